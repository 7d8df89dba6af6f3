"""Trace, eigenvalue and spectral-density estimators for any curvature operator on (sharded) parameters.

Operators (`make_hvp`, `make_ggn`, `hvp`), parameter selections (`ParamSelection`), blocks and the vector
algebra live in `analysis/hessian_ops.py`; their public names are re-exported here, so
`from analysis import hessian as H` reaches everything. A matvec is an `HVPOperator` or any traceable
`matvec(params, v) -> C v`. Every estimator runs its whole loop (probes, Lanczos steps, power steps)
inside one jitted function and brings only scalars back to the host, where non-finite values raise
`FloatingPointError` (the caller marks the row invalid). Which parameters are measured is one argument,
`select` (a `ParamSelection` or an include regex): the estimate is then that of the diagonal block C_SS.

Lanczos, power iteration and Hutch++ keep their vectors in the operator's `FlatView` (one float32
vector x_N, sharded over the whole mesh; unravelled only for the matvec), so their compiled loop does
each vector operation once, not once per parameter leaf: compile time does not grow with the number of
leaves beyond the operator's own. Hutchinson and Fisher keep per-leaf dot products (per-block traces).

Shape legend:
  N   parameters (selected ones: n)          P   probes in one jitted chunk
  k   Hutch++ sketch size (num_matvecs // 3)  m   Lanczos steps;  R   SLQ runs
  B, L, V   batch, sequence length, vocabulary;  T   loss tokens (sum of masks) over all batches

Estimators (each returns an `Estimate`: estimate, stderr, n_matvecs, per-probe samples, ...):
  hutchinson_trace   tr(C) or tr of the diagonal block of selected parameters; per-block traces
                     (with a `make_ggn` operator: tr of the Gauss-Newton matrix = tr(F), label-free)
  hutchpp_trace      Hutch++ (Meyer et al. 2021); stderr of the residual part only
  fisher_trace       tr(F), labels sampled from the model (Liu et al. 2023, App. B.1)
  power_iteration    λ of largest MAGNITUDE, residual ‖Hv − λv‖, extra['converged']
  lanczos            tridiagonal (alphas, betas), full reorthogonalisation
  top_eigenvalues    Ritz values with residual bounds max(|β_m s_mi|, float32 floor)
  slq_density        spectral density by stochastic Lanczos quadrature;  slq_trace_f: tr f(H)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from analysis.hessian_ops import (  # noqa: F401  (re-exported: the estimators' callers need them)
  DEFAULT_BLOCK_RULES,
  DISTRIBUTIONS,
  HIGHEST,
  FlatView,
  HVPOperator,
  MatVec,
  ParamSelection,
  PyTree,
  _apply_sel,
  _cached,
  _check_dist,
  _constrain,
  _leaf_dot,
  _leaf_shardings,
  _like_params,
  _num_tokens,
  _sharding_key,
  _traceable,
  block_of,
  flat_dot,
  flat_norm,
  gaussian_like,
  ggn_linearised,
  hvp,
  make_ggn,
  make_hvp,
  param_blocks,
  param_paths,
  probe_like,
  rademacher_like,
  tree_dot,
)
from lib import errors

FLOAT32_EPS = float(np.finfo(np.float32).eps)


@dataclasses.dataclass
class Estimate:
  """An estimator's answer. `stderr` is a standard error (trace estimators) or an error bound
  (eigenvalues: the residual); `n_matvecs` counts HVPs (Fisher: backward passes)."""

  estimate: float
  stderr: float
  n_matvecs: int
  samples: np.ndarray | None = None
  blocks: dict[str, tuple[float, float]] | None = None
  eigenvalues: np.ndarray | None = None
  residuals: np.ndarray | None = None
  grid: np.ndarray | None = None
  density: np.ndarray | None = None
  nodes: np.ndarray | None = None
  weights: np.ndarray | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Tridiagonal:
  """Lanczos output: T = tridiag(betas, alphas, betas); beta_last = β_m (for residual bounds); n the
  dimension of the (selected) space; basis the stacked Krylov vectors [m, ...] if asked for."""

  alphas: np.ndarray
  betas: np.ndarray
  beta_last: float
  n_matvecs: int
  basis: PyTree | None = None
  n: int = 0

  def ritz(self) -> tuple[np.ndarray, np.ndarray]:
    """(θ_m ascending, S_mxm eigenvectors of T) in float64."""
    T_mxm = np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1)
    return np.linalg.eigh(T_mxm.astype(np.float64))

  def residual_bounds(self, theta_m: np.ndarray, S_mxm: np.ndarray) -> np.ndarray:
    """Per Ritz value: max(|β_m s_mi|, ε₃₂·‖T‖·√n). The first term is the exact-arithmetic bound (an
    eigenvalue lies within it); it can fall to 1e-31 while the float32 process is only accurate to its
    rounding. The floor is that rounding: each HVP and inner product over n float32 terms carries a
    relative error of order ε₃₂·√n (the probabilistic bound for length-n sums, Higham & Mary 2019),
    relative to the operator's norm, estimated by ‖T‖ = max|θ| (≤ ‖H‖, reached by converged runs)."""
    floor = rounding_floor(theta_m, self.n)
    return np.maximum(np.abs(self.beta_last * S_mxm[-1, :]), floor)


