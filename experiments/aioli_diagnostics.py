"""Diagnostics of the Aioli study: Aioli and stratified retrained under one change to the protocol.

    python -m experiments.aioli_diagnostics --out=DIR --variant=sampled_rows [--scale=faithful] [--jobs=2]

Each variant trains, for every setting and seed of the scale, a stratified run and an Aioli run with the
variant's change applied to both (so the difference is paired by seed under the same change), then writes
DIR/diagnostics.csv and prints one markdown row per setting: Aioli − stratified test perplexity with its
95% t interval over seeds, and the largest distance of Aioli's p from uniform between LearnParams phases.
The variants (VARIANTS) answer why Aioli does not beat stratified at the faithful scale (experiments/aioli.md):

- `eta0.5`, `eta1.0`: a larger step size than the released scripts' (0.1-0.2): does p move, does it help?
- `sampled_rows`: every batch's rows drawn from p, as the released trainer samples (mixture.rows=sampled);
  exact per-batch counts of 16 rows cannot show a change of p below 1/32, so small corrections never
  reached the data. LearnParams batches stay exact, as released.
- `batch64`: four times the rows per batch (exact counts resolve p in steps of 1/64; 4x the compute).

Runs live in DIR/<variant>/ and resume like every sweep; a rerun only trains what is missing.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from experiments import aioli as A
from lib.errors import LmtraceError

VARIANTS = {  # name -> (overrides of both runs, overrides of the Aioli run only)
  "released": ({}, {}),
  "eta0.5": ({}, {"mixture.eta": 0.5}),
  "eta1.0": ({}, {"mixture.eta": 1.0}),
  "sampled_rows": ({"mixture.rows": "sampled"}, {}),
  "batch64": ({"train.batch_size": 64}, {}),
}
COLUMNS = ["variant", "setting", "seeds", "stratified_ppl", "diff", "ci_low", "ci_high", "p_move_max"]


def spec(scale: str, sets: dict, seeds: list[int], variant: str, data_dir: str) -> dict:
  """One sweep: stratified and Aioli per setting, vectorised over seeds, with the variant's overrides."""
  both, aioli_only = VARIANTS[variant]
  runs = []
  for setting, groups in sets.items():
    for method, mix, extra in (
      ("stratified", dict(method="stratified"), {}),
      ("aioli", A.aioli_mixture(scale, len(groups)), aioli_only),
    ):
      runs.append(
        {
          "name": f"{setting}/{method}",
          "config": A._card(scale, setting),
          "set": A._mix(mix) | both | extra,
          "labels": {"setting": setting, "method": method, "variant": variant},
        }
      )
  common = {"config": A._card(scale, next(iter(sets))), "set": {"data.data_dir": data_dir}}
  return common | {"runs": runs, "axes": {"seed": seeds}, "vectorise": "auto"}


def p_move(workdir: str) -> float:
  """The largest distance of p from uniform logged between LearnParams phases (what Aioli trains on)."""
  r = A.aioli_rounds(workdir)
  p = r["p_between"]
  return float(np.abs(p - 1.0 / p.shape[1]).max()) if len(p) else 0.0


def rows(sweep, sets: dict, seeds: list[int], variant: str) -> list[dict]:
  out = []
  for setting, groups in sets.items():
    names = list(groups)
    diffs, strat, moves = [], [], []
    for seed in seeds:
      s = A.summary(sweep.workdir(f"{setting}/stratified", seed), names)["test_avg_ppl"]
      wd = sweep.workdir(f"{setting}/aioli", seed)
      diffs.append(A.summary(wd, names)["test_avg_ppl"] - s)
      strat.append(s)
      moves.append(p_move(wd))
    d, lo, hi = A.t_ci(diffs)
    out.append(dict(zip(COLUMNS, (variant, setting, len(seeds), float(np.mean(strat)), d, lo, hi, float(np.max(moves))))))
  return out


def markdown(df) -> str:
  sets = list(dict.fromkeys(df.setting))
  lines = [
    "| variant | " + " | ".join(sets) + " | largest move of p from uniform (" + " / ".join(sets) + ") |",
    "|" + "---|" * (len(sets) + 2),
  ]
  for variant, g in df.groupby("variant", sort=False):
    g = g.set_index("setting")
    cells = [f"{g.loc[s, 'diff']:+.3f} [{g.loc[s, 'ci_low']:+.3f}, {g.loc[s, 'ci_high']:+.3f}]" for s in sets]
    moves = " / ".join(f"{g.loc[s, 'p_move_max']:.3f}" for s in sets)
    lines.append(f"| {variant} | " + " | ".join(cells) + f" | {moves} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="output directory (one subdirectory per variant, diagnostics.csv)")
  ap.add_argument("--variant", required=True, help=f"comma-separated, of {sorted(VARIANTS)}")
  ap.add_argument("--scale", default="faithful", choices=sorted(A.SCALES))
  ap.add_argument("--seeds", type=int, default=0, help="number of seeds (0 = the scale's default)")
  ap.add_argument("--settings", default="", help="comma-separated subset of settings (default: all but the control)")
  ap.add_argument("--data_dir", default="", help="the groups' built data (default DIR/data; an Aioli study's DIR/data works)")
  ap.add_argument("--jobs", type=int, default=1, help="training jobs at once, each its own process")
  a = ap.parse_args(argv)
  import pandas as pd

  from experiments.sweep import Sweep
  from lib import metrics as MX

  MX.quiet_logs()
  try:
    variants = a.variant.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
      raise LmtraceError(f"--variant names unknown variants {unknown}; valid: {sorted(VARIANTS)}")
    sets = {k: v for k, v in A.settings(a.scale).items() if k != "identical"}
    if a.settings:
      bad = sorted(set(a.settings.split(",")) - set(sets))
      if bad:
        raise LmtraceError(f"--settings names unknown settings {bad}; this scale has {sorted(sets)}")
      sets = {k: v for k, v in sets.items() if k in a.settings.split(",")}
    seeds = list(range(a.seeds or A.SCALES[a.scale]["seeds"]))
    out = os.path.abspath(a.out)
    data_dir = os.path.abspath(a.data_dir) if a.data_dir else os.path.join(out, "data")
    log = lambda msg: print(f"aioli_diagnostics: {msg}", flush=True)  # noqa: E731
    table = []
    for v in variants:
      sw = Sweep.from_dict({"name": v, **spec(a.scale, sets, seeds, v, data_dir)}, os.path.join(out, v), finished=A.finished)
      sw.run(log=log, jobs=a.jobs)
      table += rows(sw, sets, seeds, v)
  except LmtraceError as e:
    print(f"aioli_diagnostics: error: {e}", file=sys.stderr)
    return 2
  df = pd.DataFrame(table, columns=COLUMNS)
  path = os.path.join(out, "diagnostics.csv")
  if os.path.exists(path):  # keep the rows of variants run before, replacing those rerun now
    old = pd.read_csv(path)
    df = pd.concat([old[~old.variant.isin(variants)], df], ignore_index=True)
  df.to_csv(path, index=False, float_format="%.6g")
  print(markdown(df))
  return 0


if __name__ == "__main__":
  sys.exit(main())
