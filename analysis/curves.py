"""Per-token learning-curve metrics (Chang et al. 2023; Xia et al. 2022): every metric for every token
in one call (`token_metrics`), composed from one module per concern, whose public names it re-exports:

  analysis/smoothing.py      penalised-spline smoothing (pyGAM's LinearGAM gridsearch, vectorised)
  analysis/sigmoid.py        the batched sigmoid fitter (Levenberg-Marquardt in JAX)
  analysis/chang_metrics.py  Chang's metrics (final surprisal, variability, AoAs, forgettability,
                             cross-run variability / rank similarity / correlation)
  analysis/xia_metrics.py    Xia's trend classes and perplexity alignment

Both papers fit one model per token curve in a Python loop (one pyGAM gridsearch and one scipy
``curve_fit`` per curve in Chang's code, one statsmodels OLS per token in Xia's). Here every curve of
a run shares its x axis, so all design matrices, hat matrices and penalties are shared and every
metric becomes a few matmuls over a chunk of tokens (default 50k rows, to bound memory); the only
iterative fit (the sigmoid) is a batched Levenberg-Marquardt in JAX.

Shape legend (suffixes on array names):
  T  tokens (one curve per token and run)    C  checkpoints as given (may include step 0)
  R  runs (seeds)                            D  checkpoints with step > 0 (the log10 axis)
  K  spline basis functions (25)             G  fine x grid for AoA (1000)
  S  subsampled tokens (rank similarity)     N  rows of one chunk

Units: surprisal may be in bits (Chang) or nats; the metrics are unit-agnostic as long as ``chance``
is in the same unit. Only the Xia trend classes need perplexities, and take ``unit`` to convert
(ppl = 2**s for bits, e**s for nats).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import pandas as pd

from analysis.chang_metrics import (  # noqa: F401 - re-exported
  AOA_GRID_POINTS,
  RankResult,
  SigmoidResult,
  aoa_gam,
  aoa_gam_from_coef,
  aoa_sigmoid,
  chang_checkpoint_steps,
  crossrun_correlation,
  crossrun_rank_similarity,
  crossrun_variability,
  final_surprisal,
  final_window,
  forgettability,
  run_pairs,
  subsample_tokens,
  within_run_variability,
)
from analysis.sigmoid import MIN_SIGMOID_POINTS, fit_sigmoids, sigmoid_aoa_from_params, sigmoid_init_from_smooth  # noqa: F401
from analysis.smoothing import (  # noqa: F401 - re-exported
  CHUNK,
  DEFAULT_LAMS,
  MIN_SPLINE_POINTS,
  N_SPLINES,
  PYGAM_GCV_GAMMA,
  PYGAM_RIDGE,
  SPLINE_DEGREE,
  GamFit,
  GamSmoother,
  SmoothResult,
  bspline_basis,
  chunks,
  difference_penalty,
  log10_axis,
  smooth_curves,
  smooth_rows,
)
from analysis.xia_metrics import (  # noqa: F401 - re-exported
  TREND_DOWNWARD,
  TREND_NAMES,
  TREND_OTHER,
  TREND_STAGNATED,
  TREND_UPWARD,
  TrendResult,
  align_to_ppl,
  class_fractions,
  trend_classes,
  trend_windows,
)

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


@contextmanager
def _timed(timings: dict[str, float] | None, key: str) -> Iterator[None]:
  """Accumulate wall time per metric so the benchmark can report a breakdown."""
  t0 = time.perf_counter()
  try:
    yield
  finally:
    if timings is not None:
      timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


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

  for sl in chunks(n_tok, chunk):
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
          per["final_surprisal"][r, sl] = final_surprisal(y_NxC, last_n, steps_C, last_frac, total_steps)
          per["var_steps"][r, sl] = within_run_variability(y_NxC, last_n, steps_C, last_frac, total_steps)
      fin = fin_RxN[r]
      if sm is not None and fin.any():
        with _timed(timings, "gam_fit"):
          coef_NxK, sm_NxD = smooth_rows(sm, y_NxC[:, keep_C], fin)
          smooth_RxNxD[r] = sm_NxD
        with _timed(timings, "aoa_gam"):
          per["aoa_gam"][r, sl] = np.where(fin, aoa_gam_from_coef(coef_NxK, bfine_GxK, x_G, chance), np.nan)
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
    cross = {"var_runs": var_gam_T, "var_runs_raw": var_raw_T, "rank_similarity": rank_T}
    return _frame(per, cross, (t_cls, t_slope, t_p), flags_T, int(trend_ref_run), per_run)


def _frame(per: dict, cross: dict, trend: tuple, flags_T: np.ndarray, ref: int, per_run: bool) -> pd.DataFrame:
  """token_metrics' table: run-averaged `per` metrics, the cross-run columns, run `ref`'s trend class, flags."""
  t_cls, t_slope, t_p = trend
  df = pd.DataFrame({k: v.mean(0) for k, v in per.items()})
  for k, v in cross.items():
    df[k] = v
  df["trend_class"] = t_cls[ref]
  df["trend_slope"] = t_slope[ref]
  df["trend_p"] = t_p[ref]
  df["trend_agree"] = (t_cls == t_cls[ref][None]).mean(0)
  if per_run:
    for k, v in per.items():
      for r in range(v.shape[0]):
        df[f"{k}_r{r}"] = v[r]
    for r in range(t_cls.shape[0]):
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