def rounding_floor(theta: np.ndarray, n: int) -> float:
  """ε₃₂ · max|θ| · √n: below this, a float32 residual bound says nothing (see Tridiagonal.residual_bounds)."""
  return FLOAT32_EPS * float(np.max(np.abs(theta), initial=0.0)) * float(np.sqrt(max(n, 1)))


def _check_finite(values: np.ndarray, what: str, offset: int = 0) -> np.ndarray:
  values = np.asarray(values, np.float64)
  bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(1)) if values.size else []
  if len(bad):
    raise FloatingPointError(
      f"non-finite value ({values.reshape(len(values), -1)[bad[0]][0]}) in {what} "
      f"{offset + int(bad[0])}: the HVP or gradient produced NaN/inf"
    )
  return values


def _stderr(x: np.ndarray) -> float:
  return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def _per_leaf(v: PyTree, hv: PyTree) -> jax.Array:
  """vᵀHv split by leaf, [n_leaves] float32."""
  return jnp.stack([_leaf_dot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(hv))])


def _fold(key, start, count: int):
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(count))


# ------------------------------------------------------------------------------------------------
# trace estimators


def _hutchinson_chunk(matvec: MatVec, params: PyTree, dist: str, sel, chunk: int, amortise: bool) -> Callable:
  """jitted (params, key, start, operands) -> vᵀHv per leaf [P, n_leaves] for probes start..start+P-1."""
  draw, sh = DISTRIBUTIONS[dist], _leaf_shardings(params)

  def probe(k, p):
    return _constrain(_like_params(_apply_sel(draw(k, p), sel), p), sh)

  if amortise and isinstance(matvec, HVPOperator):
    # Linearise each batch once (the gradient, or the logits for the GGN), then push every probe through
    # the tangent map only (vᵀCv = Σ_b w_b vᵀC_b v): ≈ the cost of PyHessian's retained graph, one
    # batch's residuals in memory.
    def f(p, key, start, ops):
      keys = _fold(key, start, chunk)

      def one_batch(b):
        lin = matvec.linearise(p, b)
        return lax.map(lambda k: (lambda v: _per_leaf(v, lin(v)))(probe(k, p)), keys)

      return matvec.per_batch(one_batch, ops)
  else:
    fn, _ = _traceable(matvec)

    def f(p, key, start, ops):
      return lax.map(lambda k: (lambda v: _per_leaf(v, fn(p, v, ops)))(probe(k, p)), _fold(key, start, chunk))

  return jax.jit(f)


