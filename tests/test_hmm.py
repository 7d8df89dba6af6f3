"""Tests for data/hmm.py against brute-force sums over every state path of tiny HMMs."""

import itertools

import numpy as np
import pytest
from scipy import stats

from data.hmm import HMM

TINY = dict(
  init_S=np.array([0.5, 0.3, 0.2]),
  trans_SxS=np.array([[0.1, 0.6, 0.3], [0.4, 0.4, 0.2], [0.7, 0.0, 0.3]]),
  emit_SxV=np.array([[0.8, 0.1, 0.1], [0.2, 0.5, 0.3], [0.0, 0.3, 0.7]]),
  length=4,
)


@pytest.fixture(scope="module")
def tiny():
  return HMM(**TINY)


@pytest.fixture(scope="module")
def brute():
  """Joint p(x, path) for every sentence x [X, L] and state path [P, L], by direct products."""
  S, V, L = 3, 3, TINY["length"]
  xs = np.array(list(itertools.product(range(V), repeat=L)))
  paths = np.array(list(itertools.product(range(S), repeat=L)))
  p_path = TINY["init_S"][paths[:, 0]] * np.prod(TINY["trans_SxS"][paths[:, :-1], paths[:, 1:]], 1)
  p_emit = np.prod(TINY["emit_SxV"][paths[None, :, :], xs[:, None, :]], -1)  # [X, P]
  joint = p_emit * p_path[None]
  return xs, paths, joint


def _px(brute):
  xs, _, joint = brute
  return {tuple(x): p for x, p in zip(xs, joint.sum(1))}


def test_validation():
  with pytest.raises(ValueError, match="trans"):
    HMM(TINY["init_S"], TINY["trans_SxS"] * 0.9, TINY["emit_SxV"], 4)
  with pytest.raises(ValueError, match="shapes"):
    HMM(TINY["init_S"], TINY["trans_SxS"][:2], TINY["emit_SxV"], 4)


def test_log_prob_and_token_logprobs_match_enumeration(tiny, brute):
  xs, _, joint = brute
  px = joint.sum(1)
  assert px.sum() == pytest.approx(1.0, abs=1e-12)
  lp = tiny.log_prob(xs)
  with np.errstate(divide="ignore"):
    np.testing.assert_allclose(lp, np.log(px), rtol=1e-12)
  tl = tiny.token_logprobs(xs)
  assert tl.shape == (len(xs), 5) and np.all(tl[:, -1] == 0.0)
  pre = {}
  for x, p in zip(xs, px):
    for k in range(5):
      pre[tuple(x[:k])] = pre.get(tuple(x[:k]), 0.0) + p
  for x, row in zip(xs, tl):
    if pre[tuple(x)] == 0:
      continue
    want = [np.log(pre[tuple(x[: k + 1])] / pre[tuple(x[:k])]) for k in range(4)]
    np.testing.assert_allclose(row[:4], want, rtol=1e-12)
  # The single-sentence form (as the data pipeline calls it: one [1, L] row).
  np.testing.assert_allclose(tiny.token_logprobs(xs[5][None]).reshape(-1), tl[5])
  np.testing.assert_allclose(tiny.token_logprobs(xs[5]), tl[5])
  with pytest.raises(ValueError, match="exactly 4"):
    tiny.token_logprobs(xs[:, :3])


def test_next_token_distributions_match_enumeration(tiny, brute):
  px = _px(brute)
  pre = {}
  for x, p in px.items():
    for k in range(5):
      pre[x[:k]] = pre.get(x[:k], 0.0) + p
  for x in list(px)[::7]:
    d = tiny.next_token_distributions(np.array(x))
    assert d.shape == (4, 3)
    np.testing.assert_allclose(d.sum(1), 1.0, atol=1e-12)
    for k in range(4):
      if pre[x[:k]] > 0:
        want = [pre[x[:k] + (v,)] / pre[x[:k]] for v in range(3)]
        np.testing.assert_allclose(d[k], want, rtol=1e-12, atol=1e-15)
  # Prefixes shorter than `length` are allowed.
  assert tiny.next_token_distributions(np.array([[0, 1]])).shape == (1, 2, 3)


def test_masked_conditionals_and_posteriors_match_enumeration(tiny, brute):
  xs, paths, joint = brute
  px = _px(brute)
  sel = [i for i in range(len(xs)) if joint[i].sum() > 0][::5]
  cond = tiny.masked_conditionals(xs[sel])
  post = tiny.posterior_states(xs[sel])
  for x, c, q, i in zip(xs[sel], cond, post, sel):
    for t in range(4):
      m = np.array([px[tuple(x[:t]) + (v,) + tuple(x[t + 1 :])] for v in range(3)])
      np.testing.assert_allclose(c[t], m / m.sum(), rtol=1e-12, atol=1e-15)
      want = np.array([joint[i][paths[:, t] == s].sum() for s in range(3)]) / joint[i].sum()
      np.testing.assert_allclose(q[t], want, rtol=1e-10, atol=1e-15)


