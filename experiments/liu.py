"""Liu et al. 2022 end to end: same pre-training loss, better downstream — one command.

  python -m experiments.liu --out=DIR [--scale=nano|quick|paper] [--dry_run] [--emit=slurm|tpu]

Trains the grid through the sweep layer (experiments/sweep.py: finished runs are skipped, unfinished ones
resume; `--dry_run` prints the plan, `--emit` writes a SLURM array / TPU command lines for the training
and stops: rerun without it when the jobs are done, to analyse), measures flatness (Hutchinson
and Fisher traces, analysis.flatness) and downstream linear-probe accuracy (analysis.downstream) of
every model, and writes:
  DIR/sweep.json          the expanded grid (analysis.load_sweep(DIR) -> runs with road/size/optimizer)
  DIR/runs/<name>/seed_0/ one ordinary workdir per run
  DIR/liu.parquet         run, road, size, optimizer, step, loss, excess loss, Tr(H) ± SE (hutchinson,
                          fisher), accuracy ± SE per task (acc_<task>, acc_se_<task>)
  DIR/liu.md              the final models beside the paper's numbers (Liu et al., ICML 2023, Figs. 1-3 and
                          Tables 1-2), the directions
                          (does each reproduce?), Spearman / Pearson of Tr(H) vs accuracy with bootstrap CIs
  DIR/liu_*.png           Tr(H) vs accuracy among final models; accuracy and Tr(H) along the SGD run

Roads to the same loss (the paper's three comparisons): `size` (a width ladder, AdamW), `algorithm` (AdamW, SGD with a
constant lr after 12% warmup, and the adversarial objective of data/adversarial.py at the middle size),
`convergence` (the SGD run's checkpoints: accuracy and Tr(H) along training). Widths: Tr(H) of each
ladder model is also measured inside the widest architecture (lib/enlarge.py, `enlarged` rows) when the
widths divide it.

The grid is one sweep of named runs (`sweep_spec(runs, scale)`: card configs/liu.py:<scale>, one entry per
run with its overrides and its road/size/optimizer as labels). The analyses stay here, in process: the SGD
run is measured at every checkpoint and the others at their final step, which the sweep's per-run
analysis hook does not express.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import pandas as pd

from lib import config_check, errors

ROAD_SIZES = {
  "nano": (8, 16),
  "quick": (8, 16, 24, 32, 48, 64),
  "faithful": (32, 48, 64, 96, 128),
  "paper": (64, 128, 192, 256, 384, 512),
}
# Per scale: the SGD run's length as a multiple of the card's steps, the adversarial weights tried (the
# one whose loss matches AdamW's is compared), the adversary's task.
ROADS = {
  "nano": dict(sgd_factor=1, adv_weights=(1.0,), adv_task=None),
  "quick": dict(sgd_factor=1, adv_weights=(1.0,), adv_task=None),
  "faithful": dict(sgd_factor=2, adv_weights=(0.1, 0.3), adv_task="task_state6", sgd_lr=0.002, sgd_from_adamw=True),
  "paper": dict(sgd_factor=1, adv_weights=(1.0,), adv_task=None),
}
TOL, NEAR, PAST = 0.01, 0.05, 3.0  # same loss: within ±TOL nats; near the optimum: excess ≤ NEAR; SGD ≥ PAST× its plateau
PAPER = {  # Liu et al. (ICML 2023): Figs. 1-3 and Tables 1-2, as quoted by a reading of the paper
  "size": "Tr(H) 19.8 → 12.6 as size grows (>9M params, same loss); task-B probe 40.4% → 50.5%",
  "algorithm": "AdamW vs adversarial (235M): Tr(H) 8.01±0.73 vs 19.34±0.92; task C 55.7±0.6 vs 50.2±1.0; "
  "task A 89.9 vs 83.1; task B 49.2 vs 42.3; lookup table: A 71.2, B 39.7",
  "convergence": "after the loss plateaus (SGD): accuracy +1.6% (235M, PCFG task C) while Tr(H) decreases",
}
ANALYSIS = {  # per scale: flatness Hutchinson vectors / batches, downstream seeds / linear-probe epochs / tasks (() = all)
  "nano": dict(probes=2, batches=1, batch_size=8, seeds=2, probe_epochs=10, tasks=("task_A", "task_B")),
  "quick": dict(probes=8, batches=2, batch_size=16, seeds=3, probe_epochs=30, tasks=("task_A", "task_B", "task_C", "task_span8")),
  "faithful": dict(probes=16, batches=4, batch_size=32, seeds=5, probe_epochs=30, tasks=("task_state6", "task_state10")),
  "paper": dict(probes=100, batches=8, batch_size=64, seeds=5, probe_epochs=50, tasks=()),
}


class ExperimentError(errors.LmtraceError, ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Run:
  """One named run: the run card + overrides ('section.key' -> value) and its place in the study."""

  name: str
  road: str
  size: int
  optimizer: str
  card: str = "configs/liu.py"
  scale: str = "quick"
  overrides: tuple = ()  # ((key, value), ...)

  def config(self):
    from configs import liu

    c = liu.get_config(self.scale)
    c.unlock()
    config_check.set_keys(c, dict(self.overrides))
    c.lock()
    return c


def grid(scale: str, out: str = "") -> list[Run]:
  """The study's runs: a width ladder (AdamW), then SGD and adversarial at the middle width. At the faithful
  scale the SGD run continues from the middle-width AdamW model (`train.init_from`, which `out` locates): the
  paper's convergence road is about what training does after the loss has reached its optimum, which SGD from
  scratch does not reach on a CPU budget (measured: lr 0.3 from scratch was still 0.4-0.6 nats above the
  optimum after 4000 steps). Its lr is small (0.002, the paper's SGD runs use 1e-3): at 0.05 the gradient
  noise threw the AdamW model 0.13-0.26 nats off the optimum within 2000 steps, and at 0.005 its excess loss
  moved over a range of 0.013 nats between evaluations (the road's target: 0.01)."""
  if scale not in ROAD_SIZES:
    raise ExperimentError(f"unknown scale {scale!r}; valid: {', '.join(ROAD_SIZES)}")
  sizes = ROAD_SIZES[scale]
  mid = sizes[len(sizes) // 2]

  def width(d):
    return (("model.d_model", d), ("model.d_ff", 4 * d), ("model.n_heads", 2 if d < 64 else d // 32))

  from configs import liu

  roads = ROADS[scale]
  steps = liu.SCALES[scale]["steps"] * roads["sgd_factor"]
  runs = [Run(f"adamw_d{d}", "size", d, "adamw", scale=scale, overrides=width(d)) for d in sizes]
  lr = roads.get("sgd_lr", 0.3)
  sgd = (("opt.name", "sgd"), ("opt.schedule", "constant"), ("opt.lr", lr), ("opt.warmup_steps", max(int(0.12 * steps), 1)))
  # the paper's SGD has no weight decay; ours is coupled, and 0.01 shrank the weights ~e^-2.5 over 5000 steps
  sgd += (("opt.weight_decay", 0.0),)
  if roads.get("sgd_from_adamw"):
    sgd += (("train.init_from", os.path.join(os.path.abspath(out), "runs", f"adamw_d{mid}", "seed_0")),)
  every = max(
    steps // (8 if scale != "faithful" else 12), 1
  )  # checkpoints and evals together: excess loss at every measured step
  sgd += (("train.steps", steps), ("ckpt.schedule", f"interval:every={every};explicit:steps={steps}"), ("eval.every", every))
  sgd_name = f"sgd_from_adamw_d{mid}" if roads.get("sgd_from_adamw") else f"sgd_d{mid}"
  runs.append(Run(sgd_name, "convergence", mid, "sgd", scale=scale, overrides=width(mid) + sgd))
  for w in roads["adv_weights"]:
    adv = (("adversarial.weight", w), ("adversarial.examples", 16 if scale == "nano" else 64))
    adv += (("adversarial.task", roads["adv_task"]),) if roads["adv_task"] else ()
    name = f"adversarial_d{mid}" if len(roads["adv_weights"]) == 1 else f"adversarial_w{w:g}_d{mid}"
    runs.append(Run(name, "algorithm", mid, "adamw+adv", scale=scale, overrides=width(mid) + adv))
  return runs


def plateau_step(steps, excess, delta: float = 0.005) -> int:
  """The first evaluated step after which the excess loss never improves by more than `delta` nats."""
  steps, excess = np.asarray(steps), np.asarray(excess, float)
  later_min = np.minimum.accumulate(excess[::-1])[::-1]
  return int(steps[np.argmax(excess - later_min <= delta)])


def choose_adversarial(final: pd.DataFrame, tol: float = TOL) -> pd.Series | None:
  """The adversarial run compared with AdamW: the largest weight whose final excess loss is within `tol` of
  AdamW's at the same width (else the closest one; the protocol table says so)."""
  adv = final[final["optimizer"] == "adamw+adv"]
  if not len(adv):
    return None
  base = final[(final["road"] == "size") & (final["size"] == adv["size"].iloc[0])]
  if not len(base):
    return adv.iloc[0]
  gap = (adv["excess_loss"] - base["excess_loss"].iloc[0]).abs()
  ok = adv[gap <= tol]
  return ok.sort_values("adv_weight").iloc[-1] if len(ok) else adv.loc[gap.idxmin()]


def same_loss_ladder(size: pd.DataFrame, tol: float = TOL) -> pd.DataFrame:
  """The widths the size road compares: the longest run of consecutive widths whose final excess losses are
  within `tol` of each other (ties: the wider run). The paper compares only models that reached the same
  (optimal) loss; a width that did not is listed in the protocol table as left out, not silently dropped."""
  size = size.sort_values("size").reset_index(drop=True)
  best = (0, 0)
  for i in range(len(size)):
    for j in range(i, len(size)):
      e = size["excess_loss"].iloc[i : j + 1]
      if e.max() - e.min() <= tol and (j - i, i) >= (best[1] - best[0], best[0]):
        best = (i, j)
  return size.iloc[best[0] : best[1] + 1]


def _verdict(ok: bool, a, b) -> str:
  """'reproduces' when both changes go the paper's way and Tr(H)'s (a → b) exceeds its standard error;
  a direction-only verdict, saying so, when the Tr(H) change is within it."""
  if not ok:
    return "does not reproduce"
  d = b["trH_hutchinson"] - a["trH_hutchinson"]
  se = float(np.hypot(a.get("trH_hutchinson_se", np.nan), b.get("trH_hutchinson_se", np.nan)))
  if np.isfinite(se) and abs(d) <= se:
    return f"accuracy as in the paper; Tr(H) moves {d:+.3g}, within its standard error {se:.2g} (not resolved)"
  return "reproduces"


def protocol(df: pd.DataFrame, sgd_curve: dict[int, float]) -> pd.DataFrame:
  """The paper's protocol as invariants measured from the runs: equal losses on each road, near the optimum,
  the SGD run well past its plateau, the adversary's loss matched to AdamW's."""
  final = df[(df["road"] != "baseline") & (df["step"] == df.groupby("run")["step"].transform("max"))]
  rows = []
  every = final[final["road"] == "size"]
  size = same_loss_ladder(every) if len(every) else every
  if len(size):
    r = size["excess_loss"].max() - size["excess_loss"].min()
    left = sorted(set(every["size"]) - set(size["size"]))
    got = f"{r:.4f} ({size['excess_loss'].min():.4f} … {size['excess_loss'].max():.4f}) over widths {list(size['size'])}"
    got += (
      f"; left out {left} (excess {', '.join(f'{e:.4f}' for e in every[every['size'].isin(left)]['excess_loss'])})"
      if left
      else ""
    )
    rows.append(("size road: same loss", f"max − min excess ≤ {TOL}, ≥ 3 widths", got, r <= TOL and len(size) >= 3))
    m = size["excess_loss"].max()
    rows.append(("size road: near the optimum", f"every excess ≤ {NEAR} nats", f"max {m:.4f}", m <= NEAR))
  adv = choose_adversarial(final)
  if adv is not None:
    base = final[(final["road"] == "size") & (final["size"] == adv["size"])]
    gap = float(adv["excess_loss"] - base["excess_loss"].iloc[0]) if len(base) else float("nan")
    tried = ", ".join(f"{w:g}" for w in sorted(final.loc[final["optimizer"] == "adamw+adv", "adv_weight"]))
    got = f"λ = {adv['adv_weight']:g} (tried {tried}): Δ excess {gap:+.4f}"
    rows.append(("algorithm road: adversary's loss matches AdamW's", f"|Δ excess| ≤ {TOL}", got, abs(gap) <= TOL))
    rows.append(("algorithm road: near the optimum", f"excess ≤ {NEAR}", f"{adv['excess_loss']:.4f}", adv["excess_loss"] <= NEAR))
  if len(sgd_curve) >= 2:
    st = sorted(sgd_curve)
    p = plateau_step(st, [sgd_curve[k] for k in st])
    end = st[-1]
    rows.append(
      (
        "SGD run: past its plateau",
        f"end ≥ {PAST:g}× the step where excess stops improving (by > 0.005)",
        f"plateau {p}, end {end}: {end / max(p, 1):.1f}×",
        end >= PAST * p,
      )
    )
    past = [sgd_curve[k] for k in st if k >= p]
    r = max(past) - min(past)
    rows.append(
      ("convergence road: same loss past the plateau", f"max − min excess ≤ {TOL}", f"{r:.4f} over {len(past)} evals", r <= TOL)
    )
    rows.append(("convergence road: near the optimum", f"excess ≤ {NEAR}", f"max {max(past):.4f}", max(past) <= NEAR))
  return pd.DataFrame(rows, columns=["invariant", "target", "measured", "ok"]).assign(
    ok=lambda d: d.ok.map({True: "✓", False: "✗"})
  )


def sweep_spec(runs: list[Run], scale: str) -> dict:
  """The grid as a sweep of named runs (one seed each: the card's)."""
  entries = [
    {"name": r.name, "set": dict(r.overrides), "labels": {"road": r.road, "size": r.size, "optimizer": r.optimizer}} for r in runs
  ]
  return {"name": f"liu-{scale}", "config": f"configs/liu.py:{scale}", "runs": entries, "vectorise": "auto"}


def train_grid(runs: list[Run], out: str, scale: str, dry_run: bool = False) -> dict[str, str]:
  """Trains every run through the sweep (skips finished ones, resumes unfinished ones); returns {name: workdir}."""
  from experiments.sweep import Sweep

  sw = Sweep.from_dict(sweep_spec(runs, scale), out)
  sw.run(dry_run=dry_run, log=lambda m: print(f"liu: {m}", flush=True))
  return {r.point["name"]: r.workdir for r in sw.runs()}


def _final_step(wd: str) -> int:
  from lib import ckpt as C

  return max(C.available_steps(wd))


def flatness_job(scale: str, steps: str):
  """The study's flatness job: Hutchinson and Fisher traces at `steps`."""
  from analysis import flatness

  a = ANALYSIS[scale]
  st = flatness.Settings(probes=a["probes"], batches=a["batches"], batch_size=a["batch_size"])
  return flatness.Job(st, estimators=("hutchinson", "fisher"), steps=steps)


def downstream_job(scale: str, steps: str, methods: tuple[str, ...]):
  """The study's downstream job: linear probes (and, on one run, the lookup-table baseline) at `steps`."""
  from analysis import downstream

  a = ANALYSIS[scale]
  return downstream.Job(
    steps=steps, tasks=a["tasks"], methods=methods, seeds=a["seeds"], probe_epochs=a["probe_epochs"], progress=False
  )


def analyse(runs: list[Run], dirs: dict[str, str], scale: str) -> None:
  """Flatness (Hutchinson + Fisher) and downstream probes; every step of the convergence road, the
  final step elsewhere. Both jobs are resumable, so a rerun only fills what is missing."""
  from analysis import downstream, flatness
  from analysis.jobs import Workdir

  for r in runs:
    wd = Workdir.open(dirs[r.name])
    steps = "all" if r.road == "convergence" else str(max(wd.steps))
    flatness.run(wd, flatness_job(scale, steps))
    methods = ("probe", "lookup") if r is runs[0] else ("probe",)
    downstream.run(wd, downstream_job(scale, steps, methods))


def enlarge_ladder(runs: list[Run], dirs: dict[str, str], out: str, scale: str) -> dict[str, str]:
  """Each ladder model widened to the widest width it divides; Tr(H) measured there."""
  from analysis import flatness
  from lib import enlarge

  ladder = [r for r in runs if r.road == "size"]
  wmax = max(r.size for r in ladder)
  made = {}
  for r in ladder:
    if r.size == wmax or wmax % r.size:
      continue
    dst = os.path.join(out, "enlarged", f"{r.name}_x{wmax // r.size}")
    step = _final_step(dirs[r.name])
    enlarge.enlarge_workdir(dirs[r.name], dst, wmax // r.size, steps=[step])
    flatness.run(dst, flatness_job(scale, str(step)))
    made[r.name] = dst
  return made


def join(runs: list[Run], dirs: dict[str, str], enlarged: dict[str, str]) -> pd.DataFrame:
  """One row per (run, step) measured: losses, traces ± SE, accuracy ± SE per task (wide)."""
  from analysis import downstream
  from analysis.load import load_flatness

  rows = []
  for r in runs:
    wd = dirs[r.name]
    ev = downstream.eval_metrics_at(wd)
    fl = load_flatness(wd)
    ds = downstream.load_downstream(wd)
    steps = sorted(set(fl["step"]) if len(fl) else set())
    for s in steps:
      row = dict(run=r.name, road=r.road, size=r.size, optimizer=r.optimizer, step=int(s))
      row["adv_weight"] = float(dict(r.overrides).get("adversarial.weight", 0.0))
      row.update(loss=ev.get(s, {}).get("loss", np.nan), excess_loss=ev.get(s, {}).get("excess_loss", np.nan))
      for est, q in (("hutchinson", "trace"), ("fisher", "fisher_trace")):
        f = fl[(fl["step"] == s) & (fl["estimator"] == est) & (fl["quantity"] == q)] if len(fl) else fl
        row[f"trH_{est}"] = float(f["estimate"].iloc[-1]) if len(f) else np.nan
        row[f"trH_{est}_se"] = float(f["stderr"].iloc[-1]) if len(f) else np.nan
      if r.name in enlarged:
        fe = load_flatness(enlarged[r.name])
        fe = fe[(fe["step"] == s) & (fe["estimator"] == "hutchinson") & (fe["quantity"] == "trace")]
        row["trH_hutchinson_enlarged"] = float(fe["estimate"].iloc[-1]) if len(fe) else np.nan
      d = ds[(ds["step"] == s) & (ds["method"] == "probe")] if len(ds) else ds
      for t, g in d.groupby("task") if len(d) else []:
        row[f"acc_{t}"], row[f"acc_se_{t}"] = float(g["acc_mean"].iloc[0]), float(g["acc_se"].iloc[0])
      rows.append(row)
    look = ds[ds["method"] == "lookup"] if len(ds) else ds
    if len(look):
      row = dict(run="lookup_table", road="baseline", size=0, optimizer="exact", step=-1, excess_loss=0.0)
      for t, g in look.groupby("task"):
        row[f"acc_{t}"], row[f"acc_se_{t}"] = float(g["acc_mean"].iloc[0]), float(g["acc_se"].iloc[0])
      rows.append(row)
  return pd.DataFrame(rows)


def bootstrap_corr(x, y, n_boot: int = 2000, seed: int = 0) -> dict:
  """Spearman and Pearson r of (x, y) with percentile bootstrap 95% CIs (resampling models)."""
  from scipy import stats

  x, y = np.asarray(x, float), np.asarray(y, float)
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  out = {"n": len(x)}
  if len(x) < 3:
    return out | {"spearman": np.nan, "pearson": np.nan}
  rng = np.random.default_rng(seed)
  for name, fn in (("spearman", lambda a, b: stats.spearmanr(a, b)[0]), ("pearson", lambda a, b: stats.pearsonr(a, b)[0])):
    boots = []
    for _ in range(n_boot):
      i = rng.integers(0, len(x), len(x))
      if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
        boots.append(fn(x[i], y[i]))
    out[name] = float(fn(x, y))
    out[f"{name}_ci95"] = tuple(float(v) for v in np.percentile(boots, [2.5, 97.5]).round(3)) if boots else (np.nan, np.nan)
  return out


def _fmt(v, se=None, pct=False):
  if v is None or not np.isfinite(v):
    return "–"
  k = 100.0 if pct else 1.0
  return f"{v * k:.1f}±{se * k:.1f}" if se is not None and np.isfinite(se) else (f"{v * k:.1f}" if pct else f"{v:.3g}")


def _same_loss(a, b, tol: float = 0.02) -> str:
  """The paper compares models of (nearly) the same loss: say so when the excess losses differ."""
  if not (np.isfinite(a) and np.isfinite(b)) or abs(a - b) <= tol:
    return ""
  return f" (caveat: excess losses differ by {abs(a - b):.3f} nats > {tol}: not the same loss, so not the paper's comparison)"


def report(df: pd.DataFrame, out: str, scale: str, proto: pd.DataFrame | None = None) -> str:
  """DIR/liu.md and the figures; returns the markdown."""
  final = df[df["step"] == df.groupby("run")["step"].transform("max")]
  tasks = sorted(c[4:] for c in df.columns if c.startswith("acc_") and not c.startswith("acc_se_"))
  lines = [f"# Liu et al. 2022 at scale `{scale}`", ""]
  if proto is not None and len(proto):
    from experiments import cli

    lines += ["## Protocol", "", *cli.md_table(proto, ["invariant", "target", "measured", "ok"]), ""]
  lines += ["## Final models", "", "Final checkpoint of every run (probe accuracy in %, mean ± SE over seeds):", ""]
  head = ["run", "road", "size", "optimizer", "loss", "excess", "Tr(H) hutch", "Tr(H) fisher", "Tr(H) in widest"] + tasks
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for _, r in final.iterrows():
    cells = [r["run"], r["road"], str(r["size"]), r["optimizer"], _fmt(r.get("loss")), _fmt(r.get("excess_loss"))]
    cells += [_fmt(r.get("trH_hutchinson"), r.get("trH_hutchinson_se")), _fmt(r.get("trH_fisher"), r.get("trH_fisher_se"))]
    cells += [_fmt(r.get("trH_hutchinson_enlarged", np.nan))]
    cells += [_fmt(r.get(f"acc_{t}"), r.get(f"acc_se_{t}"), pct=True) for t in tasks]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## Directions (paper → here)", ""]
  size = same_loss_ladder(final[final["road"] == "size"]) if (final["road"] == "size").any() else final.iloc[:0]
  if len(size) < 2:  # no two widths of the same loss (e.g. nano): every width, with the caveat _same_loss adds
    size = final[final["road"] == "size"].sort_values("size")
  verdicts = {}
  if len(size) >= 2:
    tb = next((f"acc_{t}" for t in ("task_B", "task_state10", "task_state6") if f"acc_{t}" in size), None)
    d_tr = size["trH_hutchinson"].iloc[-1] - size["trH_hutchinson"].iloc[0]
    d_acc = (size[tb].iloc[-1] - size[tb].iloc[0]) if tb else np.nan
    verdicts["size"] = (d_tr < 0) and (d_acc > 0)
    lines.append(
      f"* **Size** — paper: {PAPER['size']}. Here (smallest → largest width): Tr(H) {size['trH_hutchinson'].iloc[0]:.3g} → "
      f"{size['trH_hutchinson'].iloc[-1]:.3g}, {tb[4:] if tb else 'task_B'} probe "
      f"{_fmt(size[tb].iloc[0], pct=True) if tb else '–'}% → "
      f"{_fmt(size[tb].iloc[-1], pct=True) if tb else '–'}%, excess loss {size['excess_loss'].iloc[0]:.3f} → "
      f"{size['excess_loss'].iloc[-1]:.3f}: **{_verdict(verdicts['size'], size.iloc[0], size.iloc[-1])}**"
      f"{_same_loss(size['excess_loss'].iloc[0], size['excess_loss'].iloc[-1])}."
    )
  chosen = choose_adversarial(final) if "adv_weight" in final else None
  adv = final[final["optimizer"] == "adamw+adv"] if chosen is None else final[final["run"] == chosen["run"]]
  if len(adv):
    base = final[(final["road"] == "size") & (final["size"] == adv["size"].iloc[0])]
    if len(base):
      tc = next((f"acc_{t}" for t in ("task_C", "task_state6", "task_B", "task_A") if f"acc_{t}" in final), None)
      a, b = adv.iloc[0], base.iloc[0]
      verdicts["algorithm"] = (a["trH_hutchinson"] > b["trH_hutchinson"]) and (tc is not None and a[tc] < b[tc])
      lines.append(
        f"* **Algorithm** — paper: {PAPER['algorithm']}. Here: AdamW vs adversarial Tr(H) {b['trH_hutchinson']:.3g} vs "
        f"{a['trH_hutchinson']:.3g}, {tc[4:] if tc else '?'} {_fmt(b.get(tc), pct=True)}% vs {_fmt(a.get(tc), pct=True)}%, "
        f"excess loss {b['excess_loss']:.3f} vs {a['excess_loss']:.3f}: "
        f"**{_verdict(verdicts['algorithm'], b, a)}**{_same_loss(b['excess_loss'], a['excess_loss'])}."
      )
  conv = df[df["road"] == "convergence"].sort_values("step")
  if len(conv) >= 2:
    tc = next((f"acc_{t}" for t in ("task_C", "task_state6", "task_B", "task_A") if f"acc_{t}" in conv), None)
    half = conv[conv["step"] >= conv["step"].max() / 2]
    ok = len(half) >= 2 and tc is not None
    verdicts["convergence"] = bool(
      ok and half[tc].iloc[-1] > half[tc].iloc[0] and half["trH_hutchinson"].iloc[-1] < half["trH_hutchinson"].iloc[0]
    )
    lines.append(
      f"* **Past convergence (SGD)** — paper: {PAPER['convergence']}. Here, second half of the run: "
      f"{tc[4:] if tc else '?'} {_fmt(half[tc].iloc[0] if ok else None, pct=True)}% → "
      f"{_fmt(half[tc].iloc[-1] if ok else None, pct=True)}%, "
      f"Tr(H) {half['trH_hutchinson'].iloc[0]:.3g} → {half['trH_hutchinson'].iloc[-1]:.3g}, excess loss "
      f"{half['excess_loss'].iloc[0]:.3f} → {half['excess_loss'].iloc[-1]:.3f}: "
      f"**{_verdict(verdicts['convergence'], half.iloc[0], half.iloc[-1]) if ok else 'does not reproduce'}**"
      f"{_same_loss(half['excess_loss'].iloc[0], half['excess_loss'].iloc[-1])}."
    )
  lines += ["", "## Tr(H) vs probe accuracy among final models of the same loss (bootstrap 95% CIs over models)", ""]
  models = final[final["road"] != "baseline"]
  if len(size):  # same loss: within TOL of the compared widths' median excess
    models = models[(models["excess_loss"] - size["excess_loss"].median()).abs() <= TOL]
  lines.append(f"Models compared ({len(models)}, excess within ±{TOL} of the size road's median): {', '.join(models['run'])}.")
  lines.append("")
  for t in tasks:
    c = bootstrap_corr(models["trH_hutchinson"], models[f"acc_{t}"])
    if c["n"] >= 3:
      sp, pe = f"{c['spearman']:.2f} {c.get('spearman_ci95')}", f"{c['pearson']:.2f} {c.get('pearson_ci95')}"
      lines.append(f"* {t} (n={c['n']}): Spearman {sp}, Pearson {pe}")
  lines += ["", "The paper predicts negative correlations (flatter → better transfer) among models of equal loss."]
  md = "\n".join(lines) + "\n"
  for name in ("liu.md", "report.md"):  # report.md: the name every study's report has
    with open(os.path.join(out, name), "w") as f:
      f.write(md)
  _figures(df, final, out, tasks)
  with open(os.path.join(out, "liu_verdicts.json"), "w") as f:
    json.dump({k: bool(v) for k, v in verdicts.items()}, f)
  return md


def _figures(df, final, out, tasks) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not tasks:
    return
  t = "task_B" if "task_B" in tasks else tasks[0]
  models = final[final["road"] != "baseline"]
  fig, ax = plt.subplots(figsize=(5, 4))
  for road, g in models.groupby("road"):
    ax.errorbar(
      g["trH_hutchinson"], 100 * g[f"acc_{t}"], xerr=g["trH_hutchinson_se"], yerr=100 * g[f"acc_se_{t}"], fmt="o", label=road
    )
    for _, r in g.iterrows():
      ax.annotate(r["run"], (r["trH_hutchinson"], 100 * r[f"acc_{t}"]), fontsize=6)
  ax.set_xlabel("Tr(H) (Hutchinson)")
  ax.set_ylabel(f"{t} probe accuracy (%)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "liu_trace_vs_accuracy.png"), dpi=120)
  plt.close(fig)
  conv = df[df["road"] == "convergence"].sort_values("step")
  if len(conv):
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(conv["step"], 100 * conv[f"acc_{t}"], "o-", label=f"{t} accuracy (%)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{t} probe accuracy (%)")
    ax2 = ax.twinx()
    ax2.plot(conv["step"], conv["trH_hutchinson"], "s--", color="C1", label="Tr(H)")
    ax2.set_ylabel("Tr(H)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "liu_convergence.png"), dpi=120)
    plt.close(fig)


PUBLISH = ("report.md", "protocol.csv", "liu.csv")  # what --publish copies (the figures stay in DIR)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="output directory (runs/, liu.parquet, liu.md, figures)")
  ap.add_argument("--scale", default="quick", help="nano | quick | paper")
  ap.add_argument("--no_enlarge", action="store_true", help="skip measuring Tr(H) in the widest architecture")
  ap.add_argument("--dry_run", action="store_true", help="print the runs that would be trained, then stop")
  ap.add_argument("--emit", choices=("slurm", "tpu"), help="write the grid's launch commands for a scheduler, then stop")
  ap.add_argument(
    "--publish", default="", help="also copy liu.md and its small tables into this folder (e.g. experiments/results/liu)"
  )
  args = ap.parse_args(argv)
  from lib import metrics as MX
  from lib import sharding

  MX.quiet_logs()
  sharding.enable_compilation_cache()
  try:
    t0 = time.time()
    runs = grid(args.scale, args.out)
    if args.emit:
      from experiments.sweep import Sweep

      sw = Sweep.from_dict(sweep_spec(runs, args.scale), args.out)
      then = f"python -m experiments.liu --out={sw.out} --scale={args.scale}  (skips training, analyses)"
      print(f"# written to {sw.write_launch(args.emit, then=then)}", file=sys.stderr)
      return 0
    dirs = train_grid(runs, args.out, args.scale, dry_run=args.dry_run)
    if args.dry_run:
      return 0
    analyse(runs, dirs, args.scale)
    enlarged = {} if args.no_enlarge else enlarge_ladder(runs, dirs, args.out, args.scale)
    df = join(runs, dirs, enlarged)
    tmp = os.path.join(args.out, "liu.parquet.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, os.path.join(args.out, "liu.parquet"))
    from analysis import downstream

    sgd = next(r for r in runs if r.road == "convergence")
    curve = {
      k: v["excess_loss"]
      for k, v in downstream.eval_metrics_at(dirs[sgd.name]).items()
      if np.isfinite(v.get("excess_loss", np.nan))
    }
    proto = protocol(df, curve)
    proto.to_csv(os.path.join(args.out, "protocol.csv"), index=False)
    md = report(df, args.out, args.scale, proto)
    df.to_csv(os.path.join(args.out, "liu.csv"), index=False, float_format="%.6g")
    if args.publish:
      from experiments import cli

      print(f"published: {cli.publish_results(args.out, args.publish, PUBLISH)}")
    print(md)
    print(f"liu: done in {time.time() - t0:.0f}s; {os.path.join(args.out, 'liu.parquet')}")
  except (errors.LmtraceError, ValueError) as e:
    print(f"lmtrace liu: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
