"""analysis.hessian against exact references: jax.hessian of tiny models, quadratics with known spectra,
explicit per-token Fisher, and the same estimators on a (2,2,2) mesh vs one device.

Shapes: tiny MLP on tokens x_BxLxD -> logits_BxLxV (D=8, hidden 8, V=4: 108 parameters), B=4, L=10.
Statistical checks use the estimators' own standard errors (|estimate − exact| < 4 SE) with fixed seeds.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from analysis import hessian as H
from lib import errors

D, HID, V, B, L = 8, 8, 4, 4, 10
N1 = D * HID + HID  # parameters of l1 (first in ravel order)


def mlp_logits(p, b):
  h_BxLxH = jnp.tanh(b["x"] @ p["l1"]["w"] + p["l1"]["b"])
  return h_BxLxH @ p["l2"]["w"] + p["l2"]["b"]


def token_nll(p, b):
  logp_BxLxV = jax.nn.log_softmax(mlp_logits(p, b))
  return -jnp.take_along_axis(logp_BxLxV, b["y"][..., None], -1)[..., 0]


def mlp_loss(p, b):
  m = b["mask"].astype(jnp.float32)
  return (token_nll(p, b) * m).sum() / m.sum()


def make_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {
    "l1": {"w": jax.random.normal(k[0], (D, HID)) / np.sqrt(D), "b": 0.1 * jax.random.normal(k[1], (HID,))},
    "l2": {"w": jax.random.normal(k[2], (HID, V)), "b": jnp.zeros(V)},
  }


def make_batch(seed=0, mask_p=0.8):
  rng = np.random.default_rng(seed)
  return {
    "x": jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, V, (B, L))),
    "mask": jnp.asarray((rng.random((B, L)) < mask_p).astype(np.float32)),
  }


def exact_hessian(loss, params):
  flat, unravel = ravel_pytree(params)
  return np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat), np.float64)


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


@pytest.fixture(scope="module")
def mlp():
  params, batch = make_params(), make_batch()
  return params, batch, exact_hessian(lambda p: mlp_loss(p, batch), params)


def within(r, exact, n_se=4.0):
  assert abs(r.estimate - exact) < n_se * r.stderr, (r.estimate, exact, r.stderr)


# ------------------------------------------------------------------------------------------------
# 1. HVP


@pytest.mark.slow
def test_hvp_equals_exact_hessian_times_v(mlp):
  params, batch, hess = mlp
  u, v = H.gaussian_like(jax.random.key(1), params), H.rademacher_like(jax.random.key(2), params)
  f = jax.jit(lambda p, v: H.hvp(mlp_loss, p, batch, v))
  hv, hu = flat(f(params, v)), flat(f(params, u))
  ref = hess @ flat(v)
  assert np.linalg.norm(hv - ref) < 1e-5 * np.linalg.norm(ref)
  assert abs(flat(u) @ hv - flat(v) @ hu) < 1e-5 * np.abs(flat(u) @ hv)  # symmetric operator
  mv = H.make_hvp(mlp_loss, [batch])
  assert np.linalg.norm(flat(mv(params, v)) - ref) < 1e-5 * np.linalg.norm(ref)


@pytest.mark.slow
def test_make_hvp_weights_batches_by_loss_tokens(mlp):
  params, batch, hess = mlp
  v = H.rademacher_like(jax.random.key(3), params)
  ref = hess @ flat(v)
  mask = np.asarray(batch["mask"]).copy()
  mask[:2, 3:] = 0  # the first half has far fewer loss tokens than the second
  masked = {**batch, "mask": jnp.asarray(mask)}
  ref = exact_hessian(lambda p: mlp_loss(p, masked), params) @ flat(v)
  ragged = [{k: x[:1] for k, x in masked.items()}, {k: x[1:] for k, x in masked.items()}]  # unequal shapes: loop
  halves = [{k: x[:2] for k, x in masked.items()}, {k: x[2:] for k, x in masked.items()}]  # equal shapes: scan
  for parts in (ragged, halves):
    mv = H.make_hvp(mlp_loss, parts)
    assert mv.stacked == (parts is halves)
    assert np.linalg.norm(flat(mv(params, v)) - ref) < 1e-5 * np.linalg.norm(ref)
  equal = H.make_hvp(mlp_loss, halves, weights=[0.5, 0.5])  # the known pitfall is visibly biased here
  assert np.linalg.norm(flat(equal(params, v)) - ref) > 1e-2 * np.linalg.norm(ref)
  # amortised probes (one linearisation per batch, token-weighted vᵀH_b v) == plain HVPs on the whole data
  whole = H.hutchinson_trace(H.make_hvp(mlp_loss, [masked]), params, jax.random.key(4), 6, amortise=False)
  for parts in (ragged, halves):
    r = H.hutchinson_trace(H.make_hvp(mlp_loss, parts), params, jax.random.key(4), 6, chunk=3)
    np.testing.assert_allclose(r.samples, whole.samples, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# 2. Hutchinson, blocks, filters, Hutch++ on the MLP


@pytest.mark.slow
def test_hutchinson_trace_blocks_and_stderr_scaling(mlp):
  params, batch, hess = mlp
  mv = H.make_hvp(mlp_loss, [batch])
  rules = [(r"^(l\d)/", r"\1")]
  r = H.hutchinson_trace(mv, params, jax.random.key(4), 256, blocks=rules, chunk=32)
  within(r, np.trace(hess))
  assert set(r.blocks) == {"l1", "l2"}
  assert abs(sum(e for e, _ in r.blocks.values()) - r.estimate) < 1e-5 * np.abs(r.samples).mean()
  for name, sl in (("l1", slice(0, N1)), ("l2", slice(N1, None))):
    e, se = r.blocks[name]
    assert abs(e - np.trace(hess[sl, sl])) < 4 * se, (name, e, np.trace(hess[sl, sl]), se)
  small = H.hutchinson_trace(mv, params, jax.random.key(4), 16, blocks=rules, chunk=32)
  np.testing.assert_allclose(small.samples, r.samples[:16], rtol=1e-6)  # probe i depends only on (key, i)
  assert 2.0 < small.stderr / r.stderr < 8.0  # ≈ √(256/16) = 4
  plain = H.hutchinson_trace(mv, params, jax.random.key(4), 16, chunk=5, amortise=False)  # one HVP per probe
  np.testing.assert_allclose(plain.samples, r.samples[:16], rtol=1e-5)
  g = H.hutchinson_trace(mv, params, jax.random.key(5), 256, dist="gaussian", chunk=32)
  within(g, np.trace(hess))
  early = H.hutchinson_trace(mv, params, jax.random.key(6), 256, target_rel_err=0.05, min_probes=16, chunk=8)
  assert 16 <= early.n_matvecs < 256 and early.stderr < 0.05 * abs(early.estimate)
  seen = []
  counted = H.hutchinson_trace(mv, params, jax.random.key(6), 20, chunk=8, progress=seen.append)
  assert seen == [8, 8, 4] and counted.n_matvecs == 20


@pytest.mark.slow
def test_filter_gives_the_diagonal_block(mlp):
  params, batch, hess = mlp
  mv = H.make_hvp(mlp_loss, [batch])
  h22, h11 = hess[N1:, N1:], hess[:N1, :N1]
  r = H.hutchinson_trace(mv, params, jax.random.key(7), 256, select=r"^l2/", chunk=32)
  within(r, np.trace(h22))
  r = H.hutchinson_trace(mv, params, jax.random.key(7), 256, select=H.ParamSelection(exclude=r"^l2/"), chunk=32)
  within(r, np.trace(h11))
  # exact checks of the block operator: Lanczos on H_22 (36 dims, 36 steps) recovers its spectrum
  top = H.top_eigenvalues(mv, params, jax.random.key(8), k=2, num_steps=40, select=H.ParamSelection(include=r"^l2/"))
  assert top.n_matvecs == h22.shape[0]
  np.testing.assert_allclose(top.eigenvalues, np.linalg.eigvalsh(h22)[::-1][:2], rtol=1e-4)
  assert set(H.param_blocks(params)) == {"l1/w", "l1/b", "l2/w", "l2/b"}


@pytest.mark.slow
def test_hutchpp_on_the_mlp(mlp):
  params, batch, hess = mlp
  mv = H.make_hvp(mlp_loss, [batch])
  r = H.hutchpp_trace(mv, params, jax.random.key(9), 90)
  assert r.n_matvecs == 90 and r.extra["sketch_rank"] == 30 and len(r.samples) == 30
  within(r, np.trace(hess))
  f = H.hutchpp_trace(mv, params, jax.random.key(9), 30, select=r"^l2/")
  within(f, np.trace(hess[N1:, N1:]))


# ------------------------------------------------------------------------------------------------
# 3-4. Known spectra: quadratic f(x) = ½ xᵀAx, matvec given as a plain traceable function


def quadratic(eigs, seed=0):
  n = len(eigs)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  A = (q * eigs) @ q.T
  A_f32 = jnp.asarray(A, jnp.float32)
  return A, {"x": jnp.zeros(n, jnp.float32)}, (lambda p, v: {"x": A_f32 @ v["x"]})


@pytest.mark.slow
def test_lanczos_power_and_slq_on_a_known_spectrum():
  eigs = np.concatenate([[10.0, 7.0, 5.0, 4.0, 3.5, -12.0], np.linspace(-1, 1, 194)])
  A, params, mv = quadratic(eigs)
  n = len(eigs)
  top = H.top_eigenvalues(mv, params, jax.random.key(0), k=3, num_steps=60)
  np.testing.assert_allclose(top.eigenvalues, [10.0, 7.0, 5.0], rtol=1e-4)
  assert np.all(top.residuals < 1e-3) and top.extra["converged"].all()
  lo, lo_bound = top.extra["lambda_min"]
  assert abs(lo + 12.0) < 1e-3 and lo_bound < 1e-3  # the other end of the same run
  lm = H.top_eigenvalues(mv, params, jax.random.key(0), k=1, num_steps=60, which="LM")
  assert abs(lm.estimate + 12.0) < 1e-3
  T = H.lanczos(mv, params, jax.random.key(1), 40, return_basis=True)
  Vb = np.asarray(T.basis["x"], np.float64)
  assert np.abs(Vb @ Vb.T - np.eye(40)).max() < 1e-5  # full reorthogonalisation keeps the basis orthonormal
  assert len(T.alphas) == 40 and len(T.betas) == 39
  p = H.power_iteration(mv, params, jax.random.key(1), num_iters=500, tol=1e-9)
  assert abs(p.estimate + 12.0) < 1e-3 and p.stderr < 0.1  # largest magnitude
  d = H.slq_density(mv, params, jax.random.key(2), num_runs=8, num_steps=40, grid=4000, sigma=0.1)
  dx = d.grid[1] - d.grid[0]
  assert abs(d.density.sum() * dx - 1.0) < 1e-3
  # its mean is n⁻¹ × Hutchinson over the 8 Rademacher starts: SE from Var zᵀAz = 2(‖A‖²_F − Σ A_ii²)
  se = np.sqrt(2 * ((A**2).sum() - (np.diag(A) ** 2).sum()) / 8) / n
  mean = (d.grid * d.density).sum() * dx
  assert abs(mean - eigs.mean()) < 4 * se, (mean, eigs.mean(), se)
  assert abs(d.estimate - n * mean) < 1e-3 * n * max(abs(mean), se)
  inside = d.density[(d.grid > -1.4) & (d.grid < 1.4)].sum() * dx
  assert inside > 0.9  # 194 of 200 eigenvalues live in [−1, 1]
  at = lambda x: np.interp(x, d.grid, d.density)  # noqa: E731
  assert at(10.0) > 20 * at(8.5) and at(-12.0) > 20 * at(-10.0)  # peaks at the outliers, a gap between
  nr = H.slq_density(mv, params, jax.random.key(2), num_runs=8, num_steps=40, reorth="none")
  np.testing.assert_allclose(nr.samples, d.samples, rtol=1e-5)  # first moment = α₁ = zᵀAz/n, orthogonality aside
  assert abs(nr.nodes.max() - 10.0) < 1e-3  # extreme Ritz values converge even without reorthogonalisation
  sq = H.slq_trace_f(mv, params, jax.random.key(3), lambda t: t**2, num_runs=16, num_steps=20)
  within(sq, (eigs**2).sum())


def lanczos_f64(A, q, m):
  """Reference: m Lanczos steps with full reorthogonalisation, float64, on an explicit matrix."""
  Q = [q / np.linalg.norm(q)]
  alphas, betas = [], []
  for j in range(m):
    w = A @ Q[j]
    alphas.append(Q[j] @ w)
    Qm = np.array(Q)
    for _ in range(2):
      w = w - Qm.T @ (Qm @ w)
    betas.append(np.linalg.norm(w))
    Q.append(w / betas[-1])
  return np.array(alphas), np.array(betas)


@pytest.mark.slow
def test_flat_lanczos_matches_a_float64_reference(mlp):
  """The flat-vector Lanczos (one x_N, unravelled only for the HVP) is the Lanczos process of the exact
  Hessian: same tridiagonal as float64 Lanczos from the same start, on the whole and on a selection."""
  params, batch, hess = mlp
  mv = H.make_hvp(mlp_loss, [batch])
  v0 = H.probe_like(jax.random.key(3), params)
  scale = np.abs(np.linalg.eigvalsh(hess)).max()
  for select, block in ((None, slice(None)), ("^l2/", slice(N1, None))):
    T = H.lanczos(mv, params, jax.random.key(0), 8, start=v0, select=select)
    a, b = lanczos_f64(hess[block, block], flat(v0)[block], 8)
    np.testing.assert_allclose(T.alphas, a, atol=1e-4 * scale)
    np.testing.assert_allclose(np.append(T.betas, T.beta_last), b, atol=1e-4 * scale)
    assert T.n == hess[block, block].shape[0]
  T = H.lanczos(mv, params, jax.random.key(0), 8, start=v0, reorth="none")
  np.testing.assert_allclose(T.alphas[:4], lanczos_f64(hess, flat(v0), 4)[0], atol=1e-4 * scale)  # early steps: no loss yet


@pytest.mark.slow
def test_flat_operator_weights_batches_like_apply(mlp):
  """Inside the estimators an HVPOperator's batches are weighted and summed on the flat x_N (one op per
  batch, not per leaf): still the exact token-weighted (or user-weighted) Hessian times v, for looped
  and scanned batches, on the whole and on a selection; and Lanczos through it is float64 Lanczos."""
  params, batch, _ = mlp
  mask = np.asarray(batch["mask"]).copy()
  mask[:2, 3:] = 0
  masked = {**batch, "mask": jnp.asarray(mask)}
  ragged = [{k: x[:1] for k, x in masked.items()}, {k: x[1:] for k, x in masked.items()}]
  halves = [{k: x[:2] for k, x in masked.items()}, {k: x[2:] for k, x in masked.items()}]
  h_tok = exact_hessian(lambda p: mlp_loss(p, masked), params)
  h_w = sum(w * exact_hessian(lambda p, b=b: mlp_loss(p, b), params) for w, b in zip((0.3, 0.7), halves))
  v = H.rademacher_like(jax.random.key(5), params)
  ops = (
    (H.make_hvp(mlp_loss, ragged), h_tok),
    (H.make_hvp(mlp_loss, halves), h_tok),
    (H.make_hvp(mlp_loss, halves, [0.3, 0.7]), h_w),
  )
  for mv, hess in ops:
    for select, block in ((None, slice(None)), ("^l2/", slice(N1, None))):
      view = H.FlatView(params, H.ParamSelection.of(select).mask(params))
      hv_N = jax.jit(lambda p, x, o, view=view, mv=mv: view.operator(mv.apply, p, o)(x))(params, view.ravel(v), mv.operands)
      ref = np.zeros(view.n)
      ref[block] = hess[block, block] @ flat(v)[block]
      assert np.linalg.norm(np.asarray(hv_N, np.float64) - ref) < 1e-5 * np.linalg.norm(ref)
  mv, hess = ops[2]
  T = H.lanczos(mv, params, jax.random.key(0), 8, start=v)
  a, b = lanczos_f64(hess, flat(v), 8)
  scale = np.abs(np.linalg.eigvalsh(hess)).max()
  np.testing.assert_allclose(T.alphas, a, atol=1e-4 * scale)
  np.testing.assert_allclose(np.append(T.betas, T.beta_last), b, atol=1e-4 * scale)


@pytest.mark.slow
def test_flat_view_runtime_offsets_equal_static_slices(mlp):
  """On one device FlatView cuts leaves at runtime offsets (one kernel per leaf shape, not per leaf):
  ravel, unravel (with a selection, a zero-size and a bfloat16 leaf) and a Lanczos run through the view
  equal the static slices bit for bit, and the compiled unravel really keeps the offsets opaque (were
  XLA to fold them back into static slices, the compile-time saving would silently vanish)."""
  params, batch, _ = mlp
  tree = {**params, "l3": {"w": jnp.ones((HID, D), jnp.bfloat16), "e": jnp.zeros((0, 3))}, "l4": {"w": params["l1"]["w"]}}
  v = H.rademacher_like(jax.random.key(3), tree)
  for sel in (None, H.ParamSelection.of("^l(2|3)/").mask(tree)):
    dyn, static = H.FlatView(tree, sel), H.FlatView(tree, sel)
    static.dynamic = False
    assert dyn.dynamic
    x_dyn, x_static = jax.jit(dyn.ravel)(v), jax.jit(static.ravel)(v)
    np.testing.assert_array_equal(np.asarray(x_dyn), np.asarray(x_static))
    for cast in (True, False):
      a = jax.jit(lambda x, cast=cast: dyn.unravel(x, cast))(x_dyn)
      b = jax.jit(lambda x, cast=cast: static.unravel(x, cast))(x_dyn)
      assert jax.tree.all(jax.tree.map(lambda p, q: p.dtype == q.dtype and bool((p == q).all()), a, b))
  hlo = jax.jit(dyn.unravel).lower(x_dyn).compile().as_text()
  assert len(re.findall(r" dynamic-slice\(", hlo)) >= 4 and not re.findall(r"= f32\S* slice\(", hlo)
  mv = H.make_hvp(mlp_loss, [batch])
  out = {}
  for name, dynamic in (("dynamic", True), ("static", False)):
    view = H.FlatView(params, None)
    view.dynamic = dynamic
    f = H._lanczos_fn(mv, view, 8, "full", False)
    out[name] = [np.asarray(x) for x in f(params, H.rademacher_like(jax.random.key(4), params), jax.random.key(0), mv.operands)]
  for x, y in zip(out["dynamic"], out["static"]):
    np.testing.assert_array_equal(x, y)


def test_probes_distribution_shape_and_sharding():
  """rademacher_like / gaussian_like: float32 leaves shaped like the tree (scalar, zero-size, odd-shaped and
  bfloat16-shaped leaves too), ±1 with mean ≈ 0 / mean ≈ 0 and variance ≈ 1, independent across leaves,
  the same eager and jitted, for typed and raw keys, and the same numbers on 1 and 8 devices; probe_like
  lands in the parameters' sharding."""
  tree = {"a": jnp.zeros((3, 5)), "b": jnp.zeros(()), "c": jnp.zeros((0, 4)), "d": jnp.zeros((7, 2, 3))}
  tree["e"] = jnp.zeros(9, jnp.bfloat16)
  big = {"x": jnp.zeros((200, 300)), "y": jnp.zeros((200, 300))}
  mesh = jax.make_mesh((8,), ("data",))
  on_mesh = {"w": jax.device_put(jnp.zeros((16, 24)), NamedSharding(mesh, P(None, "data")))}
  for key in (jax.random.key(3), jax.random.PRNGKey(11)):
    for draw in (H.rademacher_like, H.gaussian_like):
      got = draw(key, tree)
      assert jax.tree.structure(got) == jax.tree.structure(tree)
      assert all(g.shape == x.shape and g.dtype == jnp.float32 for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(tree)))
      assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.jit(draw)(key, tree))))
      one = np.asarray(draw(key, {"w": jnp.zeros((16, 24))})["w"])
      np.testing.assert_array_equal(np.asarray(draw(key, on_mesh)["w"]), one)  # 8 devices = 1 device
      np.testing.assert_array_equal(np.asarray(jax.jit(draw)(key, on_mesh)["w"]), one)
      x, y = (np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(draw(key, big)))
      assert abs(x.mean()) < 0.01 and abs(x.var() - 1.0) < 0.02 and abs(np.corrcoef(x, y)[0, 1]) < 0.01
      if draw is H.rademacher_like:
        assert set(np.unique(np.concatenate([x, y]))) == {-1.0, 1.0}
      else:
        assert abs(np.mean(np.abs(x) < 1.0) - 0.6827) < 0.01  # Gaussian, not merely unit variance
  assert not np.array_equal(
    np.asarray(H.rademacher_like(jax.random.key(0), big)["x"]), np.asarray(H.rademacher_like(jax.random.key(1), big)["x"])
  )
  vs = jax.jit(lambda k: H.probe_like(k, on_mesh))(jax.random.key(0))
  assert vs["w"].sharding.is_equivalent_to(on_mesh["w"].sharding, 2)


