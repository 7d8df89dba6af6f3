"""Penalised regression splines: pyGAM's LinearGAM gridsearch, vectorised over curves sharing an x axis.

Chang et al. 2023 smooth every per-token learning curve with ``pygam.LinearGAM(n_splines=25)
.gridsearch(lam=logspace(-3, 3, 11))`` on x = log10(step), one Python fit per curve. Here every curve
of a run shares its x axis, so the design matrix, hat matrices and penalties are shared and GCV for
all curves and all lambdas is a few matmuls over a chunk of curves (default 50k rows, to bound memory).

Shape legend (suffixes on array names):
  T  tokens (curves)     C  checkpoints as given (may include step 0)
  D  checkpoints with step > 0 (the log10 axis)    K  spline basis functions (25)
  L  smoothing parameters lambda (11)              G  a fine x grid    N  rows of one chunk
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

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
CHUNK = 50_000


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


def chunks(n: int, chunk: int) -> Iterator[slice]:
  """Consecutive slices of at most `chunk` rows covering range(n)."""
  for start in range(0, n, max(int(chunk), 1)):
    yield slice(start, min(start + int(chunk), n))


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
  for sl in chunks(n_tok, chunk):
    y_NxD = np.asarray(surprisal_TxC[sl][:, keep_C], dtype=np.float64)
    fit = sm.fit(y_NxD)
    smooth_TxD[sl] = fit.coef_NxK @ sm.B_DxK.T
    if fine_TxG is not None:
      fine_TxG[sl] = fit.coef_NxK @ bfine_GxK.T
    lam_T[sl] = sm.lams_L[fit.lam_idx_N]
    edof_T[sl] = sm.edof_L[fit.lam_idx_N]
    gcv_T[sl] = np.take_along_axis(fit.gcv_NxL, fit.lam_idx_N[:, None], 1)[:, 0]
  return SmoothResult(smooth_TxD, x_D, lam_T, edof_T, gcv_T, fine_TxG, x_G, True)


def smooth_rows(sm: GamSmoother, y_NxD: np.ndarray, ok_N: np.ndarray, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
  """GCV-smoothed curves of the rows `ok_N` of y (the others are fitted as zeros, then NaN):
  (spline coefficients K per row, smoothed values D per row in `dtype`)."""
  ok_N = np.asarray(ok_N, bool)
  coef_NxK = sm.fit(np.where(ok_N[:, None], y_NxD, 0.0)).coef_NxK
  smooth_NxD = (coef_NxK @ sm.B_DxK.T).astype(dtype)
  smooth_NxD[~ok_N] = np.nan
  return coef_NxK, smooth_NxD
