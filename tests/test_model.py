"""Model: shapes, causality, document masking, preset sizes, and sharded == single-device numerics."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lib import model as M
from lib import sharding


def _batch(cfg, B=8, L=16, seed=0, segments=False):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(4, cfg.vocab_size, (B, L)).astype(np.int32)
  seg = np.ones((B, L), np.int32)
  pos = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()
  if segments:  # two documents per row, split at L//2
    seg[:, L // 2 :] = 2
    pos[:, L // 2 :] -= L // 2
  return {
    "inputs": jnp.asarray(inputs),
    "targets": jnp.asarray(np.roll(inputs, -1, 1)),
    "mask": jnp.ones((B, L), jnp.int32),
    "segment_ids": jnp.asarray(seg),
    "positions": jnp.asarray(pos),
  }


@pytest.fixture(scope="module", params=["nano", "tiny-modern"])
def setup(request):
  cfg = M.preset(request.param, vocab_size=40, max_len=32)
  model = M.make(cfg)
  params = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  return cfg, model, params


def test_shapes(setup):
  cfg, model, params = setup
  b = _batch(cfg)
  logits = jax.jit(lambda p, b: M.logits(model, p, b))(params, b)
  chex.assert_shape(logits, (8, 16, cfg.vocab_size))
  chex.assert_type(logits, jnp.float32)
  loss = jax.jit(lambda p, b: M.per_token_loss(model, p, b))(params, b)
  chex.assert_shape(loss, (8, 16))
  h = jax.jit(lambda p, b: M.hidden(model, p, b))(params, b)
  chex.assert_shape(h, (8, 16, cfg.d_model))


def test_causality(setup):
  cfg, model, params = setup
  b = _batch(cfg)
  f = jax.jit(lambda p, b: M.logits(model, p, b))
  base = f(params, b)
  t = 9
  changed = dict(b, inputs=b["inputs"].at[:, t + 1].set((b["inputs"][:, t + 1] + 1 - 4) % (cfg.vocab_size - 4) + 4))
  new = f(params, changed)
  np.testing.assert_allclose(new[:, : t + 1], base[:, : t + 1], atol=1e-6)
  assert np.abs(np.asarray(new[:, t + 1 :]) - np.asarray(base[:, t + 1 :])).max() > 1e-4


def test_document_mask(setup):
  """Packed rows: the second document's logits do not depend on the first document's tokens."""
  cfg, model, params = setup
  b = _batch(cfg, segments=True)
  f = jax.jit(lambda p, b: M.logits(model, p, b))
  base = f(params, b)
  other = dict(b, inputs=b["inputs"].at[:, :8].set(5))
  new = f(params, other)
  np.testing.assert_allclose(new[:, 8:], base[:, 8:], atol=1e-5)
  # and the second document alone, at positions 0.., gives the same logits
  solo = {k: v[:, 8:] for k, v in b.items()}
  np.testing.assert_allclose(f(params, solo), base[:, 8:], atol=1e-5)


def test_bidirectional_mode_sees_the_future():
  cfg = M.preset("nano", vocab_size=40, max_len=32, causal=False)
  model = M.make(cfg)
  params = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  b = _batch(cfg)
  f = jax.jit(lambda p, b: M.logits(model, p, b))
  changed = dict(b, inputs=b["inputs"].at[:, 10].set(7))
  assert np.abs(np.asarray(f(params, changed)[:, 3]) - np.asarray(f(params, b)[:, 3])).max() > 1e-5


# Our presets minus Hugging Face's count, exactly. opt-350m is post-norm (do_layer_norm_before=False), so
# HF has no final LayerNorm there; ours keeps one: scale + bias of d_model = 1024 -> 2,048 more.
OPT_EXTRA_PARAMS = {"opt-125m": 0, "opt-350m": 2 * 1024, "opt-1.3b": 0, "opt-2.7b": 0, "opt-6.7b": 0}


@pytest.mark.parametrize("name", sorted(M.OPT_PUBLISHED_PARAMS))
def test_opt_preset_param_counts(name):
  n = M.param_count(M.make(M.preset(name)))
  assert n == M.OPT_PUBLISHED_PARAMS[name] + OPT_EXTRA_PARAMS[name], (name, n, n - M.OPT_PUBLISHED_PARAMS[name])


def _loss_and_grads(model, params, batch):
  return jax.jit(jax.value_and_grad(lambda p: M.mean_loss(model, p, batch)))(params)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_loss_and_grads_match_single_device(shape):
  cfg = M.preset("nano", vocab_size=48, max_len=32, n_heads=4, d_model=32, d_ff=64)
  model = M.make(cfg)
  single = M.init_params(model, jax.random.key(1), sharding.single_device_mesh())
  b = _batch(cfg, B=8, L=16, segments=True)
  with nn.logical_axis_rules(sharding.RULES):
    l1, g1 = _loss_and_grads(model, single, b)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    params = jax.device_put(single, M.param_shardings(model, mesh))
    gb = jax.device_put(b, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
      l8, g8 = _loss_and_grads(model, params, gb)
  # the parameters really are split across devices
  k = params["layer_0"]["mlp"]["wi"]["kernel"]
  assert len(k.sharding.device_set) == 8
  if shape[1] * shape[2] > 1:
    assert k.addressable_shards[0].data.size < k.size
  np.testing.assert_allclose(l8, l1, rtol=2e-6)
  for a, b_ in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b_, rtol=2e-4, atol=2e-6)


def test_bad_model_config():
  with pytest.raises(ValueError, match="n_heads"):
    M.make(M.preset("nano", d_model=30, n_heads=4))
  with pytest.raises(ValueError, match="unknown model config keys"):
    M.ModelConfig.from_config({"d_modle": 3})
  with pytest.raises(ValueError, match="unknown model preset"):
    M.preset("opt-9b")


def _grad_and_hvp_match_on_8_devices(reference, model, params, b, v):
  """The gradient and H·v of `model` sharded over 8 devices (data 2 x fsdp 4) equal `reference`'s on one
  device, up to float32 sums in another order (1e-6 of each leaf's scale)."""

  @functools.partial(jax.jit, static_argnums=0)
  def grad_and_hvp(m, p, batch):
    g = jax.grad(lambda q: M.mean_loss(m, q, batch))
    return g(p), jax.jvp(g, (p,), (v,))[1]

  ref = grad_and_hvp(reference, params, b)
  with nn.logical_axis_rules(sharding.RULES):
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, (2, 4, 1))))
    with jax.set_mesh(mesh):
      p8 = jax.device_put(params, M.param_shardings(model, mesh))
      got = grad_and_hvp(model, p8, jax.device_put(b, sharding.batch_sharding(mesh)))
  for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(r).max())))


