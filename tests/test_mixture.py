"""Data-mixing methods (lib/mixture.py, lib/steps.py's reweighting step) and mixing laws (lib/mixing_laws.py).

Known answers: one hand-computed round of every method's update; the on-device DoReMi/DoGE steps
against gradients computed independently; planted mixing laws recovered; vmapped branches equal
sequential ones; bit-identical resume for every controller; bad input is one clear error.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from data import pipeline as dp
from lib import errors, mixing_laws, mixture, sharding, steps
from lib import model as M


def _mcfg(**kw):
  base = dict(
    method="stratified",
    proportions="",
    update_steps=20,
    lp_rounds=1,
    lp_steps=1,
    one_hot_factor=0.75,
    eta=1.0,
    ema=0.0,
    prior="",
    prior_steps=0,
    window=3,
    graph="",
    reference="",
    mu=0.01,
    smoothing=1e-3,
  )
  base.update(kw)
  return mlc.ConfigDict(base)


# ---------------------------------------------------------------- Aioli


def _aioli_round(c, st, start, ell0, drops):
  """Feeds one round's evaluations: ℓ⁰ at `start`, then ℓ drops by drops[j] after probing group j."""
  st = c.update(st, start, {"eval/group_loss": np.asarray(ell0)})
  ell = np.asarray(ell0, np.float64)
  for k in range(c.R * c.m):
    t = start + (k + 1) * c.s
    _, _, j = c._phase(t - 1)
    ell = ell - np.asarray(drops[j])
    st = c.update(st, t, {"eval/group_loss": ell})
  return st


def test_aioli_hand_computed_round():
  c = mixture.make(_mcfg(method="aioli", update_steps=4, lp_rounds=1, lp_steps=1, one_hot_factor=0.75, eta=1.0), ["a", "b"])
  # probing group 0 lowers the losses by (0.2, 0.1), probing group 1 by (0.05, 0.3): G = [[.2, .05], [.1, .3]]
  st = _aioli_round(c, c.init(), 0, [3.0, 3.0], {0: [0.2, 0.1], 1: [0.05, 0.3]})
  # W = [[.75, .25], [.25, .75]], W⁻¹ = [[1.5, -.5], [-.5, 1.5]]; Â rows = W⁻¹ G[i, :]:
  # [0.275, -0.025], [0, 0.4]; shift by 0.025 -> [[.3, 0], [.025, .425]]; / 0.75
  A = np.array([[0.3, 0.0], [0.025, 0.425]]) / 0.75
  np.testing.assert_allclose(st["A"], A, rtol=1e-5, atol=1e-7)
  # p = softmax(log(1/2) + η·1ᵀÂ) with column sums (13/30, 17/30)
  p0 = 1 / (1 + np.exp(4 / 30))
  np.testing.assert_allclose(st["p"], [p0, 1 - p0], rtol=1e-5)
  assert int(st["rounds"]) == 1
  fields = c.log_fields(st)
  assert abs(fields["mixture/A/b/b"] - 0.425 / 0.75) < 1e-6 and len(fields) == 4
  # a second, identical round multiplies again (cumulative): p ∝ exp(2·η·1ᵀÂ)
  st = _aioli_round(c, st, 4, [2.0, 2.0], {0: [0.2, 0.1], 1: [0.05, 0.3]})
  p0 = 1 / (1 + np.exp(8 / 30))
  np.testing.assert_allclose(st["p"], [p0, 1 - p0], rtol=1e-5)


def test_aioli_branch_mode_round_equals_the_chained_round_on_the_same_drops():
  drops = {0: [0.2, 0.1], 1: [0.05, 0.3]}
  for R in (1, 2):
    kw = dict(method="aioli", update_steps=8, lp_rounds=R, lp_steps=1, one_hot_factor=0.75, eta=1.0)
    chained = mixture.make(_mcfg(**kw), ["a", "b"], seed=3)
    st_c = _aioli_round(chained, chained.init(), 0, [3.0, 3.0], drops)
    c = mixture.make(_mcfg(lp_branches="vmap", **kw), ["a", "b"], seed=3)
    assert c.wants_eval(c.init(), 0) and not c.wants_eval(c.init(), 1)  # one evaluation per round
    assert np.allclose(c.proportions(c.init(), 1), 0.5)  # no q^(j) sub-phases in the run itself
    # branch k (group perm[k]) forked from ℓ⁰ ends at ℓ⁰ − drops[perm[k]]: G = R·drops, Â as chained
    branch = np.array([3.0 - np.asarray(drops[int(j)]) for j in c.permutation(0)])
    st = c.update(c.init(), 0, {"eval/group_loss": np.array([3.0, 3.0]), "branch/group_loss": branch})
    for k in ("A", "p", "rounds"):
      np.testing.assert_allclose(st[k], st_c[k], rtol=1e-6, atol=1e-7)
  with pytest.raises(errors.ConfigError, match="lp_branches"):
    mixture.make(_mcfg(method="aioli", lp_branches="gpu"), ["a", "b"])


def test_aioli_ema_rounds():
  c = mixture.make(_mcfg(method="aioli", update_steps=4, lp_rounds=1, lp_steps=1, eta=1.0, ema=0.5), ["a", "b"])
  st = _aioli_round(c, c.init(), 0, [3.0, 3.0], {0: [0.2, 0.1], 1: [0.05, 0.3]})
  # round 1: Ā¹ = Â¹ (the released EMA starts from Â itself, not from 0), p ∝ exp(η·1ᵀĀ) with 1ᵀÂ¹ = (13/30, 17/30)
  p0 = 1 / (1 + np.exp(4 / 30))
  np.testing.assert_allclose(st["p"], [p0, 1 - p0], rtol=1e-5)
  # round 2: probing group 0 lowers (0.4, 0), group 1 (0, 0.1): G = [[.4, 0], [0, .1]]; Â rows = W⁻¹G[i, :]:
  # [0.6, -0.2], [-0.05, 0.15]; shift by 0.2 -> [[.8, 0], [.15, .35]] / 1.3; 1ᵀÂ² = (0.95, 0.35)/1.3
  st = _aioli_round(c, st, 4, [2.0, 2.0], {0: [0.4, 0.0], 1: [0.0, 0.1]})
  A2 = np.array([[0.8, 0.0], [0.15, 0.35]]) / 1.3
  np.testing.assert_allclose(st["A"], A2, rtol=1e-5, atol=1e-7)
  # Ā² = 0.5·Â² + 0.5·Ā¹; p ∝ exp(η·1ᵀĀ²) (not cumulative)
  col = 0.5 * np.array([0.95, 0.35]) / 1.3 + 0.5 * np.array([13, 17]) / 30
  p0 = 1 / (1 + np.exp(col[1] - col[0]))
  np.testing.assert_allclose(st["p"], [p0, 1 - p0], rtol=1e-5)


