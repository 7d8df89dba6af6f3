"""Hessian-vector products and trace / spectrum estimators on (sharded) parameter pytrees.

Model-agnostic: callers pass `loss_fn(params, batch) -> scalar mean loss` (and, for the Fisher trace,
`logits_fn(params, batch) -> logits_BxLxV` with `batch["mask"]`). Vectors are pytrees shaped and
sharded like the parameters and are never raveled (raveling would gather sharded leaves); dot products
are per-leaf contractions that XLA turns into per-shard partial sums plus one all-reduce. HVPs are
forward-over-reverse (`jax.jvp(jax.grad(f))`: exact, ≈2-3 gradients of cost). Every estimator runs its
whole loop (probes, Lanczos steps, power steps) inside one jitted function and brings only scalars back
to the host, where non-finite values raise `FloatingPointError` (the caller marks the row invalid).

Shape legend:
  N   parameters (a pytree; "a vector" below means a pytree like the parameters)
  P   probes in one jitted chunk        k   Hutch++ sketch size (num_matvecs // 3)
  m   Lanczos steps                      R   SLQ runs
  B, L, V   batch, sequence length, vocabulary;  T   loss tokens (sum of masks) over all batches
  Stacked vectors (Hutch++ sketch `Q_k`, Lanczos basis `basis_m`) are pytrees whose leaves have a leading
  axis of size k or m, sharded like the parameter on the remaining axes.

Estimators (each returns an `Estimate`: estimate, stderr, n_matvecs, per-probe samples, ...):
  hutchinson_trace   tr(H) or tr of the diagonal block of filtered parameters; per-block traces
                     (with a `make_ggn` operator: tr of the Gauss-Newton matrix = tr(F), label-free)
  hutchpp_trace      Hutch++ (Meyer et al. 2021); stderr of the residual part only
  fisher_trace       tr(F), labels sampled from the model (Liu et al. 2023, App. B.1)
  power_iteration    λ of largest magnitude, residual ‖Hv − λv‖
  lanczos            tridiagonal (alphas, betas), full reorthogonalisation
  top_eigenvalues    Ritz values with residual bounds |β_m s_mi|
  slq_density        spectral density by stochastic Lanczos quadrature;  slq_trace_f: tr f(H)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
MatVec = Callable[[PyTree, PyTree], PyTree]
HIGHEST = lax.Precision.HIGHEST


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

  def as_dict(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class Tridiagonal:
  """Lanczos output: T = tridiag(betas, alphas, betas); beta_last = β_m (for residual bounds)."""

  alphas: np.ndarray
  betas: np.ndarray
  beta_last: float
  n_matvecs: int
  basis: PyTree | None = None

  def ritz(self) -> tuple[np.ndarray, np.ndarray]:
    """(θ_m ascending, S_mxm eigenvectors of T) in float64."""
    T_mxm = np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1)
    return np.linalg.eigh(T_mxm.astype(np.float64))


# ------------------------------------------------------------------------------------------------
# pytree vector algebra (float32 accumulation; sharded leaves reduce per shard + one all-reduce)


def _leaf_dot(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32), precision=HIGHEST)


def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
  return sum((_leaf_dot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), jnp.float32(0))


def tree_add(a: PyTree, b: PyTree, alpha: float | jax.Array = 1.0) -> PyTree:
  """a + alpha b."""
  return jax.tree.map(lambda x, y: x + (alpha * y).astype(x.dtype), a, b)


def tree_scale(a: PyTree, s: float | jax.Array) -> PyTree:
  return jax.tree.map(lambda x: (x * s).astype(x.dtype), a)


def tree_norm(a: PyTree) -> jax.Array:
  return jnp.sqrt(tree_dot(a, a))


def _leaf_keys(key, tree: PyTree) -> PyTree:
  """One key per leaf, from the tree structure only: the same numbers on every mesh."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))


def rademacher_like(key, tree: PyTree) -> PyTree:
  """±1 float32 leaves shaped like `tree` (pure; use `probe_like` for a sharded, jitted draw)."""
  return jax.tree.map(lambda x, k: jax.random.rademacher(k, x.shape, jnp.float32), tree, _leaf_keys(key, tree))


def gaussian_like(key, tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x, k: jax.random.normal(k, x.shape, jnp.float32), tree, _leaf_keys(key, tree))


DISTRIBUTIONS: dict[str, Callable[[Any, PyTree], PyTree]] = {"rademacher": rademacher_like, "gaussian": gaussian_like}


