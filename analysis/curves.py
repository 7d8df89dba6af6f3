"""Per-token learning-curve metrics (Chang et al. 2023; Xia et al. 2022), vectorised.

Both papers fit one model per token curve in a Python loop (one pyGAM gridsearch and
one scipy ``curve_fit`` per curve in Chang's code, one statsmodels OLS per token in
Xia's). Here every curve of a run shares its x axis, so all design matrices, hat
matrices and penalties are shared and every metric becomes a few matmuls over a chunk
of tokens (default 50k rows, to bound memory); the only iterative fit (the sigmoid)
is a batched Levenberg-Marquardt in JAX.

Shape legend (suffixes on array names):
  T  tokens (one curve per token and run)    C  checkpoints as given (may include step 0)
  R  runs (seeds)                            D  checkpoints with step > 0 (the log10 axis)
  K  spline basis functions (25)             L  smoothing parameters lambda (11)
  G  fine x grid for AoA (1000)              P  run pairs
  S  subsampled tokens (rank similarity)     N  rows of one chunk
  W  checkpoints in a trend window           Q  target validation-ppl grid

Units: surprisal may be in bits (Chang) or nats; the metrics are unit-agnostic as long
as ``chance`` is in the same unit. Only the Xia trend classes need perplexities, and
take ``unit`` to convert (ppl = 2**s for bits, e**s for nats).

x axis: Chang indexes curves by x = log10(step) and drops step 0 wherever log10 is used
(GAM, both AoAs, forgettability, GAM cross-run variability); the raw-curve metrics
(final surprisal, within-run variability, raw cross-run variability, rank similarity)
use all C columns, as the reference does.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy import stats as sps

# pyGAM LinearGAM defaults mirrored by the smoother (pygam 0.9.0, pinned in Chang's
# requirements_analysis.txt; the code used is unchanged since 0.8.0): 25 cubic
# B-splines, gridsearch grid, GCV "gamma" inflation of the effective dof, and the
# sqrt(eps) ridge its PIRLS adds.
N_SPLINES = 25
SPLINE_DEGREE = 3
DEFAULT_LAMS = np.logspace(-3, 3, 11)
PYGAM_GCV_GAMMA = 1.4
PYGAM_RIDGE = float(np.sqrt(np.finfo(np.float64).eps))
MIN_SPLINE_POINTS = 4
MIN_SIGMOID_POINTS = 4
AOA_GRID_POINTS = 1000
CHUNK = 50_000

# Trend classes, numbered as in Xia et al.'s notebook (1 stagnated, 2 up, 3 down).
TREND_OTHER, TREND_STAGNATED, TREND_UPWARD, TREND_DOWNWARD = 0, 1, 2, 3
TREND_NAMES = {0: "other", 1: "stagnated", 2: "upward", 3: "downward"}

# Bits of the ``flags`` column of token_metrics(); a set bit means some metric is NaN
# (or, for SIGMOID_NOT_CONVERGED, approximate) for that token.
FLAG_FEW_GAM_POINTS = 1  # < 4 checkpoints with step > 0: GAM metrics NaN
FLAG_FEW_FINAL_POINTS = 2  # fewer checkpoints than the final window: final/var NaN
FLAG_FEW_SIGMOID_POINTS = 4  # < 4 checkpoints with step > 0: sigmoid AoA NaN
FLAG_SIGMOID_NOT_CONVERGED = 8  # LM hit max_iter in some run: best params so far kept
FLAG_FEW_TREND_POINTS = 16  # < 3 points in the trend window: trend stats NaN, class 0
FLAG_NONFINITE = 32  # NaN/inf in the input curve of some run: that run's fits NaN
FLAG_SINGLE_RUN = 64  # R < 2: cross-run metrics NaN
FLAG_NAMES = {
  FLAG_FEW_GAM_POINTS: "few_gam_points",
  FLAG_FEW_FINAL_POINTS: "few_final_points",
  FLAG_FEW_SIGMOID_POINTS: "few_sigmoid_points",
  FLAG_SIGMOID_NOT_CONVERGED: "sigmoid_not_converged",
  FLAG_FEW_TREND_POINTS: "few_trend_points",
  FLAG_NONFINITE: "nonfinite_input",
  FLAG_SINGLE_RUN: "single_run",
}


def describe_flags(flags: int) -> list[str]:
  """Names of the bits set in one ``flags`` value (for reading the DataFrame)."""
  return [name for bit, name in FLAG_NAMES.items() if int(flags) & bit]


# ----------------------------------------------------------------------------- axes


def chang_checkpoint_steps(n_checkpoints: int = 222, s0: float = 100.0, s1: float = 25_000.0, t1: float = 1e6) -> np.ndarray:
  """Chang's exponential save schedule: the save interval grows linearly s0 -> s1 by t1.

  step(n) = s0*t1/(s1-s0) * (exp(n*(s1-s0)/t1) - 1), rounded; n = 0..221 gives
  0, 101, 205, 311, ..., 957299, 981536.
  """
  n_C = np.arange(n_checkpoints, dtype=np.float64)
  steps_C = s0 * t1 / (s1 - s0) * (np.exp(n_C * (s1 - s0) / t1) - 1.0)
  return np.round(steps_C).astype(np.int64)


def log10_axis(steps_C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """x = log10(step) on the checkpoints with step > 0, and the mask selecting them.

  Step 0 has log10 = -inf; Chang drops it for every log-axis metric.
  """
  steps_C = np.asarray(steps_C)
  if steps_C.ndim != 1:
    raise ValueError(f"steps_C must be 1-D, got shape {steps_C.shape}")
  if np.any(np.diff(steps_C) <= 0):
    raise ValueError("steps_C must be strictly increasing")
  keep_C = steps_C > 0
  return np.log10(steps_C[keep_C].astype(np.float64)), keep_C


def _chunks(n: int, chunk: int) -> Iterator[slice]:
  for start in range(0, n, max(int(chunk), 1)):
    yield slice(start, min(start + int(chunk), n))


@contextmanager
def _timed(timings: dict[str, float] | None, key: str) -> Iterator[None]:
  """Accumulate wall time per metric so the benchmark can report a breakdown."""
  t0 = time.perf_counter()
  try:
    yield
  finally:
    if timings is not None:
      timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


# ---------------------------------------------------------- penalised regression spline


def bspline_basis(
  x_N: np.ndarray,
  edges: tuple[float, float],
  n_splines: int = N_SPLINES,
  degree: int = SPLINE_DEGREE,
) -> np.ndarray:
  """pyGAM's B-spline design matrix ``B_NxK`` (utils.b_spline_basis, non-periodic).

  pyGAM rescales x to [0, 1] over the data range (``edges`` = (min, max)), puts
  n_splines - degree + 1 evenly spaced knots on [0, 1] and extends them by ``degree``
  equally spaced knots on each side (uniform P-spline knots, not repeated end knots).
  Points outside the edges are evaluated by extending the polynomial end pieces
  (pyGAM extrapolates linearly instead; the AoA grid never leaves the data range).
  """
  from scipy.interpolate import BSpline

  lo, hi = float(edges[0]), float(edges[1])
  scale = hi - lo if hi > lo else 1.0
  u_N = (np.asarray(x_N, dtype=np.float64).ravel() - lo) / scale
  inner = np.linspace(0.0, 1.0, n_splines - degree + 1)
  step = inner[1] - inner[0]
  aug = np.arange(1, degree + 1) * step
  knots = np.r_[-aug[::-1], inner, 1.0 + aug]
  return BSpline.design_matrix(u_N, knots, degree, extrapolate=True).toarray()


def difference_penalty(n_splines: int = N_SPLINES, order: int = 2) -> np.ndarray:
  """pyGAM's 'derivative' penalty: P = D^T D with D the order-th difference operator.

  pyGAM (penalties.derivative) builds the same matrix from a sparse diff of the
  identity; it annihilates constants and straight lines in the coefficients.
  """
  d_MxK = np.diff(np.eye(n_splines), n=order, axis=0)
  return d_MxK.T @ d_MxK


@dataclasses.dataclass
class GamFit:
  """Per-curve GCV choice: coefficients, chosen lambda index and the GCV table."""

  coef_NxK: np.ndarray
  lam_idx_N: np.ndarray
  gcv_NxL: np.ndarray


class GamSmoother:
  """pyGAM ``LinearGAM(n_splines=25).gridsearch(lam=logspace(-3,3,11))`` for curves
  sharing one x axis, with GCV evaluated for all curves and all lambdas at once.

  Model (pyGAM 0.9.0 = 0.8.0 here; read in pygam.py, terms.py, penalties.py, utils.py):
    * s(0): cubic B-splines (``bspline_basis``) with the second-order difference
      penalty, scaled by lambda as is (pyGAM does not rescale lambda by n or by
      the basis: P_term = lam * D^T D).
    * intercept term: an unpenalised column of ones.
    * PIRLS adds sqrt(eps) * I to the penalty of all 26 coefficients "to improve
      conditioning", and GCV = n * RSS / (n - gamma * edof)^2 with gamma = 1.4 and
      edof = tr(H) (``_estimate_GCV_UBRE`` defaults).
  Reduction used here: B-splines sum to one on the data range, so the intercept
  column equals B @ 1 and the model space is span(B). Minimising the sqrt(eps) ridge
  over the intercept/spline split of each coefficient vector beta leaves the
  penalty ``lam * b'Pb + eps * b'(I - 11'/(K+1))b`` on the K spline coefficients, so
  the 25-column fit below has exactly pyGAM's fitted values, hat matrix and edof
  (see the test comparing with the 26-column system). With ``gamma=1.0`` and
  ``ridge=0`` this is the textbook GCV C*RSS/(C - tr H)^2. Remaining differences to
  pyGAM: it solves via QR+SVD, here via an explicit K x K inverse and the RSS
  identity below (fitted values and edof equal to 1e-8 relative in the tests), and
  outside the data range pyGAM extrapolates linearly.
  """

  def __init__(
    self,
    x_D: np.ndarray,
    n_splines: int = N_SPLINES,
    lams_L: np.ndarray = DEFAULT_LAMS,
    gamma: float = PYGAM_GCV_GAMMA,
    ridge: float = PYGAM_RIDGE,
    degree: int = SPLINE_DEGREE,
  ) -> None:
    self.x_D = np.asarray(x_D, dtype=np.float64)
    if self.x_D.ndim != 1 or self.x_D.size < MIN_SPLINE_POINTS:
      raise ValueError(f"need >= {MIN_SPLINE_POINTS} x points, got {self.x_D.shape}")
    self.n_splines, self.degree = int(n_splines), int(degree)
    self.lams_L = np.asarray(lams_L, dtype=np.float64).ravel()
    self.gamma, self.ridge = float(gamma), float(ridge)
    self.edges = (float(self.x_D.min()), float(self.x_D.max()))
    k = self.n_splines
    self.B_DxK = bspline_basis(self.x_D, self.edges, k, self.degree)
    self.P_KxK = difference_penalty(k, 2)
    self.gram_KxK = self.B_DxK.T @ self.B_DxK
    ridge_KxK = self.ridge * (np.eye(k) - np.ones((k, k)) / (k + 1))
    self.A_LxKxK = np.stack([np.linalg.inv(self.gram_KxK + ridge_KxK + lam * self.P_KxK) for lam in self.lams_L])
    self.A_LxKxK = 0.5 * (self.A_LxKxK + self.A_LxKxK.transpose(0, 2, 1))
    self.edof_L = np.einsum("lij,ji->l", self.A_LxKxK, self.gram_KxK)
    q_LxKxK = 2.0 * self.A_LxKxK - self.A_LxKxK @ self.gram_KxK @ self.A_LxKxK
    self.Q_KxLK = q_LxKxK.transpose(1, 0, 2).reshape(k, -1)

  def basis(self, x_G: np.ndarray) -> np.ndarray:
    """Design matrix at new x (e.g. the 1000-point AoA grid)."""
    return bspline_basis(x_G, self.edges, self.n_splines, self.degree)

  def hat_matrix(self, lam_idx: int) -> np.ndarray:
    """H_lambda = B (B'B + lam P + ridge)^-1 B' (D x D); for tests and inspection."""
    return self.B_DxK @ self.A_LxKxK[lam_idx] @ self.B_DxK.T

  def gcv_from_rss(self, rss_NxL: np.ndarray) -> np.ndarray:
    """pyGAM's GCV score n * RSS / (n - gamma * edof)^2 for every curve and lambda."""
    n = self.x_D.size
    return n * rss_NxL / (n - self.gamma * self.edof_L) ** 2

  def fit(self, y_NxD: np.ndarray) -> GamFit:
    """Choose lambda per curve by GCV; K-space algebra only, never a D x D hat per curve.

    With z = B'y and A = (B'B + lam P + ridge)^-1: beta = A z and
    RSS(lam) = y'y - 2 z'Az + z'A(B'B)Az = y'y - z'Q z with Q = 2A - A B'B A, so all
    11 lambdas cost one N x K x (L*K) matmul after the N x D x K projection.
    """
    y_NxD = np.asarray(y_NxD, dtype=np.float64)
    z_NxK = y_NxD @ self.B_DxK
    yy_N = np.einsum("nd,nd->n", y_NxD, y_NxD)
    n_rows, n_lams, k = y_NxD.shape[0], self.lams_L.size, self.n_splines
    zq_NxLxK = (z_NxK @ self.Q_KxLK).reshape(n_rows, n_lams, k)
    rss_NxL = yy_N[:, None] - np.einsum("nlk,nk->nl", zq_NxLxK, z_NxK)
    gcv_NxL = self.gcv_from_rss(np.maximum(rss_NxL, 0.0))
    lam_idx_N = np.argmin(gcv_NxL, axis=1)  # first minimum on ties, as pyGAM's strict <
    coef_NxK = np.empty((n_rows, k))
    for l_idx in np.unique(lam_idx_N):
      rows = lam_idx_N == l_idx
      coef_NxK[rows] = z_NxK[rows] @ self.A_LxKxK[l_idx]
    return GamFit(coef_NxK, lam_idx_N, gcv_NxL)


@dataclasses.dataclass
class SmoothResult:
  """Output of ``smooth_curves``; NaN everywhere (ok=False) when too few checkpoints."""

  smooth_TxD: np.ndarray
  x_D: np.ndarray
  lam_T: np.ndarray
  edof_T: np.ndarray
  gcv_T: np.ndarray
  fine_TxG: np.ndarray | None
  x_G: np.ndarray | None
  ok: bool


def smooth_curves(
  surprisal_TxC: np.ndarray,
  steps_C: np.ndarray,
  fine_points: int | None = None,
  n_splines: int = N_SPLINES,
  lams_L: np.ndarray = DEFAULT_LAMS,
  gamma: float = PYGAM_GCV_GAMMA,
  chunk: int = CHUNK,
  dtype: type = np.float32,
) -> SmoothResult:
  """GAM-smooth every curve on x = log10(step) with GCV lambda per curve (Chang's
  ``get_gam_curves``), optionally also on a ``fine_points`` grid over [x_min, x_max].

  The fine grid costs T x G memory; for AoA over millions of tokens use
  ``token_metrics``, which reduces it chunk by chunk.
  """
  surprisal_TxC = np.asarray(surprisal_TxC)
  x_D, keep_C = log10_axis(steps_C)
  n_tok, n_d = surprisal_TxC.shape[0], x_D.size
  x_G = np.linspace(x_D[0], x_D[-1], fine_points) if fine_points and n_d else None
  if n_d < MIN_SPLINE_POINTS:
    nan_T = np.full(n_tok, np.nan)
    fine = None if x_G is None else np.full((n_tok, x_G.size), np.nan, dtype)
    return SmoothResult(
      np.full((n_tok, n_d), np.nan, dtype),
      x_D,
      nan_T,
      nan_T.copy(),
      nan_T.copy(),
      fine,
      x_G,
      False,
    )
  sm = GamSmoother(x_D, n_splines, lams_L, gamma)
  smooth_TxD = np.empty((n_tok, n_d), dtype)
  fine_TxG = None if x_G is None else np.empty((n_tok, x_G.size), dtype)
  bfine_GxK = None if x_G is None else sm.basis(x_G)
  lam_T, edof_T, gcv_T = np.empty(n_tok), np.empty(n_tok), np.empty(n_tok)
  for sl in _chunks(n_tok, chunk):
    y_NxD = np.asarray(surprisal_TxC[sl][:, keep_C], dtype=np.float64)
    fit = sm.fit(y_NxD)
    smooth_TxD[sl] = fit.coef_NxK @ sm.B_DxK.T
    if fine_TxG is not None:
      fine_TxG[sl] = fit.coef_NxK @ bfine_GxK.T
    lam_T[sl] = sm.lams_L[fit.lam_idx_N]
    edof_T[sl] = sm.edof_L[fit.lam_idx_N]
    gcv_T[sl] = np.take_along_axis(fit.gcv_NxL, fit.lam_idx_N[:, None], 1)[:, 0]
  return SmoothResult(smooth_TxD, x_D, lam_T, edof_T, gcv_T, fine_TxG, x_G, True)


# ----------------------------------------------------------------- Chang: simple metrics


def final_window(
  steps_C: np.ndarray | None,
  n_checkpoints: int,
  last_n: int = 11,
  last_frac: float | None = None,
  total_steps: float | None = None,
) -> np.ndarray | None:
  """Boolean mask of the 'end of training' checkpoints, or None if too few.

  Chang uses the last 11 checkpoints (his comment: 'last 25% of pre-training', i.e.
  steps >= 750k of the 1M trained, which selects the same 11 checkpoints). With
  ``last_frac`` the window is every checkpoint with step >= (1 - last_frac) * total,
  total = ``total_steps`` or, by default, the last checkpoint's step (981,536 for
  Chang, which admits a 12th checkpoint at 741k; pass total_steps=1e6 for his 11).
  """
  if last_frac is not None:
    if steps_C is None:
      raise ValueError("last_frac needs steps_C")
    steps_C = np.asarray(steps_C, dtype=np.float64)
    total = float(steps_C[-1] if total_steps is None else total_steps)
    mask_C = steps_C >= (1.0 - float(last_frac)) * total
    return mask_C if mask_C.sum() >= 1 else None
  if n_checkpoints < last_n or last_n < 1:
    return None
  mask_C = np.zeros(n_checkpoints, dtype=bool)
  mask_C[-last_n:] = True
  return mask_C


def final_surprisal(
  surprisal_TxC: np.ndarray,
  last_n: int = 11,
  steps_C: np.ndarray | None = None,
  last_frac: float | None = None,
  total_steps: float | None = None,
) -> np.ndarray:
  """Mean raw surprisal over the final window (Chang's 'surprisal' / confidence score).

  NaN (not an exception) when there are fewer checkpoints than the window.
  """
  surprisal_TxC = np.asarray(surprisal_TxC)
  mask_C = final_window(steps_C, surprisal_TxC.shape[-1], last_n, last_frac, total_steps)
  if mask_C is None:
    return np.full(surprisal_TxC.shape[:-1], np.nan)
  return surprisal_TxC[..., mask_C].mean(axis=-1, dtype=np.float64)


def within_run_variability(
  surprisal_TxC: np.ndarray,
  last_n: int = 11,
  steps_C: np.ndarray | None = None,
  last_frac: float | None = None,
  total_steps: float | None = None,
) -> np.ndarray:
  """Std (ddof=0) of raw surprisal over the final window: Chang's 'var_steps'."""
  surprisal_TxC = np.asarray(surprisal_TxC)
  mask_C = final_window(steps_C, surprisal_TxC.shape[-1], last_n, last_frac, total_steps)
  if mask_C is None:
    return np.full(surprisal_TxC.shape[:-1], np.nan)
  return surprisal_TxC[..., mask_C].astype(np.float64).std(axis=-1)


def aoa_gam(
  smooth_fine_TxG: np.ndarray,
  x_G: np.ndarray,
  chance: float,
  proportion: float = 0.5,
  return_threshold: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """GAM age of acquisition (Chang's ``get_gam_aoas``), in log10 steps.

  Threshold y* = (1 - p) * chance + p * min_x GAM(x), halfway between chance and the
  best (not the final) smoothed surprisal for p = 0.5; AoA is the first grid x with
  GAM(x) <= y*, or x_max when y* >= chance (the curve never gets below chance).
  """
  fine_TxG = np.asarray(smooth_fine_TxG)
  x_G = np.asarray(x_G, dtype=np.float64)
  thr_T = chance * (1.0 - proportion) + fine_TxG.min(axis=-1).astype(np.float64) * proportion
  hit_T = np.argmax(fine_TxG <= thr_T[..., None].astype(fine_TxG.dtype), axis=-1)
  aoa_T = np.where(thr_T >= chance, x_G[-1], x_G[hit_T])
  aoa_T = np.where(np.isfinite(thr_T), aoa_T, np.nan)
  return (aoa_T, thr_T) if return_threshold else aoa_T


def forgettability(smooth_TxD: np.ndarray) -> np.ndarray:
  """Total rise of the smoothed curve, sum_t max(0, GAM(x_t+1) - GAM(x_t)).

  Chang smooths first so that noise spikes do not count as forgetting.
  """
  rise = np.diff(np.asarray(smooth_TxD, dtype=np.float64), axis=-1)
  return np.clip(rise, 0.0, None).sum(axis=-1)


# ------------------------------------------------------------------ Chang: sigmoid AoA


def _sum_rows(*terms: jax.Array) -> tuple[jax.Array, ...]:
  """Row sums of many N x D terms in one variadic XLA reduce (one pass over memory).

  Separate jnp.sum calls made XLA recompute the shared sigmoid for each reduction,
  about 2x slower on CPU.
  """
  zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
  return jax.lax.reduce(terms, zeros, lambda a, b: tuple(p + q for p, q in zip(a, b)), (1,))


def _sigmoid_normal_eq(th_Nx4: jax.Array, y_NxD: jax.Array, x_D: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Cost sum r^2, J'J and J'r of f = start + (end-start)/(1+exp((xmid-x)/scale))."""
  start, end = th_Nx4[:, 0:1], th_Nx4[:, 1:2]
  xmid, scale = th_Nx4[:, 2:3], th_Nx4[:, 3:4]
  u = (x_D[None, :] - xmid) / scale
  sg = 0.5 * jnp.tanh(0.5 * u) + 0.5  # = sigmoid(u); XLA's CPU tanh is ~20% faster
  dlt = end - start
  r = y_NxD - (start + dlt * sg)
  j2 = -(dlt / scale) * sg * (1.0 - sg)  # d f / d xmid
  j3 = j2 * u  # d f / d scale
  (s1, s11, s2, s12, s3, s13, s22, s23, s33, sr, s1r, s2r, s3r, srr) = _sum_rows(
    sg,
    sg * sg,
    j2,
    sg * j2,
    j3,
    sg * j3,
    j2 * j2,
    j2 * j3,
    j3 * j3,
    r,
    sg * r,
    j2 * r,
    j3 * r,
    r * r,
  )
  n = jnp.asarray(x_D.shape[0], y_NxD.dtype)
  # Columns: d/dstart = 1 - sg, d/dend = sg, j2, j3.
  a00 = n - 2 * s1 + s11
  a01 = s1 - s11
  a02, a03 = s2 - s12, s3 - s13
  a11, a12, a13 = s11, s12, s13
  jtj = jnp.stack(
    [
      jnp.stack([a00, a01, a02, a03], -1),
      jnp.stack([a01, a11, a12, a13], -1),
      jnp.stack([a02, a12, s22, s23], -1),
      jnp.stack([a03, a13, s23, s33], -1),
    ],
    -2,
  )
  jtr = jnp.stack([sr - s1r, s1r, s2r, s3r], -1)
  return srr, jtj, jtr


@jax.jit
def _lm_init(th_Nx4: jax.Array, y_NxD: jax.Array, x_D: jax.Array):
  return _sigmoid_normal_eq(th_Nx4, y_NxD, x_D)


@functools.partial(jax.jit, static_argnames=("n_iter",))
def _lm_block(state, y_NxD, x_D, ftol, n_iter: int):
  """``n_iter`` Levenberg-Marquardt iterations for every row, one fused data pass each.

  Marquardt scaling (damping mu * diag(J'J), as MINPACK) with Nielsen's damping
  update from the gain ratio rho = actual / predicted cost reduction; on 20k synthetic
  curves this cut the mean iteration count from 28 to 22 and the 99th percentile from
  147 to 100 versus a fixed x0.3 / x10 rule. A rejected step only raises the damping,
  so J'J and J'r of the current point are carried along.
  """

  def body(_, st):
    th, cost, jtj, jtr, mu, nu, done, n_it = st
    diag = jnp.diagonal(jtj, axis1=1, axis2=2) + 1e-9
    damp = (mu[:, None] * diag)[:, :, None] * jnp.eye(4, dtype=th.dtype)
    step = jnp.linalg.solve(jtj + damp, jtr[..., None])[..., 0]
    th_new = th + step
    cost_new, jtj_new, jtr_new = _sigmoid_normal_eq(th_new, y_NxD, x_D)
    finite = jnp.isfinite(cost_new) & jnp.all(jnp.isfinite(th_new), -1)
    actual = cost - cost_new
    predicted = jnp.sum(step * (jtr + mu[:, None] * diag * step), -1)
    rho = jnp.where(finite, actual / jnp.maximum(predicted, 1e-30), -1.0)
    ok = (~done) & finite & (rho > 0) & (cost_new < cost)
    n_it = n_it + (~done).astype(n_it.dtype)
    # Converged: an accepted step that no longer improves the cost by ftol, or damping
    # so large that no step helps any more (a float32 minimum).
    done = done | (ok & (actual <= ftol * cost)) | (mu > 1e10)
    mu = jnp.where(ok, mu * jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), mu * nu)
    nu = jnp.where(ok, 2.0, nu * 2.0)
    th = jnp.where(ok[:, None], th_new, th)
    cost = jnp.where(ok, cost_new, cost)
    jtj = jnp.where(ok[:, None, None], jtj_new, jtj)
    jtr = jnp.where(ok[:, None], jtr_new, jtr)
    return th, cost, jtj, jtr, mu, nu, done, n_it

  return jax.lax.fori_loop(0, n_iter, body, state)


def _bucket(n: int, full: int, step: int = 2048) -> int:
  """Padded batch size for the active set: few distinct shapes (jit recompiles) but
  little padding (powers of two below ``step``, multiples of ``step`` above)."""
  if n <= step:
    return min(full, max(64, 1 << (int(n) - 1).bit_length()))
  return min(full, -(-int(n) // step) * step)


def fit_sigmoids(
  y_NxD: np.ndarray,
  x_D: np.ndarray,
  max_iter: int = 200,
  ftol: float = 1e-6,
  block_iter: int = 4,
  mu0: float = 0.1,
  init_Nx4: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Least-squares sigmoid fit of every row, from ``init_Nx4`` or by default from
  Chang's p0 = [min y, max y, mean x, 1].

  Batched LM in float32 JAX over the rows, with an active set compacted every
  ``block_iter`` iterations so converged rows stop costing time. Returns params
  (start, end, xmid, scale) in the sign of y, a converged mask and iteration counts.
  Agreement with scipy.optimize.curve_fit (same p0, ftol=1e-8): on 300 clean planted
  sigmoids+noise, xmid within 1e-3 for all; on 600 of the benchmark's synthetic
  curves (bumps, unlearned tokens, late rises) the AoA within 1e-3 for 99.0%; the rest
  are curves where the two optimisers stop in different local minima (typically
  start -> -inf with xmid left of the data), mostly with a higher cost here. The
  initial damping mu0 = 0.1 (vs 1e-3) took the fewest iterations (mean 15 on those
  curves) and the best agreement. curve_fit's retry with a looser ftol is not
  replicated; rows still moving after ``max_iter`` are flagged (best params kept).
  """
  y_NxD = np.asarray(y_NxD, dtype=np.float32)
  n_rows = y_NxD.shape[0]
  x32_D = jnp.asarray(x_D, dtype=jnp.float32)
  th_Nx4 = np.stack([y_NxD.min(1), y_NxD.max(1), np.full(n_rows, np.mean(x_D)), np.ones(n_rows)], 1).astype(np.float32)
  if init_Nx4 is not None:
    th_Nx4 = np.asarray(init_Nx4, np.float32).copy()
  cost, jtj, jtr = (np.array(a) for a in _lm_init(th_Nx4, y_NxD, x32_D))
  mu_N = np.full(n_rows, mu0, np.float32)
  nu_N = np.full(n_rows, 2.0, np.float32)
  done_N = np.zeros(n_rows, bool)
  n_it_N = np.zeros(n_rows, np.int32)
  state = [th_Nx4, cost, jtj, jtr, mu_N, nu_N, done_N, n_it_N]
  active = np.arange(n_rows)
  it = 0
  ftol32 = np.float32(ftol)
  while active.size and it < max_iter:
    size = _bucket(active.size, n_rows)
    idx = np.concatenate([active, np.full(size - active.size, active[0])])
    sub = tuple(jnp.asarray(a[idx]) for a in state)
    n_blk = min(block_iter, max_iter - it)
    out = _lm_block(sub, jnp.asarray(y_NxD[idx]), x32_D, ftol32, n_iter=n_blk)
    for dst, src in zip(state, out):
      dst[active] = np.asarray(src)[: active.size]
    it += n_blk
    active = active[~state[6][active]]
  th_Nx4, done_N, n_it_N = state[0], state[6], state[7]
  return th_Nx4.astype(np.float64), done_N & np.all(np.isfinite(th_Nx4), 1), n_it_N


def sigmoid_init_from_smooth(y_NxD: np.ndarray, smooth_NxD: np.ndarray, x_D: np.ndarray, scale: float = 0.2) -> np.ndarray:
  """LM start for y: Chang's start/end (min y, max y), but xmid where the smoothed
  curve first reaches its own midpoint and a 0.2-decade width instead of mean x, 1.

  Same objective and same minimiser family; only the starting point of the two
  nonlinear parameters moves. On 600 synthetic curves this converged in 9.3 vs 15.0
  LM iterations on average and matched curve_fit-from-p0 AoAs (within 1e-3) for
  99.5% vs 99.0% of curves.
  """
  y_NxD = np.asarray(y_NxD, np.float64)
  sm_NxD = np.asarray(smooth_NxD, np.float64)
  mid_N = 0.5 * (sm_NxD.min(1) + sm_NxD.max(1))
  cross_N = np.argmax(sm_NxD >= mid_N[:, None], axis=1)
  n_rows = y_NxD.shape[0]
  return np.stack([y_NxD.min(1), y_NxD.max(1), np.asarray(x_D)[cross_N], np.full(n_rows, scale)], 1)


@dataclasses.dataclass
class SigmoidResult:
  """Sigmoid AoA per curve; params are (start, end, xmid, scale) in surprisal sign,
  as Chang's ``compute_aoa_vals`` returns them."""

  aoa_T: np.ndarray
  threshold_T: np.ndarray
  params_Tx4: np.ndarray
  converged_T: np.ndarray
  n_iter_T: np.ndarray


def sigmoid_aoa_from_params(
  params_Nx4: np.ndarray,
  ymax_N: np.ndarray,
  chance: float,
  x_min: float,
  x_max: float,
  proportion: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
  """Chang's ``get_aoa`` vectorised, on -surprisal: params fit to y = -surprisal.

  Threshold = (1-p)*(-chance) + p*max(y). AoA = x_max if the threshold is above the
  whole sigmoid, if -chance >= max(y), or if the sigmoid decreases; x_min if it is
  below the whole sigmoid; else xmid - scale*ln((end-start)/(thr-start) - 1) clipped.
  Returns (aoa, surprisal threshold; NaN where AoA was set to x_min / x_max).
  """
  start, end, xmid, scale = (params_Nx4[:, i] for i in range(4))
  ymin = -float(chance)
  thr = ymin * (1.0 - proportion) + ymax_N * proportion
  to_max = ((thr >= start) & (thr >= end)) | (ymin >= ymax_N)
  to_max |= ((end < start) & (scale > 0)) | ((end > start) & (scale < 0))
  to_min = (~to_max) & (thr <= start) & (thr <= end)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    inter = xmid - scale * np.log((end - start) / (thr - start) - 1.0)
  aoa = np.where(to_max, x_max, np.where(to_min, x_min, np.clip(inter, x_min, x_max)))
  clipped = to_max | to_min | (inter <= x_min) | (inter >= x_max)
  return aoa, np.where(clipped, np.nan, -thr)


def aoa_sigmoid(
  surprisal_TxC: np.ndarray,
  steps_C: np.ndarray,
  chance: float,
  proportion: float = 0.5,
  init: Literal["gam", "p0"] = "gam",
  max_iter: int = 200,
  ftol: float = 1e-6,
  chunk: int = CHUNK,
  smooth_TxD: np.ndarray | None = None,
) -> SigmoidResult:
  """Sigmoid AoA (Chang & Bergen 2022 ``compute_aoa_vals``) for every curve, in log10
  steps. Fits -surprisal on x = log10(step), step 0 dropped; NaN if < 4 points or if
  a curve has non-finite values.

  init='p0' starts LM at Chang's p0 = [min y, max y, mean x, 1]; init='gam' (default)
  starts xmid/scale from the GAM-smoothed curve (``sigmoid_init_from_smooth``), which
  is faster and agreed with curve_fit-from-p0 slightly more often. Pass
  ``smooth_TxD`` (GAM of the surprisal curves) to skip re-smoothing.
  """
  surprisal_TxC = np.asarray(surprisal_TxC)
  x_D, keep_C = log10_axis(steps_C)
  n_tok = surprisal_TxC.shape[0]
  aoa_T, thr_T = np.full(n_tok, np.nan), np.full(n_tok, np.nan)
  params_Tx4 = np.full((n_tok, 4), np.nan)
  conv_T, nit_T = np.zeros(n_tok, bool), np.zeros(n_tok, np.int32)
  if x_D.size < MIN_SIGMOID_POINTS:
    return SigmoidResult(aoa_T, thr_T, params_Tx4, conv_T, nit_T)
  if init not in ("gam", "p0"):
    raise ValueError(f"init must be 'gam' or 'p0', got {init!r}")
  use_gam = init == "gam" and x_D.size >= MIN_SPLINE_POINTS
  sm = GamSmoother(x_D) if use_gam and smooth_TxD is None else None
  for sl in _chunks(n_tok, chunk):
    y_NxD = -np.asarray(surprisal_TxC[sl][:, keep_C], dtype=np.float32)
    fin_N = np.all(np.isfinite(y_NxD), 1)
    if not fin_N.any():
      continue
    rows = np.flatnonzero(fin_N) + sl.start
    init_Nx4 = None
    if use_gam:
      if smooth_TxD is not None:
        gam_NxD = -np.asarray(smooth_TxD[sl], np.float64)[fin_N]
      else:
        gam_NxD = sm.fit(y_NxD[fin_N]).coef_NxK @ sm.B_DxK.T
      init_Nx4 = sigmoid_init_from_smooth(y_NxD[fin_N], gam_NxD, x_D)
    th, conv, nit = fit_sigmoids(y_NxD[fin_N], x_D, max_iter, ftol, init_Nx4=init_Nx4)
    aoa, thr = sigmoid_aoa_from_params(th, y_NxD[fin_N].max(1).astype(np.float64), chance, x_D[0], x_D[-1], proportion)
    aoa_T[rows], thr_T[rows], conv_T[rows], nit_T[rows] = aoa, thr, conv, nit
    params_Tx4[rows] = th * np.array([-1.0, -1.0, 1.0, 1.0])
  return SigmoidResult(aoa_T, thr_T, params_Tx4, conv_T, nit_T)


# ------------------------------------------------------------------- Chang: cross-run


def run_pairs(n_runs: int) -> list[tuple[int, int]]:
  """All unordered run pairs (i < j); Chang's 5 runs give 10."""
  return list(itertools.combinations(range(n_runs), 2))


def crossrun_variability(curves_RxTxD: np.ndarray, return_pairs: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Chang's var_runs: mean over run pairs of the mean squared difference of curves.

  Pass GAM-smoothed curves (Chang's default, ``use_gams=True``) or raw curves (his
  raw variant). Zero for identical runs; NaN for a single run.
  """
  curves = np.asarray(curves_RxTxD)
  pairs = run_pairs(curves.shape[0])
  if not pairs:
    out = np.full(curves.shape[1], np.nan)
    return (out, np.empty((curves.shape[1], 0))) if return_pairs else out
  dist_TxP = np.stack(
    [np.mean(np.square(curves[i].astype(np.float64) - curves[j]), axis=-1) for i, j in pairs],
    -1,
  )
  var_T = dist_TxP.mean(-1)
  return (var_T, dist_TxP) if return_pairs else var_T


@dataclasses.dataclass
class RankResult:
  """Cross-run rank similarity on a token subsample: rank 0 = the token's own curve in
  the other run is its nearest neighbour; ``normalized`` divides by S - 1."""

  rank_PxS: np.ndarray
  idx_S: np.ndarray
  pairs: list[tuple[int, int]]

  @property
  def normalized_PxS(self) -> np.ndarray:
    return self.rank_PxS / max(self.rank_PxS.shape[1] - 1, 1)

  @property
  def mean_rank_S(self) -> np.ndarray:
    return self.rank_PxS.mean(0)


def subsample_tokens(n_tok: int, n_sub: int | None, seed: int = 0) -> np.ndarray:
  """Sorted token indices for O(S^2) metrics; all tokens when n_sub is None or >= T."""
  if n_sub is None or n_sub >= n_tok:
    return np.arange(n_tok)
  return np.sort(np.random.default_rng(seed).choice(n_tok, size=int(n_sub), replace=False))


def crossrun_rank_similarity(
  curves_RxTxC: np.ndarray,
  n_sub: int | None = 10_000,
  seed: int = 0,
  pairs: Sequence[tuple[int, int]] | None = None,
  chunk: int = 2048,
) -> RankResult:
  """Chang's cross-run trajectory similarity, run over a token subsample.

  For curve k of run i, rank = #{k' : MSE(c_ik, c_jk') < MSE(c_ik, c_jk)} with k'
  ranging over the same subsample in run j. All-pairs is O(T^2 C) (1M tokens: 2e14
  flops per run pair), so by default S = 10,000 random tokens (seed 0); ranks scale
  with S, so compare ``normalized_PxS`` across subsample sizes. Chang's script uses
  raw curves (USE_GAMS = False) and the single pair (0, 1); here every pair i < j,
  with run i as the query side. Distances use ||a||^2 + ||b||^2 - 2ab in float64 on
  curves centred per checkpoint; the own-curve distance is computed directly and
  excluded from the count, so identical runs give rank 0 exactly.
  """
  curves = np.asarray(curves_RxTxC)
  idx_S = subsample_tokens(curves.shape[1], n_sub, seed)
  sub = curves[:, idx_S].astype(np.float64)
  sub -= sub.mean(axis=(0, 1), keepdims=True)
  pairs = list(run_pairs(curves.shape[0]) if pairs is None else pairs)
  n_s, n_c = sub.shape[1], sub.shape[2]
  norms_RxS = np.einsum("rsc,rsc->rs", sub, sub)
  rank_PxS = np.zeros((len(pairs), n_s), dtype=np.int64)
  for p_idx, (i, j) in enumerate(pairs):
    own_S = np.mean(np.square(sub[i] - sub[j]), axis=-1)
    for sl in _chunks(n_s, chunk):
      d_NxS = norms_RxS[i, sl, None] + norms_RxS[j][None, :] - 2.0 * sub[i, sl] @ sub[j].T
      d_NxS /= n_c
      rows = np.arange(sl.stop - sl.start)
      d_NxS[rows, rows + sl.start] = np.inf
      rank_PxS[p_idx, sl] = np.sum(d_NxS < own_S[sl, None], axis=1)
  return RankResult(rank_PxS, idx_S, pairs)


def crossrun_correlation(metric_RxT: np.ndarray) -> tuple[float, float, np.ndarray]:
  """Pearson r of a per-token metric between every pair of runs: (mean, sd, r_P).

  Chang reports mean +- np.std (ddof=0) over the 10 pairs; tokens NaN in either run
  of a pair are dropped for that pair.
  """
  metric = np.asarray(metric_RxT, dtype=np.float64)
  r_P = []
  for i, j in run_pairs(metric.shape[0]):
    ok = np.isfinite(metric[i]) & np.isfinite(metric[j])
    a, b = metric[i, ok], metric[j, ok]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
      r_P.append(np.nan)
    else:
      r_P.append(float(np.corrcoef(a, b)[0, 1]))
  r = np.asarray(r_P)
  if r.size == 0:
    return float("nan"), float("nan"), r
  return float(np.nanmean(r)), float(np.nanstd(r)), r


# ---------------------------------------------------------------- Xia: trend classes


def trend_windows(
  steps_C: np.ndarray,
  n_checkpoints: int,
  window_frac: float = 0.2,
  window: Literal["steps", "checkpoints", "xia"] = "steps",
) -> tuple[int, int]:
  """First checkpoint index of the OLS window and of the stagnation window.

  'steps' (default): both start at the checkpoint nearest to window_frac * final
  step, i.e. the paper's 'after x% of training'. 'checkpoints': both start at
  int(window_frac * C). 'xia': Xia's released code, OLS by steps but stagnation by
  checkpoints; the two differ whenever checkpoints are not evenly spaced in steps
  (all OPT schedules, and Chang's exponential one).
  """
  steps = np.asarray(steps_C, dtype=np.float64)
  by_steps = int(np.argmin(np.abs(steps - int(steps[-1] * window_frac))))
  by_ckpt = int(window_frac * n_checkpoints)
  if window == "steps":
    return by_steps, by_steps
  if window == "checkpoints":
    return by_ckpt, by_ckpt
  if window == "xia":
    return by_steps, by_ckpt
  raise ValueError(f"unknown window {window!r}")


@dataclasses.dataclass
class TrendResult:
  """Per-token Xia trend: class (TREND_*), OLS slope on ln(step), t, p, n points."""

  class_T: np.ndarray
  slope_T: np.ndarray
  intercept_T: np.ndarray
  t_T: np.ndarray
  p_T: np.ndarray
  n_T: np.ndarray
  gmean_T: np.ndarray
  ols_start: int
  stag_start: int


def _to_ppl(values: np.ndarray, kind: str, unit: str) -> np.ndarray:
  values = np.asarray(values, dtype=np.float64)
  if kind == "ppl":
    return values
  if kind != "surprisal":
    raise ValueError(f"kind must be 'ppl' or 'surprisal', got {kind!r}")
  if unit == "bits":
    return np.exp2(values)
  if unit == "nats":
    return np.exp(values)
  raise ValueError(f"unit must be 'bits' or 'nats', got {unit!r}")


def trend_classes(
  values_TxC: np.ndarray,
  steps_C: np.ndarray,
  window_frac: float = 0.2,
  window: Literal["steps", "checkpoints", "xia"] = "steps",
  p: float = 0.05,
  kind: Literal["ppl", "surprisal"] = "ppl",
  unit: Literal["bits", "nats"] = "nats",
  band: float = 0.05,
  chunk: int = CHUNK,
) -> TrendResult:
  """Xia et al. token trends: upward / downward / stagnated, all tokens at once.

  OLS per token of y_t = ppl_t / ppl_t0 on [1, ln(step_t)] over the OLS window
  (t0 its first checkpoint; the released code's scalar ``x = np.log(checkpoint_index
  [starting_index])`` is fixed to the slice). Upward: slope > 0 and p < ``p``;
  downward: slope < 0 and p < ``p`` (two-sided t test, df = n - 2, as statsmodels).
  Stagnated: with m the geometric mean of ppl over the stagnation window,
  1-band < m/ppl_first < 1+band, 1-band < m/ppl_last < 1+band, var(ppl) < m, and
  neither up nor down. NaN points are dropped per token as in Xia's code; step 0
  (ln 0) never enters the OLS.
  """
  steps_C = np.asarray(steps_C)
  n_tok, n_c = np.shape(values_TxC)
  s_ols, s_stag = trend_windows(steps_C, n_c, window_frac, window)
  ols_cols = np.arange(s_ols, n_c)
  ols_cols = ols_cols[steps_C[ols_cols] > 0]
  x_W = np.log(steps_C[ols_cols].astype(np.float64))
  xc_W = x_W - x_W.mean() if x_W.size else x_W
  out = {k: np.full(n_tok, np.nan) for k in ("slope", "icpt", "t", "p", "gm")}
  n_T = np.zeros(n_tok, np.int64)
  cls_T = np.zeros(n_tok, np.int8)
  for sl in _chunks(n_tok, chunk):
    ppl_NxC = _to_ppl(np.asarray(values_TxC[sl]), kind, unit)
    with np.errstate(divide="ignore", invalid="ignore"):
      # OLS window: normalise by the first window checkpoint (NaN there -> all NaN).
      y_NxW = ppl_NxC[:, s_ols:] / ppl_NxC[:, s_ols : s_ols + 1]
      y_NxW = y_NxW[:, steps_C[s_ols:] > 0]
      m_NxW = np.isfinite(y_NxW)
      n_N = m_NxW.sum(1)
      y0 = np.where(m_NxW, y_NxW, 0.0)
      xbar = (m_NxW * xc_W).sum(1) / n_N
      ybar = y0.sum(1) / n_N
      dx = (xc_W[None, :] - xbar[:, None]) * m_NxW
      dy = (y0 - ybar[:, None]) * m_NxW
      sxx, sxy = (dx * dx).sum(1), (dx * dy).sum(1)
      slope = sxy / sxx
      rss = np.square(dy - slope[:, None] * dx).sum(1)
      df = n_N - 2.0
      se = np.sqrt(rss / df / sxx)
      tval = slope / se
      pval = 2.0 * sps.t.sf(np.abs(tval), df)
      few = n_N < 3
      for arr in (slope, tval, pval):
        arr[few] = np.nan
      icpt = np.where(few, np.nan, ybar - slope * (xbar + (x_W.mean() if x_W.size else 0)))
      up = (slope > 0) & (pval < p)
      down = (slope < 0) & (pval < p)
      # Stagnation window: raw ppl (not normalised); NaN anywhere -> not stagnated.
      z = ppl_NxC[:, s_stag:]
      gm = np.exp(np.nanmean(np.log(z), axis=1)) if z.shape[1] else np.full(z.shape[0], np.nan)
      lo, hi = 1.0 - band, 1.0 + band
      stag = (gm / z[:, 0] > lo) & (gm / z[:, 0] < hi) & (gm / z[:, -1] > lo)
      stag &= (gm / z[:, -1] < hi) & (z.var(axis=1) < gm)
    cls = np.zeros(sl.stop - sl.start, np.int8)
    cls[stag & ~up & ~down] = TREND_STAGNATED
    cls[up] = TREND_UPWARD
    cls[down] = TREND_DOWNWARD
    cls_T[sl], n_T[sl] = cls, n_N
    out["slope"][sl], out["icpt"][sl], out["t"][sl], out["p"][sl] = slope, icpt, tval, pval
    out["gm"][sl] = gm
  return TrendResult(cls_T, out["slope"], out["icpt"], out["t"], out["p"], n_T, out["gm"], s_ols, s_stag)


def class_fractions(class_T: np.ndarray) -> dict[str, float]:
  """Share of tokens per trend class (names from TREND_NAMES)."""
  class_T = np.asarray(class_T)
  n = max(class_T.size, 1)
  return {name: float(np.sum(class_T == c)) / n for c, name in TREND_NAMES.items()}


def _align_one(metric_xC: np.ndarray, val_ppl_C: np.ndarray, logq_Q: np.ndarray, monotone: str) -> np.ndarray:
  val = np.asarray(val_ppl_C, dtype=np.float64)
  metric = np.asarray(metric_xC, dtype=np.float64)
  if metric.shape[-1] != val.size:
    raise ValueError(f"metric has {metric.shape[-1]} checkpoints, val_ppl {val.size}")
  if monotone == "running_min":
    # Keep only checkpoints that set a new validation-ppl record.
    prev = np.concatenate([[np.inf], np.minimum.accumulate(val)[:-1]])
    keep = val < prev
  elif monotone == "strict":
    if np.any(np.diff(val) >= 0):
      raise ValueError("val_ppl is not strictly decreasing")
    keep = np.ones(val.size, bool)
  else:
    raise ValueError(f"unknown monotone mode {monotone!r}")
  xp = np.log(val[keep])[::-1]  # increasing log ppl
  fp = metric[..., keep][..., ::-1]
  out = np.full(metric.shape[:-1] + (logq_Q.size,), np.nan)
  if xp.size == 0:
    return out
  inside = (logq_Q >= xp[0]) & (logq_Q <= xp[-1])
  if xp.size == 1:
    out[..., inside] = fp[..., :1]
    return out
  hi = np.clip(np.searchsorted(xp, logq_Q[inside], side="left"), 1, xp.size - 1)
  w = (logq_Q[inside] - xp[hi - 1]) / (xp[hi] - xp[hi - 1])
  out[..., inside] = fp[..., hi - 1] * (1.0 - w) + fp[..., hi] * w
  return out


def align_to_ppl(
  metric: np.ndarray | Sequence[np.ndarray],
  val_ppl: np.ndarray | Sequence[np.ndarray],
  target_ppl_Q: np.ndarray,
  monotone: Literal["running_min", "strict"] = "running_min",
) -> np.ndarray | list[np.ndarray]:
  """Interpolate per-checkpoint metrics onto a shared validation-perplexity axis.

  Xia compares model sizes "at the same perplexity" by plotting on a log validation-
  ppl axis; this makes that explicit: linear interpolation in log(val ppl) of any
  metric [..., C] (e.g. R x C, or T x C per token) at target_ppl_Q. ``metric`` and
  ``val_ppl`` may be lists (one entry per run / model size, each with its own C).
  Validation ppl normally falls with training but can spike; 'running_min' (default)
  keeps only the checkpoints that set a new minimum, so each target ppl maps to the
  first time the model reached it; 'strict' raises on any non-decrease. Targets
  outside a run's ppl range are NaN (no extrapolation).
  """
  logq_Q = np.log(np.asarray(target_ppl_Q, dtype=np.float64).ravel())
  if isinstance(metric, (list, tuple)):
    vals = val_ppl if isinstance(val_ppl, (list, tuple)) else [val_ppl] * len(metric)
    outs = [_align_one(m, v, logq_Q, monotone) for m, v in zip(metric, vals)]
    shapes = {o.shape for o in outs}
    return np.stack(outs) if len(shapes) == 1 else outs
  return _align_one(metric, val_ppl, logq_Q, monotone)


# ------------------------------------------------------------------ all metrics at once


def token_metrics(
  surprisal_RxTxC: np.ndarray,
  steps_C: np.ndarray,
  chance: float,
  unit: Literal["bits", "nats"] = "bits",
  last_n: int = 11,
  last_frac: float | None = None,
  total_steps: float | None = None,
  sigmoid: bool = True,
  sigmoid_max_iter: int = 200,
  sigmoid_init: Literal["gam", "p0"] = "gam",
  trend_window_frac: float = 0.2,
  trend_window: Literal["steps", "checkpoints", "xia"] = "steps",
  trend_ref_run: int = 0,
  rank_subsample: int | None = 10_000,
  rank_curves: Literal["raw", "gam"] = "raw",
  per_run: bool = False,
  chunk: int = CHUNK,
  fine_points: int = AOA_GRID_POINTS,
  seed: int = 0,
  timings: dict[str, float] | None = None,
) -> pd.DataFrame:
  """Every Chang and Xia metric for every token, one DataFrame row per token.

  ``surprisal_RxTxC`` may be any array-like supporting ``x[:, a:b, :]`` (e.g. a
  memmap); it is read chunk by chunk, so the fine AoA grid (T x 1000 per run) and
  the smoothed curves are never held for all tokens. Columns (run-averaged where
  Chang averages): final_surprisal, var_steps, aoa_gam, aoa_sigmoid, forgettability,
  var_runs (GAM), var_runs_raw, rank_similarity (mean rank over pairs, subsample only,
  else NaN), trend_class / trend_slope / trend_p (run ``trend_ref_run``, classes as
  Xia classify tokens in one reference model), trend_agree (share of runs with the
  reference class), flags (FLAG_* bits; a metric that cannot be computed is NaN and
  flagged, never an exception). per_run=True adds '<metric>_r<i>' columns.
  """
  shape = tuple(surprisal_RxTxC.shape)
  if len(shape) == 2:
    surprisal_RxTxC = np.asarray(surprisal_RxTxC)[None]
    shape = (1,) + shape
  n_runs, n_tok, n_c = shape
  steps_C = np.asarray(steps_C)
  if steps_C.size != n_c:
    raise ValueError(f"steps_C has {steps_C.size} entries, curves have {n_c} checkpoints")
  x_D, keep_C = log10_axis(steps_C)
  n_d = x_D.size
  gam_ok = n_d >= MIN_SPLINE_POINTS
  sig_ok = sigmoid and n_d >= MIN_SIGMOID_POINTS
  fwin_C = final_window(steps_C, n_c, last_n, last_frac, total_steps)
  s_ols, _ = trend_windows(steps_C, n_c, trend_window_frac, trend_window)
  trend_few = int(np.sum(steps_C[s_ols:] > 0)) < 3

  names = ["final_surprisal", "var_steps", "aoa_gam", "aoa_sigmoid", "forgettability"]
  per = {k: np.full((n_runs, n_tok), np.nan) for k in names}
  t_cls = np.zeros((n_runs, n_tok), np.int8)
  t_slope, t_p = np.full((n_runs, n_tok), np.nan), np.full((n_runs, n_tok), np.nan)
  var_gam_T, var_raw_T = np.full(n_tok, np.nan), np.full(n_tok, np.nan)
  flags_T = np.zeros(n_tok, np.int64)
  flags_T |= 0 if gam_ok else FLAG_FEW_GAM_POINTS
  flags_T |= 0 if fwin_C is not None else FLAG_FEW_FINAL_POINTS
  flags_T |= FLAG_FEW_SIGMOID_POINTS if (sigmoid and not sig_ok) else 0
  flags_T |= FLAG_FEW_TREND_POINTS if trend_few else 0
  flags_T |= FLAG_SINGLE_RUN if n_runs < 2 else 0

  sm = GamSmoother(x_D) if gam_ok else None
  bfine_GxK = None
  if sm is not None:
    x_G = np.linspace(x_D[0], x_D[-1], fine_points)
    bfine_GxK = sm.basis(x_G).astype(np.float32)
  idx_S = subsample_tokens(n_tok, rank_subsample, seed) if n_runs >= 2 else np.arange(0)
  rank_len = n_c if rank_curves == "raw" else n_d
  rank_sub = np.full((n_runs, idx_S.size, rank_len), np.nan, np.float32)

  for sl in _chunks(n_tok, chunk):
    with _timed(timings, "read"):
      y_RxNxC = np.asarray(surprisal_RxTxC[:, sl, :], dtype=np.float32)
    n_rows = sl.stop - sl.start
    fin_RxN = np.all(np.isfinite(y_RxNxC), axis=-1)
    flags_T[sl] |= np.where(fin_RxN.all(0), 0, FLAG_NONFINITE)
    smooth_RxNxD = np.full((n_runs, n_rows, n_d), np.nan, np.float32)
    for r in range(n_runs):
      y_NxC = y_RxNxC[r]
      with _timed(timings, "final_and_var"):
        if fwin_C is not None:
          win = y_NxC[:, fwin_C].astype(np.float64)
          per["final_surprisal"][r, sl] = win.mean(-1)
          per["var_steps"][r, sl] = win.std(-1)
      fin = fin_RxN[r]
      if sm is not None and fin.any():
        with _timed(timings, "gam_fit"):
          y_NxD = np.where(fin[:, None], y_NxC[:, keep_C], 0.0)
          coef_NxK = sm.fit(y_NxD).coef_NxK
          sm_NxD = (coef_NxK @ sm.B_DxK.T).astype(np.float32)
          sm_NxD[~fin] = np.nan
          smooth_RxNxD[r] = sm_NxD
        with _timed(timings, "aoa_gam"):
          aoa = np.full(n_rows, np.nan)
          coef32 = coef_NxK.astype(np.float32)
          for sub in _chunks(n_rows, 8192):
            fine = coef32[sub] @ bfine_GxK.T
            aoa[sub] = aoa_gam(fine, x_G, chance)
          per["aoa_gam"][r, sl] = np.where(fin, aoa, np.nan)
        with _timed(timings, "forgettability"):
          per["forgettability"][r, sl] = forgettability(sm_NxD)
      if sig_ok and fin.any():
        with _timed(timings, "aoa_sigmoid"):
          res = aoa_sigmoid(
            np.where(fin[:, None], y_NxC, 0.0),
            steps_C,
            chance,
            init=sigmoid_init,
            max_iter=sigmoid_max_iter,
            chunk=n_rows,
            smooth_TxD=np.where(fin[:, None], smooth_RxNxD[r], 0.0) if gam_ok else None,
          )
          per["aoa_sigmoid"][r, sl] = np.where(fin, res.aoa_T, np.nan)
          flags_T[sl] |= np.where(fin & ~res.converged_T, FLAG_SIGMOID_NOT_CONVERGED, 0)
      with _timed(timings, "trend"):
        tr = trend_classes(y_NxC, steps_C, trend_window_frac, trend_window, kind="surprisal", unit=unit, chunk=n_rows)
        t_cls[r, sl], t_slope[r, sl], t_p[r, sl] = tr.class_T, tr.slope_T, tr.p_T
    with _timed(timings, "crossrun_var"):
      if n_runs >= 2:
        if gam_ok:
          var_gam_T[sl] = crossrun_variability(smooth_RxNxD)
        var_raw_T[sl] = crossrun_variability(y_RxNxC)
    with _timed(timings, "rank_similarity"):
      lo, hi = np.searchsorted(idx_S, [sl.start, sl.stop])
      if hi > lo:
        src = y_RxNxC if rank_curves == "raw" else smooth_RxNxD
        rank_sub[:, lo:hi] = src[:, idx_S[lo:hi] - sl.start]

  rank_T = np.full(n_tok, np.nan)
  with _timed(timings, "rank_similarity"):
    ok_S = np.all(np.isfinite(rank_sub), axis=(0, 2))  # drop non-finite tokens from the pool
    if n_runs >= 2 and ok_S.sum() >= 2:
      rank_T[idx_S[ok_S]] = crossrun_rank_similarity(rank_sub[:, ok_S], n_sub=None).mean_rank_S

  with _timed(timings, "frame"):
    ref = int(trend_ref_run)
    df = pd.DataFrame({k: v.mean(0) for k, v in per.items()})
    df["var_runs"] = var_gam_T
    df["var_runs_raw"] = var_raw_T
    df["rank_similarity"] = rank_T
    df["trend_class"] = t_cls[ref]
    df["trend_slope"] = t_slope[ref]
    df["trend_p"] = t_p[ref]
    df["trend_agree"] = (t_cls == t_cls[ref][None]).mean(0)
    if per_run:
      for k, v in per.items():
        for r in range(n_runs):
          df[f"{k}_r{r}"] = v[r]
      for r in range(n_runs):
        df[f"trend_class_r{r}"] = t_cls[r]
    df["flags"] = flags_T
  return df


def per_run_matrix(df: pd.DataFrame, metric: str) -> np.ndarray:
  """Stack '<metric>_r<i>' columns of a per_run=True frame into R x T (for
  ``crossrun_correlation``)."""
  cols = sorted(
    (c for c in df.columns if c.startswith(f"{metric}_r") and c[len(metric) + 2 :].isdigit()),
    key=lambda c: int(c[len(metric) + 2 :]),
  )
  if not cols:
    raise KeyError(f"no per-run columns for {metric!r}; call token_metrics(per_run=True)")
  return np.stack([df[c].to_numpy(dtype=np.float64) for c in cols])