def test_residual_bounds_are_floored_at_float32_rounding():
  eigs = np.concatenate([[10.0, 7.0, 5.0, -12.0], np.linspace(-1, 1, 196)])
  _, params, mv = quadratic(eigs)
  top = H.top_eigenvalues(mv, params, jax.random.key(0), k=3, num_steps=80)
  floor = H.FLOAT32_EPS * 12.0 * np.sqrt(200)  # ε₃₂ · ‖T‖ · √n
  T = H.lanczos(mv, params, jax.random.key(0), 80)
  theta, S = T.ritz()
  raw = np.abs(T.beta_last * S[-1, :])
  assert raw.min() < 1e-12  # the exact-arithmetic bound of converged Ritz values means nothing in float32 ...
  assert np.all(top.residuals >= floor * (1 - 1e-6)) and top.extra["lambda_min"][1] >= floor * (1 - 1e-6)  # ... floored
  assert np.all(np.abs(top.eigenvalues - [10.0, 7.0, 5.0]) <= top.residuals)  # and still a bound
  assert abs(top.extra["lambda_min"][0] + 12.0) <= top.extra["lambda_min"][1]


def test_power_iteration_reports_convergence_and_its_cap():
  eigs = np.concatenate([[10.0, -12.0], np.linspace(-1, 1, 98)])
  _, params, mv = quadratic(eigs)
  capped = H.power_iteration(mv, params, jax.random.key(1), num_iters=3, tol=1e-6)
  assert capped.n_matvecs == 3 and capped.extra == {"converged": False, "iterations": 3}
  done = H.power_iteration(mv, params, jax.random.key(1), num_iters=1000, tol=1e-6)
  assert done.extra["converged"] and done.n_matvecs < 1000
  assert abs(done.estimate + 12.0) < 1e-3  # the largest MAGNITUDE, not the top eigenvalue (+10)