def _check_dist(dist: str) -> Callable:
  if dist not in DISTRIBUTIONS:
    raise ValueError(f"unknown probe distribution {dist!r}; valid: {sorted(DISTRIBUTIONS)}")
  return DISTRIBUTIONS[dist]


# ------------------------------------------------------------------------------------------------
# shardings


def _shardings(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else None, tree)


def _out_shardings(params: PyTree):
  """The params' shardings if every leaf has one (jit out_shardings), else None (let XLA choose)."""
  sh = jax.tree.leaves(_shardings(params), is_leaf=lambda s: s is None)
  return _shardings(params) if sh and all(s is not None for s in sh) else None


def _leaf_shardings(params: PyTree) -> tuple:
  """Concrete per-leaf shardings, captured before tracing (tracers carry none)."""
  return tuple(getattr(x, "sharding", None) for x in jax.tree.leaves(params))


def _constrain(v: PyTree, sh: tuple, stacked: bool = False) -> PyTree:
  """Inside jit: pin v (or a stacked v with a leading axis) to the parameters' NamedShardings."""

  def one(x, s):
    if not isinstance(s, NamedSharding):
      return x
    if stacked:
      s = NamedSharding(s.mesh, P(None, *s.spec))
    return lax.with_sharding_constraint(x, s)

  leaves, treedef = jax.tree.flatten(v)
  return jax.tree.unflatten(treedef, [one(x, s) for x, s in zip(leaves, sh)])


def _sharding_key(params: PyTree) -> tuple:
  return tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in jax.tree.leaves(params))


def _like_params(v: PyTree, params: PyTree) -> PyTree:
  """Tangents must have the primal dtype (fp32 probes for bf16 params are cast)."""
  return jax.tree.map(lambda x, p: x.astype(p.dtype), v, params)


# ------------------------------------------------------------------------------------------------
# parameter paths, filters and blocks