def hutchinson_trace(
  matvec: MatVec,
  params: PyTree,
  key,
  num_probes: int,
  *,
  dist: str = "rademacher",
  select: ParamSelection | str | None = None,
  blocks: bool | Sequence[tuple[str, str]] | Callable[[str], str] | None = None,
  target_rel_err: float | None = None,
  min_probes: int = 8,
  chunk: int = 8,
  amortise: bool = True,
  progress: Callable[[int], Any] | None = None,
) -> Estimate:
  """Hutchinson: mean of vᵀHv over probes v (E[vvᵀ] = I), with its standard error.

  With a filter, probes are zero outside the selected parameters S, so the estimate is tr(H_SS), the
  trace of the *diagonal block* (the other parameters are held fixed). `blocks` (True = default
  `param_blocks` names, or rules / a callable) also returns {block: (trace, stderr)} from the same probes:
  v_bᵀ(Hv)_b has expectation tr(H_bb), and the blocks sum to the total probe by probe.
  Probe i is drawn from fold_in(key, i): results do not depend on `chunk`, the mesh or early stopping.
  `chunk` probes run per jitted call; with a `make_hvp` operator and `amortise`, they share one
  linearisation per batch (same numbers, ≈ one tangent pass per probe instead of a full HVP). A last
  partial chunk is computed whole and its extra probes discarded (use num_probes divisible by chunk).
  With `target_rel_err`, stops at the first chunk boundary (≥ min_probes) where stderr/|estimate| < it.
  `progress(n)` is called after each chunk with the number of probes it added (e.g. a tqdm `update`).
  A non-finite probe raises FloatingPointError naming the probe.
  """
  _check_dist(dist)
  if num_probes < 1:
    raise errors.AnalysisError(f"num_probes must be ≥ 1, not {num_probes}")
  sel = ParamSelection.of(select).mask(params)
  names = None
  if blocks:
    names = list(param_blocks(params, None if blocks is True else blocks).values())
  chunk = max(1, min(chunk, num_probes))
  ck = ("hutchinson", dist, sel, chunk, amortise, _sharding_key(params))
  f = _cached(matvec, ck, lambda: _hutchinson_chunk(matvec, params, dist, sel, chunk, amortise))
  _, ops = _traceable(matvec)
  rows = []
  while len(rows) < num_probes:
    start = len(rows)
    leaves = _check_finite(np.asarray(f(params, key, start, ops)), "Hutchinson probe", start)
    rows.extend(leaves[: num_probes - start])
    n = len(rows)
    if progress is not None:
      progress(n - start)
    if target_rel_err and n >= max(min_probes, 2) and n < num_probes:
      s = np.sum(rows, 1)
      if _stderr(s) < target_rel_err * abs(s.mean()):
        break
  leaves_PxL = np.asarray(rows)
  samples = leaves_PxL.sum(1)
  blk = None
  if names is not None:
    blk = {}
    for u in dict.fromkeys(names):  # first-seen order
      cols = [j for j, nm in enumerate(names) if nm == u and (sel is None or sel[j])]
      if cols:
        b = leaves_PxL[:, cols].sum(1)
        blk[u] = (float(b.mean()), _stderr(b))
  return Estimate(float(samples.mean()), _stderr(samples), len(samples), samples=samples, blocks=blk)


def _orthonormalise(Y_kxN: jax.Array, view: FlatView) -> tuple[jax.Array, jax.Array]:
  """Orthonormal basis of span(Y) (rows) via the k×k Gram matrix, done twice (like CholeskyQR2).
  Directions with Gram eigenvalue < 1e-6·max are dropped (zero rows). Returns (Q_kxN, rank)."""
  for rel in (1e-6, 0.5):
    lam_k, U_kxk = jnp.linalg.eigh(jnp.dot(Y_kxN, Y_kxN.T, precision=HIGHEST))
    keep = lam_k > rel * jnp.max(lam_k)
    scale = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam_k, 1.0)), 0.0)
    Y_kxN = view.constrain(jnp.dot((U_kxk * scale[None, :]).T, Y_kxN, precision=HIGHEST))
  return Y_kxN, jnp.sum(keep)


def _project_out(Q_kxN: jax.Array, g_N: jax.Array) -> jax.Array:
  """(I − QᵀQ) g for orthonormal rows Q (zero rows are harmless)."""
  return g_N - jnp.dot(jnp.dot(Q_kxN, g_N, precision=HIGHEST), Q_kxN, precision=HIGHEST)