def test_param_selection():
  params = make_params()
  assert H.ParamSelection.of(None).mask(params) is None and H.ParamSelection.of("").mask(params) is None
  assert H.ParamSelection.of("^l2/") == H.ParamSelection(include="^l2/")
  assert H.ParamSelection(include="l1", exclude="/b$").mask(params) == (False, True, False, False)  # leaf order: l1/b, l1/w, ...
  assert H.ParamSelection(exclude="^l1/").count(params) == HID * V + V
  with pytest.raises(errors.AnalysisError, match="select must be"):
    H.ParamSelection.of(3)


def test_lanczos_survives_an_exhausted_krylov_space():
  eigs = np.repeat([3.0, 1.0, -2.0], [20, 30, 50])  # only 3 distinct eigenvalues: breakdown after 3 steps
  _, params, mv = quadratic(eigs, seed=2)
  top = H.top_eigenvalues(mv, params, jax.random.key(0), k=12, num_steps=12)
  assert np.isfinite(top.eigenvalues).all()
  dist = np.abs(top.eigenvalues[:, None] - np.array([3.0, 1.0, -2.0])[None]).min(1)
  assert np.all(dist < 1e-3)  # every Ritz value is a true eigenvalue (no ghosts)
  assert top.estimate == pytest.approx(3.0, abs=1e-4)


