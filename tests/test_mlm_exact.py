"""Liu et al.'s masked-LM loss (every position masked in turn) against brute-force enumeration."""

import json
import os

import jax
import numpy as np
import pytest

import train
from data import hmm, mlm_exact, vocab
from data.pcfg import PCFG
from lib import errors, sharding
from lib import model as M
from tests.helpers import tiny_cfg
from tests.test_pcfg import TINY_RULES


def _brute_conditional(lang, s, i):
  """p(w_i = v | w_{-i}) by enumerating the substitutions (sentence probabilities only)."""
  subs = [np.array(list(s[:i]) + [v] + list(s[i + 1 :])) for v in range(lang.n_terminals)]
  lp = np.array(lang.log_prob(subs) if not isinstance(lang, hmm.HMM) else lang.log_prob(np.stack(subs)))
  p = np.exp(lp)
  return p / p.sum()


def _reference(model, params, lang, sents):
  """Mean expected CE and mean entropy over (sentence, position), one un-padded row at a time."""
  ces, hs = [], []
  fwd = jax.jit(lambda p, b: M.logits(model, p, b))
  for s in sents:
    framed = vocab.frame(s)
    for i in range(len(s)):
      x = framed.copy()
      x[i + 1] = vocab.MASK
      b = {"inputs": x[None], "positions": np.arange(len(x))[None], "segment_ids": np.ones((1, len(x)), np.int32)}
      lg = np.asarray(fwd(params, b)[0, i + 1], np.float64)
      logp = lg - np.log(np.exp(lg - lg.max()).sum()) - lg.max()
      p = _brute_conditional(lang, s, i)
      ces.append(-np.sum(p * logp[vocab.N_SPECIAL : vocab.N_SPECIAL + lang.n_terminals]))
      hs.append(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)))
  return float(np.mean(ces)), float(np.mean(hs))


def _model(n_terminals, mesh=None):
  cfg = M.preset("nano", vocab_size=vocab.vocab_size(n_terminals), max_len=16, causal=False)
  model = M.make(cfg)
  return model, M.init_params(model, jax.random.PRNGKey(3), mesh or sharding.single_device_mesh())


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_pcfg_matches_brute_force(mesh_shape):
  g = PCFG.from_rules(TINY_RULES)
  sents, _ = g.enumerate_sentences()
  sents = sents[:: max(1, len(sents) // 10)]  # ~10 sentences of every length
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), jax.devices()[: int(np.prod(mesh_shape))])
  model, params = _model(g.n_terminals, mesh)
  ev = mlm_exact.MaskedEval(model, g, sents, seq_len=16, batch_size=8, mesh=mesh)
  got = ev(params)
  ce, h = _reference(model, params, g, sents)
  assert got["eval/mlm_rows"] == sum(len(s) for s in sents)
  np.testing.assert_allclose(got["eval/optimal_loss"], h, rtol=1e-9)
  np.testing.assert_allclose(got["eval/mlm_loss"], ce, rtol=2e-5)
  assert got["eval/excess_loss"] > 0


@pytest.mark.slow
def test_hmm_matches_brute_force():
  lang = hmm.HMM.random(seed=1, n_states=3, n_tokens=5, length=4, transition_support=None, emission_support=None)
  toks, _ = lang.sample(12, seed=0)
  sents = [t.astype(np.int64) for t in toks]
  model, params = _model(lang.n_terminals)
  got = mlm_exact.MaskedEval(model, lang, sents, seq_len=8, batch_size=8)(params)
  ce, h = _reference(model, params, lang, sents)
  np.testing.assert_allclose(got["eval/optimal_loss"], h, rtol=1e-9)
  np.testing.assert_allclose(got["eval/mlm_loss"], ce, rtol=2e-5)


def test_exact_model_has_zero_excess():
  """Expected CE of the true conditional against itself is its entropy (the optimum)."""
  p = np.random.default_rng(0).dirichlet(np.ones(6), size=5).astype(np.float32)
  p[:, 0] = 0
  p /= p.sum(1, keepdims=True)
  logp = np.log(np.where(p > 0, p, 1e-30))
  ce = -np.sum(np.where(p > 0, p * logp, 0), -1)
  np.testing.assert_allclose(ce, mlm_exact.entropy(p), rtol=1e-6)


def test_causal_model_refused():
  g = PCFG.from_rules(TINY_RULES)
  model = M.make(M.preset("nano", vocab_size=vocab.vocab_size(g.n_terminals), max_len=16))
  with pytest.raises(errors.ConfigError, match="bidirectional"):
    mlm_exact.MaskedEval(model, g, [np.array([0, 1])], seq_len=16, batch_size=8)


@pytest.mark.slow
def test_mlm_run_logs_excess_loss(tmp_path):
  cfg = tiny_cfg(str(tmp_path / "tfds"))
  cfg.unlock()
  cfg.data.source = dict(
    kind="pcfg", seed=0, n_nonterminals=20, n_terminals=30, max_len=16, n_train=1000, n_validation=100, n_test=20, n_downstream=0
  )
  cfg.model.causal = False
  cfg.data.objective = "mlm"
  cfg.eval.mlm_sentences = 40
  cfg.train.steps = 6
  cfg.lock()
  wd = str(tmp_path / "run")
  train.train_and_evaluate(cfg, wd)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    ev = [r for r in map(json.loads, f) if "eval/excess_loss" in r]
  assert [r["step"] for r in ev] == [0, 6]
  for r in ev:
    assert r["eval/excess_loss"] > 0
    np.testing.assert_allclose(r["eval/excess_loss"], r["eval/mlm_loss"] - r["eval/optimal_loss"])
  assert ev[0]["eval/optimal_loss"] == ev[1]["eval/optimal_loss"]