def hutchpp_trace(
  matvec: MatVec,
  params: PyTree,
  key,
  num_matvecs: int,
  *,
  dist: str = "rademacher",
  select: ParamSelection | str | None = None,
) -> Estimate:
  """Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with a budget of m HVPs, k = m // 3:

    S: k probes; Q_k = orth(H S) (stacked vectors, sharded like params); exact tr(QᵀHQ) with k HVPs;
    Hutchinson on the deflated residual with m − 2k probes g ← (I − QQᵀ) g.

  Unbiased for any sketch. `stderr` is the standard error of the *residual* Hutchinson part only: the
  deflated part is exact given Q, and the sketch's randomness is not in the error bar (repeat with
  other keys to see it). `samples` are the residual probes' values; extra['exact_part'] is tr(QᵀHQ).
  Needs 2k stacked vectors of memory. Lower variance than Hutchinson when the spectrum decays fast.
  """
  _check_dist(dist)
  if num_matvecs < 3:
    raise errors.AnalysisError(f"Hutch++ needs num_matvecs ≥ 3, not {num_matvecs}")
  sel = ParamSelection.of(select).mask(params)
  k, n_res = num_matvecs // 3, num_matvecs - 2 * (num_matvecs // 3)
  draw, sh = DISTRIBUTIONS[dist], _leaf_shardings(params)
  fn, ops = _traceable(matvec)
  view = FlatView(params, sel)

  def build():
    def f(p, key, ops):
      k_sketch, k_res = jax.random.split(key)
      hv = view.operator(fn, p, ops)

      def probe(kk):  # drawn leaf by leaf (the same numbers as Hutchinson's probes), then flattened
        return view.ravel(_constrain(_like_params(draw(kk, p), p), sh))

      Y_kxN = view.constrain(lax.map(lambda kk: hv(probe(kk)), _fold(k_sketch, 0, k)))
      Q_kxN, rank = _orthonormalise(Y_kxN, view)
      exact_k = lax.map(lambda q_N: flat_dot(q_N, hv(q_N)), Q_kxN)

      def residual(kk):
        g_N = _project_out(Q_kxN, probe(kk))
        return flat_dot(g_N, hv(g_N))

      return exact_k, lax.map(residual, _fold(k_res, 0, n_res)), rank

    return jax.jit(f)

  f = _cached(matvec, ("hutchpp", dist, sel, num_matvecs, _sharding_key(params)), build)
  exact_k, res, rank = f(params, key, ops)
  exact = float(_check_finite(np.asarray(exact_k), "Hutch++ sketch vector").sum())
  res = _check_finite(np.asarray(res), "Hutch++ residual probe")
  return Estimate(
    exact + float(res.mean()),
    _stderr(res),
    2 * k + n_res,
    samples=res,
    extra={"exact_part": exact, "sketch_rank": int(rank), "sketch_size": k},
  )