def test_hutchpp_has_lower_variance_than_hutchinson_on_a_decaying_spectrum():
  eigs = 1.0 / np.arange(1, 201) ** 2
  _, params, mv = quadratic(eigs, seed=1)
  hut = [H.hutchinson_trace(mv, params, jax.random.key(i), 30, chunk=30).estimate for i in range(40)]
  hpp = [H.hutchpp_trace(mv, params, jax.random.key(100 + i), 30).estimate for i in range(40)]
  mse_h, mse_pp = np.mean((np.array(hut) - eigs.sum()) ** 2), np.mean((np.array(hpp) - eigs.sum()) ** 2)
  assert mse_pp < 0.2 * mse_h, (mse_pp, mse_h)


# ------------------------------------------------------------------------------------------------
# 5. Fisher trace


def exact_fisher_trace(params, batches):
  """(1/T) Σ_t Σ_y p(y|x_t) ‖∇ log p(y|x_t)‖² by explicit per-token, per-label gradients."""

  def sq(x_D, y):
    g = jax.grad(lambda q: -jax.nn.log_softmax(mlp_logits(q, {"x": x_D}))[y])(params)
    return H.tree_dot(g, g)

  num, T = 0.0, 0.0
  for b in batches:
    x_TxD, m_T = b["x"].reshape(-1, D), b["mask"].reshape(-1)
    p_TxV = jax.nn.softmax(mlp_logits(params, b)).reshape(-1, V)
    sq_TxV = jax.jit(jax.vmap(lambda x: jax.vmap(lambda y: sq(x, y))(jnp.arange(V))))(x_TxD)
    num += float(((p_TxV * sq_TxV).sum(1) * m_T).sum())
    T += float(m_T.sum())
  return num / T