def _key_str(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def param_paths(params: PyTree) -> list[str]:
  """'/'-joined key paths in leaf order, e.g. 'layer_0/attn/query/kernel'."""
  return ["/".join(_key_str(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


@dataclasses.dataclass(frozen=True)
class ParamFilter:
  """Parameters whose '/'-joined path matches `include` (re.search) and not `exclude`."""

  include: str | None = None
  exclude: str | None = None


def _filter_args(filter: str | ParamFilter | None, include: str | None, exclude: str | None):  # noqa: A002
  if isinstance(filter, ParamFilter):
    return filter.include or include, filter.exclude or exclude
  return filter or include, exclude


def selected(params: PyTree, include: str | None = None, exclude: str | None = None) -> tuple[bool, ...] | None:
  """Per-leaf selection (None = all). A filter that selects nothing is an error, not a zero trace."""
  if not include and not exclude:
    return None
  paths = param_paths(params)
  keep = tuple(
    (not include or re.search(include, p) is not None) and (not exclude or re.search(exclude, p) is None) for p in paths
  )
  if not any(keep):
    raise ValueError(
      f"parameter filter include={include!r} exclude={exclude!r} matches no parameter; "
      f"available paths ({len(paths)}) look like {paths[:8]}"
    )
  return keep


def filter_mask(params: PyTree, include: str | None = None, exclude: str | None = None) -> PyTree | None:
  """0/1 float32 scalar per leaf (None = everything)."""
  keep = selected(params, include, exclude)
  if keep is None:
    return None
  return jax.tree.unflatten(jax.tree.structure(params), [jnp.float32(k) for k in keep])


def _apply_sel(v: PyTree, sel: tuple[bool, ...] | None) -> PyTree:
  """Zero the unselected leaves: v restricted to the selected block (static, costs nothing)."""
  if sel is None:
    return v
  leaves, treedef = jax.tree.flatten(v)
  return jax.tree.unflatten(treedef, [x if k else jnp.zeros_like(x) for x, k in zip(leaves, sel)])


_LAYER = r"(?:^|/)(?:layers?|blocks?|h)(?:[._/])?(\d+)(?=/|$)"
DEFAULT_BLOCK_RULES: tuple[tuple[str, str], ...] = (
  # (regex searched in the path, block name template with the regex groups)
  (_LAYER + r"(?:/.*)?/(?:ln[^/]*|[^/]*norm[^/]*)(?:/|$)", r"layer_\1/norm"),
  (_LAYER + r"(?:/.*)?/[^/]*(?:attn|attention)[^/]*(?:/|$)", r"layer_\1/attn"),
  (_LAYER + r"(?:/.*)?/[^/]*(?:mlp|ffn|feed_?forward)[^/]*(?:/|$)", r"layer_\1/mlp"),
  (_LAYER, r"layer_\1/other"),
  (r"(?:^|/)[^/]*(?:embed|wte|wpe|proj_in)[^/]*(?:/|$)", "embeddings"),
  (r"(?:^|/)[^/]*(?:head|unembed|proj_out|final_norm|ln_f)[^/]*(?:/|$)", "head"),
)


def block_of(path: str, rules: Sequence[tuple[str, str]] | None = None) -> str:
  """Block name of one path by the first matching rule; 'other' when none matches."""
  for pattern, name in DEFAULT_BLOCK_RULES if rules is None else rules:
    m = re.search(pattern, path)
    if m:
      return m.expand(name)
  return "other"


def param_blocks(params: PyTree, rules: Sequence[tuple[str, str]] | Callable[[str], str] | None = None) -> dict[str, str]:
  """{path: block} for every leaf (leaf order). Default names: embeddings, layer_{i}/attn|mlp|norm|other,
  head, other — derived from path names only, so any nested-dict model works; pass (regex, template)
  rules or a path -> name callable to group differently."""
  name = rules if callable(rules) else (lambda p: block_of(p, rules))
  return {p: name(p) for p in param_paths(params)}


# ------------------------------------------------------------------------------------------------
# HVP operators


def hvp(loss_fn: Callable, params: PyTree, batch, v: PyTree) -> PyTree:
  """H v by forward-over-reverse: the directional derivative of the gradient along v."""
  return jax.jvp(jax.grad(lambda p: loss_fn(p, batch)), (params,), (_like_params(v, params),))[1]


def _num_tokens(batch) -> float:
  """Loss tokens of a batch (sum of its mask; 1 without a mask). A device reduction, no host gather."""
  return float(jnp.sum(jnp.asarray(batch["mask"], jnp.float32))) if "mask" in batch else 1.0


def _signature(batch) -> tuple:
  leaves, treedef = jax.tree.flatten(batch)
  return treedef, tuple((np.shape(x), str(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)) for x in leaves)


def ggn_linearised(logits_fn: Callable, params: PyTree, batch) -> Callable[[PyTree], PyTree]:
  """v -> G v for the mean masked token cross-entropy of one batch, G = Jᵀ (H_z / T) J the generalised
  Gauss-Newton matrix: J the Jacobian of the logits, H_z = diag(p) − ppᵀ per token (the CE Hessian in
  the logits, label-free), T the batch's loss tokens. One forward pass is linearised and transposed, so
  each further v costs a tangent forward and its transpose (≈ 4/3 of a gradient's matmul FLOPs). For
  softmax cross-entropy G equals the Fisher (tr G = `fisher_trace`'s expectation), is PSD, and equals H
  wherever the logits are linear in the parameters."""
  z_BxLxV, lin = jax.linearize(lambda q: logits_fn(q, batch), params)
  lin_t = jax.linear_transpose(lin, params)
  p_BxLxV = jax.nn.softmax(z_BxLxV.astype(jnp.float32), -1)
  m_BxL = jnp.asarray(batch["mask"], jnp.float32)
  w_BxL = m_BxL / jnp.maximum(m_BxL.sum(), 1.0)

  def mv(v):
    u_BxLxV = lin(_like_params(v, params)).astype(jnp.float32)
    hu = p_BxLxV * (u_BxLxV - jnp.sum(p_BxLxV * u_BxLxV, -1, keepdims=True)) * w_BxL[..., None]
    return lin_t(hu.astype(z_BxLxV.dtype))[0]

  return mv


class HVPOperator:
  """matvec(params, v) = Σ_b w_b C_b v for the curvature C of the loss over all batches' tokens:
  the Hessian H (default) or, with `curvature='ggn'` and a `logits_fn`, the generalised Gauss-Newton
  matrix G of the mean masked token cross-entropy (`ggn_linearised`).

  `loss_fn` is a per-batch *mean*, so weights default to each batch's share of loss tokens (mask sum):
  the result is exactly the HVP of the concatenated data (equal per-batch weights would be biased for
  ragged or masked batches). Same-shaped batches are stacked and scanned inside one jit (memory of one
  batch at a time); ragged ones are summed in a traced Python loop. Results are sharded like `params`.
  `apply(params, v, operands)` is the traceable form the estimators run inside their own jit;
  `linearise(params, batch)` gives v -> C_b v sharing one linearisation across many v.
  """

  def __init__(
    self,
    loss_fn: Callable | None,
    batches: Sequence[dict],
    weights: Sequence[float] | None = None,
    *,
    curvature: str = "hessian",
    logits_fn: Callable | None = None,
  ):
    if curvature not in ("hessian", "ggn"):
      raise ValueError(f"unknown curvature {curvature!r}; valid: 'hessian', 'ggn'")
    if (curvature == "hessian" and loss_fn is None) or (curvature == "ggn" and logits_fn is None):
      raise ValueError("curvature='hessian' needs loss_fn; curvature='ggn' needs logits_fn")
    self.loss_fn, self.logits_fn, self.curvature = loss_fn, logits_fn, curvature
    self.batches = list(batches)
    if not self.batches:
      raise ValueError("make_hvp needs at least one batch")
    tokens = np.array([_num_tokens(b) for b in self.batches])
    self.n_tokens = float(tokens.sum())
    if weights is None:
      if self.n_tokens <= 0:
        raise ValueError("the batches have no loss tokens (every mask is zero)")
      weights = tokens / self.n_tokens
    if len(weights) != len(self.batches):
      raise ValueError(f"{len(weights)} weights for {len(self.batches)} batches")
    self.weights = np.asarray(weights, np.float32)
    self.n_batches = len(self.batches)
    self.stacked = self.n_batches > 1 and len({_signature(b) for b in self.batches}) == 1
    if self.stacked:
      self.operands = (
        jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *self.batches),
        jnp.asarray(self.weights),
      )
    else:
      self.operands = (tuple(self.batches), jnp.asarray(self.weights))
    self._jitted: dict = {}

  def per_batch(self, f: Callable[[Any], Any], operands) -> Any:
    """Σ_b w_b f(batch_b) inside a trace (f returns a pytree of arrays)."""
    batches, w = operands
    if self.stacked:

      def body(acc, xs):
        b, wb = xs
        return jax.tree.map(lambda a, y: (a + wb * y).astype(a.dtype), acc, f(b)), None

      first = jax.tree.map(lambda x: x[0], batches)
      acc0 = jax.tree.map(lambda y: jnp.zeros(y.shape, y.dtype), jax.eval_shape(f, first))
      return lax.scan(body, acc0, (batches, w))[0]
    out = None
    for i, b in enumerate(batches):
      y = jax.tree.map(lambda t, i=i: (w[i] * t).astype(t.dtype), f(b))
      out = y if out is None else jax.tree.map(jnp.add, out, y)
    return out

  def linearise(self, params: PyTree, batch) -> Callable[[PyTree], PyTree]:
    if self.curvature == "ggn":
      return ggn_linearised(self.logits_fn, params, batch)
    return jax.linearize(jax.grad(lambda q: self.loss_fn(q, batch)), params)[1]

  def apply(self, params: PyTree, v: PyTree, operands) -> PyTree:
    if self.curvature == "ggn":
      return self.per_batch(lambda b: ggn_linearised(self.logits_fn, params, b)(v), operands)
    return self.per_batch(lambda b: hvp(self.loss_fn, params, b, v), operands)

  def __call__(self, params: PyTree, v: PyTree) -> PyTree:
    key = _sharding_key(params)
    if key not in self._jitted:
      self._jitted[key] = jax.jit(self.apply, out_shardings=_out_shardings(params))
    return self._jitted[key](params, v, self.operands)


def make_hvp(loss_fn: Callable, batches: Sequence[dict], weights: Sequence[float] | None = None) -> HVPOperator:
  """The token-weighted HVP operator over a fixed list of batches (see `HVPOperator`)."""
  return HVPOperator(loss_fn, batches, weights)


def make_ggn(logits_fn: Callable, batches: Sequence[dict], weights: Sequence[float] | None = None) -> HVPOperator:
  """The token-weighted generalised Gauss-Newton operator of the mean masked token cross-entropy
  (`logits_fn(params, batch) -> logits_BxLxV`, batches with "mask"); every estimator takes it."""
  return HVPOperator(None, batches, weights, curvature="ggn", logits_fn=logits_fn)


def _traceable(matvec: MatVec) -> tuple[Callable, Any]:
  """(fn(params, v, operands), operands): batches travel as jit arguments, not baked-in constants.
  A plain `matvec(params, v)` must be a traceable JAX function."""
  if isinstance(matvec, HVPOperator):
    return matvec.apply, matvec.operands
  return (lambda p, v, _ops: matvec(p, v)), ()


def _cached(owner: Any, key: tuple, build: Callable[[], Callable]) -> Callable:
  """Jitted estimator bodies are stored on their operator (or function): repeated calls with the same
  settings do not retrace or recompile, and the cache dies with the operator."""
  d = getattr(owner, "__dict__", None)
  if d is None:  # e.g. a bound method: no cache
    return build()
  cache = d.setdefault("_hessian_jit_cache", {})
  if key not in cache:
    cache[key] = build()
  return cache[key]


def probe_like(
  key,
  params: PyTree,
  dist: str = "rademacher",
  *,
  filter: str | ParamFilter | None = None,  # noqa: A002
  include: str | None = None,
  exclude: str | None = None,
) -> PyTree:
  """A probe drawn under jit straight into the parameters' shardings (zero outside the filter)."""
  draw = _check_dist(dist)
  sel = selected(params, *_filter_args(filter, include, exclude))
  ck = (dist, sel, jax.tree.structure(params), _sharding_key(params))
  if ck not in _PROBE_FNS:
    _PROBE_FNS[ck] = jax.jit(lambda k, p: _like_params(_apply_sel(draw(k, p), sel), p), out_shardings=_out_shardings(params))
  return _PROBE_FNS[ck](key, params)


_PROBE_FNS: dict[tuple, Callable] = {}


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
  filter: str | ParamFilter | None = None,
  include: str | None = None,  # noqa: A002
  exclude: str | None = None,
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
    raise ValueError(f"num_probes must be ≥ 1, not {num_probes}")
  sel = selected(params, *_filter_args(filter, include, exclude))
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


def _gram(A_k: PyTree, B_k: PyTree) -> jax.Array:
  """G_kxk[i, j] = Σ_leaves <A_i, B_j> for stacked vectors."""

  def one(a, b):
    ax = tuple(range(1, a.ndim))
    return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=(ax, ax), precision=HIGHEST)

  return sum((one(a, b) for a, b in zip(jax.tree.leaves(A_k), jax.tree.leaves(B_k))), jnp.float32(0))


def _combine(C_kxj: jax.Array, Y_k: PyTree) -> PyTree:
  """Stacked Σ_i C[i, j] Y_i -> [j, ...]."""
  return jax.tree.map(lambda y: jnp.tensordot(C_kxj, y.astype(jnp.float32), axes=([0], [0]), precision=HIGHEST), Y_k)


def _orthonormalise(Y_k: PyTree, sh: tuple) -> tuple[PyTree, jax.Array]:
  """Orthonormal basis of span(Y) as stacked vectors via the k×k Gram matrix, done twice (like
  CholeskyQR2; no flattening of sharded leaves). Directions with Gram eigenvalue < 1e-6·max are
  dropped (zero columns). Returns (Q_k, rank)."""
  for rel in (1e-6, 0.5):
    lam_k, U_kxk = jnp.linalg.eigh(_gram(Y_k, Y_k))
    keep = lam_k > rel * jnp.max(lam_k)
    scale = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam_k, 1.0)), 0.0)
    Y_k = _constrain(_combine(U_kxk * scale[None, :], Y_k), sh, stacked=True)
  return Y_k, jnp.sum(keep)


