"""Liu's adversarial objective (data/adversarial.py): the closed-form head, and a run that uses it."""

import json
import os

import jax
import numpy as np
import pytest

import train
from data import adversarial, vocab
from lib import errors, sharding
from lib import model as M
from tests.helpers import tiny_cfg


@pytest.mark.slow
def test_head_loss_equals_primal_ridge():
  cfg = M.preset("nano", vocab_size=20, max_len=16, causal=False)
  model = M.make(cfg)
  params = M.init_params(model, jax.random.PRNGKey(0), sharding.single_device_mesh())
  rng = np.random.default_rng(0)
  tok = np.zeros((16, 9), np.int32)
  for i in range(16):
    n = rng.integers(2, 7)
    tok[i, : n + 2] = vocab.frame(rng.integers(0, 16, n))
  y = rng.integers(0, 3, 16).astype(np.int32)
  got = float(adversarial.head_loss(model, params, tok, y, 3, ridge=0.1))
  seg = (tok != 0).astype(np.int32)
  h = np.asarray(
    M.hidden(model, params, {"inputs": tok, "positions": np.tile(np.arange(9), (16, 1)), "segment_ids": seg}), np.float64
  )
  X = (h * (tok >= vocab.N_SPECIAL)[..., None])[:, 1:-1].reshape(16, -1)
  Y = np.eye(3)[y]
  Xa, Xb, Ya, Yb = X[:8], X[8:], Y[:8] - Y[:8].mean(0), Y[8:] - Y[:8].mean(0)
  alpha = 0.1 * np.trace(Xa @ Xa.T) / 8 + 1e-6
  W = np.linalg.solve(Xa.T @ Xa + alpha * np.eye(X.shape[1]), Xa.T @ Ya)  # primal ridge
  np.testing.assert_allclose(got, np.mean(np.sum((Xb @ W - Yb) ** 2, -1)), rtol=1e-4)
  g = jax.grad(lambda p: adversarial.head_loss(model, p, tok, y, 3, 0.1))(params)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def _cfg(tmp_path, **over):
  cfg = tiny_cfg(str(tmp_path / "tfds"))
  cfg.unlock()
  cfg.data.source = dict(
    kind="pcfg", seed=0, n_nonterminals=20, n_terminals=30, max_len=16, n_train=500, n_validation=50, n_test=10, n_downstream=600
  )
  cfg.model.causal = False
  cfg.data.objective = "mlm"
  cfg.eval.mlm_sentences = 0
  cfg.train.steps = 3
  cfg.adversarial.weight = 1.0
  cfg.adversarial.examples = 16
  for k, v in over.items():
    cfg.adversarial[k] = v
  cfg.lock()
  return cfg


@pytest.mark.slow
def test_adversarial_run_and_bad_task(tmp_path):
  wd = str(tmp_path / "adv")
  train.train_and_evaluate(_cfg(tmp_path), wd)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if "train/adv_head_loss" in r]
  assert len(rows) == 3 and all(np.isfinite(r["train/adv_head_loss"]) for r in rows)
  with pytest.raises(errors.ConfigError, match="not a task split"):
    train.train_and_evaluate(_cfg(tmp_path, task="task_Q"), str(tmp_path / "bad"))
  assert not os.path.exists(os.path.join(tmp_path, "bad", "config.json"))  # refused before anything is written