def test_aioli_restricted_mode_with_ema_keeps_the_prior_in_every_round():
  kw = dict(method="aioli", update_steps=4, lp_rounds=1, lp_steps=1, eta=1.0, ema=0.1)
  drops = [{0: [0.2, 0.1], 1: [0.05, 0.3]}, {0: [0.4, 0.0], 1: [0.0, 0.1]}, {0: [0.1, 0.1], 1: [0.1, 0.2]}]
  ps = {}
  for name, extra in (("prior", dict(prior="a=0.7,b=0.3", prior_steps=2)), ("none", {})):
    c = mixture.make(_mcfg(**kw, **extra), ["a", "b"])
    st, bars = c.init(), []
    for r, d in enumerate(drops):
      st = _aioli_round(c, st, c.P + 4 * r, [3.0 - r, 3.0 - r], d)
      A = np.asarray(st["A"], np.float64)
      bars.append(A if r == 0 else 0.9 * A + 0.1 * bars[-1])  # Ā¹ = Â¹, Āᵗ = (1−γ)Âᵗ + γĀᵗ⁻¹
      q = (np.array([0.7, 0.3]) if name == "prior" else np.full(2, 0.5)) * np.exp(bars[-1].sum(0))
      np.testing.assert_allclose(st["p"], q / q.sum(), rtol=1e-5)  # p ∝ p⁰ ⊙ exp(η·1ᵀĀᵗ) in every round
    ps[name] = np.asarray(st["p"])
  assert abs(ps["prior"][0] - ps["none"][0]) > 0.1  # the prior still counts after 3 rounds


def test_aioli_permutation_depends_on_the_run_seed():
  cfg = _mcfg(method="aioli", update_steps=100, lp_rounds=4, lp_steps=1)
  perms = []
  for seed in (0, 1):
    c = mixture.make(cfg, list("abcd"), seed=seed)
    perms.append([c._phase(t)[2] for t in range(16)])
    assert sorted(perms[-1]) == sorted(list(range(4)) * 4)
  assert perms[0] != perms[1]
  c0 = mixture.make(cfg, list("abcd"), seed=0)
  assert perms[0] == [c0._phase(t)[2] for t in range(16)]  # deterministic per seed


def test_aioli_restricted_mode_starts_from_the_prior():
  c = mixture.make(
    _mcfg(method="aioli", update_steps=4, lp_rounds=1, lp_steps=1, prior="a=0.8,b=0.2", prior_steps=3, eta=1.0), ["a", "b"]
  )
  st = c.init()
  np.testing.assert_allclose(st["p"], [0.8, 0.2], rtol=1e-6)
  assert [t for t in range(12) if c.wants_eval(st, t)] == [3, 4, 5, 7, 8, 9, 11]
  for t in range(3):
    np.testing.assert_allclose(c.proportions(st, t), [0.8, 0.2])
  assert c.proportions(st, 3).max() == 0.75  # LearnParams starts at prior_steps
  # under mixture.rows='sampled' exactly the LearnParams steps keep exact counts (as the released trainer does)
  assert [t for t in range(12) if c.exact_rows(t)] == [3, 4, 7, 8, 11]
  assert not any(mixture.make(_mcfg(method="stratified"), ["a", "b"]).exact_rows(t) for t in range(12))
  st = _aioli_round(c, st, 3, [3.0, 3.0], {0: [0.2, 0.1], 1: [0.05, 0.3]})
  # p = prior ⊙ exp(η·1ᵀÂ), renormalised (the dynamic stage adjusts the prior)
  q = np.array([0.8, 0.2]) * np.exp([13 / 30, 17 / 30])
  np.testing.assert_allclose(st["p"], q / q.sum(), rtol=1e-5)
  np.testing.assert_allclose(c.proportions(st, 6), q / q.sum(), rtol=1e-5)


# ---------------------------------------------------------------- Skill-It


def test_skills_graph_from_one_hot_runs():
  L0 = np.array([4.0, 2.0])
  L1 = np.array([[3.0, 1.8], [3.6, 1.0]])  # row i: losses after training on group i
  np.testing.assert_allclose(mixture.skills_graph(L0, L1), [[0.25, 0.1], [0.1, 0.5]])


def test_skillit_hand_computed_updates():
  c = mixture.make(
    _mcfg(method="skillit", graph="0.5,0.1;0.2,0.4", eta=0.2, window=2, update_steps=5, skillit_form="fresh"), ["a", "b"]
  )
  st = c.init()
  assert [t for t in range(12) if c.wants_eval(st, t)] == [0, 5, 10]
  st = c.update(st, 0, {"eval/group_loss": np.array([3.0, 2.0])})
  # logits = 0.2·A·[3, 2] = 0.2·[1.7, 1.4]
  p0 = 1 / (1 + np.exp(0.2 * (1.4 - 1.7)))
  np.testing.assert_allclose(st["p"], [p0, 1 - p0], rtol=1e-5)
  st = c.update(st, 5, {"eval/group_loss": np.array([2.0, 1.0])})
  # window 2: S = [5, 3]; logits = 0.2·[2.8, 2.2] (restarts from uniform: not cumulative)
  p0 = 1 / (1 + np.exp(0.2 * (2.2 - 2.8)))
  np.testing.assert_allclose(st["p"], [p0, 1 - p0], rtol=1e-5)
  st = c.update(st, 10, {"eval/group_loss": np.array([1.0, 1.0])})
  # the oldest evaluation ([3, 2]) left the window: S = [3, 2]
  p0 = 1 / (1 + np.exp(0.2 * (1.4 - 1.7)))
  np.testing.assert_allclose(st["p"], [p0, 1 - p0], rtol=1e-5)
  np.testing.assert_allclose(c.proportions(st, 11), st["p"])