@pytest.mark.parametrize("tied,causal,loss_chunk,attn_chunk", [(True, True, 5, 0), (False, True, 5, 4), (True, False, 0, 4)])
def test_chunked_loss_and_attention_match_whole_sequence(tied, causal, loss_chunk, attn_chunk):
  """model.loss_chunk makes the logits, model.attn_chunk the attention scores, a chunk of positions at a time
  (5 and 4 do not divide L = 13: the pad is dropped); loss, gradient and a Hessian-vector product equal the
  whole-sequence ones, with packed segments, sharded over 8 devices."""
  cfg = M.preset("nano", vocab_size=41, max_len=16, d_model=16, n_heads=2, d_ff=32, tied_embeddings=tied, causal=causal)
  whole = M.make(cfg)
  chunked = M.make(dataclasses.replace(cfg, loss_chunk=loss_chunk, attn_chunk=attn_chunk))
  params = M.init_params(whole, jax.random.key(3), sharding.single_device_mesh())
  b = _batch(cfg, B=8, L=13, segments=True)
  np.testing.assert_allclose(M.per_token_loss(chunked, params, b), M.per_token_loss(whole, params, b), rtol=1e-6)
  v = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape), params)
  _grad_and_hvp_match_on_8_devices(whole, chunked, params, b, v)
  with pytest.raises(ValueError, match="attn_chunk"):
    M.make(dataclasses.replace(cfg, attn_chunk=-1))


@pytest.mark.parametrize("remat,parallel,dropout", [(False, False, 0.0), (True, True, 0.0), (True, False, 0.1)])
def test_scanned_layers_match_unrolled(remat, parallel, dropout):
  """model.scan_layers runs the blocks as one lax.scan over their stacked parameters: the parameter tree is
  the unrolled one (layer_{i}), and loss, gradient and a Hessian-vector product equal the unrolled stack's,
  with remat and sharded over 8 devices; with dropout the scan trains (finite gradient, a different mask
  per layer) and is deterministic given the key."""
  dims = dict(vocab_size=41, max_len=16, d_model=16, n_heads=2, d_ff=32, n_layers=3)
  cfg = M.preset("nano", **dims, remat=remat, parallel_residual=parallel)
  unrolled = M.make(cfg)
  scanned = M.make(dataclasses.replace(cfg, scan_layers=True))
  assert jax.tree.structure(M.abstract_params(scanned)[0]) == jax.tree.structure(M.abstract_params(unrolled)[0])
  params = M.init_params(unrolled, jax.random.key(5), sharding.single_device_mesh())
  b = _batch(cfg, B=8, L=13, segments=True)
  if dropout:
    drop = M.make(dataclasses.replace(cfg, scan_layers=True, dropout=dropout))
    loss = lambda q, k: M.mean_loss(drop, q, b, deterministic=False, rngs={"dropout": k})  # noqa: E731
    l1, l2 = loss(params, jax.random.key(1)), loss(params, jax.random.key(1))
    assert float(l1) == float(l2) and float(l1) != float(M.mean_loss(drop, params, b))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(jax.grad(loss)(params, jax.random.key(2))))
    return
  np.testing.assert_allclose(M.per_token_loss(scanned, params, b), M.per_token_loss(unrolled, params, b), rtol=1e-5, atol=1e-6)
  v = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape), params)
  _grad_and_hvp_match_on_8_devices(unrolled, scanned, params, b, v)
