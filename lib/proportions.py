"""Mixture proportions over data groups: validation and exact integer row counts.

Shared by the data pipeline (rows per group at each step) and the mixture controllers (lib/mixture.py),
so lib/ needs nothing from data/.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lib.errors import DataError

GROUP_ROWS = ("exact", "sampled")  # how a step's batch rows are split over groups (data/pipeline.py)


def largest_remainder(p: Sequence[float], total: int) -> np.ndarray:
  """Exact integer counts summing to `total`, as close as possible to p·total (Hamilton's method)."""
  p = np.asarray(p, dtype=np.float64)
  check_proportions(p)
  raw = p * total
  counts = np.floor(raw).astype(np.int64)
  short = total - counts.sum()
  # Largest fractional parts first; stable sort keeps lower group indices first on ties.
  order = np.argsort(-(raw - counts), kind="stable")
  counts[order[:short]] += 1
  return counts


def check_proportions(p, names: Sequence[str] | None = None, atol: float = 1e-6) -> None:
  p = np.asarray(p, dtype=np.float64)
  shown = dict(zip(names, p.tolist())) if names is not None else p.tolist()
  if p.ndim != 1 or p.size == 0:
    raise DataError(f"proportions must be a non-empty vector, got {shown}")
  if names is not None and len(names) != p.size:
    raise DataError(f"{p.size} proportions for {len(names)} groups {list(names)}")
  if np.any(~np.isfinite(p)) or np.any(p < 0):
    raise DataError(f"proportions must be finite and non-negative, got {shown}")
  if abs(p.sum() - 1.0) > atol:
    raise DataError(f"proportions must sum to 1, got sum {p.sum():.6g} for {shown}")
