"""Regression helpers for learning-curve analyses (Chang et al. 2023, run_regressions).

Chang regresses each run-averaged curve metric (surprisal, var_steps, aoa,
forgettability, var_runs) on token predictors with statsmodels OLS, adds predictor
blocks in a fixed order with likelihood-ratio tests, checks VIFs, and residualises
the 5-gram log-prob on the unigram log-prob. These are closed-form numpy versions
(one QR per model, fine for 1M rows) that agree with statsmodels; see the tests.

Shape legend: N observations (tokens), F predictor columns, B blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

# Chang's sequential LRT order (analysis/run_regressions.py).
CHANG_SEQUENTIAL_ORDER = (
  "unigram",
  "ngram",
  "context_loglen",
  "context_logprob",
  "contextual_div",
  "pos",
  "interactions",
)


def _design(
  X: np.ndarray | pd.DataFrame | None, n: int, names: Sequence[str] | None, add_const: bool
) -> tuple[np.ndarray, list[str]]:
  if X is None:
    X_NxF, cols = np.empty((n, 0)), []
  elif isinstance(X, pd.DataFrame):
    X_NxF, cols = X.to_numpy(dtype=np.float64), [str(c) for c in X.columns]
  else:
    X_NxF = np.asarray(X, dtype=np.float64)
    X_NxF = X_NxF[:, None] if X_NxF.ndim == 1 else X_NxF
    cols = list(names) if names is not None else [f"x{i}" for i in range(X_NxF.shape[1])]
  if names is not None and isinstance(X, pd.DataFrame):
    cols = list(names)
  if len(cols) != X_NxF.shape[1]:
    raise ValueError(f"{len(cols)} names for {X_NxF.shape[1]} columns")
  if add_const:
    X_NxF = np.column_stack([np.ones(n), X_NxF])
    cols = ["const"] + cols
  return X_NxF, cols


def ols(
  y: np.ndarray,
  X: np.ndarray | pd.DataFrame | None,
  names: Sequence[str] | None = None,
  add_const: bool = True,
) -> dict:
  """OLS with statsmodels' summary numbers: params, se, t, p (two-sided t), R^2,
  adjusted R^2, Gaussian log-likelihood, plus a ``table`` DataFrame.

  R^2 is centred when the model has a constant (statsmodels' convention) and
  uncentred otherwise.
  """
  y_N = np.asarray(y, dtype=np.float64).ravel()
  n = y_N.size
  X_NxF, cols = _design(X, n, names, add_const)
  q, r = np.linalg.qr(X_NxF)
  rank = int(np.linalg.matrix_rank(r))
  if rank < X_NxF.shape[1]:
    raise np.linalg.LinAlgError(f"design matrix is rank deficient ({rank} < {len(cols)})")
  beta = np.linalg.solve(r, q.T @ y_N)
  resid = y_N - X_NxF @ beta
  rss = float(resid @ resid)
  df_resid = n - X_NxF.shape[1]
  sigma2 = rss / df_resid if df_resid > 0 else np.nan
  r_inv = np.linalg.inv(r)
  se = np.sqrt(np.sum(r_inv**2, axis=1) * sigma2)
  with np.errstate(divide="ignore", invalid="ignore"):
    t = beta / se
  p = 2.0 * sps.t.sf(np.abs(t), df_resid) if df_resid > 0 else np.full_like(t, np.nan)
  has_const = add_const or np.any(np.all(X_NxF == X_NxF[:1], axis=0) & (X_NxF[0] != 0))
  tss = float(np.sum((y_N - y_N.mean()) ** 2)) if has_const else float(y_N @ y_N)
  r2 = 1.0 - rss / tss if tss > 0 else np.nan
  df_model = X_NxF.shape[1] - (1 if has_const else 0)
  adj = 1.0 - (1.0 - r2) * (n - (1 if has_const else 0)) / df_resid if df_resid > 0 else np.nan
  llf = -0.5 * n * (np.log(2.0 * np.pi) + np.log(rss / n) + 1.0)
  table = pd.DataFrame({"coef": beta, "se": se, "t": t, "p": p}, index=cols)
  return {
    "params": pd.Series(beta, index=cols),
    "se": pd.Series(se, index=cols),
    "t": pd.Series(t, index=cols),
    "p": pd.Series(p, index=cols),
    "r2": r2,
    "adj_r2": adj,
    "llf": float(llf),
    "nobs": n,
    "df_model": df_model,
    "df_resid": df_resid,
    "resid": resid,
    "table": table,
  }


def lrt(ll_small: float, ll_big: float, df: int) -> tuple[float, float]:
  """Likelihood-ratio test of nested models: (2*(ll_big - ll_small), chi2 p-value)."""
  stat = 2.0 * (float(ll_big) - float(ll_small))
  return stat, float(sps.chi2.sf(stat, df))


def sequential_lrt(
  y: np.ndarray,
  predictor_blocks: Sequence[tuple[str, np.ndarray | pd.DataFrame]] | Mapping[str, np.ndarray],
) -> pd.DataFrame:
  """Add predictor blocks one at a time (Chang's order: CHANG_SEQUENTIAL_ORDER) and
  test each addition against the previous model with an LRT.

  Row 0 is the intercept-only model; each following row reports the block added, its
  number of columns (the LRT df), log-likelihood, R^2, adjusted R^2 and its gain,
  the chi^2 statistic and p-value.
  """
  blocks = list(predictor_blocks.items()) if isinstance(predictor_blocks, Mapping) else list(predictor_blocks)
  y_N = np.asarray(y, dtype=np.float64).ravel()
  base = ols(y_N, None)
  rows = [dict(block="intercept", df=0, llf=base["llf"], r2=0.0, adj_r2=0.0, delta_adj_r2=np.nan, lr_stat=np.nan, p=np.nan)]
  cols: list[np.ndarray] = []
  prev = base
  for name, block in blocks:
    b = block.to_numpy(dtype=np.float64) if isinstance(block, pd.DataFrame) else np.asarray(block, dtype=np.float64)
    b = b[:, None] if b.ndim == 1 else b
    cols.append(b)
    fit = ols(y_N, np.column_stack(cols))
    stat, p = lrt(prev["llf"], fit["llf"], b.shape[1])
    rows.append(
      dict(
        block=name,
        df=b.shape[1],
        llf=fit["llf"],
        r2=fit["r2"],
        adj_r2=fit["adj_r2"],
        delta_adj_r2=fit["adj_r2"] - prev["adj_r2"],
        lr_stat=stat,
        p=p,
      )
    )
    prev = fit
  return pd.DataFrame(rows)


def interaction_block(columns: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
  """All pairwise products of the given predictors (Chang's last LRT block)."""
  names = list(columns)
  prods, labels = [], []
  for a in range(len(names)):
    for b in range(a + 1, len(names)):
      prods.append(np.asarray(columns[names[a]], float) * np.asarray(columns[names[b]], float))
      labels.append(f"{names[a]}:{names[b]}")
  n = len(next(iter(columns.values()))) if columns else 0
  return (np.column_stack(prods) if prods else np.empty((n, 0))), labels


def vif(X: np.ndarray | pd.DataFrame, names: Sequence[str] | None = None) -> pd.Series:
  """Variance inflation factors 1 / (1 - R_j^2), regressing each column on the others
  plus an intercept (= statsmodels' variance_inflation_factor on [const, X])."""
  X_NxF, cols = _design(X, len(X), names, add_const=False)
  out = []
  for j in range(X_NxF.shape[1]):
    others = np.delete(X_NxF, j, axis=1)
    r2 = ols(X_NxF[:, j], others)["r2"]
    out.append(np.inf if r2 >= 1.0 else 1.0 / (1.0 - r2))
  return pd.Series(out, index=cols)


def residualize(y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Residuals of y ~ 1 + x (Chang: the 5-gram log-prob residualised on unigram)."""
  return ols(y, x)["resid"]


def clip_sigma(x: np.ndarray, k: float = 5.0) -> np.ndarray:
  """Clip a predictor to mean +- k * std (ddof=0), as Chang does with k = 5."""
  x = np.asarray(x, dtype=np.float64)
  mu, sd = np.nanmean(x), np.nanstd(x)
  return np.clip(x, mu - k * sd, mu + k * sd)


def cluster_bootstrap(
  stat, n: int, clusters: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
  """Percentile bootstrap CI of `stat(idx)` (idx: int array of row indices into the n rows).

  With `clusters` (one label per row) whole clusters are resampled with replacement, as the rows of one
  cluster are not independent: the probe tokens of one token type share its frequency, so a CI of a
  frequency effect resamples types, not tokens. Resamples where `stat` is not finite are dropped; a
  vector-valued `stat` gives arrays (lo, hi), each entry over its own finite resamples."""
  rng = np.random.default_rng(seed)
  if clusters is None:
    members = [np.array([i]) for i in range(n)]
  else:
    clusters = np.asarray(clusters)
    _, inv = np.unique(clusters, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inv))[:-1])
  k = len(members)
  vals = np.array([stat(np.concatenate([members[j] for j in rng.integers(0, k, k)])) for _ in range(n_boot)], np.float64)
  a = (1 - level) / 2
  if vals.ndim > 1:
    with np.errstate(all="ignore"):
      import warnings

      with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(vals, [a, 1 - a], axis=0)
    return lo, hi
  vals = vals[np.isfinite(vals)]
  if not len(vals):
    return (float("nan"), float("nan"))
  lo, hi = np.quantile(vals, [a, 1 - a])
  return (float(lo), float(hi))
