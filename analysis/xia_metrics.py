"""Xia et al. 2022's per-token trends: upward / downward / stagnated classes from an OLS of each token's
perplexity on ln(step), and metrics aligned on a shared validation-perplexity axis (comparing model
sizes at matched perplexity).

Shape legend: T tokens, C checkpoints, W checkpoints in a trend window, Q target validation-ppl grid,
N rows of one chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import stats as sps

from analysis.smoothing import CHUNK, chunks

# Trend classes, numbered as in Xia et al.'s notebook (1 stagnated, 2 up, 3 down).
TREND_OTHER, TREND_STAGNATED, TREND_UPWARD, TREND_DOWNWARD = 0, 1, 2, 3
TREND_NAMES = {0: "other", 1: "stagnated", 2: "upward", 3: "downward"}


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
  for sl in chunks(n_tok, chunk):
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