def fisher_trace(
  logits_fn: Callable,
  params: PyTree,
  batches: Sequence[dict],
  key,
  num_samples: int,
  *,
  select: ParamSelection | str | None = None,
  chunk: int = 8,
  target_rel_err: float | None = None,
  min_samples: int = 8,
  progress: Callable[[int], Any] | None = None,
) -> Estimate:
  """tr(F) of the model's predictive distribution on the fixed tokens (Liu et al. 2023, App. B.1).

  Loss L(θ) = (1/T) Σ_t ℓ_t with ℓ_t(y) = −log p_θ(y | x_t) over the T masked tokens of all batches.
  F = (1/T) Σ_t E_{y~p_θ(·|x_t)} [∇ℓ_t(y) ∇ℓ_t(y)ᵀ], so tr(F) = (1/T) Σ_t E_y ‖∇ℓ_t(y)‖², the expected
  squared norm of a *per-token* gradient. This F is E_y[∇²L] when labels follow the model (Bartlett
  identity), hence tr(F) = tr(H) where the model matches the data. (Cov(∇L) under sampled labels is F/T:
  a batch-level gradient estimates tr(F)/T, plus cross terms between tokens.)

  One sample = one backward per batch, no per-token gradients: sample y_t ~ p_θ(·|x_t) and signs
  r_t = ±1, take g = ∇_θ Σ_t r_t m_t ℓ_t(y_t); E_r‖g‖² = Σ_t m_t ‖∇ℓ_t(y_t)‖² (cross terms cancel for
  every label draw), so Σ_batches ‖g‖² / T is unbiased for tr(F). The forward pass and its VJP are
  shared by the `chunk` samples of one call. With a filter, gradients are restricted to the selected
  parameters (the diagonal block of F). Liu et al.'s released code instead runs Hutchinson with one
  Gaussian probe and the *true* labels (use `hutchinson_trace(dist='gaussian')`).
  `n_matvecs` counts backward passes (num_samples × batches). `target_rel_err`, `min_samples` and
  `progress` work as in `hutchinson_trace` (per chunk of samples; either one syncs with the host once
  per chunk).
  """
  if num_samples < 1:
    raise errors.AnalysisError(f"num_samples must be ≥ 1, not {num_samples}")
  sel = ParamSelection.of(select).mask(params)
  batches = list(batches)
  T = sum(_num_tokens(b) for b in batches)
  if T <= 0:
    raise errors.AnalysisError("fisher_trace: the batches have no loss tokens (every mask is zero)")
  chunk = max(1, min(chunk, num_samples))

  def build():
    def f(p, b, key, j, start):
      logits_BxLxV, vjp = jax.vjp(lambda q: logits_fn(q, b), p)
      logits_BxLxV = logits_BxLxV.astype(jnp.float32)
      probs_BxLxV = jax.nn.softmax(logits_BxLxV, -1)
      mask_BxL = b["mask"].astype(jnp.float32)

      def one(i):
        k_y, k_r = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, i), j))
        y_BxL = jax.random.categorical(k_y, logits_BxLxV)
        r_BxL = jax.random.rademacher(k_r, y_BxL.shape, jnp.float32) * mask_BxL
        # d/dlogits of Σ_t r_t ℓ_t(y_t) = r_t (softmax − onehot(y_t))
        cot = r_BxL[..., None] * (probs_BxLxV - jax.nn.one_hot(y_BxL, logits_BxLxV.shape[-1]))
        (g,) = vjp(cot.astype(logits_BxLxV.dtype))
        g = _apply_sel(g, sel)
        return tree_dot(g, g)

      return lax.map(one, start + jnp.arange(chunk))

    return jax.jit(f)

  f = _cached(logits_fn, ("fisher", sel, chunk, _sharding_key(params)), build)
  sums = []
  for start in range(0, num_samples, chunk):
    acc = None
    for j, b in enumerate(batches):
      s = f(params, b, key, j, start)
      acc = s if acc is None else acc + s
    sums.append(acc)  # without a target or progress, no host sync inside the loops
    n = min(start + chunk, num_samples)
    if progress is not None or target_rel_err:
      done = _check_finite(np.concatenate([np.asarray(s, np.float64) for s in sums])[:n] / T, "Fisher sample")
      if progress is not None:
        progress(n - start)
      if target_rel_err and n >= max(min_samples, 2) and n < num_samples:
        if _stderr(done) < target_rel_err * abs(done.mean()):
          break
  samples = np.concatenate([np.asarray(s, np.float64) for s in sums])[:n] / T
  _check_finite(samples, "Fisher sample")
  return Estimate(float(samples.mean()), _stderr(samples), n * len(batches), samples=samples, extra={"n_tokens": T})


# ------------------------------------------------------------------------------------------------
# eigenvalues and spectral density


def power_iteration(
  matvec: MatVec,
  params: PyTree,
  key,
  num_iters: int = 50,
  tol: float = 1e-5,
  *,
  select: ParamSelection | str | None = None,
) -> Estimate:
  """λ of largest MAGNITUDE (not the largest algebraic: at init that is often a negative one; use
  `top_eigenvalues` for the sharpness) by power iteration (Rayleigh quotients), in one jitted while-loop.

  Stops when |λ_i − λ_{i−1}| ≤ tol·|λ_i| (extra['converged'] = True) or after num_iters (False).
  `stderr` holds the residual ‖Hv − λv‖ of the unit vector v (some eigenvalue lies within it of λ);
  extra['iterations'] = n_matvecs. A baseline: prefer `top_eigenvalues`.
  """
  sel = ParamSelection.of(select).mask(params)
  fn, ops = _traceable(matvec)
  sh = _leaf_shardings(params)
  view = FlatView(params, sel)

  def build():
    def f(p, key, ops):
      hv = view.operator(fn, p, ops)
      v_N = view.ravel(_constrain(gaussian_like(key, p), sh))  # leaf-wise draw: the same start as before
      v_N = v_N / flat_norm(v_N)

      def done(lam, lam_old):
        return jnp.abs(lam - lam_old) <= tol * jnp.abs(lam)

      def cond(s):
        i, _, lam, lam_old, _ = s
        return (i < num_iters) & ((i < 2) | ~done(lam, lam_old))

      def body(s):
        i, v_N, lam, _, _ = s
        w_N = hv(v_N)
        new = flat_dot(v_N, w_N)
        res = flat_norm(w_N - new * v_N)
        nrm = flat_norm(w_N)
        return i + 1, w_N * jnp.where(nrm > 0, 1.0 / nrm, 0.0), new, lam, res

      init = (0, v_N, jnp.float32(0), jnp.float32(jnp.inf), jnp.float32(jnp.inf))
      i, _, lam, lam_old, res = lax.while_loop(cond, body, init)
      return lam, res, i, (i >= 2) & done(lam, lam_old)

    return jax.jit(f)

  f = _cached(matvec, ("power", num_iters, tol, sel, _sharding_key(params)), build)
  lam, res, n, conv = (np.asarray(x) for x in f(params, key, ops))
  _check_finite(np.asarray([lam, res]), "power iteration value")
  return Estimate(float(lam), float(res), int(n), extra={"converged": bool(conv), "iterations": int(n)})