def _project_out(Q_k: PyTree, g: PyTree) -> PyTree:
  """(I − QQᵀ) g for stacked orthonormal Q (zero columns are harmless)."""

  def coef(q, x):
    ax = tuple(range(1, q.ndim))
    return jnp.tensordot(q, x.astype(jnp.float32), axes=(ax, tuple(range(x.ndim))), precision=HIGHEST)

  c_k = sum((coef(q, x) for q, x in zip(jax.tree.leaves(Q_k), jax.tree.leaves(g))), jnp.float32(0))
  return jax.tree.map(lambda x, q: x - jnp.tensordot(c_k, q, axes=([0], [0]), precision=HIGHEST).astype(x.dtype), g, Q_k)


def hutchpp_trace(
  matvec: MatVec,
  params: PyTree,
  key,
  num_matvecs: int,
  *,
  dist: str = "rademacher",
  filter: str | ParamFilter | None = None,
  include: str | None = None,  # noqa: A002
  exclude: str | None = None,
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
    raise ValueError(f"Hutch++ needs num_matvecs ≥ 3, not {num_matvecs}")
  sel = selected(params, *_filter_args(filter, include, exclude))
  k, n_res = num_matvecs // 3, num_matvecs - 2 * (num_matvecs // 3)
  draw, sh = DISTRIBUTIONS[dist], _leaf_shardings(params)
  fn, ops = _traceable(matvec)

  def build():
    def f(p, key, ops):
      k_sketch, k_res = jax.random.split(key)

      def probe(kk):
        return _constrain(_like_params(_apply_sel(draw(kk, p), sel), p), sh)

      def hv(v):
        return _apply_sel(fn(p, _like_params(v, p), ops), sel)

      Y_k = _constrain(lax.map(lambda kk: hv(probe(kk)), _fold(k_sketch, 0, k)), sh, stacked=True)
      Q_k, rank = _orthonormalise(Y_k, sh)
      exact_k = lax.map(lambda q: tree_dot(q, hv(q)), Q_k)

      def residual(kk):
        g = _project_out(Q_k, probe(kk))
        return tree_dot(g, hv(g))

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
  filter: str | ParamFilter | None = None,
  include: str | None = None,  # noqa: A002
  exclude: str | None = None,
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
    raise ValueError(f"num_samples must be ≥ 1, not {num_samples}")
  sel = selected(params, *_filter_args(filter, include, exclude))
  batches = list(batches)
  T = sum(_num_tokens(b) for b in batches)
  if T <= 0:
    raise ValueError("fisher_trace: the batches have no loss tokens (every mask is zero)")
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
  filter: str | ParamFilter | None = None,
  include: str | None = None,  # noqa: A002
  exclude: str | None = None,
) -> Estimate:
  """λ of largest magnitude by power iteration (Rayleigh quotients), in one jitted while-loop.

  Stops when |λ_i − λ_{i−1}| ≤ tol·|λ_i| or after num_iters. `stderr` holds the residual ‖Hv − λv‖ of
  the unit vector v (some eigenvalue lies within it of λ). A baseline: prefer `top_eigenvalues`.
  """
  sel = selected(params, *_filter_args(filter, include, exclude))
  fn, ops = _traceable(matvec)
  sh = _leaf_shardings(params)

  def build():
    def f(p, key, ops):
      v = _constrain(_apply_sel(gaussian_like(key, p), sel), sh)
      v = tree_scale(v, 1.0 / tree_norm(v))

      def cond(s):
        i, _, lam, lam_old, _ = s
        return (i < num_iters) & ((i < 2) | ~(jnp.abs(lam - lam_old) <= tol * jnp.abs(lam)))

      def body(s):
        i, v, lam, _, _ = s
        hv = _apply_sel(fn(p, _like_params(v, p), ops), sel)
        hv = jax.tree.map(lambda x: x.astype(jnp.float32), hv)
        new = tree_dot(v, hv)
        res = tree_norm(tree_add(hv, v, -new))
        nrm = tree_norm(hv)
        v = tree_scale(hv, jnp.where(nrm > 0, 1.0 / nrm, 0.0))
        return i + 1, v, new, lam, res

      i, _, lam, _, res = lax.while_loop(cond, body, (0, v, jnp.float32(0), jnp.float32(jnp.inf), jnp.float32(jnp.inf)))
      return lam, res, i

    return jax.jit(f)

  f = _cached(matvec, ("power", num_iters, tol, sel, _sharding_key(params)), build)
  lam, res, n = (np.asarray(x) for x in f(params, key, ops))
  _check_finite(np.asarray([lam, res]), "power iteration value")
  return Estimate(float(lam), float(res), int(n))