def test_skillit_released_form_stale_window_over_updates():
  """The released trainer's form: evaluate every E = 2 steps, update every U = 4 from the last w = 2
  evaluations taken before the update step; p¹ ∝ exp(η·A·1); the off-diagonal 1 becomes 0.5."""
  c = mixture.make(_mcfg(method="skillit", graph="0.5,1;0.2,0.4", eta=0.2, window=2, update_steps=4, eval_every=2), ["a", "b"])
  A = np.array([[0.5, 0.5], [0.2, 0.4]])
  np.testing.assert_allclose(c.A, A)

  def p_of(logits):
    return np.exp(logits) / np.exp(logits).sum()

  st = c.init()
  np.testing.assert_allclose(st["p"], p_of(0.2 * A @ np.ones(2)), rtol=1e-6)  # logits 0.2·(1.0, 0.6)
  assert [t for t in range(10) if c.wants_eval(st, t)] == [0, 2, 4, 6, 8]
  losses = {0: [3.0, 2.0], 2: [2.5, 1.5], 4: [2.0, 1.0], 6: [1.5, 1.0], 8: [1.0, 0.5]}
  expect = {
    0: 0.2 * A @ np.ones(2),  # evaluations only: p stays
    2: 0.2 * A @ np.ones(2),
    4: 0.2 * A @ np.array([5.5, 3.5]),  # evaluations at 0 and 2 (not the one at 4): logits 0.2·(4.5, 2.5)
    6: 0.2 * A @ np.array([5.5, 3.5]),
    8: 0.2 * A @ np.array([3.5, 2.0]),  # evaluations at 4 and 6: 0.2·(2.75, 1.5)
  }
  for t, ell in losses.items():
    st = c.update(st, t, {"eval/group_loss": np.array(ell)})
    np.testing.assert_allclose(st["p"], p_of(expect[t]), rtol=1e-5, err_msg=f"step {t}")
    np.testing.assert_allclose(c.proportions(st, t + 1), st["p"])
  fresh = mixture.make(_mcfg(method="skillit", graph="0.5,1;0.2,0.4", update_steps=4, skillit_form="fresh"), ["a", "b"])
  assert fresh.A[0, 1] == 1.0 and np.allclose(fresh.init()["p"], 0.5)  # the fresh form keeps the graph and starts uniform
  with pytest.raises(errors.ConfigError, match="eval_every=3 must divide update_steps=4"):
    mixture.make(_mcfg(method="skillit", graph="0.5,1;0.2,0.4", update_steps=4, eval_every=3), ["a", "b"])
  with pytest.raises(errors.ConfigError, match="skillit_form"):
    mixture.make(_mcfg(method="skillit", graph="0.5,1;0.2,0.4", skillit_form="paper"), ["a", "b"])


# ---------------------------------------------------------------- DoReMi / DoGE updates


def test_doremi_hand_computed_update():
  logw, w = steps.doremi_weights(jnp.zeros(2), jnp.array([3.0, 2.0]), jnp.array([2.5, 2.5]), mu=0.1, eps=0.01)
  # excess = (0.5, 0) -> softmax(0 + 0.1·(0.5, 0)) = softmax(0.05, 0); w = 0.99·softmax + 0.005
  s0 = 1 / (1 + np.exp(-0.05))
  np.testing.assert_allclose(w, [0.99 * s0 + 0.005, 0.99 * (1 - s0) + 0.005], rtol=1e-6)
  np.testing.assert_allclose(logw, np.log(w), rtol=1e-6)  # the state carries log of the smoothed w (fed back next step)


def test_doremi_feeds_the_smoothed_weights_back_over_steps():
  """Two steps, m = 2, excess (1, 0) twice, μ = 1, ε = 0.1, by hand from α_t = (1−ε)·normalise(α_{t−1}·e^{μλ}) + ε/m:
  step 1: softmax(1, 0) = (0.7311, 0.2689) -> α_1 = (0.7080, 0.2920); step 2: 0.7080·e / (0.7080·e + 0.2920) = 0.8683
  -> α_2 = 0.9·0.8683 + 0.05 = 0.8314. (Accumulating unsmoothed log-weights gave 0.8427.)"""
  logw, w = jnp.zeros(2), None
  for _ in range(2):
    logw, w = steps.doremi_weights_from_excess(logw, jnp.array([1.0, 0.0]), 1.0, 0.1)
  np.testing.assert_allclose(w, [0.8314, 0.1686], atol=1e-4)
  a = np.array([0.5, 0.5])
  for _ in range(2):  # the same recursion in numpy
    a = a * np.exp([1.0, 0.0])
    a = 0.9 * a / a.sum() + 0.05
  np.testing.assert_allclose(w, a, rtol=1e-6)

  # 10k steps at μ = 0.01, ε = 1e-3, constant excess (0.5, 0): the weights saturate at
  # α = 0.999·αe^{0.005}/(αe^{0.005} + 1 − α) + 0.0005 near 0.9; their average over training is [0.899, 0.101]
  # (unsmoothed accumulation: [0.986, 0.014])
  def body(lw, _):
    lw, w = steps.doremi_weights_from_excess(lw, jnp.array([0.5, 0.0]), 0.01, 1e-3)
    return lw, w

  _, ws = jax.lax.scan(body, jnp.zeros(2), None, length=10_000)
  np.testing.assert_allclose(np.asarray(ws).mean(0), [0.899, 0.101], atol=2e-3)


