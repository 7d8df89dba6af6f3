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
  "faithful": dict(
    presets=["nano", "tiny", "mid", "small"], steps=3000, batch=16, seq_len=64, n_train=100_000, sequences=300, every=50
  ),
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


def _class_ppl_RxKxC(v_RxCxT: np.ndarray, cls_T: np.ndarray, w_T: np.ndarray) -> np.ndarray:
  """exp(weighted mean surprisal) of each class's tokens, per run and checkpoint ([R, K, C]; K = TREND_NAMES)."""
  from analysis import curves

  masks_TxK = np.stack([(cls_T == k) * w_T for k in curves.TREND_NAMES], 1).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.exp(np.einsum("rct,tk->rkc", v_RxCxT, masks_TxK) / masks_TxK.sum(0)[None, :, None])


def spreads(v_RxCxT, val_RxC, steps_C, cls_T, targets_Q, w_T) -> np.ndarray:
  """[2, K]: per class, the mean over the matched points of log(max/min across sizes) of the class perplexity.
  Row 0: each size taken where ITS validation perplexity equals each target (matched perplexity). Row 1: each
  size taken at the step where the REFERENCE (largest) model reaches that target (matched step, interpolated in
  log step). Same points along the reference trajectory, two x-axes, as the paper's perplexity-vs-steps
  figures. The paper's claim is that perplexity lines the sizes up: row 0 below row 1."""
  from analysis import curves

  ppl_RxKxC = _class_ppl_RxKxC(v_RxCxT, cls_T, w_T)
  R, K, _ = ppl_RxKxC.shape
  at_ppl_RxKxQ = np.stack([curves.align_to_ppl(ppl_RxKxC[r], val_RxC[r], targets_Q) for r in range(R)])
  s_Q = curves.align_to_ppl(steps_C.astype(np.float64)[None], val_RxC[-1], targets_Q)[0]
  x_C = np.log1p(steps_C.astype(np.float64))
  at_step_RxKxQ = np.stack([[np.interp(np.log1p(s_Q), x_C, ppl_RxKxC[r, k]) for k in range(K)] for r in range(R)])
  out = np.full((2, K), np.nan)
  with np.errstate(invalid="ignore", divide="ignore"):
    for row, a in enumerate((at_ppl_RxKxQ, at_step_RxKxQ)):
      lr = np.log(a.max(0) / a.min(0))  # [K, Q]
      ok = np.isfinite(lr).any(1)
      out[row, ok] = np.nanmean(lr[ok], 1)
  return out


def uncertainty(da, cls_T: np.ndarray, n_points: int = 6, n_boot: int = 300) -> pd.DataFrame:
  """Trend fractions and the two spreads of `spreads`, each with a 95% CI from a bootstrap over probe
  DOCUMENTS (the tokens of one document share its context, so they are resampled together)."""
  from analysis import curves, stats

  v_RxCxT = np.asarray(da.values, np.float64)
  ok_C = np.isfinite(v_RxCxT).all(axis=(0, 2))
  v_RxCxT, val_RxC, steps_C = v_RxCxT[:, ok_C], np.asarray(da.val_ppl.values)[:, ok_C], da.step.values[ok_C]
  lo, hi = max(val_RxC[r].min() for r in range(len(val_RxC))), min(val_RxC[r].max() for r in range(len(val_RxC)))
  targets_Q = np.geomspace(hi, lo, n_points) if lo < hi else np.array([])
  T = len(cls_T)

  def stat(idx):
    w_T = np.bincount(idx, minlength=T).astype(np.float64)
    frac = [(w_T * (cls_T == k)).sum() / w_T.sum() for k in curves.TREND_NAMES]
    sp = spreads(v_RxCxT, val_RxC, steps_C, cls_T, targets_Q, w_T) if len(targets_Q) else np.full((2, len(frac)), np.nan)
    return np.concatenate([frac, sp[0], sp[1]])

  point = stat(np.arange(T))
  lo_, hi_ = stats.cluster_bootstrap(stat, T, clusters=np.asarray(da.doc.values), n_boot=n_boot)
  K = len(curves.TREND_NAMES)
  rows = []
  for j, q in enumerate(("fraction", "spread_at_matched_ppl", "spread_at_matched_step")):
    for k, name in enumerate(curves.TREND_NAMES.values()):
      i = j * K + k
      rows.append(dict(quantity=q, trend=name, value=float(point[i]), ci_lo=float(lo_[i]), ci_hi=float(hi_[i])))
  return pd.DataFrame(rows)


def protocol(wds: list[str], da, names: list[str], n_matched: int) -> pd.DataFrame:
  """The paper's protocol as invariants measured from the runs."""
  from lib import ckpt as C

  cfgs = [C.read_config(w) for w in wds]
  n_params = [int(x) for x in da.n_params.values]
  steps_C = da.step.values[np.isfinite(np.asarray(da.values)).all(axis=(0, 2))]
  in_win = int((steps_C >= WINDOW * steps_C.max()).sum())
  same_data = len({(json_dumps(c["data"]), c["train"]["steps"], c["train"]["batch_size"]) for c in cfgs}) == 1
  rows = [
    ("model sizes", "≥ 4 (paper: 6 OPT sizes, 125M–175B)", f"{len(wds)}: {dict(zip(names, n_params))}", len(wds) >= 4),
    (
      "sizes distinct and increasing",
      "n_params strictly increasing",
      str(n_params),
      all(a < b for a, b in zip(n_params, n_params[1:])),
    ),
    ("same data, order and steps for every size", "identical data config", "identical" if same_data else "differ", same_data),
    ("checkpoints in the classification window", "≥ 20 (paper: 36 for 125M)", in_win, in_win >= 20),
    ("classification window", f"last {1 - WINDOW:.0%} of steps (paper's figures)", f"last {1 - WINDOW:.0%}", True),
    ("reference model", "one model classifies the tokens (the largest here)", names[-1], True),
    ("matched validation-perplexity points", "≥ 3 where every size has been", n_matched, n_matched >= 3),
  ]
  return pd.DataFrame(rows, columns=["invariant", "target", "measured", "ok"]).assign(
    ok=lambda d: d.ok.map({True: "✓", False: "✗"})
  )