def _lanczos_fn(matvec: MatVec, params: PyTree, m: int, sel, reorth: str, return_basis: bool) -> Callable:
  """jitted (params, v0, key, operands) -> (alphas_m, betas_m[, basis_m]); betas[j] couples v_j, v_{j+1}."""
  fn, _ = _traceable(matvec)
  sh = _leaf_shardings(params)

  def hv(p, v, ops):
    return jax.tree.map(lambda x: x.astype(jnp.float32), _apply_sel(fn(p, _like_params(v, p), ops), sel))

  def full(p, v0, key, ops):
    v0 = tree_scale(v0, 1.0 / tree_norm(v0))
    basis_m = _constrain(jax.tree.map(lambda x: jnp.zeros((m,) + x.shape, jnp.float32).at[0].set(x), v0), sh, True)

    def reorthogonalise(w, basis_m):  # two block Gram-Schmidt passes (CGS2): matmuls, not a sequential loop
      for _ in range(2):
        w = _project_out(basis_m, w)
      return w

    def body(j, s):
      basis_m, alphas_m, betas_m, scale = s
      v = jax.tree.map(lambda b: b[j], basis_m)
      w = hv(p, v, ops)
      a = tree_dot(v, w)
      w = reorthogonalise(w, basis_m)  # removes a·v_j and β_{j−1}·v_{j−1} along with everything else
      b = tree_norm(w)
      scale = jnp.maximum(scale, jnp.abs(a) + b)
      # breakdown (invariant subspace found): continue from a fresh random vector ⟂ basis, β = 0
      broke = b <= 1e-6 * scale

      def fresh():
        r = _constrain(_apply_sel(rademacher_like(jax.random.fold_in(key, j), p), sel), sh)
        r = reorthogonalise(r, basis_m)
        return tree_scale(r, 1.0 / jnp.maximum(tree_norm(r), 1e-30))

      nxt = lax.cond(broke, fresh, lambda: tree_scale(w, 1.0 / jnp.where(broke, 1.0, b)))
      row = jnp.minimum(j + 1, m - 1)
      basis_m = jax.tree.map(lambda B, x: B.at[row].set(jnp.where(j + 1 < m, x, B[row])), basis_m, nxt)
      basis_m = _constrain(basis_m, sh, stacked=True)
      return basis_m, alphas_m.at[j].set(a), betas_m.at[j].set(jnp.where(broke, 0.0, b)), scale

    z = jnp.zeros(m, jnp.float32)
    basis_m, alphas_m, betas_m, _ = lax.fori_loop(0, m, body, (basis_m, z, z, jnp.float32(0)))
    return (alphas_m, betas_m, basis_m) if return_basis else (alphas_m, betas_m)

  def plain(p, v0, key, ops):  # three-term recurrence only: O(1) vectors, ghost eigenvalues possible
    v0 = tree_scale(v0, 1.0 / tree_norm(v0))

    def body(j, s):
      v_prev, v, b_prev, alphas_m, betas_m = s
      w = tree_add(hv(p, v, ops), v_prev, -b_prev)
      a = tree_dot(v, w)
      w = tree_add(w, v, -a)
      b = tree_norm(w)
      nxt = tree_scale(w, jnp.where(b > 0, 1.0 / b, 0.0))
      return v, nxt, b, alphas_m.at[j].set(a), betas_m.at[j].set(b)

    z = jnp.zeros(m, jnp.float32)
    out = lax.fori_loop(0, m, body, (jax.tree.map(jnp.zeros_like, v0), v0, jnp.float32(0), z, z))
    return out[3], out[4]

  return jax.jit(full if reorth == "full" else plain)