def test_doge_hand_computed_update():
  g = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  logw, w = steps.doge_weights(jnp.zeros(2), g, 0.1, mu=1.0)
  # g_val = (0.5, 1); ⟨g_i, g_val⟩ = (0.5, 2); mean norm 1.5; s = 0.1·(0.5, 2)/1.5 (under the 5·lr clip)
  np.testing.assert_allclose(logw, [0.1 * 0.5 / 1.5, 0.1 * 2 / 1.5], rtol=1e-6)
  np.testing.assert_allclose(w, jax.nn.softmax(jnp.array([0.1 / 3, 0.4 / 3])), rtol=1e-6)
  logw, _ = steps.doge_weights(jnp.zeros(2), jnp.array([[2.0, 0.0], [-1.0, 0.0]]), 0.1, mu=1.0)
  assert float(logw[1]) == 0.0  # negative alignment clipped at 0
  logw, _ = steps.doge_weights(jnp.zeros(2), jnp.array([[100.0, 0.0], [0.0, 0.01]]), 0.1, mu=1.0)
  assert abs(float(logw[0]) - 0.5) < 1e-6  # clipped at 5·lr


def _tiny(seed=0):
  cfg = M.preset("nano", vocab_size=24, max_len=16)
  model = M.make(cfg)

  params = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  rng = np.random.default_rng(seed)
  x = rng.integers(4, 24, (8, 16)).astype(np.int32)
  batch = {
    "inputs": x,
    "targets": np.roll(x, -1, 1),
    "mask": (rng.random((8, 16)) < 0.8).astype(np.int32),
    "segment_ids": np.ones_like(x),
    "positions": np.broadcast_to(np.arange(16, dtype=np.int32), x.shape).copy(),
    "group": np.array([0, 1, 1, 0, 1, 0, 0, 1], np.int32),
  }
  return model, params, jax.tree.map(jnp.asarray, batch)


def _group_loss_fn(model, params, batch, g):
  loss = M.per_token_loss(model, params, batch)
  sel = (batch["group"] == g).astype(jnp.float32)[:, None] * batch["mask"]
  return (loss * sel).sum() / sel.sum()


def test_doge_released_clipping_over_steps():
  """The released trainer clips each per-group gradient and the validation gradient to norm 1 before the
  inner products: g = ((3, 4), (0, 0.5)) -> ((0.6, 0.8), (0, 0.5)) (scales 0.2, 1); g_val (0, 2) -> (0, 1);
  scores (0.8, 0.5), mean norm 0.75, s = 0.1·(0.8, 0.5)/0.75; two identical steps add s/μ twice."""
  g, g_val = jnp.array([[3.0, 4.0], [0.0, 0.5]]), jnp.array([0.0, 2.0])
  gc, scale = steps.clip_rows(g, 1.0)
  np.testing.assert_allclose(scale, [0.2, 1.0], rtol=1e-6)
  vc = steps.clip_rows(g_val[None], 1.0)[0][0]
  logw = jnp.zeros(2)
  for _ in range(2):
    logw, w = steps.doge_weights(logw, gc, 0.1, mu=1.0, g_val_P=vc)
  s = 0.1 * np.array([0.8, 0.5]) / 0.75
  np.testing.assert_allclose(logw, 2 * s, rtol=1e-5)
  np.testing.assert_allclose(w, np.exp(2 * s) / np.exp(2 * s).sum(), rtol=1e-5)
  unclipped, _ = steps.doge_weights(jnp.zeros(2), g, 0.1, mu=1.0, g_val_P=g_val)
  np.testing.assert_allclose(unclipped, 0.1 * np.array([8.0, 1.0]) / 2.75, rtol=1e-5)  # the unclipped form differs
  assert steps.clip_rows(g, 0.0)[0] is g  # 0 = off
  assert mixture.make(_mcfg(method="doge"), ["a", "b"]).clip == 1.0  # the released form is the default
  with pytest.raises(errors.ConfigError, match="doge_clip"):
    mixture.make(_mcfg(method="doge", doge_clip=-1.0), ["a", "b"])


def test_doge_hand_computed_update_with_a_validation_gradient():
  g = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  g_val = jnp.array([-1.0, 3.0])  # a held-out batch's gradient, not the training groups' mean
  logw, w = steps.doge_weights(jnp.array([0.5, 0.0]), g, 0.1, mu=0.5, g_val_P=g_val)
  # ⟨g_i, g_val⟩ = (−1, 6); mean norm 1.5; s = clip(0.1·(−1, 6)/1.5, 0, 0.5) = (0, 0.4); log w += s/0.5
  np.testing.assert_allclose(logw, [0.5, 0.8], rtol=1e-6)
  np.testing.assert_allclose(w, [1 / (1 + np.exp(0.3)), 1 - 1 / (1 + np.exp(0.3))], rtol=1e-6)


def test_doremi_per_token_excess_hand_computed():
  loss = jnp.array([[2.0, 1.0, 5.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
  ref = jnp.array([[1.0, 2.0, 0.0], [0.5, 3.0, 0.0], [1.0, 0.0, 0.0]])
  batch = {"mask": jnp.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]]), "group": jnp.array([0, 1, 0])}
  # group 0: tokens (2−1)+, (1−2)+, (3−1)+ -> (1 + 0 + 2)/3 = 1; the masked 5 is ignored
  # group 1: (0.5 + 0 + 1)/3 = 0.5 (per-token clipping, unlike max(mean ℓ − mean ℓ_ref, 0) = 0)
  np.testing.assert_allclose(steps.group_excess(loss, ref, batch, 3), [1.0, 0.5, 0.0], rtol=1e-6)


