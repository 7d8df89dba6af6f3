"""Hessian tools against exact references: jax.hessian on tiny models, quadratics with known spectra."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from analysis import hessian as H
from lib import model as M
from lib import sharding

D, V, N = 6, 4, 40


def mlp_loss(p, b):
  h = jnp.tanh(b["x"] @ p["l1"]["w"] + p["l1"]["b"])
  logits = h @ p["l2"]["w"] + p["l2"]["b"]
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["y"][:, None], 1)[:, 0]
  return (nll * b["mask"]).sum() / b["mask"].sum()


@pytest.fixture(scope="module")
def mlp():
  k = jax.random.split(jax.random.key(0), 4)
  params = {"l1": {"w": jax.random.normal(k[0], (D, 8)), "b": 0.1 * jax.random.normal(k[1], (8,))},
            "l2": {"w": jax.random.normal(k[2], (8, V)), "b": jnp.zeros(V)}}
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(N, D)), jnp.float32), "y": jnp.asarray(rng.integers(0, V, N)),
           "mask": jnp.asarray((rng.random(N) < 0.8).astype(np.float32))}
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  hess = np.asarray(jax.jit(jax.hessian(lambda f: mlp_loss(unravel(f), batch)))(flat), np.float64)
  return params, batch, hess, flat, unravel


def test_hvp_equals_exact_hessian_times_v(mlp):
  params, batch, hess, flat, unravel = mlp
  v = H.gaussian_like(jax.random.key(1), params)
  hv = jax.jit(lambda p, v: H.hvp(mlp_loss, p, batch, v))(params, v)
  vf = jax.flatten_util.ravel_pytree(v)[0]
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(hv)[0], hess @ np.asarray(vf), rtol=1e-4, atol=1e-5)


def test_weighted_hvp_over_ragged_batches_equals_concatenated(mlp):
  params, batch, hess, _, _ = mlp
  b1 = {k: v[:13] for k, v in batch.items()}
  b2 = {k: v[13:] for k, v in batch.items()}
  mv = H.make_hvp(mlp_loss, [b1, b2])
  v = H.rademacher_like(jax.random.key(2), params)
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(mv(params, v))[0],
                             hess @ np.asarray(jax.flatten_util.ravel_pytree(v)[0]), rtol=1e-4, atol=1e-5)


def test_hutchinson_matches_exact_trace_and_blocks(mlp):
  params, batch, hess, _, _ = mlp
  mv = H.make_hvp(mlp_loss, [batch])
  exact = np.trace(hess)
  r = H.hutchinson_trace(mv, params, jax.random.key(3), 200, blocks=True)
  assert abs(r.estimate - exact) < 4 * r.stderr, (r.estimate, exact, r.stderr)
  # blocks: per top-level module here ('l1', 'l2'); they sum to the total, each near its exact block trace
  assert abs(sum(e for e, _ in r.blocks.values()) - r.estimate) < 1e-6 * max(1, abs(r.estimate))
  n1 = D * 8 + 8
  exact_l1 = np.trace(hess[:n1, :n1]) if list(params) == ["l1", "l2"] else None
  e, se = r.blocks["l1"]
  assert abs(e - exact_l1) < 4 * se
  small = H.hutchinson_trace(mv, params, jax.random.key(4), 16, dist="gaussian")
  assert small.stderr > 2 * H.hutchinson_trace(mv, params, jax.random.key(4), 256, dist="gaussian").stderr


def test_filter_gives_the_sub_block_trace(mlp):
  params, batch, hess, _, _ = mlp
  mv = H.make_hvp(mlp_loss, [batch])
  n1 = D * 8 + 8
  r = H.hutchinson_trace(mv, params, jax.random.key(5), 200, include=r"^l2/")
  exact_l2 = np.trace(hess[n1:, n1:])
  assert abs(r.estimate - exact_l2) < 4 * r.stderr
  with pytest.raises(ValueError, match="matches no parameter.*'l1/b'"):
    H.hutchinson_trace(mv, params, jax.random.key(5), 2, include="attn")
  with pytest.raises(ValueError, match="distribution"):
    H.hutchinson_trace(mv, params, jax.random.key(5), 2, dist="uniform")


def _quadratic(eigs, seed=0):
  n = len(eigs)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  A = (q * eigs) @ q.T
  loss = lambda p, b: 0.5 * p["x"] @ (jnp.asarray(A, jnp.float32) @ p["x"])  # noqa: E731
  return A, {"x": jnp.zeros(n, jnp.float32)}, H.make_hvp(loss, [{"mask": np.ones(1)}])


def test_lanczos_power_and_slq_on_a_known_spectrum():
  eigs = np.concatenate([[10.0, 7.0, 5.0, 4.0, 3.5], np.linspace(-1, 1, 195)])
  A, params, mv = _quadratic(eigs)
  r = H.top_eigenvalues(mv, params, jax.random.key(0), k=3, num_steps=60)
  np.testing.assert_allclose(r.eigenvalues, [10.0, 7.0, 5.0], rtol=1e-4)
  assert np.all(r.residuals < 1e-2)
  p = H.power_iteration(mv, params, jax.random.key(1), num_iters=300, tol=1e-9)
  assert abs(p.estimate - 10.0) < 1e-3
  d = H.slq_density(mv, params, jax.random.key(2), num_runs=8, num_steps=40)
  dx = d.grid[1] - d.grid[0]
  assert abs(d.density.sum() * dx - 1.0) < 1e-3
  mean = (d.grid * d.density).sum() * dx
  assert abs(mean - eigs.mean()) < 0.05
  # most mass where most eigenvalues are ([-1, 1]), a little near the outliers
  inside = d.density[(d.grid > -1.3) & (d.grid < 1.3)].sum() * dx
  assert inside > 0.9


def test_hutchpp_has_lower_variance_on_a_decaying_spectrum():
  eigs = 1.0 / np.arange(1, 201) ** 2
  A, params, mv = _quadratic(eigs, seed=1)
  exact = eigs.sum()
  hut = [H.hutchinson_trace(mv, params, jax.random.key(i), 30).estimate for i in range(30)]
  hpp = [H.hutchpp_trace(mv, params, jax.random.key(100 + i), 30).estimate for i in range(30)]
  err_h, err_pp = np.mean((np.array(hut) - exact) ** 2), np.mean((np.array(hpp) - exact) ** 2)
  assert err_pp < 0.2 * err_h, (err_pp, err_h)
  assert H.hutchpp_trace(mv, params, jax.random.key(7), 30).n_matvecs <= 30


def test_fisher_trace_matches_exact_per_token_fisher_and_hessian_for_softmax_regression():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 10, D)), jnp.float32)  # "batch" [B, L, D]
  batch = {"x": x, "mask": jnp.asarray((rng.random((2, 10)) < 0.9).astype(np.float32))}
  params = {"w": jnp.asarray(rng.normal(size=(D, V)), jnp.float32), "b": jnp.zeros(V)}
  logits_fn = lambda p, b: b["x"] @ p["w"] + p["b"]  # noqa: E731
  r = H.fisher_trace(logits_fn, params, [batch], jax.random.key(0), 300)
  # exact: (1/T) Σ_t Σ_y p(y|x_t) ‖∇ log p(y|x_t)‖²
  def tok_sq(p, xt, y):
    g = jax.grad(lambda q: -jax.nn.log_softmax(xt @ q["w"] + q["b"])[y])(p)
    return H.tree_dot(g, g)
  xs = x.reshape(-1, D)
  probs = jax.nn.softmax(logits_fn(params, batch)).reshape(-1, V)
  sq = jax.vmap(lambda xt: jax.vmap(lambda y: tok_sq(params, xt, y))(jnp.arange(V)))(xs)
  m = batch["mask"].reshape(-1)
  exact = float((probs * sq).sum(1) @ m / m.sum())
  assert abs(r.estimate - exact) < 4 * r.stderr, (r.estimate, exact, r.stderr)
  # softmax regression: the Hessian of the token loss does not depend on the label, so tr(F) = tr(H)
  y = jnp.zeros((2, 10), jnp.int32)
  loss = lambda p: ((-jnp.take_along_axis(jax.nn.log_softmax(logits_fn(p, batch)), y[..., None], -1)[..., 0])  # noqa: E731
                    * batch["mask"]).sum() / batch["mask"].sum()
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  tr_h = float(np.trace(jax.hessian(lambda f: loss(unravel(f)))(flat)))
  assert abs(exact - tr_h) < 1e-4 * abs(tr_h)


def test_nan_hvp_is_reported():
  params = {"x": jnp.ones(3)}
  mv = H.make_hvp(lambda p, b: jnp.sum(jnp.sqrt(p["x"] - 2.0)), [{"mask": np.ones(1)}])
  with pytest.raises(FloatingPointError, match="non-finite"):
    H.hutchinson_trace(mv, params, jax.random.key(0), 2)


def test_sharded_and_single_device_agree():
  cfg = M.preset("nano", vocab_size=24, max_len=16, n_heads=2)
  model = M.make(cfg)
  single = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  rng = np.random.default_rng(0)
  x = rng.integers(4, 24, (8, 16)).astype(np.int32)
  b = {"inputs": x, "targets": np.roll(x, -1, 1), "mask": np.ones_like(x), "segment_ids": np.ones_like(x),
       "positions": np.broadcast_to(np.arange(16, dtype=np.int32), x.shape).copy()}
  loss = lambda p, bb: M.mean_loss(model, p, bb)  # noqa: E731
  r1 = H.hutchinson_trace(H.make_hvp(loss, [jax.tree.map(jnp.asarray, b)]), single, jax.random.key(1), 3, blocks=True)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    params = jax.device_put(single, M.param_shardings(model, mesh))
    gb = jax.device_put(b, sharding.batch_sharding(mesh))
    mv = H.make_hvp(loss, [gb])
    r8 = H.hutchinson_trace(mv, params, jax.random.key(1), 3, blocks=True)
    v = H._probe_fn(params, "rademacher", None)(jax.random.key(0))
    hv = mv(params, v)
  np.testing.assert_allclose(r8.samples, r1.samples, rtol=2e-4)
  assert set(r8.blocks) == {"embeddings", "head", "layer_0/attn", "layer_0/mlp", "layer_0/norm", "layer_1/attn",
                            "layer_1/mlp", "layer_1/norm"}
  w = hv["layer_0"]["mlp"]["wi"]["kernel"]
  assert w.sharding == params["layer_0"]["mlp"]["wi"]["kernel"].sharding and len(w.sharding.device_set) == 8


def test_amortised_probes_equal_plain_probes(mlp):
  params, batch, _, _, _ = mlp
  b1 = {k: v[:13] for k, v in batch.items()}
  b2 = {k: v[13:] for k, v in batch.items()}
  mv = H.make_hvp(mlp_loss, [b1, b2])
  plain = H.hutchinson_trace(mv, params, jax.random.key(9), 10, chunk=1, blocks=True)
  fast = H.hutchinson_trace(mv, params, jax.random.key(9), 10, chunk=4, blocks=True)
  np.testing.assert_allclose(fast.samples, plain.samples, rtol=1e-5, atol=1e-6)
  for k in plain.blocks:
    np.testing.assert_allclose(fast.blocks[k], plain.blocks[k], rtol=1e-5, atol=1e-6)
  assert fast.n_matvecs == 10