def _lanczos_fn(matvec: MatVec, view: FlatView, m: int, reorth: str, return_basis: bool) -> Callable:
  """jitted (params, v0, key, operands) -> (alphas_m, betas_m[, basis_mxN]); betas[j] couples v_j, v_{j+1}.
  Every vector is a flat x_N of `view` (one op per vector operation, whatever the number of leaves)."""
  fn, _ = _traceable(matvec)

  def start(v0):
    v0_N = view.ravel(v0)
    return v0_N / flat_norm(v0_N)

  def full(p, v0, key, ops):
    hv = view.operator(fn, p, ops)
    salt = jax.random.key_data(key).reshape(-1)[-1]  # restarts from hashed signs, not threefry (compile time)

    def reorthogonalise(w_N, basis_mxN):  # two block Gram-Schmidt passes (CGS2): matvecs, not a sequential loop
      for _ in range(2):  # (matvecs: XLA:CPU runs a [2, N] x [N, m] matmul ~10x slower than two of these)
        w_N = w_N - jnp.dot(jnp.dot(basis_mxN, w_N, precision=HIGHEST), basis_mxN, precision=HIGHEST)
      return w_N

    def body(j, s):  # v_N (unit, ⟂ rows < j) is carried, not read back from the basis: one row written per step
      basis_mxN, v_N, alphas_m, betas_m, scale = s
      basis_mxN = view.constrain(basis_mxN.at[j].set(v_N))
      w_N = hv(v_N)
      a = flat_dot(v_N, w_N)
      w_N = reorthogonalise(w_N, basis_mxN)  # removes a·v_j and β_{j−1}·v_{j−1} along with everything else
      b = flat_norm(w_N)
      scale = jnp.maximum(scale, jnp.abs(a) + b)
      # breakdown (invariant subspace found): continue from a fresh random vector ⟂ basis, β = 0
      broke = b <= 1e-6 * scale

      def fresh():
        r_N = reorthogonalise(view.hashed_signs(salt + jnp.uint32(j)), basis_mxN)
        return r_N / jnp.maximum(flat_norm(r_N), 1e-30)

      nxt_N = lax.cond(broke, fresh, lambda: w_N / jnp.where(broke, 1.0, b))
      return basis_mxN, nxt_N, alphas_m.at[j].set(a), betas_m.at[j].set(jnp.where(broke, 0.0, b)), scale

    z = jnp.zeros(m, jnp.float32)
    basis_mxN = view.constrain(jnp.zeros((m, view.n), jnp.float32))
    basis_mxN, _, alphas_m, betas_m, _ = lax.fori_loop(0, m, body, (basis_mxN, start(v0), z, z, jnp.float32(0)))
    return (alphas_m, betas_m, basis_mxN) if return_basis else (alphas_m, betas_m)

  def plain(p, v0, key, ops):  # three-term recurrence only: O(1) vectors, ghost eigenvalues possible
    hv = view.operator(fn, p, ops)

    def body(j, s):
      v_prev, v_N, b_prev, alphas_m, betas_m = s
      w_N = hv(v_N) - b_prev * v_prev
      a = flat_dot(v_N, w_N)
      w_N = w_N - a * v_N
      b = flat_norm(w_N)
      nxt_N = w_N * jnp.where(b > 0, 1.0 / b, 0.0)
      return v_N, nxt_N, b, alphas_m.at[j].set(a), betas_m.at[j].set(b)

    z = jnp.zeros(m, jnp.float32)
    v0_N = start(v0)
    out = lax.fori_loop(0, m, body, (jnp.zeros_like(v0_N), v0_N, jnp.float32(0), z, z))
    return out[3], out[4]

  return jax.jit(full if reorth == "full" else plain)