def _n_selected(params: PyTree, sel) -> int:
  return sum(math.prod(x.shape) for x, k in zip(jax.tree.leaves(params), sel or [True] * len(jax.tree.leaves(params))) if k)


def _run_lanczos(
  matvec: MatVec, params: PyTree, key, num_steps: int, sel, reorth: str, start: PyTree | None = None, return_basis: bool = False
) -> Tridiagonal:
  m = int(min(num_steps, _n_selected(params, sel)))
  if m < 1:
    raise ValueError(f"num_steps must be ≥ 1, not {num_steps}")
  f = _cached(
    matvec,
    ("lanczos", m, sel, reorth, return_basis, _sharding_key(params)),
    lambda: _lanczos_fn(matvec, params, m, sel, reorth, return_basis),
  )
  _, ops = _traceable(matvec)
  k_start, k_fresh = jax.random.split(key)
  v0 = start if start is not None else probe_like(k_start, params)
  v0 = jax.tree.map(lambda x: x.astype(jnp.float32), _apply_sel(v0, sel))
  out = f(params, v0, k_fresh, ops)
  alphas, betas = (np.asarray(x, np.float64) for x in out[:2])
  _check_finite(np.stack([alphas, betas], 1), "Lanczos step")
  return Tridiagonal(alphas, betas[:-1], float(betas[-1]), m, basis=out[2] if return_basis else None)