@pytest.mark.parametrize("method", ["doremi", "doremi_per_token", "doge", "doge_clip"])
def test_reweighting_step_matches_independent_gradients(method):
  model, params, batch = _tiny()
  lr = 0.1
  tx = optax.sgd(lr)
  mode = method.removesuffix("_per_token").removesuffix("_clip")
  clip = 0.05 if method == "doge_clip" else 0.0  # small enough that every gradient here is clipped
  c = mixture.make(_mcfg(method=mode, reference="a=3.0,b=3.2", mu=0.5), ["a", "b"])
  mix = jax.tree.map(jnp.asarray, c.init())
  mix["logw"] = jnp.array([0.3, -0.2])
  mix["w"] = jax.nn.softmax(mix["logw"])
  state = {
    "params": params,
    "opt_state": tx.init(params),
    "step": jnp.zeros((), jnp.int32),
    "rng": jax.random.PRNGKey(0),
    "mixture": mix,
  }
  fn = jax.jit(
    functools.partial(
      steps.mixing_train_step,
      model=model,
      tx=tx,
      schedule=lambda s: lr,
      num_groups=2,
      mode=mode,
      mu=0.5,
      eps=1e-3,
      doge_clip=clip,
    )
  )
  # extra inputs: a validation batch (other rows, other group layout) and a reference model's params
  _, _, val = _tiny(seed=1)
  val = dict(val, group=jnp.array([1, 1, 0, 0, 1, 0, 1, 1], jnp.int32))
  ref_params = M.init_params(model, jax.random.key(7), sharding.single_device_mesh())
  extra = {"doge": {"val": val}, "doge_clip": {"val": val}, "doremi_per_token": {"ref_params": ref_params}}.get(method, {})
  new, m = fn(state, dict(batch, **extra))
  vg = jax.jit(jax.value_and_grad(lambda p, b, g: _group_loss_fn(model, p, b, g)))
  gl, grads = zip(*(vg(params, batch, g) for g in (0, 1)))
  gl = np.array(gl)
  np.testing.assert_allclose(m["train/group_loss"], gl, rtol=1e-5)
  if method == "doremi":  # w moves with the excess loss; the just-updated w_t weights the loss (DoReMi's Alg. 1)
    logw, w_new = steps.doremi_weights(mix["logw"], jnp.asarray(gl), jnp.array([3.0, 3.2]), 0.5, 1e-3)
    w_used = np.asarray(w_new)
    assert not np.allclose(w_used, mix["w"], atol=1e-3)
  elif method == "doremi_per_token":  # excess from per-token losses of proxy and reference, brute force in numpy
    lp, lr_ = (np.asarray(M.per_token_loss(model, p, batch), np.float64) for p in (params, ref_params))
    mask, grp = np.asarray(batch["mask"]), np.asarray(batch["group"])
    excess = np.zeros(2)
    for gi in range(2):
      toks = [(b, t) for b in range(8) for t in range(16) if grp[b] == gi and mask[b, t]]
      excess[gi] = sum(max(lp[b, t] - lr_[b, t], 0.0) for b, t in toks) / len(toks)
    assert excess.min() > 0 and not np.allclose(excess, np.maximum(gl - np.array([3.0, 3.2]), 0))
    np.testing.assert_allclose(m["mixture/excess"], excess, rtol=1e-4)
    z = np.asarray(mix["logw"]) + 0.5 * excess  # log of the previous weights + μ·excess
    w_new = 0.999 * np.exp(z) / np.exp(z).sum() + 0.0005
    logw, w_used = np.log(w_new), w_new  # the state keeps log of the smoothed w_t, which weights the loss
  else:  # the new w weights the per-group gradients; the target is the validation batch's gradient
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(np.float64) for g in grads]
    vals = [vg(params, val, g) for g in (0, 1)]
    g_val = np.mean([np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for _, g in vals], axis=0).astype(np.float64)
    scale = np.ones(2)
    if clip:  # the released form: every gradient clipped to norm `clip` first
      scale = np.array([min(1.0, clip / np.linalg.norm(x)) for x in flat])
      assert scale.max() < 1 and np.linalg.norm(g_val) > clip
      flat = [x * c for x, c in zip(flat, scale)]
      g_val = g_val * clip / np.linalg.norm(g_val)
    np.testing.assert_allclose(m["mixture/val_loss"], [v for v, _ in vals], rtol=1e-5)
    norm_mean = np.mean([np.linalg.norm(x) for x in flat])
    s = np.clip(lr * np.array([x @ g_val for x in flat]) / norm_mean, 0, 5 * lr)
    assert not np.allclose(s, np.clip(lr * np.array([x @ np.mean(flat, 0) for x in flat]) / norm_mean, 0, 5 * lr))
    logw = np.asarray(mix["logw"]) + s / 0.5
    w_new = np.exp(logw) / np.exp(logw).sum()
    w_used = np.asarray(w_new) * scale  # the (clipped) per-group gradients, weighted
  np.testing.assert_allclose(new["mixture"]["logw"], logw, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["mixture"]["w"], w_new, rtol=1e-5)
  np.testing.assert_allclose(new["mixture"]["w_sum"], np.asarray(w_new), rtol=1e-5)
  assert int(new["mixture"]["n"]) == 1
  expect = jax.tree.map(lambda p, a, b: p - lr * (w_used[0] * a + w_used[1] * b), params, grads[0], grads[1])
  for x, y in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(expect)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  if mode == "doge":
    with pytest.raises(ValueError, match="needs batch\\['val'\\]"):
      fn(state, batch)


def test_average_weights():
  st = {"w_sum": np.array([1.2, 0.8]), "n": np.array(2)}
  np.testing.assert_allclose(mixture.DoReMi.average_weights(st), [0.6, 0.4])


# ---------------------------------------------------------------- mixing laws