@pytest.mark.slow
def test_fisher_trace_equals_exact_per_token_fisher(mlp):
  params, batch, _ = mlp
  ragged = [{k: x[:1] for k, x in batch.items()}, {k: x[1:] for k, x in batch.items()}]
  exact = exact_fisher_trace(params, ragged)
  r = H.fisher_trace(mlp_logits, params, ragged, jax.random.key(0), 400, chunk=50)
  within(r, exact)
  assert r.n_matvecs == 800 and r.extra["n_tokens"] == float(batch["mask"].sum())
  # a single batch-level gradient of the mean loss would estimate tr(F)/T: far outside the error bar
  assert abs(r.estimate - exact / r.extra["n_tokens"]) > 10 * r.stderr
  seen = []
  early = H.fisher_trace(
    mlp_logits, params, ragged, jax.random.key(0), 400, chunk=10, target_rel_err=0.05, min_samples=20, progress=seen.append
  )
  assert 20 <= len(early.samples) < 400 and early.stderr < 0.05 * early.estimate
  assert sum(seen) == len(early.samples) and early.n_matvecs == 2 * len(early.samples)
  np.testing.assert_allclose(early.samples, r.samples[: len(early.samples)], rtol=1e-5)  # sample i: (key, i) only


@pytest.mark.slow
def test_fisher_trace_matches_hessian_trace_when_labels_follow_the_model():
  params = make_params(seed=3)
  big = {"x": jnp.asarray(np.random.default_rng(4).normal(size=(8, 16, D)), jnp.float32), "mask": jnp.ones((8, 16), jnp.float32)}
  logits = mlp_logits(params, big)
  # E_{y~model}[tr ∇²L(y)] = tr F: average exact Hessian traces over label sets drawn from the model
  tr_hess = jax.jit(
    lambda y: jnp.trace(jax.hessian(lambda f: mlp_loss(ravel_pytree(params)[1](f), {**big, "y": y}))(ravel_pytree(params)[0]))
  )
  ys = [jax.random.categorical(jax.random.key(1000 + i), logits) for i in range(24)]
  traces = np.array([float(tr_hess(y)) for y in ys])
  f = H.fisher_trace(mlp_logits, params, [big], jax.random.key(1), 200, chunk=50)
  se = np.sqrt(traces.var(ddof=1) / len(traces) + f.stderr**2)
  assert abs(traces.mean() - f.estimate) < 4 * se, (traces.mean(), f.estimate, se)
  assert abs(traces.mean() - exact_fisher_trace(params, [big])) < 4 * traces.std(ddof=1) / np.sqrt(len(traces))
  # softmax regression: the loss Hessian does not depend on the labels, so tr F = tr H exactly
  W = {"w": jnp.asarray(np.random.default_rng(5).normal(size=(D, V)), jnp.float32), "b": jnp.zeros(V)}
  lin = lambda p, b: b["x"] @ p["w"] + p["b"]  # noqa: E731
  y = jnp.zeros((8, 16), jnp.int32)
  loss = lambda p: -jnp.take_along_axis(jax.nn.log_softmax(lin(p, big)), y[..., None], -1).mean()  # noqa: E731
  fl = H.fisher_trace(lin, W, [big], jax.random.key(2), 200, chunk=50)
  within(fl, np.trace(exact_hessian(loss, W)))


