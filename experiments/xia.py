"""Xia et al. (ACL 2023) in one command: a size ladder on the same data, token trend classes in a
reference model, those tokens' perplexity across sizes against validation perplexity, and the
fraction of double-descent (upward) tokens beside the paper's ~9.4%.

  python -m experiments.xia --out=DIR [--scale=nano|quick|paper]

Steps: a sweep over `preset` (same data, data order and schedule for every size; checkpoints evenly
spaced) -> per-token surprisal of every position of the probe documents at every checkpoint
(analysis.trajectories) -> Xia's classes (analysis.curves.trend_classes: OLS of ppl_t/ppl_t0 on ln step
with p < 0.05 over the last 80% of steps, stagnated by the ±5% band) in the LARGEST model, as the paper
classifies in one reference model -> each class's mean perplexity in every size, per checkpoint and
interpolated at matched validation (probe-set) perplexity (analysis.curves.align_to_ppl) -> figures ->
DIR/report.md beside the paper's findings (Xia et al., "Training Trajectories of Language Models Across
Scales", ACL 2023).

Outputs in DIR: runs/preset=<p>/seed_0/ (ordinary workdirs), classes.parquet (one row per token),
class_ppl.csv (size x checkpoint x class), class_ppl_matched.csv (size x matched val ppl x class),
fig_*.png, report.md.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd

from experiments import cli
from experiments.sweep import Sweep
from lib import errors

SCALES = {
  "nano": dict(presets=["nano", "tiny"], steps=60, batch=8, seq_len=32, n_train=1000, sequences=30, every=4),
  "quick": dict(presets=["nano", "tiny", "small"], steps=1500, batch=16, seq_len=64, n_train=50_000, sequences=200, every=50),
  "paper": dict(
    presets=["opt-125m", "opt-350m", "opt-1.3b"],
    steps=50_000,
    batch=256,
    seq_len=128,
    n_train=2_000_000,
    sequences=2000,
    every=2000,
  ),
}
PAPER_UPWARD = 0.094  # README of the released code: "about 9.4% of tokens show double descent"
WINDOW = 0.2  # classification window starts at 20% of training (the paper's figures)


def sweep_spec(scale: str, data_dir: str = "") -> dict:
  s = SCALES[scale]
  small = scale == "nano"
  over = {
    "train.steps": s["steps"],
    "train.batch_size": s["batch"],
    "train.log_every": max(1, s["steps"] // 10),
    "data.seq_len": s["seq_len"],
    "model.max_len": max(s["seq_len"], 32),
    "data.source.n_train": s["n_train"],
    "data.source.n_validation": max(100 if small else 1000, s["sequences"]),
    "data.source.n_test": 50 if small else 1000,
    "data.seed": 0,  # every size sees the same data in the same order
    "ckpt.schedule": f"interval:every={s['every']}",
    "ckpt.resume_every": max(s["steps"] // 4, 1),
    "ckpt.params_only": True,
    "eval.every": s["steps"],
    "eval.batches": 1 if small else 4,
    "eval.batch_size": 8 if small else 16,
    "log.tensorboard": False,
  }
  if data_dir:
    over["data.data_dir"] = data_dir
  return {"name": f"xia-{scale}", "config": "configs/pcfg.py:nano", "set": over, "axes": {"preset": s["presets"]}}


def class_ppl(da, classes_T: np.ndarray) -> pd.DataFrame:
  """Mean perplexity exp(mean surprisal, nats) of each class's tokens, per (size, checkpoint)."""
  from analysis import curves

  rows = []
  for r in range(da.sizes["run"]):
    v = da.isel(run=r).values  # [C, T] nats
    for c, step in enumerate(da.step.values):
      if not np.isfinite(v[c]).all():
        continue
      for k, name in curves.TREND_NAMES.items():
        sel = classes_T == k
        if sel.any():
          rows.append(
            dict(
              run=str(da.run.values[r]),
              n_params=int(da.n_params.values[r]),
              step=int(step),
              val_ppl=float(da.val_ppl.values[r, c]),
              trend=name,
              n_tokens=int(sel.sum()),
              ppl=float(np.exp(v[c, sel].mean())),
            )
          )
  return pd.DataFrame(rows)


def matched(tab: pd.DataFrame, n_points: int = 6) -> pd.DataFrame:
  """Class perplexities interpolated at validation perplexities every size reached (ppl-matched)."""
  from analysis import curves

  runs = list(dict.fromkeys(tab["run"]))
  per = {r: tab[tab.run == r] for r in runs}
  lo = max(per[r]["val_ppl"].min() for r in runs)
  hi = min(per[r]["val_ppl"].max() for r in runs)
  if not lo < hi:
    return pd.DataFrame()
  targets = np.geomspace(hi, lo, n_points)
  rows = []
  for trend in dict.fromkeys(tab["trend"]):
    metric, val = [], []
    for r in runs:
      d = per[r][per[r].trend == trend].sort_values("step")
      metric.append(d["ppl"].to_numpy())
      val.append(d["val_ppl"].to_numpy())
    out = curves.align_to_ppl(metric, val, targets)
    for r, y in zip(runs, out):
      for q, v in zip(targets, y):
        rows.append(dict(run=r, trend=trend, val_ppl=float(q), ppl=float(v)))
  return pd.DataFrame(rows)


