"""Function-preserving widening (lib/enlarge.py): identical logits, then Tr(H) in the wide architecture."""

import jax
import numpy as np
import pytest

import train
from analysis import flatness
from lib import ckpt as C
from lib import enlarge, errors, sharding
from lib import model as M
from tests.helpers import tiny_cfg


def _noisy_params(model, seed):
  """Init plus noise on every leaf (norm scales and biases too), so no parameter is trivially 0 or 1."""
  p = M.init_params(model, jax.random.PRNGKey(seed), sharding.single_device_mesh())
  leaves, tdef = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tdef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize(
  "preset,r,causal",
  [("nano", 2, True), ("nano", 3, False), ("tiny-modern", 2, True)],
)
@pytest.mark.slow
def test_widened_logits_equal(preset, r, causal):
  cfg = M.preset(preset, vocab_size=23, max_len=16, causal=causal)
  small = M.make(cfg)
  params = _noisy_params(small, 0)
  wcfg = enlarge.widened_config(cfg, r)
  assert (wcfg.d_model, wcfg.n_heads, wcfg.d_ff) == (cfg.d_model * r, cfg.n_heads * r, cfg.d_ff * r)
  wide = M.make(wcfg)
  wparams = enlarge.widen_params(params, cfg, r)
  shapes, _ = M.abstract_params(wide)
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, wparams)
  rng = np.random.default_rng(0)
  b = {
    "inputs": rng.integers(0, 23, (3, 12)).astype(np.int32),
    "positions": np.tile(np.arange(12), (3, 1)).astype(np.int32),
    "segment_ids": np.repeat([[1] * 7 + [2] * 5], 3, 0).astype(np.int32),
  }
  with jax.default_matmul_precision("highest"):
    a = np.asarray(M.logits(small, params, b))
    w = np.asarray(M.logits(wide, wparams, b))
  assert np.abs(a).max() > 1.0  # not a degenerate model
  np.testing.assert_allclose(w, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("r", [1, 0, -2, 1.5, True])
def test_bad_factor_refused(r):
  with pytest.raises(errors.ConfigError, match="widening factor"):
    enlarge.widened_config(M.preset("nano"), r)


@pytest.mark.slow
def test_enlarged_workdir_trace(tmp_path):
  """A trained run widened by 2 is an ordinary workdir: same loss on the same tokens, Tr(H) measured."""
  src, dst = str(tmp_path / "small"), str(tmp_path / "wide")
  train.train_and_evaluate(tiny_cfg(str(tmp_path / "tfds"), **{"train.steps": 4}), src)
  assert enlarge.enlarge_workdir(src, dst, 2, steps=[4]) == [4]
  assert enlarge.enlarge_workdir(src, dst, 2, steps=[4]) == [4]  # rerun: nothing rewritten
  with pytest.raises(errors.CheckpointError, match="another run"):
    enlarge.enlarge_workdir(src, dst, 3, steps=[4])
  assert C.load_model(dst)[1].d_model == 64
  args = flatness.job_from_args(
    flatness.parse_args(["--workdir", "x", "--steps=4", "--estimator=hutchinson", "--probes=2", "--batches=1", "--batch_size=8"])
  )
  a = flatness.run(src, args)
  w = flatness.run(dst, args)
  np.testing.assert_allclose(w["loss"].iloc[0], a["loss"].iloc[0], rtol=1e-5)
  assert w["valid"].all() and np.isfinite(w["estimate"]).all() and w["n_params"].iloc[0] > 3 * a["n_params"].iloc[0]