def test_dirichlet_cover_spreads_over_the_simplex():
  X = mixing_laws.dirichlet_cover(3, 10, seed=0)
  assert X.shape == (10, 3) and np.all(X >= 0)
  np.testing.assert_allclose(X.sum(1), 1.0)
  np.testing.assert_array_equal(X, mixing_laws.dirichlet_cover(3, 10, seed=0))
  # covers better than 10 plain Dirichlet draws: a smaller worst distance to a dense test set
  T = np.random.default_rng(9).dirichlet(np.ones(3), 2000)

  def worst(S):
    return np.sqrt(((T[:, None] - S[None]) ** 2).sum(-1)).min(1).max()

  plain = [worst(np.random.default_rng(s).dirichlet(np.ones(3), 10)) for s in range(5)]
  assert worst(X) < np.median(plain)


def test_static_law_fit_recovers_planted_parameters_and_choose_p():
  rng = np.random.default_rng(0)
  m = 3
  c, b = np.array([2.0, 3.0, 2.5]), np.array([1.5, 1.0, 2.0])
  A = rng.normal(0, 1.5, (m, m)) + 2 * np.eye(m)
  P = mixing_laws.dirichlet_cover(m, 20, seed=1)
  L = mixing_laws.static_law(P, c, b, A)
  fit = mixing_laws.fit_static_law(P, L)
  assert fit["mse"] < 1e-8 and fit["r2"] > 0.9999
  np.testing.assert_allclose(fit["c"], c, atol=2e-2)
  np.testing.assert_allclose(mixing_laws.centre_rows(fit["A"]), mixing_laws.centre_rows(A), atol=5e-2)
  Q = np.random.default_rng(5).dirichlet(np.ones(m), 50)  # held-out mixtures
  np.testing.assert_allclose(
    mixing_laws.static_law(Q, fit["c"], fit["b"], fit["A"]), mixing_laws.static_law(Q, c, b, A), atol=1e-3
  )
  # choose_p against brute force on a fine simplex grid
  p = mixing_laws.choose_p(fit)
  k = 200
  grid = np.array([(i / k, j / k, (k - i - j) / k) for i in range(k + 1) for j in range(k + 1 - i)])
  avg = mixing_laws.static_law(grid, c, b, A).mean(1)
  assert mixing_laws.static_law(p, c, b, A).mean() <= avg.min() + 1e-4


def test_dynamic_law_fit_recovers_planted_A_and_resists_an_outlier():
  rng = np.random.default_rng(1)
  m, K = 3, 11
  A = np.abs(rng.normal(0.05, 0.03, (m, m)))
  ell = np.array([3.0, 2.5, 4.0])
  P = np.vstack([np.eye(m), rng.dirichlet(np.ones(m), K - m)])
  L = ell[None, :] - P @ A.T
  fit = mixing_laws.fit_dynamic_law(ell, P, L)
  np.testing.assert_allclose(fit["A"], A, atol=1e-6)
  assert fit["mse"] < 1e-12
  L_bad = L.copy()
  L_bad[5, 0] += 1.0  # one diverged branch
  huber = mixing_laws.fit_dynamic_law(ell, P, L_bad)["A"]
  lstsq = (np.linalg.lstsq(P, ell[None, :] - L_bad, rcond=None)[0]).T
  assert np.abs(huber - A).max() < np.abs(lstsq - A).max() / 3


def test_fidelity_known_values():
  A = np.array([[1.0, 0.0, 2.0], [0.0, 2.0, 1.0]])  # column sums (1, 2, 3)
  assert abs(mixing_laws.fidelity(A, A) - 1.0) < 1e-12
  R = np.array([[3.0, 2.0, 1.0]])  # column sums (3, 2, 1): cos = 10/14, Spearman = -1
  assert abs(mixing_laws.fidelity(A, R) - (0.5 * 10 / 14 - 0.5)) < 1e-12


def test_implied_A_of_every_method_and_fidelity_on_a_planted_law():
  from experiments.aioli_fidelity import branch_mixtures

  # Planted: per-group quadratic losses ℓ_i(θ) = ½‖θ − c_i‖²; one SGD step of size lr on mixture p moves
  # ℓ_i by −lr·Σ_j p_j ⟨g_i, g_j⟩ + O(lr²): the dynamic law holds with A⋆_ij = lr·⟨g_i, g_j⟩.
  rng = np.random.default_rng(0)
  m, lr = 3, 1e-4
  c = rng.normal(size=(m, 6)) * np.array([[0.5], [1.0], [2.0]])
  g = -c  # ∇ℓ_i at θ = 0
  ell = 0.5 * (c**2).sum(1)
  P = branch_mixtures(m)
  L = np.stack([0.5 * (((-lr * p @ g)[None, :] - c) ** 2).sum(1) for p in P])
  A_true = mixing_laws.fit_dynamic_law(ell, P, L, delta=1e-6)["A"]
  np.testing.assert_allclose(A_true, lr * g @ g.T, rtol=1e-2, atol=1e-9)
  # DoGE: scores ⟨g_j, g_val⟩ with g_val the mean validation gradient -> column sums m·⟨g_j, g_val⟩ = 1ᵀ(g gᵀ)
  A_doge = mixing_laws.implied_A("doge", doge_score=g @ g.mean(0))
  np.testing.assert_allclose(A_doge.sum(0), (g @ g.T).sum(0), rtol=1e-9)
  assert mixing_laws.fidelity(A_doge, A_true) > 0.999
  # DoReMi: diag(excess); excesses ranked like the true column sums agree, reversed ones do not
  col = A_true.sum(0)
  np.testing.assert_allclose(mixing_laws.implied_A("doremi", excess=[0.1, 0.0, 0.3]), np.diag([0.1, 0.0, 0.3]))
  assert mixing_laws.fidelity(mixing_laws.implied_A("doremi", excess=col / col.sum()), A_true) > 0.999
  rev = np.sort(col)[::-1][np.argsort(np.argsort(col))]  # the same values, ranks reversed
  assert mixing_laws.fidelity(mixing_laws.implied_A("doremi", excess=rev), A_true) < 0.5
  # Skill-It, hand-computed: A_ji = graph[i, j]·S_j, so 1ᵀA = graph @ S (its update's logits / η)
  graph, S = np.array([[0.5, 0.1, 0.0], [0.2, 0.4, 0.1], [0.0, 0.3, 0.6]]), np.array([3.0, 2.0, 1.0])
  A_sk = mixing_laws.implied_A("skillit", graph=graph, window_loss=S)
  np.testing.assert_allclose(A_sk, [[1.5, 0.6, 0.0], [0.2, 0.8, 0.6], [0.0, 0.1, 0.6]])
  np.testing.assert_allclose(A_sk.sum(0), graph @ S)
  with pytest.raises(errors.AnalysisError, match="no implied"):
    mixing_laws.implied_A("gs")


