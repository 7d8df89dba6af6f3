"""Hessian-vector products and trace / spectrum estimators on (sharded) parameter pytrees.

Everything is model-agnostic: callers pass `loss_fn(params, batch) -> scalar mean loss` (and, for the
Fisher trace, `logits_fn(params, batch) -> logits_BxLxV` with `batch["mask"]`). Probe vectors are
pytrees with the parameters' shapes and shardings; HVPs are forward-over-reverse
(`jax.jvp(jax.grad(f))`, ≈2 gradients of cost, exact in fp32), jitted, one probe at a time so memory
stays ≈2.5× a gradient step. Legend: N parameters, k sketch/Krylov size, T tokens.

Estimators return an `Estimate` with the estimate, its standard error and the number of HVPs:
  hutchinson_trace   tr(H) (or of the diagonal block of filtered parameters), per-block traces
  hutchpp_trace      Hutch++ (Meyer et al. 2021): exact trace on a sketched top subspace + Hutchinson
                     on the deflated rest; stderr covers the residual part only (the sketched part is
                     exact given the sketch)
  fisher_trace       tr(F) with labels sampled from the model (Liu et al. App. B.1): F = mean over
                     tokens of E_y~p[∇ℓ_t ∇ℓ_tᵀ]; equals tr(H) at a minimiser of the expected loss
  power_iteration    λ of largest magnitude (+ residual ‖Hv − λv‖)
  lanczos / top_eigenvalues   full reorthogonalisation, Ritz values with residual bounds |β_m s_mi|
  slq_density        spectral density by stochastic Lanczos quadrature
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
MatVec = Callable[[PyTree, PyTree], PyTree]


@dataclasses.dataclass
class Estimate:
  estimate: float
  stderr: float
  n_matvecs: int
  samples: np.ndarray | None = None
  blocks: dict[str, tuple[float, float]] | None = None
  eigenvalues: np.ndarray | None = None
  residuals: np.ndarray | None = None
  grid: np.ndarray | None = None
  density: np.ndarray | None = None


# ------------------------------------------------------------------------------------------------
# pytree vector algebra (float32 accumulations, sharded reductions)

def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_add(a: PyTree, b: PyTree, alpha: float = 1.0) -> PyTree:
  return jax.tree.map(lambda x, y: x + alpha * y, a, b)


def tree_scale(a: PyTree, s) -> PyTree:
  return jax.tree.map(lambda x: x * s, a)


def tree_norm(a: PyTree) -> jax.Array:
  return jnp.sqrt(tree_dot(a, a))


def _keys_like(key, tree):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))


def rademacher_like(key, tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x, k: jax.random.rademacher(k, x.shape, jnp.float32), tree, _keys_like(key, tree))


def gaussian_like(key, tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x, k: jax.random.normal(k, x.shape, jnp.float32), tree, _keys_like(key, tree))


DISTRIBUTIONS = {"rademacher": rademacher_like, "gaussian": gaussian_like}


def _shardings(tree):
  return jax.tree.map(lambda x: getattr(x, "sharding", None), tree)


def _probe_fn(params: PyTree, dist: str, mask: PyTree | None):
  """A jitted key -> probe (masked), placed like the parameters (same values on any mesh)."""
  if dist not in DISTRIBUTIONS:
    raise ValueError(f"unknown probe distribution {dist!r}; valid: {sorted(DISTRIBUTIONS)}")
  draw = DISTRIBUTIONS[dist]

  def f(key):
    v = draw(key, params)
    return v if mask is None else jax.tree.map(lambda x, m: x * m, v, mask)

  return jax.jit(f, out_shardings=_shardings(params))


# ------------------------------------------------------------------------------------------------
# parameter paths, filters and blocks

def param_paths(params: PyTree) -> list[str]:
  return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def filter_mask(params: PyTree, include: str | None = None, exclude: str | None = None) -> PyTree | None:
  """0/1 per leaf: paths matching `include` (regex search) and not `exclude`; None = everything."""
  if not include and not exclude:
    return None
  paths = param_paths(params)
  keep = [(not include or re.search(include, p) is not None) and (not exclude or re.search(exclude, p) is None)
          for p in paths]
  if not any(keep):
    raise ValueError(f"parameter filter include={include!r} exclude={exclude!r} matches no parameter; "
                     f"paths look like {paths[:6]}")
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [jnp.float32(k) for k in keep])


def block_of(path: str) -> str:
  """Block name of a parameter path: embeddings, layer_i/attn, layer_i/mlp, layer_i/norm, head."""
  m = re.match(r"(layer_\d+)/(attn|mlp|ln_attn|ln_mlp)", path)
  if m:
    return f"{m.group(1)}/{'norm' if m.group(2).startswith('ln') else m.group(2)}"
  top = path.split("/")[0]
  if top in ("embed", "pos_embed", "proj_in"):
    return "embeddings"
  if top in ("head", "proj_out", "final_norm"):
    return "head"
  return top


def blocks_of(params: PyTree) -> list[str]:
  return [block_of(p) for p in param_paths(params)]


# ------------------------------------------------------------------------------------------------
# HVPs

def hvp(loss_fn: Callable, params: PyTree, batch, v: PyTree) -> PyTree:
  """H v by forward-over-reverse: the directional derivative of the gradient along v."""
  return jax.jvp(jax.grad(lambda p: loss_fn(p, batch)), (params,), (v,))[1]


def make_hvp(loss_fn: Callable, batches: Sequence[dict], weights: Sequence[float] | None = None) -> MatVec:
  """matvec(params, v) = Σ_b w_b H_b v, the HVP of the loss over all batches' tokens.

  `loss_fn` is a per-batch *mean*; weights default to each batch's share of mask tokens, so ragged or
  masked batches give exactly the HVP of the concatenated data (equal per-batch weights would not).
  """
  batches = list(batches)
  if weights is None:
    n = np.array([float(np.asarray(b["mask"]).sum()) if "mask" in b else 1.0 for b in batches])
    weights = n / n.sum()
  weights = [float(w) for w in weights]
  jitted = {}

  def fns(params):
    """HVP and sum jitted to return arrays sharded exactly like the parameters."""
    sh = _shardings(params)
    key = jax.tree.structure(params), tuple(str(x) for x in jax.tree.leaves(sh))
    if key not in jitted:
      out_sh = sh if all(x is not None for x in jax.tree.leaves(sh, is_leaf=lambda x: x is None)) else None
      jitted[key] = (jax.jit(lambda p, v, b, w: tree_scale(hvp(loss_fn, p, b, v), w), out_shardings=out_sh),
                     jax.jit(tree_add, out_shardings=out_sh))
    return jitted[key]

  def matvec(params, v):
    one, add = fns(params)
    out = None
    for b, w in zip(batches, weights):
      h = one(params, v, b, w)
      out = h if out is None else add(out, h)
    return out

  matvec.n_batches = len(batches)
  matvec.loss_fn, matvec.batches, matvec.weights = loss_fn, batches, weights  # for amortised probing
  return matvec


def _checked(x: jax.Array, what: str) -> float:
  x = float(x)
  if not np.isfinite(x):
    raise FloatingPointError(f"non-finite value ({x}) in {what}")
  return x


# ------------------------------------------------------------------------------------------------
# trace estimators

def _per_leaf(v: PyTree, hv: PyTree) -> jax.Array:
  return jnp.stack([jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(hv))])


def _amortised_probes(loss_fn: Callable, params: PyTree, dist: str, mask: PyTree | None):
  """jitted (params, batch, keys[c]) -> per-leaf vᵀHv [c, leaves]: the gradient is linearised once per
  call and each probe pays only the tangent pass (like keeping a first-order graph alive)."""
  draw = DISTRIBUTIONS[dist]
  sh = _shardings(params)

  def f(p, batch, keys):
    _, lin = jax.linearize(jax.grad(lambda q: loss_fn(q, batch)), p)

    def one(k):
      v = draw(k, p)
      if mask is not None:
        v = jax.tree.map(lambda x, m: x * m, v, mask)
      if all(s is not None for s in jax.tree.leaves(sh, is_leaf=lambda s: s is None)):
        v = jax.lax.with_sharding_constraint(v, sh)
      return _per_leaf(v, lin(v))

    return jax.lax.map(one, keys)

  return jax.jit(f)


def hutchinson_trace(matvec: MatVec, params: PyTree, key, num_probes: int, *, dist: str = "rademacher",
                     include: str | None = None, exclude: str | None = None, blocks: bool = False,
                     target_rel_err: float | None = None, min_probes: int = 8, chunk: int = 8) -> Estimate:
  """tr(H_SS) for the selected parameters S (all by default), mean of vᵀHv over probes.

  Per-block traces reuse the same probes: v_bᵀ(Hv)_b has expectation tr(H_bb), and the blocks sum to
  the total. With `target_rel_err`, stops once stderr/|estimate| < target (after `min_probes`).
  With a `make_hvp` operator and chunk > 1, probes run `chunk` at a time through one linearisation
  per batch (vᵀHv = Σ_b w_b vᵀH_b v): same probes, same numbers, ~2x cheaper per probe; memory holds
  one batch's linearisation residuals. chunk=1 uses the plain operator.
  """
  mask = filter_mask(params, include, exclude)
  probe = _probe_fn(params, dist, mask)
  names = blocks_of(params) if blocks else None
  uniq = sorted(set(names)) if blocks else []
  per_leaf = jax.jit(_per_leaf)
  amortised = chunk > 1 and getattr(matvec, "loss_fn", None) is not None
  fast = None
  if amortised:  # one compiled function per operator and setting (reused across checkpoints)
    cache = matvec.__dict__.setdefault("_amortised", {})
    ck = (dist, include, exclude, str(jax.tree.leaves(_shardings(params))))
    if ck not in cache:
      cache[ck] = _amortised_probes(matvec.loss_fn, params, dist, mask)
    fast = cache[ck]
  samples, block_samples = [], []
  i = 0
  while i < num_probes:
    if amortised:
      take = min(chunk, num_probes - i)
      keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(i, i + chunk))  # fixed shape: no recompile
      leaves = sum(w * np.asarray(fast(params, b, keys), np.float64) for b, w in zip(matvec.batches, matvec.weights))
      leaves = leaves[:take]
    else:
      v = probe(jax.random.fold_in(key, i))
      leaves = np.asarray(per_leaf(v, matvec(params, v)), np.float64)[None]
    for leaf in leaves:
      samples.append(_checked(leaf.sum(), f"Hutchinson probe {i}"))
      if blocks:
        block_samples.append([leaf[[n == u for n in names]].sum() for u in uniq])
      i += 1
    n = len(samples)
    if target_rel_err and n >= max(min_probes, 2):
      se = np.std(samples, ddof=1) / np.sqrt(n)
      if se < target_rel_err * abs(np.mean(samples)):
        break
  s = np.asarray(samples)
  se = float(np.std(s, ddof=1) / np.sqrt(len(s))) if len(s) > 1 else float("nan")
  blk = None
  if blocks:
    b = np.asarray(block_samples)
    blk = {u: (float(b[:, j].mean()), float(b[:, j].std(ddof=1) / np.sqrt(len(b))) if len(b) > 1 else float("nan"))
           for j, u in enumerate(uniq) if np.any(b[:, j] != 0)}
  return Estimate(float(s.mean()), se, len(s), samples=s, blocks=blk)


def _orthonormalise(vectors: list[PyTree]) -> list[PyTree]:
  """Modified Gram–Schmidt (twice, for stability) on pytrees; drops numerically dependent vectors."""
  dot, axpy = jax.jit(tree_dot), jax.jit(lambda a, b, c: tree_add(a, b, -c))
  out = []
  for v in vectors:
    for _ in range(2):
      for q in out:
        v = axpy(v, q, dot(q, v))
    nrm = float(jnp.sqrt(dot(v, v)))
    if nrm > 1e-8:
      out.append(tree_scale(v, 1.0 / nrm))
  return out


def hutchpp_trace(matvec: MatVec, params: PyTree, key, num_matvecs: int, *, dist: str = "rademacher",
                  include: str | None = None, exclude: str | None = None) -> Estimate:
  """Hutch++: budget m = 3k: Q = orth(H S) from k probes, exact tr(QᵀHQ), Hutchinson on (I−QQᵀ)."""
  k = max(1, num_matvecs // 3)
  mask = filter_mask(params, include, exclude)
  probe = _probe_fn(params, dist, mask)
  Q = _orthonormalise([matvec(params, probe(jax.random.fold_in(key, i))) for i in range(k)])
  if mask is not None:  # keep the sketch inside the selected block
    Q = _orthonormalise([jax.tree.map(lambda x, m: x * m, q, mask) for q in Q])
  dot = jax.jit(tree_dot)
  exact = sum(_checked(dot(q, matvec(params, q)), "Hutch++ sketch") for q in Q)
  n_res = max(1, num_matvecs - k - len(Q))
  samples = []
  for i in range(n_res):
    g = probe(jax.random.fold_in(key, 10_000 + i))
    for q in Q:
      g = tree_add(g, q, -float(dot(q, g)))
    samples.append(_checked(dot(g, matvec(params, g)), f"Hutch++ residual probe {i}"))
  s = np.asarray(samples)
  se = float(np.std(s, ddof=1) / np.sqrt(len(s))) if len(s) > 1 else float("nan")
  return Estimate(float(exact + s.mean()), se, k + len(Q) + n_res, samples=s)


def fisher_trace(logits_fn: Callable, params: PyTree, batches: Sequence[dict], key, num_samples: int, *,
                 include: str | None = None, exclude: str | None = None) -> Estimate:
  """tr(F), F = (1/T) Σ_t E_{y~p_θ(·|x_t)} ∇ℓ_t(y) ∇ℓ_t(y)ᵀ, labels sampled from the model.

  One backward per batch per sample: with Rademacher signs r_t, E_r‖∇ Σ_t r_t ℓ_t‖² = Σ_t ‖∇ℓ_t‖², so
  ‖g‖²/T is an unbiased sample without per-token gradients (cross terms between tokens cancel).
  """
  mask = filter_mask(params, include, exclude)
  batches = list(batches)
  T = float(sum(np.asarray(b["mask"]).sum() for b in batches))

  def one(p, b, k):
    k1, k2 = jax.random.split(k)
    y = jax.random.categorical(k1, jax.lax.stop_gradient(logits_fn(p, b)))
    r = jax.random.rademacher(k2, y.shape, jnp.float32) * b["mask"]

    def f(q):
      logp = jax.nn.log_softmax(logits_fn(q, b))
      return -(jnp.take_along_axis(logp, y[..., None], -1)[..., 0] * r).sum()

    g = jax.grad(f)(p)
    if mask is not None:
      g = jax.tree.map(lambda x, m: x * m, g, mask)
    return tree_dot(g, g)

  one = jax.jit(one)
  samples = []
  for i in range(num_samples):
    ki = jax.random.fold_in(key, i)
    samples.append(_checked(sum(float(one(params, b, jax.random.fold_in(ki, j))) for j, b in enumerate(batches)) / T,
                            f"Fisher sample {i}"))
  s = np.asarray(samples)
  se = float(np.std(s, ddof=1) / np.sqrt(len(s))) if len(s) > 1 else float("nan")
  return Estimate(float(s.mean()), se, len(s) * len(batches), samples=s)


# ------------------------------------------------------------------------------------------------
# eigenvalues and spectral density

def power_iteration(matvec: MatVec, params: PyTree, key, num_iters: int = 50, tol: float = 1e-5) -> Estimate:
  """λ of largest magnitude (Rayleigh quotient); `stderr` holds the residual ‖Hv − λv‖ (an error bound)."""
  dot = jax.jit(tree_dot)
  v = _probe_fn(params, "gaussian", None)(key)
  v = tree_scale(v, 1.0 / float(jnp.sqrt(dot(v, v))))
  lam, res, n = 0.0, float("nan"), 0
  for n in range(1, num_iters + 1):  # noqa: B007 - n is returned
    hv = matvec(params, v)
    new = _checked(dot(v, hv), "power iteration")
    res = float(tree_norm(tree_add(hv, v, -new)))
    nrm = float(jnp.sqrt(dot(hv, hv)))
    if nrm == 0:
      break
    v = tree_scale(hv, 1.0 / nrm)
    if abs(new - lam) < tol * max(abs(new), 1e-12):
      lam = new
      break
    lam = new
  return Estimate(lam, res, n)


def lanczos(matvec: MatVec, params: PyTree, key, num_steps: int, start: PyTree | None = None):
  """(alphas [m], betas [m-1], n_matvecs) of the Lanczos tridiagonal, full reorthogonalisation."""
  dot = jax.jit(tree_dot)
  axpy = jax.jit(lambda a, b, c: tree_add(a, b, -c))
  v = start if start is not None else _probe_fn(params, "rademacher", None)(key)
  v = tree_scale(v, 1.0 / float(jnp.sqrt(dot(v, v))))
  basis, alphas, betas = [v], [], []
  for j in range(num_steps):
    w = matvec(params, basis[-1])
    a = _checked(dot(basis[-1], w), "Lanczos")
    alphas.append(a)
    for _ in range(2):  # full reorthogonalisation against every basis vector
      for q in basis:
        w = axpy(w, q, dot(q, w))
    b = float(jnp.sqrt(dot(w, w)))
    if j == num_steps - 1 or b < 1e-8 * max(1.0, abs(a)):
      break
    betas.append(b)
    basis.append(tree_scale(w, 1.0 / b))
  return np.asarray(alphas), np.asarray(betas), len(alphas), b


def _ritz(alphas, betas):
  T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
  return np.linalg.eigh(T)


def top_eigenvalues(matvec: MatVec, params: PyTree, key, k: int = 5, num_steps: int = 30,
                    which: str = "LA") -> Estimate:
  """Top-k Ritz values ('LA' largest algebraic, 'LM' largest magnitude), residual bounds |β_m s_mi|."""
  a, b, n, b_last = lanczos(matvec, params, key, num_steps)
  theta, S = _ritz(a, b)
  resid = np.abs(b_last * S[-1, :])
  order = np.argsort(-theta if which == "LA" else -np.abs(theta))
  if which not in ("LA", "LM"):
    raise ValueError(f"which must be 'LA' or 'LM', not {which!r}")
  sel = order[:k]
  return Estimate(float(theta[sel[0]]), float(resid[sel[0]]), n, eigenvalues=theta[sel], residuals=resid[sel])


def slq_density(matvec: MatVec, params: PyTree, key, num_runs: int = 4, num_steps: int = 30,
                grid_points: int = 1000, sigma: float | None = None) -> Estimate:
  """Spectral density by stochastic Lanczos quadrature: nodes = Ritz values, weights = (e₁ᵀs_i)²,
  Gaussian-smoothed; integrates to 1. `estimate` = N·Σ w_i θ_i / runs (an SLQ trace estimate)."""
  nodes, weights, n_mv = [], [], 0
  for r in range(num_runs):
    a, b, n, _ = lanczos(matvec, params, jax.random.fold_in(key, r), num_steps)
    theta, S = _ritz(a, b)
    nodes.append(theta)
    weights.append(S[0, :] ** 2 / num_runs)
    n_mv += n
  th, w = np.concatenate(nodes), np.concatenate(weights)
  lo, hi = th.min(), th.max()
  span = max(hi - lo, 1e-12)
  sigma = sigma or span / max(num_steps, 1)
  grid = np.linspace(lo - 3 * sigma, hi + 3 * sigma, grid_points)
  dens = (w[None, :] * np.exp(-0.5 * ((grid[:, None] - th[None, :]) / sigma) ** 2)).sum(1) / (np.sqrt(2 * np.pi) * sigma)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  trace = float(n_params * (w * th).sum())
  return Estimate(trace, float("nan"), n_mv, eigenvalues=th, grid=grid, density=dens)
