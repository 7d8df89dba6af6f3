"""Sanity checks of every online mixing method (Aioli, Skill-It, DoReMi, DoGE) under the released scripts'
settings for m = 2, through the real trainer on a nano model:
  (i)  statistically identical groups (one bigram language, two groups with different sentences):
       p (DoReMi/DoGE: their weights w) stays within 0.05 of uniform at every logged step (seeded);
  (ii) a planted world where one group is pure noise (near-uniform random tokens): p moves away from it.
Aioli: R = 4, s = 4, f = 0.625, η = 0.2, γ = 0.1, 10 rounds, the rounds start after the warmup
(restricted mode with a uniform prior for the warmup steps). Skill-It: η = 0.2, window 3, 10 updates,
evaluations every U/2 (the released form), graph from two one-hot runs. DoReMi: μ = 0.01, ε = 1e-3,
the reference = a same-size stratified run. DoGE: lr/μ as released (μ = 0.01 at lr 5e-4, so μ = 0.06 at our 3e-3),
gradients clipped to norm 1 (released)."""

import json
import os

import ml_collections as mlc
import numpy as np
import pytest

WARMUP, U, ROUNDS = 8, 40, 10
STEPS = WARMUP + U * ROUNDS


def _groups(world: str) -> dict:
  lang = dict(kind="bigram", seed=5, n_terminals=16, n_train=3000, n_validation=300, n_test=50)
  if world == "identical":
    return {"a": dict(lang, sample_seed=0), "b": dict(lang, sample_seed=7)}
  noise = dict(lang, seed=6, concentration=1e6)  # every row ~ uniform: i.i.d. uniform tokens
  return {"real": lang, "noise": noise}


def _cfg(data_dir: str, world: str, seed: int = 0, steps: int = STEPS, **mix):
  from tests.helpers import tiny_cfg

  c = tiny_cfg(data_dir)
  c.data.groups = mlc.ConfigDict(_groups(world))
  c.seed = seed
  c.train.steps, c.train.batch_size, c.train.log_every = steps, 8, 4
  c.opt.warmup_steps = WARMUP
  c.eval.every, c.eval.batches, c.eval.batch_size = 0, 4, 16
  c.eval.test_at_end = False
  c.ckpt.schedule, c.ckpt.resume_every, c.ckpt.async_save = f"interval:every={steps}", steps, False
  c.mixture.update(mix)
  return c


def _train(tmp_path, name, cfg) -> list[dict]:
  import train

  wd = str(tmp_path / name)
  train.train_and_evaluate(cfg, wd)
  return [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]


def _series(rows, names, key="mixture/p") -> np.ndarray:
  """[steps, m] of p (or w) over the logged training rows."""
  return np.array([[r[f"{key}/{n}"] for n in names] for r in rows if f"{key}/{names[0]}" in r])


# DoGE's weight step is lr·score/μ: the released μ = 0.01 at the released peak lr 5e-4, so at our lr (3e-3)
# μ = 0.06 keeps the released lr/μ (experiments/aioli.py DOGE_MU, the same rule)
DOGE_MU = 0.01 * 3e-3 / 5e-4
AIOLI = dict(
  method="aioli",
  update_steps=U,
  lp_rounds=4,
  lp_steps=4,
  one_hot_factor=0.625,
  eta=0.2,
  ema=0.1,
  prior="0.5,0.5",
  prior_steps=WARMUP,
)


def _graph(tmp_path, world, data_dir):
  """Skill-It's graph from two one-hot runs of 100 steps (its m extra runs)."""
  from lib import mixture

  names = list(_groups(world))
  L0, L1 = None, []
  for i, n in enumerate(names):
    q = ",".join(f"{x}={1.0 if j == i else 0.0}" for j, x in enumerate(names))
    cfg = _cfg(data_dir, world, steps=100, method="static", proportions=q)
    cfg.eval.every = 100  # evaluations at the start and the end
    rows = _train(tmp_path, f"onehot_{n}", cfg)
    ev = [r for r in rows if f"eval/{names[0]}/loss" in r]
    L0 = np.array([ev[0][f"eval/{x}/loss"] for x in names])
    L1.append([ev[-1][f"eval/{x}/loss"] for x in names])
  return ";".join(",".join(f"{v:.6f}" for v in row) for row in mixture.skills_graph(L0, np.array(L1)))


def _run(tmp_path, method, world):
  data_dir = str(tmp_path / "data")
  names = list(_groups(world))
  if method == "aioli":  # p between rounds (the LearnParams sub-phases train on q^(j), not on p)
    rows = _train(tmp_path, "aioli", _cfg(data_dir, world, **AIOLI))
    lp = WARMUP + np.arange(ROUNDS)[:, None] * U + np.arange(AIOLI["lp_rounds"] * AIOLI["lp_steps"] * 2)[None, :]
    rows = [r for r in rows if "train/loss" not in r or r["step"] - 1 not in set(lp.ravel().tolist())]
    return _series(rows, names), names, rows
  if method == "skillit":
    g = _graph(tmp_path, world, data_dir)
    mix = dict(method="skillit", graph=g, update_steps=U, eval_every=U // 2, eta=0.2, window=3, skillit_form="released")
    rows = _train(tmp_path, "skillit", _cfg(data_dir, world, **mix))
    return _series(rows, names), names, rows
  if method == "doremi":
    _train(tmp_path, "ref", _cfg(data_dir, world, method="stratified"))
    mix = dict(method="doremi", reference=str(tmp_path / "ref"), mu=0.01, smoothing=1e-3)
    rows = _train(tmp_path, "doremi", _cfg(data_dir, world, **mix))
    return _series(rows, names, "mixture/w"), names, rows
  rows = _train(tmp_path, "doge", _cfg(data_dir, world, method="doge", mu=DOGE_MU, doge_clip=1.0))
  return _series(rows, names, "mixture/w"), names, rows


@pytest.mark.slow  # 20-80 s each on a loaded 2-core machine (1-3 training runs of ~400 steps)
@pytest.mark.parametrize("method", ["aioli", "skillit", "doremi", "doge"])
def test_identical_groups_keep_p_near_uniform(tmp_path, method):
  p, names, rows = _run(tmp_path, method, "identical")
  dev = np.abs(p - 0.5).max(1)
  print(method, "max |p - 1/2| =", dev.max(), "mean", dev.mean())
  assert len(p) > 20
  assert dev.max() < 0.05, (method, dev.max())


SKILLIT_SEEKS_NOISE = pytest.mark.xfail(
  strict=True,
  reason="measured: Skill-It moves TOWARDS the noise group (0.50 -> 0.525): its update p_i ∝ exp(η Σ_j A_ij S_j) favours "
  "groups with a high loss, the noise group's loss is the highest and its graph row (from one-hot runs) does not cancel it",
)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["aioli", pytest.param("skillit", marks=SKILLIT_SEEKS_NOISE), "doremi", "doge"])
def test_noise_group_loses_share(tmp_path, method):
  p, names, rows = _run(tmp_path, method, "noise")
  k = names.index("noise")
  print(method, "p(noise) first/last/mean:", p[0, k], p[-1, k], p[len(p) // 2 :, k].mean())
  assert p[-1, k] < 0.5 and p[len(p) // 2 :, k].mean() < 0.5