@pytest.mark.slow
def test_vectorised_branches_equal_sequential():
  model, params, batch = _tiny()
  tx = optax.adam(1e-2)
  state = {
    "params": params,
    "opt_state": tx.init(params),
    "step": jnp.zeros((), jnp.int32),
    "rng": jax.random.PRNGKey(0),
    "mixture": {},
  }
  fn = functools.partial(steps.train_step, model=model, tx=tx, schedule=lambda s: 1e-2, num_groups=2)
  S, K = 2, 3
  rng = np.random.default_rng(3)
  batches = jax.tree.map(lambda x: jnp.stack([jnp.stack([x[rng.permutation(8)] for _ in range(K)]) for _ in range(S)]), batch)
  vs, vm = mixing_laws.run_branches(fn, state, batches, vectorise=True)
  ss, sm = mixing_laws.run_branches(fn, state, batches, vectorise=False)
  assert vm["train/loss"].shape == (S, K)
  np.testing.assert_allclose(vm["train/loss"], sm["train/loss"], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(vs["params"]), jax.tree.leaves(ss["params"])):
    # atol: parameters whose exact gradient is 0 (e.g. attention key biases, softmax shift-invariance)
    # hold only float noise, whose summation order differs between the vmapped and the single program
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=5e-5)
  assert not np.allclose(vm["train/loss"][1, 0], vm["train/loss"][1, 1])  # branches differ


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_clear_error(tmp_path):
  with pytest.raises(errors.ConfigError, match=r"unknown groups \['c'\]"):
    mixture.make(_mcfg(method="aioli", update_steps=10, prior="a=0.5,c=0.5", prior_steps=2), ["a", "b"])
  with pytest.raises(errors.DataError, match="sum to 1"):
    mixture.make(_mcfg(method="aioli", update_steps=10, prior="a=0.5,b=0.6", prior_steps=2), ["a", "b"])
  with pytest.raises(errors.ConfigError, match="without mixture.prior"):
    mixture.make(_mcfg(method="aioli", update_steps=10, prior_steps=2), ["a", "b"])
  with pytest.raises(errors.ConfigError, match="needs a reference run"):
    mixture.make(_mcfg(method="doremi"), ["a", "b"])
  with pytest.raises(errors.ConfigError, match="more than a round"):
    mixture.make(_mcfg(method="aioli", update_steps=8, lp_rounds=2, lp_steps=2), ["a", "b"])
  with pytest.raises(errors.ConfigError, match="needs mixture.graph"):
    mixture.make(_mcfg(method="skillit"), ["a", "b"])
  with pytest.raises(errors.ConfigError, match="2x2"):
    mixture.make(_mcfg(method="skillit", graph="1,2,3;4,5,6"), ["a", "b"])
  with pytest.raises(errors.ConfigError, match="one group"):
    mixture.make(_mcfg(method="doge"), ["a"])
  with pytest.raises(errors.ConfigError, match=r"missing groups \['b'\]"):
    mixture.make(_mcfg(method="doremi", reference="a=3.0"), ["a", "b"])

  with pytest.raises(errors.ConfigError, match="no checkpoint to restore its params"):
    mixture.make(_mcfg(method="doremi", reference=str(tmp_path)), ["a", "b"])
  with pytest.raises(errors.ConfigError, match="a/b/c"):
    mixture.make(_mcfg(method="aioli", lp_branches="a/b/c"), ["a", "b"])
  runner = mixture.MixtureRunner(mixture.make(_mcfg(method="doge"), ["a", "b"]), None, total=4, num_threads=1)
  with pytest.raises(errors.ConfigError, match=r"validation batches of every group; none for \['b'\]"):
    runner.prepare(eval_sets=[{"group": jnp.zeros(4, jnp.int32)}])

  class Oracle(mixture.Controller):
    name, needs = "oracle", frozenset({"test_losses"})

  with pytest.raises(errors.ConfigError, match=r"needs \['test_losses'\], which this trainer cannot supply"):
    mixture.MixtureRunner(Oracle(["a", "b"]), None, total=4, num_threads=1)


# ---------------------------------------------------------------- trainer: every controller resumes bit-for-bit


def _run_cfg(tmp_path, method, stop=0, **mix):
  from tests.helpers import tiny_cfg

  cfg = tiny_cfg(str(tmp_path / "data"))
  cfg.data.groups = mlc.ConfigDict(
    {n: dict(kind="bigram", seed=s, n_terminals=16, n_train=300, n_validation=40, n_test=10) for n, s in (("a", 1), ("b", 2))}
  )
  cfg.mixture.update(dict(method=method, **mix))
  cfg.train.steps, cfg.train.stop_at, cfg.eval.every, cfg.ckpt.resume_every = 8, stop, 0, 2
  return cfg


MIXES = {
  "aioli_prior": ("aioli", dict(update_steps=4, lp_rounds=1, lp_steps=1, prior="a=0.75,b=0.25", prior_steps=2, eta=5.0)),
  "aioli_sampled_rows": ("aioli", dict(update_steps=4, lp_rounds=1, lp_steps=1, eta=1.0, rows="sampled")),
  "skillit": ("skillit", dict(graph="0.5,0.1;0.2,0.4", update_steps=3, eta=2.0, window=2)),
  "doremi": ("doremi", dict(reference="a=2.0,b=2.0", mu=1.0)),
  "doremi_per_token": ("doremi", dict(reference="<a stratified run>", mu=1.0)),
  "doge": ("doge", dict(mu=0.01)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MIXES))