def explicit_ggn(params, batch):
  """Σ_t (m_t / Σm) J_tᵀ (diag p_t − p_t p_tᵀ) J_t from the full Jacobian of the logits."""
  f0, unravel = ravel_pytree(params)
  J_TxVxN = np.asarray(jax.jit(jax.jacobian(lambda f: mlp_logits(unravel(f), batch)))(f0), np.float64).reshape(-1, V, f0.size)
  p_TxV = np.asarray(jax.nn.softmax(mlp_logits(params, batch)), np.float64).reshape(-1, V)
  w_T = np.asarray(batch["mask"], np.float64).reshape(-1) / float(batch["mask"].sum())
  Hz_TxVxV = np.einsum("tv,vu->tvu", p_TxV, np.eye(V)) - np.einsum("tv,tu->tvu", p_TxV, p_TxV)
  return np.einsum("t,tvn,tvu,tum->nm", w_T, J_TxVxN, Hz_TxVxV, J_TxVxN)


@pytest.mark.slow
def test_ggn_operator_against_the_explicit_gauss_newton_matrix(mlp):
  params, batch, _ = mlp
  G = explicit_ggn(params, batch)
  assert np.linalg.eigvalsh(G).min() > -1e-6 * np.abs(G).max()  # PSD, unlike the Hessian
  v = H.rademacher_like(jax.random.key(7), params)
  ragged = [{k: x[:1] for k, x in batch.items()}, {k: x[1:] for k, x in batch.items()}]
  for parts in ([batch], ragged):  # token-weighted like the HVP operator
    gv = flat(H.make_ggn(mlp_logits, parts)(params, v))
    assert np.linalg.norm(gv - G @ flat(v)) < 1e-5 * np.linalg.norm(G @ flat(v))
  # tr G is the Fisher trace exactly (the expectation the label-sampling estimator targets)
  assert abs(np.trace(G) - exact_fisher_trace(params, [batch])) < 1e-4 * np.trace(G)
  op = H.make_ggn(mlp_logits, ragged)
  r = H.hutchinson_trace(op, params, jax.random.key(8), 256, chunk=32, blocks=[(r"^(l\d)/", r"\1")])
  within(r, np.trace(G))
  plain = H.hutchinson_trace(op, params, jax.random.key(8), 16, chunk=8, amortise=False)
  np.testing.assert_allclose(plain.samples, r.samples[:16], rtol=1e-5)  # amortised == one matvec per probe
  top = H.top_eigenvalues(op, params, jax.random.key(9), k=2, num_steps=40)
  np.testing.assert_allclose(top.eigenvalues, np.linalg.eigvalsh(G)[::-1][:2], rtol=1e-3)