def test_entropy_exact_and_sampled(tiny, brute):
  xs, _, joint = brute
  px = joint.sum(1)
  p = px[px > 0]
  h = -np.sum(p * np.log(p))
  cond = tiny.masked_conditionals(xs[px > 0])
  x = xs[px > 0]
  mlm = np.sum(p * -np.log(np.take_along_axis(cond, x[..., None], -1)[..., 0]).sum(1)) / 4
  e = tiny.entropy_rate(exact=True)
  assert e["sentence_entropy"] == pytest.approx(h, rel=1e-12)
  assert e["causal_loss"] == pytest.approx(h / 5, rel=1e-12)  # EOS is the 5th, free, prediction
  assert e["causal_loss_per_word"] == pytest.approx(h / 4, rel=1e-12)
  assert e["mlm_loss"] == pytest.approx(mlm, rel=1e-12)
  est = tiny.entropy_rate(n_samples=4000, seed=1)
  for k in ("causal_loss", "mlm_loss"):
    assert 0 < est[k + "_se"] < 0.05
    assert abs(est[k] - e[k]) < 4 * est[k + "_se"], (k, est[k], e[k])


def test_sample_chi2(tiny):
  tok, st = tiny.sample(20000, seed=0)
  assert tok.shape == st.shape == (20000, 4) and tok.dtype == st.dtype == np.int32

  def check(counts, probs):
    mask = probs > 0
    assert np.all(counts[~mask] == 0)  # impossible events never happen
    return stats.chisquare(counts[mask], probs[mask] * counts.sum()).pvalue

  assert check(np.bincount(st[:, 0], minlength=3), TINY["init_S"]) > 1e-3
  trans = np.zeros((3, 3))
  np.add.at(trans, (st[:, :-1].ravel(), st[:, 1:].ravel()), 1)
  emit = np.zeros((3, 3))
  np.add.at(emit, (st.ravel(), tok.ravel()), 1)
  for s in range(3):
    assert check(trans[s], TINY["trans_SxS"][s]) > 1e-3
    assert check(emit[s], TINY["emit_SxV"][s]) > 1e-3
  a, _ = tiny.sample(100, seed=0)
  b, _ = tiny.sample(100, seed=0)
  assert np.array_equal(a, b) and not np.array_equal(a, tiny.sample(100, seed=1)[0])


def test_hidden_state_labels():
  st = np.arange(32).reshape(2, 16)
  assert HMM.hidden_state_labels(st, 6).tolist() == [5, 21]
  assert HMM.hidden_state_labels(st, 10).tolist() == [9, 25]
  with pytest.raises(ValueError):
    HMM.hidden_state_labels(st, 0)


def test_default_hmm():
  h = HMM.random(seed=0)
  assert (h.n_states, h.n_tokens, h.n_terminals, h.length) == (100, 200, 200, 16)
  assert np.all((h.trans_SxS > 0).sum(1) == 10) and np.all((h.emit_SxV > 0).sum(1) == 20)
  assert HMM.random(seed=0, n_terminals=50).n_tokens == 50
  assert np.array_equal(HMM.random(seed=0).trans_SxS, h.trans_SxS)
  tok, st = h.sample(500, seed=3)
  assert tok.shape == (500, 16) and tok.max() < 200 and st.max() < 100
  tl = h.token_logprobs(tok)
  assert tl.shape == (500, 17) and np.all(np.isfinite(tl)) and np.all(tl[:, -1] == 0)
  np.testing.assert_allclose(h.next_token_distributions(tok[:5]).sum(-1), 1.0, atol=1e-12)
  np.testing.assert_allclose(h.masked_conditionals(tok[:5]).sum(-1), 1.0, atol=1e-12)
  # The true states are typically likely under the posterior (sanity of forward-backward).
  post = h.posterior_states(tok)
  assert np.mean(np.take_along_axis(post, st[..., None].astype(int), -1)) > 0.2
  e = h.entropy_rate(n_samples=500, seed=0)
  assert np.isfinite(e["causal_loss"]) and 0 < e["causal_loss"] < np.log(200)
  assert 0 < e["mlm_loss"] < e["causal_loss_per_word"]
  d = h.describe(n_samples=0)
  assert d["n_states"] == 100 and d["mean_emission_entropy"] < np.log(20) + 1e-9