def test_every_controller_resumes_bit_for_bit(tmp_path, name):
  import train
  from lib import ckpt as C

  method, mix = MIXES[name]
  if name == "doremi_per_token":  # the reference: a same-size stratified run, its params restored once
    train.train_and_evaluate(_run_cfg(tmp_path, "stratified"), str(tmp_path / "ref"))
    mix = dict(mix, reference=str(tmp_path / "ref"))
  train.train_and_evaluate(_run_cfg(tmp_path, method, **mix), str(tmp_path / "straight"))
  train.train_and_evaluate(_run_cfg(tmp_path, method, stop=3, **mix), str(tmp_path / "resumed"))
  train.train_and_evaluate(_run_cfg(tmp_path, method, **mix), str(tmp_path / "resumed"))
  for x, y in zip(
    jax.tree.leaves(C.restore_params(str(tmp_path / "straight"), 8)),
    jax.tree.leaves(C.restore_params(str(tmp_path / "resumed"), 8)),
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  rows = [json.loads(x) for x in open(os.path.join(tmp_path, "straight", "metrics.jsonl"))]
  tr = [r for r in rows if "train/loss" in r]
  if method in ("doremi", "doge"):  # weights move away from uniform and are logged with their average
    assert abs(tr[-1]["mixture/w/a"] - 0.5) > 1e-4 and "mixture/w_avg/a" in tr[-1]
    assert all(r["data/rows/a"] == 4 for r in tr)  # data stay stratified
    key = "mixture/excess/a" if method == "doremi" else "mixture/val_loss/a"  # per-token excess; DoGE's val batch
    assert all(key in r for r in tr) and all(np.isfinite(r[key]) for r in tr)
  else:  # proportions move
    assert len({round(r["mixture/p/a"], 6) for r in tr}) > 2
  if mix.get("rows") == "sampled":  # LearnParams batches (steps 0, 1, 4, 5) exact at f = 0.625; the others drawn from p
    B = _run_cfg(tmp_path, method).train.batch_size
    exact = {int(n) for n in dp.largest_remainder([0.625, 0.375], B)}
    assert all(r["data/rows/a"] in exact for r in tr if r["step"] - 1 in (0, 1, 4, 5))
    drawn = [r for r in tr if r["step"] - 1 not in (0, 1, 4, 5)]
    rounded = [int(dp.largest_remainder([r["mixture/p/a"], 1 - r["mixture/p/a"]], B)[0]) for r in drawn]
    assert [r["data/rows/a"] for r in drawn] != rounded  # drawn from p, not rounded
  assert "mixture/A/a/b" in tr[-1]  # the implied LMO parameters are logged (for experiments/aioli_fidelity)
  resumed = {
    r["step"]: r for r in (json.loads(x) for x in open(os.path.join(tmp_path, "resumed", "metrics.jsonl"))) if "train/loss" in r
  }
  for r in tr:
    if r["step"] > 3:
      assert resumed[r["step"]]["train/loss"] == r["train/loss"]
      assert {k: v for k, v in resumed[r["step"]].items() if k.startswith("mixture/")} == {
        k: v for k, v in r.items() if k.startswith("mixture/")
      }


@pytest.mark.slow
def test_aioli_learn_params_branches_vmapped_equal_sequential(tmp_path):
  import train

  mix = dict(update_steps=4, lp_rounds=2, lp_steps=1, eta=5.0)
  rows = {}
  for mode in ("vmap", "sequential"):
    cfg = _run_cfg(tmp_path, "aioli", lp_branches=mode, **mix)
    cfg.train.steps = 6
    train.train_and_evaluate(cfg, str(tmp_path / mode))
    rows[mode] = [json.loads(x) for x in open(os.path.join(tmp_path, mode, "metrics.jsonl"))]
  tr = {m: [r for r in rows[m] if "train/loss" in r] for m in rows}
  assert len(tr["vmap"]) == 6 and "mixture/A/a/b" in tr["vmap"][-1]
  for a, b in zip(tr["vmap"], tr["sequential"]):
    for k in (k for k in a if k.startswith("mixture/") or k == "train/loss"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert len({round(r["mixture/p/a"], 6) for r in tr["vmap"]}) >= 2  # rounds at steps 0 and 4 move p
  assert all(r["data/rows/a"] + r["data/rows/b"] == 8 for r in tr["vmap"])


@pytest.mark.slow
def test_branch_sweep_from_a_checkpoint_fits_the_dynamic_law(tmp_path):
  import train
  from experiments import aioli_fidelity as F

  mix = dict(update_steps=4, lp_rounds=1, lp_steps=1, eta=5.0)
  w = str(tmp_path / "run")
  train.train_and_evaluate(_run_cfg(tmp_path, "aioli", **mix), w)
  P = F.branch_mixtures(2)
  assert P.shape == (11, 2) and np.allclose(P.sum(1), 1)
  res = F.branch_sweep(w, 4, branch_steps=2)
  assert res["A"].shape == (2, 2) and res["L"].shape == (11, 2) and np.all(np.isfinite(res["A"]))
  # the fit reproduces the branches' losses from ℓ and P, and the sequential branches agree
  np.testing.assert_allclose(res["ell"][None, :] - res["P"] @ res["A"].T, res["L"], atol=0.05)
  seq = F.branch_sweep(w, 4, branch_steps=2, mixtures=res["P"][:3], vectorise=False)
  np.testing.assert_allclose(seq["L"], res["L"][:3], atol=1e-4)
  A_hat = F.logged_A(w, 8, res["groups"])
  assert A_hat is not None and -1.0 <= mixing_laws.fidelity(A_hat, res["A"]) <= 1.0
  assert F.logged_A(w, 1, res["groups"]) is None  # the first round ends at step 2 (R·s·m = 2)
  with pytest.raises(errors.LmtraceError, match="no full checkpoint"):
    F.branch_sweep(w, 5, branch_steps=1)