def test_ggn_equals_the_hessian_when_logits_are_linear_in_the_parameters():
  big = {
    "x": jnp.asarray(np.random.default_rng(6).normal(size=(4, 8, D)), jnp.float32),
    "y": jnp.asarray(np.random.default_rng(7).integers(0, V, (4, 8))),
    "mask": jnp.ones((4, 8), jnp.float32),
  }
  W = {"w": jnp.asarray(np.random.default_rng(5).normal(size=(D, V)), jnp.float32), "b": jnp.zeros(V)}
  lin = lambda p, b: b["x"] @ p["w"] + p["b"]  # noqa: E731
  loss = lambda p, b: -jnp.take_along_axis(jax.nn.log_softmax(lin(p, b)), b["y"][..., None], -1).mean()  # noqa: E731
  v = H.gaussian_like(jax.random.key(3), W)
  hv, gv = flat(H.make_hvp(loss, [big])(W, v)), flat(H.make_ggn(lin, [big])(W, v))
  assert np.linalg.norm(gv - hv) < 1e-5 * np.linalg.norm(hv)
  with pytest.raises(ValueError, match="needs logits_fn"):
    H.HVPOperator(None, [big], curvature="ggn")


# ------------------------------------------------------------------------------------------------
# 6. Sharding: same numbers on a (2,2,2) mesh and on one device; results carry the params' shardings


def mesh222():
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)