def lanczos(
  matvec: MatVec,
  params: PyTree,
  key,
  num_steps: int,
  *,
  start: PyTree | None = None,
  reorth: str = "full",
  filter: str | ParamFilter | None = None,
  include: str | None = None,  # noqa: A002
  exclude: str | None = None,
  return_basis: bool = False,
) -> Tridiagonal:
  """m Lanczos steps from `start` (default: a Rademacher probe from `key`) in one jitted fori_loop.

  reorth='full': the basis is a stacked pytree [m, ...] (fp32, sharded like params) and every new vector
  is re-orthogonalised against all of it by two block Gram-Schmidt passes; memory m vectors. On
  breakdown (an invariant subspace, β ≈ 0) it continues from a fresh random orthogonal vector with β = 0,
  so the Ritz values stay eigenvalues. reorth='none': three-term recurrence (O(1) vectors; spurious
  copies of converged eigenvalues appear — use for densities only). m is capped at the dimension.
  With a filter: the Lanczos process of the diagonal block H_SS.
  """
  if reorth not in ("full", "none"):
    raise ValueError(f"reorth must be 'full' or 'none', not {reorth!r}")
  sel = selected(params, *_filter_args(filter, include, exclude))
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
  filter: str | ParamFilter | None = None,
  include: str | None = None,  # noqa: A002
  exclude: str | None = None,
) -> Estimate:
  """Top-k Ritz values of an m-step Lanczos run ('LA' largest algebraic — the sharpness, 'LM' largest
  magnitude, 'SA' smallest algebraic) with residual bounds |β_m s_{m,i}| (an eigenvalue of H lies within
  that distance of each Ritz value). extra['converged'] flags residual < tol·|θ|; extra['lambda_min'] is
  the smallest Ritz value of the same run with its bound (negative curvature, at no extra HVP)."""
  if which not in ("LA", "LM", "SA"):
    raise ValueError(f"which must be 'LA', 'LM' or 'SA', not {which!r}")
  T = lanczos(matvec, params, key, num_steps, filter=filter, include=include, exclude=exclude)
  theta_m, S_mxm = T.ritz()
  resid_m = np.abs(T.beta_last * S_mxm[-1, :])
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
    raise ValueError(f"num_runs must be ≥ 1, not {num_runs}")
  runs = [_run_lanczos(matvec, params, jax.random.fold_in(key, r), num_steps, sel, reorth) for r in range(num_runs)]
  ritz = [T.ritz() for T in runs]
  return [t for t, _ in ritz], [S[0, :] ** 2 for _, S in ritz], sum(T.n_matvecs for T in runs), _n_selected(params, sel)


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
  filter: str | ParamFilter | None = None,
  include: str | None = None,  # noqa: A002
  exclude: str | None = None,
  grid_points: int | None = None,
) -> Estimate:
  """Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019; Lin et al. 2016).

  Each run gives nodes θ_i (Ritz values) and weights w_i = (e₁ᵀ s_i)² (Σ w_i = 1); the density is
  (1/R) Σ_runs Σ_i w_i N(x; θ_i, σ²) on `grid` (points, or an array), σ default (θ_max − θ_min)/m. It
  integrates to 1 and its mean is an unbiased estimate of tr(H)/n. `estimate` = n·mean_r Σ_i w_i θ_i,
  the SLQ trace (a Hutchinson estimate over the R start vectors) with its stderr across runs; raw
  nodes/weights (concatenated over runs) are returned for re-smoothing.
  """
  if grid_points is not None:  # older keyword
    grid = grid_points
  sel = selected(params, *_filter_args(filter, include, exclude))
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
  filter: str | ParamFilter | None = None,  # noqa: A002
  include: str | None = None,
  exclude: str | None = None,
) -> Estimate:
  """tr f(H) ≈ n·mean_r Σ_i w_i f(θ_i) (f applied to Ritz values, vectorised numpy). Exact per run for
  polynomials of degree < 2m (then it is Hutchinson on f(H)); stderr across runs."""
  sel = selected(params, *_filter_args(filter, include, exclude))
  nodes, weights, n_mv, n = _slq(matvec, params, key, num_runs, num_steps, sel, reorth)
  per_run = np.array([n * float(wr @ np.asarray(f(tr), np.float64)) for tr, wr in zip(nodes, weights)])
  return Estimate(float(per_run.mean()), _stderr(per_run), n_mv, samples=per_run, extra={"dimension": n})