def json_dumps(x) -> str:
  import json

  return json.dumps(x, sort_keys=True)


def report(out: str, scale: str, ref: str, per_size: dict, m: pd.DataFrame, figs, n_tok: int, proto, unc, windows=None) -> str:
  def get(q, t):
    r = unc[(unc.quantity == q) & (unc.trend == t)]
    return (float(r.value.iloc[0]), float(r.ci_lo.iloc[0]), float(r.ci_hi.iloc[0])) if len(r) else (np.nan,) * 3

  def pct(q, t):
    v, lo, hi = get(q, t)
    return f"{v:.1%} [{lo:.1%}, {hi:.1%}]"

  lines = [
    f"# Xia et al. (2023) token trajectories across sizes — scale `{scale}`",
    "",
    f"Sizes {list(per_size)} trained on the same data and order; {n_tok} probe tokens (every position of the "
    f"probe documents); classes from the reference model `{ref}` over the last {1 - WINDOW:.0%} of steps. Data: a "
    "random PCFG language, not OPT's corpus; models and runs are far smaller than OPT's. 95% CIs from a bootstrap "
    "over probe documents.",
    "",
    "## Protocol",
    "",
    *cli.md_table(proto, ["invariant", "target", "measured", "ok"]),
    "",
    "## Trend classes in the reference model beside the paper",
    "",
    "| class | fraction here [95% CI] | paper |",
    "|---|---|---|",
    f"| upward (double descent) | {pct('fraction', 'upward')} | ~9.4% (released code's README) |",
    f"| downward | {pct('fraction', 'downward')} | most tokens (figure, no number) |",
    f"| stagnated | {pct('fraction', 'stagnated')} | (figure, no number) |",
    f"| other | {pct('fraction', 'other')} | |",
    "",
    "Fraction upward when each size classifies its own tokens: "
    + ", ".join(f"{k}: {v.get('upward', 0):.1%}" for k, v in per_size.items()),
    "",
    "Fraction upward in the reference model when the window starts at other fractions of training (the released "
    "code precomputes 0.1, 0.3 and 0.7; the figures use 0.2): "
    + ", ".join(f"{w:g}: {f.get('upward', 0):.1%}" for w, f in (windows or {}).items()),
    "",
    "## Class perplexity at matched validation perplexity",
    "",
    "Paper (Xia et al. 2023): at a given validation perplexity, independent of size, a similar subset of tokens "
    "gets the largest loss reduction; the rest stagnate or show double descent — the trajectories of different "
    "sizes line up when plotted against validation perplexity, not against steps or compute. Test here: for each "
    "class, the spread of its perplexity across sizes, log(max/min) averaged over 6 points of the reference "
    "model's trajectory (validation perplexities every size reached): once with each size taken where its own "
    "validation perplexity equals the point's (matched perplexity), once with each size taken at the step where "
    "the reference reaches it (matched step; same data, order and steps for every size). The claim holds when "
    "the first is clearly below the second (the 95% CIs do not overlap). Matching the overall perplexity "
    "constrains the average over all tokens, not each class.",
    "",
    "| class | spread at matched ppl [95% CI] | spread at matched step [95% CI] | verdict |",
    "|---|---|---|---|",
  ]
  for t in ("downward", "upward", "stagnated", "other"):
    a, b = get("spread_at_matched_ppl", t), get("spread_at_matched_step", t)
    verdict = "n/a" if not np.isfinite(a[2] + b[1]) else ("ppl aligns (reproduces)" if a[2] < b[1] else "not separated")
    lines.append(f"| {t} | {a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}] | {b[0]:.3f} [{b[1]:.3f}, {b[2]:.3f}] | {verdict} |")
  lines += ["", "Each class's perplexity in each size at the matched validation perplexities:", ""]
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
  TJ.run(wds, TJ.Job(names=tuple(names), sequences=s["sequences"], positions=0, probe_seed=0, quiet=True))
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
  proto = protocol(wds, da, names, int(m["val_ppl"].nunique()) if len(m) else 0)
  proto.to_csv(os.path.join(out, "protocol.csv"), index=False)
  unc = uncertainty(da, cls, n_boot=300 if scale != "nano" else 50)
  unc.to_csv(os.path.join(out, "uncertainty.csv"), index=False, float_format="%.6g")
  windows = {
    w: curves.class_fractions(
      curves.trend_classes(da.isel(run=len(names) - 1).values.T, steps_C, window_frac=w, kind="surprisal", unit="nats").class_T
    )
    for w in (0.1, 0.2, 0.3, 0.7)
  }
  report(out, scale, ref, per_size, m, figs, int(cls.size), proto, unc, windows)
  return {
    "protocol": proto,
    "uncertainty": unc,
    "workdirs": wds,
    "fractions": per_size,
    "class_ppl": tab,
    "matched": m,
    "figures": figs,
  }


def main(argv=None) -> int:
  return cli.main("xia", __doc__, SCALES, run, argv, publish=PUBLISH)


PUBLISH = ("report.md", "protocol.csv", "uncertainty.csv")  # what --publish copies (the figures stay in DIR)


if __name__ == "__main__":
  sys.exit(main())