def report(out: str, scale: str, ref: str, fractions: dict, per_size: dict, m: pd.DataFrame, figs, n_tok: int) -> str:
  up = fractions.get("upward", 0.0)
  lines = [
    f"# Xia et al. (2023) token trajectories across sizes — scale `{scale}`",
    "",
    f"Sizes {list(per_size)} trained on the same data and order; {n_tok} probe tokens (every position of the "
    f"probe documents); classes from the reference model `{ref}` over the last {1 - WINDOW:.0%} of steps. Data: a "
    "random PCFG language, not OPT's corpus; models and runs are far smaller than OPT's.",
    "",
    "## Trend classes in the reference model beside the paper",
    "",
    "| class | fraction here | paper |",
    "|---|---|---|",
    f"| upward (double descent) | {up:.1%} | ~9.4% (released code's README) |",
    f"| downward | {fractions.get('downward', 0):.1%} | most tokens (figure, no number) |",
    f"| stagnated | {fractions.get('stagnated', 0):.1%} | (figure, no number) |",
    f"| other | {fractions.get('other', 0):.1%} | |",
    "",
    "Fraction upward when each size classifies its own tokens: "
    + ", ".join(f"{k}: {v.get('upward', 0):.1%}" for k, v in per_size.items()),
    "",
    "## Class perplexity at matched validation perplexity",
    "",
    "Paper (Xia et al. 2023, ACL): at a given validation perplexity, independent of size, a similar subset of tokens gets the "
    "largest loss reduction; the rest stagnate or show double descent. Here: each class's mean perplexity in "
    "each size, interpolated at validation perplexities every size reached; the spread across sizes "
    "(max/min) is small when the claim holds.",
    "",
  ]
  if len(m):
    piv = m.pivot_table(index=["trend", "val_ppl"], columns="run", values="ppl").reset_index()
    runs = [c for c in piv.columns if c not in ("trend", "val_ppl")]
    piv["max/min"] = piv[runs].max(axis=1) / piv[runs].min(axis=1)
    lines += cli.md_table(piv, ["trend", "val_ppl", *runs, "max/min"])
  else:
    lines.append("The sizes' validation perplexities do not overlap: no matched points.")
  return cli.write_report(out, lines, figs, scale)


def run(out: str, scale: str = "nano", data_dir: str = "") -> dict:
  if scale not in SCALES:
    raise errors.ConfigError(f"--scale={scale!r}: expected one of {', '.join(SCALES)}")
  import matplotlib

  matplotlib.use("Agg")
  from analysis import curves, plots
  from analysis import load as LD
  from analysis import trajectories as TJ

  s = SCALES[scale]
  sw = Sweep.from_dict(sweep_spec(scale, data_dir), out)
  sw.run(log=lambda m: print(m, flush=True))
  wds = [r.workdir for r in sw.runs()]
  names = [str(r.point["preset"]) for r in sw.runs()]
  TJ.extract(wds, steps="all", spec={"sequences": s["sequences"], "positions": 0, "seed": 0}, names=names, progress=False)
  da = LD.load_trajectories(wds, unit="nats")
  steps_C = da.step.values
  per_size = {}
  results = {}
  for r, name in enumerate(names):
    res = curves.trend_classes(da.isel(run=r).values.T, steps_C, window_frac=WINDOW, kind="surprisal", unit="nats")
    results[name] = res
    per_size[name] = curves.class_fractions(res.class_T)
  ref = names[-1]  # the largest model is the reference
  cls = results[ref].class_T
  pd.DataFrame(
    {
      "token_index": np.arange(cls.size),
      "doc": da.doc.values,
      "position": da.position.values,
      "token": da.token_id.values,
      "trend_class": cls,
      "trend": [curves.TREND_NAMES[int(c)] for c in cls],
      "slope": results[ref].slope_T,
      "p": results[ref].p_T,
    }
  ).to_parquet(os.path.join(out, "classes.parquet"), index=False)
  tab = class_ppl(da, cls)
  tab.to_csv(os.path.join(out, "class_ppl.csv"), index=False)
  m = matched(tab)
  m.to_csv(os.path.join(out, "class_ppl_matched.csv"), index=False)
  figs = [os.path.join(out, "fig_class_ppl_vs_val_ppl.png"), os.path.join(out, "fig_trend_fractions_vs_ppl.png")]
  plots.class_ppl_vs_val_ppl(da, cls).savefig(figs[0], dpi=120)
  plots.trend_fractions_vs_ppl(da, window_frac=WINDOW).savefig(figs[1], dpi=120)
  report(out, scale, ref, per_size[ref], per_size, m, figs, int(cls.size))
  return {"workdirs": wds, "fractions": per_size, "class_ppl": tab, "matched": m, "figures": figs}


def main(argv=None) -> int:
  return cli.main("xia", __doc__, SCALES, run, argv)


if __name__ == "__main__":
  sys.exit(main())
