"""Figures from the loaders' DataFrames / DataArrays (matplotlib; each returns its Figure, never shows).

  da = load.load_trajectories(["runs/s0", "runs/s1"]); df = load.load_token_metrics("runs/s0")
  plots.learning_curves(da, tokens=[0, 5, 9]); plots.aoa_vs_frequency(df)
  plots.trend_fractions_vs_ppl(da); plots.cross_run_scatter(df, "aoa_gam", 0, 1)

Shape legend: R runs, C checkpoints (steps), T probe tokens, E window ends (trend fractions).
Curves are drawn on a log10-step axis, so step 0 (the initialisation) is left out, as in Chang et al.
"""

from __future__ import annotations

import json
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import xarray as xr

from analysis import curves

TREND_COLORS = {"stagnated": "tab:gray", "upward": "tab:red", "downward": "tab:blue", "other": "tab:olive"}


def _axes(ax, figsize=(5.0, 3.5)):
  if ax is not None:
    return ax.figure, ax
  fig, ax = plt.subplots(figsize=figsize)
  return fig, ax


def _run_index(da: xr.DataArray, run) -> int:
  if isinstance(run, str):
    return list(map(str, da.run.values)).index(run)
  return int(run)


def learning_curves(da: xr.DataArray, tokens: Sequence[int], run: int | str = 0, smooth: bool = True, ax=None) -> plt.Figure:
  """Surprisal of selected probe tokens vs step (log axis): raw (solid) and GAM-smoothed (dashed,
  curves.smooth_curves, when the run has >= 4 checkpoints after step 0)."""
  fig, ax = _axes(ax)
  r = _run_index(da, run)
  sub = da.isel(run=r, token=list(tokens))
  keep_C = (sub.step.values > 0) & np.isfinite(sub.values).all(axis=1)
  steps_C = sub.step.values[keep_C]
  y_TxC = sub.values[keep_C].T
  sm = curves.smooth_curves(y_TxC, steps_C) if smooth and steps_C.size else None
  for i, t in enumerate(tokens):
    (line,) = ax.plot(steps_C, y_TxC[i], lw=1, label=f"token {t} (pos {int(sub.position.values[i])})")
    if sm is not None and sm.ok:
      ax.plot(10**sm.x_D, sm.smooth_TxD[i], ls="--", lw=1.5, color=line.get_color())
  ax.set_xscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel(f"surprisal ({da.attrs.get('unit', 'nats')})")
  ax.set_title(f"run {da.run.values[r]}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def aoa_vs_frequency(df: pd.DataFrame, x: str = "log_freq", y: str = "aoa_gam", bins: int = 10, ax=None) -> plt.Figure:
  """Scatter of a per-token metric (default GAM age of acquisition, log10 steps) against `x`
  (default log10 unigram frequency in the training data), with the binned mean as a line."""
  fig, ax = _axes(ax)
  ok = np.isfinite(df[x].to_numpy(float)) & np.isfinite(df[y].to_numpy(float))
  xs, ys = df[x].to_numpy(float)[ok], df[y].to_numpy(float)[ok]
  ax.scatter(xs, ys, s=4, alpha=0.4)
  if xs.size >= 2 and np.ptp(xs) > 0:
    edges = np.linspace(xs.min(), xs.max(), bins + 1)
    which = np.clip(np.digitize(xs, edges) - 1, 0, bins - 1)
    centers = [0.5 * (edges[b] + edges[b + 1]) for b in range(bins) if np.any(which == b)]
    means = [ys[which == b].mean() for b in range(bins) if np.any(which == b)]
    ax.plot(centers, means, color="k", lw=2, label="binned mean")
    ax.legend(fontsize=7)
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  fig.tight_layout()
  return fig


def trend_fractions_vs_ppl(da: xr.DataArray, window_frac: float = 0.2, max_points: int = 20, ax=None) -> plt.Figure:
  """Share of tokens per Xia trend class (curves.trend_classes over the checkpoints up to each
  window end) against the run's probe-set perplexity at that end; one line per (run, class)."""
  fig, ax = _axes(ax)
  unit = da.attrs.get("unit", "nats")
  for r in range(da.sizes["run"]):
    run = da.isel(run=r)
    ok_C = np.isfinite(run.values).all(axis=1)
    steps_C, y_CxT, ppl_C = run.step.values[ok_C], run.values[ok_C], run.val_ppl.values[ok_C]
    ends = [e for e in range(steps_C.size) if np.sum(steps_C[: e + 1] > 0) >= 3]
    if len(ends) > max_points:
      ends = sorted(set(np.linspace(ends[0], ends[-1], max_points).round().astype(int).tolist()))
    frac = {name: [] for name in curves.TREND_NAMES.values()}
    for e in ends:
      tr = curves.trend_classes(y_CxT[: e + 1].T, steps_C[: e + 1], window_frac, kind="surprisal", unit=unit)
      for name, f in curves.class_fractions(tr.class_T).items():
        frac[name].append(f)
    for name in ("upward", "downward", "stagnated"):
      ax.plot(
        ppl_C[ends],
        frac[name],
        marker="o",
        ms=3,
        color=TREND_COLORS[name],
        ls=["-", "--", ":", "-."][r % 4],
        label=f"{da.run.values[r]}: {name}",
      )
  ax.set_xscale("log")
  ax.invert_xaxis()  # training moves right, towards lower perplexity
  ax.set_xlabel("validation perplexity (probe set)")
  ax.set_ylabel("fraction of tokens")
  ax.legend(fontsize=6)
  fig.tight_layout()
  return fig


def class_ppl_vs_val_ppl(da: xr.DataArray, classes: np.ndarray | pd.Series, ax=None) -> plt.Figure:
  """Xia's figure: mean perplexity of each trend class's tokens (classes from one reference run,
  e.g. load_token_metrics(W)["trend_class"]) against validation perplexity, one line per (run, class)."""
  fig, ax = _axes(ax)
  classes = np.asarray(classes)
  to_nats = np.log(2.0) if da.attrs.get("unit") == "bits" else 1.0
  for r in range(da.sizes["run"]):
    run = da.isel(run=r)
    ok_C = np.isfinite(run.values).all(axis=1)
    for c, name in curves.TREND_NAMES.items():
      sel = classes == c
      if not sel.any():
        continue
      ppl_C = np.exp(run.values[ok_C][:, sel].mean(axis=1) * to_nats)
      ax.plot(
        run.val_ppl.values[ok_C],
        ppl_C,
        marker="o",
        ms=3,
        color=TREND_COLORS[name],
        ls=["-", "--", ":", "-."][r % 4],
        label=f"{da.run.values[r]}: {name} ({sel.sum()})",
      )
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.invert_xaxis()
  ax.set_xlabel("validation perplexity (probe set)")
  ax.set_ylabel("mean token perplexity")
  ax.legend(fontsize=6)
  fig.tight_layout()
  return fig


def cross_run_scatter(df: pd.DataFrame, metric: str, i: int = 0, j: int = 1, ax=None) -> plt.Figure:
  """Per-token `metric` in run i vs run j (the '<metric>_r<i>' columns of token_metrics(per_run=True)),
  with the identity line and Pearson r over the tokens finite in both (Chang's cross-seed check)."""
  fig, ax = _axes(ax, (4.0, 4.0))
  a, b = df[f"{metric}_r{i}"].to_numpy(float), df[f"{metric}_r{j}"].to_numpy(float)
  ok = np.isfinite(a) & np.isfinite(b)
  a, b = a[ok], b[ok]
  ax.scatter(a, b, s=4, alpha=0.4)
  if a.size:
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
  r = np.corrcoef(a, b)[0, 1] if a.size >= 2 and a.std() > 0 and b.std() > 0 else float("nan")
  ax.set_title(f"{metric}: run {i} vs run {j}, r = {r:.3f} (n = {a.size})", fontsize=9)
  ax.set_xlabel(f"{metric} (run {i})")
  ax.set_ylabel(f"{metric} (run {j})")
  fig.tight_layout()
  return fig


def flatness(df: pd.DataFrame, quantity: str = "trace", x: str = "step", estimator: str | None = None):
  """Flatness vs `x` ('step', 'tokens_seen' or 'loss') with ±1 standard-error bars, one line per run
  (and estimator). `df` is `analysis.load.load_flatness(...)`."""
  d = df[(df["quantity"] == quantity) & df["valid"]]
  if estimator:
    d = d[d["estimator"] == estimator]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  if "run" not in d:
    d = d.assign(run="")
  for (run, est), g in d.groupby(["run", "estimator"]):
    g = g.sort_values(x)
    ax.errorbar(g[x], g["estimate"], yerr=g["stderr"], marker="o", ms=3, capsize=2, label=f"{run} {est}")
  if x in ("step", "tokens_seen") and len(d) and (d[x] > 0).all():
    ax.set_xscale("log")
  ax.set_xlabel(x)
  ax.set_ylabel(quantity.replace("_", " "))
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def spectral_density(df: pd.DataFrame, steps: Sequence[int] | None = None, run: str | None = None, log: bool = True):
  """SLQ spectral densities (rows of `load_flatness` with estimator 'slq'), one line per checkpoint,
  log-scaled density by default (the bulk near 0 and the outliers both show)."""
  d = df[(df["estimator"] == "slq") & df["valid"]]
  if run is not None and "run" in d:
    d = d[d["run"] == run]
  if steps is not None:
    d = d[d["step"].isin(list(steps))]
  if not len(d):
    raise ValueError("no valid slq rows: run python -m analysis.flatness --estimator=slq first")
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for _, r in d.sort_values("step").iterrows():
    dens = json.loads(r["density"])
    label = f"{r['run']} step {r['step']}" if "run" in d else f"step {r['step']}"
    ax.plot(dens["grid"], dens["density"], lw=1, label=label)
  if log:
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-8)
  ax.set_xlabel("eigenvalue")
  ax.set_ylabel("density")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig
