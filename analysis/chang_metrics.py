"""Chang et al. 2023's per-token learning-curve metrics (utils/annotator.py, formula_utils.py), vectorised:
the checkpoint schedule, final surprisal and within-run variability over the final window, GAM and
sigmoid ages of acquisition, forgettability, cross-run variability, rank similarity and correlation.

x axis: Chang indexes curves by x = log10(step) and drops step 0 wherever log10 is used (GAM, both
AoAs, forgettability, GAM cross-run variability); the raw-curve metrics (final surprisal, within-run
variability, raw cross-run variability, rank similarity) use all C columns, as the reference does.
Units: surprisal in bits (Chang) or nats; the metrics are unit-agnostic as long as ``chance`` is in
the same unit.

Shape legend: T tokens, C checkpoints, R runs, D checkpoints with step > 0, K spline basis
functions, G fine AoA grid (1000), P run pairs, S subsampled tokens, N rows of one chunk.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Literal

import numpy as np

from analysis.sigmoid import MIN_SIGMOID_POINTS, fit_sigmoids, sigmoid_aoa_from_params, sigmoid_init_from_smooth
from analysis.smoothing import CHUNK, MIN_SPLINE_POINTS, GamSmoother, chunks, log10_axis

AOA_GRID_POINTS = 1000


def chang_checkpoint_steps(n_checkpoints: int = 222, s0: float = 100.0, s1: float = 25_000.0, t1: float = 1e6) -> np.ndarray:
  """Chang's exponential save schedule: the save interval grows linearly s0 -> s1 by t1.

  step(n) = s0*t1/(s1-s0) * (exp(n*(s1-s0)/t1) - 1), rounded; n = 0..221 gives
  0, 101, 205, 311, ..., 957299, 981536.
  """
  n_C = np.arange(n_checkpoints, dtype=np.float64)
  steps_C = s0 * t1 / (s1 - s0) * (np.exp(n_C * (s1 - s0) / t1) - 1.0)
  return np.round(steps_C).astype(np.int64)


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


def aoa_gam_from_coef(
  coef_NxK: np.ndarray, fine_basis_GxK: np.ndarray, x_G: np.ndarray, chance: float, block: int = 8192
) -> np.ndarray:
  """``aoa_gam`` of GAM fits given by their spline coefficients, evaluating the fine grid `block`
  rows at a time (float32), so T x G values are never held at once."""
  coef32 = np.asarray(coef_NxK, np.float32)
  basis32 = np.asarray(fine_basis_GxK, np.float32)
  aoa_N = np.full(coef32.shape[0], np.nan)
  for sub in chunks(coef32.shape[0], block):
    aoa_N[sub] = aoa_gam(coef32[sub] @ basis32.T, x_G, chance)
  return aoa_N


def forgettability(smooth_TxD: np.ndarray) -> np.ndarray:
  """Total rise of the smoothed curve, sum_t max(0, GAM(x_t+1) - GAM(x_t)).

  Chang smooths first so that noise spikes do not count as forgetting.
  """
  rise = np.diff(np.asarray(smooth_TxD, dtype=np.float64), axis=-1)
  return np.clip(rise, 0.0, None).sum(axis=-1)


@dataclasses.dataclass
class SigmoidResult:
  """Sigmoid AoA per curve; params are (start, end, xmid, scale) in surprisal sign,
  as Chang's ``compute_aoa_vals`` returns them."""

  aoa_T: np.ndarray
  threshold_T: np.ndarray
  params_Tx4: np.ndarray
  converged_T: np.ndarray
  n_iter_T: np.ndarray


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
  for sl in chunks(n_tok, chunk):
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
    for sl in chunks(n_s, chunk):
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