def _run_lanczos(
  matvec: MatVec, params: PyTree, key, num_steps: int, sel, reorth: str, start: PyTree | None = None, return_basis: bool = False
) -> Tridiagonal:
  view = FlatView(params, sel)
  m = int(min(num_steps, view.n_selected))
  if m < 1:
    raise errors.AnalysisError(f"num_steps must be ≥ 1, not {num_steps}")
  f = _cached(
    matvec,
    ("lanczos", m, sel, reorth, return_basis, _sharding_key(params)),
    lambda: _lanczos_fn(matvec, view, m, reorth, return_basis),
  )
  _, ops = _traceable(matvec)
  k_start, k_fresh = jax.random.split(key)
  v0 = start if start is not None else probe_like(k_start, params)
  out = f(params, v0, k_fresh, ops)
  alphas, betas = (np.asarray(x, np.float64) for x in out[:2])
  _check_finite(np.stack([alphas, betas], 1), "Lanczos step")
  basis = view.unravel_stacked(out[2]) if return_basis else None
  return Tridiagonal(alphas, betas[:-1], float(betas[-1]), m, basis=basis, n=view.n_selected)


def lanczos(
  matvec: MatVec,
  params: PyTree,
  key,
  num_steps: int,
  *,
  start: PyTree | None = None,
  reorth: str = "full",
  select: ParamSelection | str | None = None,
  return_basis: bool = False,
) -> Tridiagonal:
  """m Lanczos steps from `start` (default: a Rademacher probe from `key`) in one jitted fori_loop.

  reorth='full': the basis is one flat float32 [m, N] array (the operator's `FlatView`) and every new
  vector is re-orthogonalised against all of it by two block Gram-Schmidt passes; memory m vectors. On
  breakdown (an invariant subspace, β ≈ 0) it continues from a fresh random orthogonal vector with β = 0,
  so the Ritz values stay eigenvalues.
  reorth='none': three-term recurrence (O(1) vectors; spurious copies of converged eigenvalues appear —
  use for densities only). m is capped at the dimension.
  With a filter: the Lanczos process of the diagonal block H_SS.
  """
  if reorth not in ("full", "none"):
    raise errors.AnalysisError(f"reorth must be 'full' or 'none', not {reorth!r}")
  sel = ParamSelection.of(select).mask(params)
  return _run_lanczos(matvec, params, key, num_steps, sel, reorth, start, return_basis)


def top_eigenvalues(
  matvec: MatVec,
  params: PyTree,
  key,
  k: int = 5,
  num_steps: int = 30,
  which: str = "LA",
  *,
  tol: float = 1e-3,
  select: ParamSelection | str | None = None,
) -> Estimate:
  """Top-k Ritz values of an m-step Lanczos run ('LA' largest algebraic — the sharpness, 'LM' largest
  magnitude, 'SA' smallest algebraic) with residual bounds |β_m s_{m,i}| (an eigenvalue of H lies within
  that distance of each Ritz value) floored at float32 rounding (`Tridiagonal.residual_bounds`: ε₃₂·‖T‖·√n,
  so on large models no tol below ≈ ε₃₂√n can be met). extra['converged'] flags bound < tol·|θ|;
  extra['lambda_min'] is the smallest Ritz value of the same run with its bound (negative curvature, at
  no extra HVP)."""
  if which not in ("LA", "LM", "SA"):
    raise errors.AnalysisError(f"which must be 'LA', 'LM' or 'SA', not {which!r}")
  T = lanczos(matvec, params, key, num_steps, select=select)
  theta_m, S_mxm = T.ritz()
  resid_m = T.residual_bounds(theta_m, S_mxm)
  order = {"LA": np.argsort(-theta_m), "SA": np.argsort(theta_m), "LM": np.argsort(-np.abs(theta_m))}[which][:k]
  vals, res = theta_m[order], resid_m[order]
  i_min = int(np.argmin(theta_m))
  return Estimate(
    float(vals[0]),
    float(res[0]),
    T.n_matvecs,
    eigenvalues=vals,
    residuals=res,
    extra={
      "converged": res < tol * np.maximum(np.abs(vals), 1e-30),
      "which": which,
      "lambda_min": (float(theta_m[i_min]), float(resid_m[i_min])),
    },
  )