@pytest.mark.slow
def test_estimators_agree_on_a_mesh_and_one_device(mlp):
  params, batch, _ = mlp
  mesh = mesh222()
  specs = {"l1": {"w": P("fsdp", "tensor"), "b": P("tensor")}, "l2": {"w": P("tensor", "fsdp"), "b": P("fsdp")}}
  sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  halves = [{k: x[:2] for k, x in batch.items()}, {k: x[2:] for k, x in batch.items()}]
  sbatch = jax.device_put(halves, NamedSharding(mesh, P("data")))
  single = jax.device_put(params, jax.devices()[0])

  def run(p, b):
    mv = H.make_hvp(mlp_loss, b)  # two equal-shaped batches: the scanned, token-weighted operator
    assert mv.stacked
    k = jax.random.key(11)
    return {
      "hutchinson": H.hutchinson_trace(mv, p, k, 8, blocks=[(r"^(l\d)/", r"\1")]).samples,
      "hutchinson_plain": H.hutchinson_trace(mv, p, k, 4, amortise=False, select="l1").samples,
      "hutchpp": H.hutchpp_trace(mv, p, k, 12).estimate,
      "top": H.top_eigenvalues(mv, p, k, k=2, num_steps=12).eigenvalues,
      "power": H.power_iteration(mv, p, k, num_iters=15, tol=0.0).estimate,
      "slq": H.slq_density(mv, p, k, num_runs=2, num_steps=12).nodes,  # same compiled Lanczos as "top"
      "fisher": H.fisher_trace(mlp_logits, p, b, k, 4).samples,
      "ggn": H.hutchinson_trace(H.make_ggn(mlp_logits, b), p, k, 4).samples,
    }, mv

  one, _ = run(single, halves)
  eight, mv8 = run(sharded, sbatch)
  for name in one:
    np.testing.assert_allclose(eight[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
  v = H.probe_like(jax.random.key(0), sharded)
  hv = mv8(sharded, v)
  for leaf, vl, pl in zip(jax.tree.leaves(hv), jax.tree.leaves(v), jax.tree.leaves(sharded)):
    assert leaf.sharding == pl.sharding and vl.sharding == pl.sharding
  assert len(hv["l1"]["w"].sharding.device_set) == 8


@pytest.mark.slow
def test_transformer_hutchinson_on_a_mesh_matches_one_device():
  from flax import linen as nn

  from lib import model as M
  from lib import sharding

  model = M.make(M.preset("nano", vocab_size=24, max_len=16, n_heads=2))
  single = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  x = np.random.default_rng(0).integers(4, 24, (8, 16)).astype(np.int32)
  b = {
    "inputs": x,
    "targets": np.roll(x, -1, 1),
    "mask": np.ones_like(x),
    "segment_ids": np.ones_like(x),
    "positions": np.broadcast_to(np.arange(16, dtype=np.int32), x.shape).copy(),
  }
  loss = lambda p, bb: M.mean_loss(model, p, bb)  # noqa: E731
  r1 = H.hutchinson_trace(H.make_hvp(loss, [jax.tree.map(jnp.asarray, b)]), single, jax.random.key(1), 4, blocks=True)
  mesh = mesh222()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    params = jax.device_put(single, M.param_shardings(model, mesh))
    mv = H.make_hvp(loss, [jax.device_put(b, sharding.batch_sharding(mesh))])
    r8 = H.hutchinson_trace(mv, params, jax.random.key(1), 4, blocks=True)
    v = H.probe_like(jax.random.key(0), params)
  np.testing.assert_allclose(r8.samples, r1.samples, rtol=1e-5)
  for name in r1.blocks:
    np.testing.assert_allclose(r8.blocks[name][0], r1.blocks[name][0], rtol=1e-5, atol=1e-7 * abs(r1.estimate))
  assert set(r8.blocks) == {"embeddings", "head", *(f"layer_{i}/{p}" for i in (0, 1) for p in ("attn", "mlp", "norm"))}
  w = v["layer_0"]["mlp"]["wi"]["kernel"]
  assert w.sharding == params["layer_0"]["mlp"]["wi"]["kernel"].sharding and len(w.sharding.device_set) == 8


# ------------------------------------------------------------------------------------------------
# 7. Blocks, errors, NaN reporting


def test_param_blocks_are_a_function_of_path_names():
  z = jnp.zeros(1)
  params = {
    "embed": z,
    "pos_embed": z,
    "layers_3": {"self_attention": {"q": z}, "ffn": {"w1": z}, "ln_1": {"scale": z}, "gate": z},
    "blocks": [{"attn": {"k": z}, "mlp": {"w": z}}],
    "final_norm": {"scale": z},
    "lm_head": z,
    "misc": z,
  }
  got = H.param_blocks(params)
  assert got == {
    "blocks/0/attn/k": "layer_0/attn",
    "blocks/0/mlp/w": "layer_0/mlp",
    "embed": "embeddings",
    "final_norm/scale": "head",
    "layers_3/ffn/w1": "layer_3/mlp",
    "layers_3/gate": "layer_3/other",
    "layers_3/ln_1/scale": "layer_3/norm",
    "layers_3/self_attention/q": "layer_3/attn",
    "lm_head": "head",
    "misc": "other",
    "pos_embed": "embeddings",
  }
  assert set(H.param_blocks(params, lambda p: p.split("/")[0]).values()) == {
    "embed",
    "pos_embed",
    "layers_3",
    "blocks",
    "final_norm",
    "lm_head",
    "misc",
  }


def test_errors(mlp):
  params, batch, _ = mlp
  mv = H.make_hvp(mlp_loss, [batch])
  with pytest.raises(ValueError, match=r"include='layers_0/attn/\.\*'.*matches no parameter.*'l1/w'"):
    H.hutchinson_trace(mv, params, jax.random.key(0), 2, select="layers_0/attn/.*")
  with pytest.raises(ValueError, match="matches no parameter"):
    H.lanczos(mv, params, jax.random.key(0), 3, select=H.ParamSelection(exclude="."))
  for call in (
    lambda: H.hutchinson_trace(mv, params, jax.random.key(0), 2, dist="uniform"),
    lambda: H.hutchpp_trace(mv, params, jax.random.key(0), 6, dist="uniform"),
    lambda: H.probe_like(jax.random.key(0), params, "uniform"),
  ):
    with pytest.raises(ValueError, match="distribution 'uniform'"):
      call()
  with pytest.raises(ValueError, match="which"):
    H.top_eigenvalues(mv, params, jax.random.key(0), which="BE")


@pytest.mark.slow
def test_nan_in_an_hvp_is_reported_not_averaged():
  params = {"x": jnp.ones(3)}
  mv = H.make_hvp(lambda p, b: jnp.sum(jnp.sqrt(p["x"] - 2.0)), [{"mask": np.ones(1)}])
  nan_logits = lambda p, b: jnp.log(p["x"] - 2.0)[None, None, :]  # noqa: E731
  for name, call in (
    ("Hutchinson probe 0", lambda: H.hutchinson_trace(mv, params, jax.random.key(0), 4)),
    ("Hutch++", lambda: H.hutchpp_trace(mv, params, jax.random.key(0), 6)),
    ("Lanczos step 0", lambda: H.top_eigenvalues(mv, params, jax.random.key(0), k=1, num_steps=2)),
    ("power iteration", lambda: H.power_iteration(mv, params, jax.random.key(0), 3)),
    ("Fisher sample 0", lambda: H.fisher_trace(nan_logits, params, [{"mask": jnp.ones((1, 1))}], jax.random.key(0), 2)),
  ):
    with pytest.raises(FloatingPointError, match=f"non-finite.*{re.escape(name)}"):
      call()
