"""Train step: gradient accumulation == one big batch, every optimizer learns, remat and bf16 paths."""

import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from lib import model as M
from lib import optim, sharding, steps


def _opt(name, lr):
  return mlc.ConfigDict(
    dict(
      name=name,
      lr=lr,
      schedule="constant",
      warmup_steps=0,
      final_lr_frac=1.0,
      b1=0.9,
      b2=0.98,
      eps=1e-8,
      weight_decay=0.0,
      momentum=0.9,
      nesterov=False,
      grad_clip=1.0,
    )
  )


def _setup(**model_kw):
  cfg = M.preset("nano", vocab_size=24, max_len=16, **model_kw)
  model = M.make(cfg)
  params = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  rng = np.random.default_rng(0)
  x = rng.integers(4, 24, (8, 16)).astype(np.int32)
  mask = (rng.random((8, 16)) < 0.8).astype(np.int32)  # ragged masks make the weighting matter
  batch = {
    "inputs": x,
    "targets": np.roll(x, -1, 1),
    "mask": mask,
    "segment_ids": np.ones_like(x),
    "positions": np.broadcast_to(np.arange(16, dtype=np.int32), x.shape).copy(),
  }
  return model, params, jax.tree.map(jnp.asarray, batch)


def _state(params, tx):
  return {
    "params": params,
    "opt_state": tx.init(params),
    "step": jnp.zeros((), jnp.int32),
    "rng": jax.random.PRNGKey(0),
    "mixture": {},
  }


@pytest.mark.slow
def test_gradient_accumulation_equals_full_batch():
  model, params, batch = _setup()
  tx, sched = optim.make_optimizer(_opt("sgd", 0.5), 10)
  outs = []
  for a in (1, 2, 4):
    fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, schedule=sched, grad_accum=a))
    s, m = fn(_state(params, tx), batch)
    outs.append((s, m))
  for s, m in outs[1:]:
    np.testing.assert_allclose(m["train/loss"], outs[0][1]["train/loss"], rtol=1e-6)
    np.testing.assert_allclose(m["train/grad_norm"], outs[0][1]["train/grad_norm"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(s["params"]), jax.tree.leaves(outs[0][0]["params"])):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name,lr", [("adamw", 1e-2), ("sgd", 0.3), ("adafactor", 1e-2), ("lion", 1e-3)])
def test_each_optimizer_reduces_the_loss(name, lr):
  model, params, batch = _setup()
  tx, sched = optim.make_optimizer(_opt(name, lr), 30)
  fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, schedule=sched))
  s, m0 = fn(_state(params, tx), batch)
  for _ in range(15):
    s, m = fn(s, batch)
  assert float(m["train/loss"]) < float(m0["train/loss"]) - 0.1
  assert int(s["step"]) == 16


@pytest.mark.slow
def test_remat_and_bf16():
  model, params, batch = _setup()
  remat_model, _, _ = _setup(remat=True)
  f = lambda mdl: jax.jit(jax.value_and_grad(lambda p: M.mean_loss(mdl, p, batch)))(params)  # noqa: E731
  (l1, g1), (l2, g2) = f(model), f(remat_model)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  bf16, _, _ = _setup(dtype="bfloat16")
  lb = jax.jit(lambda p: M.mean_loss(bf16, p, batch))(params)
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  assert abs(float(lb) - float(l1)) < 0.05 and float(lb) != float(l1)


@pytest.mark.slow
def test_per_group_losses_in_train_step():
  model, params, batch = _setup()
  batch = dict(batch, group=jnp.array([0, 0, 1, 1, 1, 2, 2, 2]))
  tx, sched = optim.make_optimizer(_opt("sgd", 0.0), 10)
  fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, schedule=sched, num_groups=3))
  _, m = fn(_state(params, tx), batch)
  loss_BxL = np.asarray(M.per_token_loss(model, params, batch))
  mask = np.asarray(batch["mask"])
  for g, rows in ((0, [0, 1]), (1, [2, 3, 4]), (2, [5, 6, 7])):
    np.testing.assert_allclose(m["train/group_loss"][g], loss_BxL[rows].sum() / mask[rows].sum(), rtol=1e-5)