def _slq(matvec, params, key, num_runs: int, num_steps: int, sel, reorth: str):
  """Per run r: Ritz nodes θ_r [m] and weights (e₁ᵀ s_i)² [m] from a unit Rademacher start z/√n."""
  if num_runs < 1:
    raise errors.AnalysisError(f"num_runs must be ≥ 1, not {num_runs}")
  runs = [_run_lanczos(matvec, params, jax.random.fold_in(key, r), num_steps, sel, reorth) for r in range(num_runs)]
  ritz = [T.ritz() for T in runs]
  return [t for t, _ in ritz], [S[0, :] ** 2 for _, S in ritz], sum(T.n_matvecs for T in runs), runs[0].n


def slq_density(
  matvec: MatVec,
  params: PyTree,
  key,
  num_runs: int = 4,
  num_steps: int = 30,
  grid: int | np.ndarray = 1000,
  sigma: float | None = None,
  *,
  reorth: str = "full",
  select: ParamSelection | str | None = None,
) -> Estimate:
  """Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019; Lin et al. 2016).

  Each run gives nodes θ_i (Ritz values) and weights w_i = (e₁ᵀ s_i)² (Σ w_i = 1); the density is
  (1/R) Σ_runs Σ_i w_i N(x; θ_i, σ²) on `grid` (points, or an array), σ default (θ_max − θ_min)/m. It
  integrates to 1 and its mean is an unbiased estimate of tr(H)/n. `estimate` = n·mean_r Σ_i w_i θ_i,
  the SLQ trace (a Hutchinson estimate over the R start vectors) with its stderr across runs; raw
  nodes/weights (concatenated over runs) are returned for re-smoothing.
  """
  sel = ParamSelection.of(select).mask(params)
  nodes, weights, n_mv, n = _slq(matvec, params, key, num_runs, num_steps, sel, reorth)
  th, w = np.concatenate(nodes), np.concatenate(weights) / num_runs
  lo, hi = float(th.min()), float(th.max())
  sigma = float(sigma or max(hi - lo, 1e-12 * max(1.0, abs(hi))) / max(len(nodes[0]), 1))
  grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, int(grid)) if np.ndim(grid) == 0 else np.asarray(grid, np.float64)
  dens = (w[None, :] * np.exp(-0.5 * ((grid[:, None] - th[None, :]) / sigma) ** 2)).sum(1) / (np.sqrt(2 * np.pi) * sigma)
  per_run = np.array([n * float(wr @ tr) for tr, wr in zip(nodes, weights)])
  return Estimate(
    float(per_run.mean()),
    _stderr(per_run),
    n_mv,
    samples=per_run,
    grid=grid,
    density=dens,
    nodes=th,
    weights=w,
    extra={"sigma": sigma, "dimension": n},
  )


def slq_trace_f(
  matvec: MatVec,
  params: PyTree,
  key,
  f: Callable[[np.ndarray], np.ndarray],
  num_runs: int = 4,
  num_steps: int = 30,
  *,
  reorth: str = "full",
  select: ParamSelection | str | None = None,
) -> Estimate:
  """tr f(H) ≈ n·mean_r Σ_i w_i f(θ_i) (f applied to Ritz values, vectorised numpy). Exact per run for
  polynomials of degree < 2m (then it is Hutchinson on f(H)); stderr across runs."""
  sel = ParamSelection.of(select).mask(params)
  nodes, weights, n_mv, n = _slq(matvec, params, key, num_runs, num_steps, sel, reorth)
  per_run = np.array([n * float(wr @ np.asarray(f(tr), np.float64)) for tr, wr in zip(nodes, weights)])
  return Estimate(float(per_run.mean()), _stderr(per_run), n_mv, samples=per_run, extra={"dimension": n})
