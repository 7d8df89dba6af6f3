"""Leaf module: estimators shared by the synthetic languages (entropy rates from sampled sentences)."""

from __future__ import annotations

import numpy as np


def ratio_stats(num_M: np.ndarray, den_M: np.ndarray) -> dict:
  """Ratio estimator sum(num)/sum(den) over iid units with a delta-method standard error."""
  num_M, den_M = np.asarray(num_M, np.float64), np.asarray(den_M, np.float64)
  m = len(num_M)
  r = float(num_M.sum() / den_M.sum())
  if m < 2:
    return {"mean": r, "se": float("nan"), "ci95": (float("nan"), float("nan"))}
  resid = num_M - r * den_M
  se = float(np.sqrt(np.sum(resid**2) / (m * (m - 1))) / den_M.mean())
  return {"mean": r, "se": se, "ci95": (r - 1.96 * se, r + 1.96 * se)}
