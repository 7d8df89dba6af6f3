"""Load a sweep directory (experiments/sweep.py) as one DataFrame: swept axes joined to results.

  from analysis import load_sweep
  runs = load_sweep("sweeps/demo", table="runs")   # one row per run: axes + final metrics
  df = load_sweep("sweeps/demo")                    # every analysis table's rows, each joined to its run

Columns: the swept axes (`seed` always), `run` (workdir relative to the sweep), `workdir`, `diverged`,
`final/<metric>` (the last logged value of each metric in metrics.jsonl, e.g. `final/eval/loss`,
`final/step`), and for analysis rows `table` (the parquet's name under W/analysis/) with that table's
own columns.
"""

from __future__ import annotations

import glob
import json
import math
import os

import pandas as pd

from lib import errors

SWEEP_JSON = "sweep.json"


def _final_metrics(workdir: str) -> dict:
  out: dict = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      for k, v in row.items():
        if k == "time":
          continue
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
          out[f"final/{k}"] = v
  return out


def sweep_runs(directory: str) -> list[dict]:
  """[{'workdir': abs path, 'run': rel path, **point}] of the sweep in `directory`."""
  path = os.path.join(directory, SWEEP_JSON)
  if not os.path.exists(path):
    raise errors.AnalysisError(
      f"{directory} holds no {SWEEP_JSON}: not a sweep directory (python -m experiments.sweep FILE --out=DIR)"
    )
  with open(path) as f:
    sw = json.load(f)
  return [{"run": r["workdir"], "workdir": os.path.join(directory, r["workdir"]), **r["point"]} for r in sw["runs"]]


def load_sweep(directory: str, table: str = "all") -> pd.DataFrame:
  """The sweep's runs (table='runs'), one analysis table ('flatness', 'token_metrics', ...) or all of them.

  With 'all', every analysis table present is stacked (a `table` column names it) and each row carries its
  run's axes and final metrics; a run without any analysis table still appears once (table = None).
  """
  rows = []
  for r in sweep_runs(directory):
    row = dict(r)
    row["diverged"] = os.path.exists(os.path.join(r["workdir"], "diverged.json"))
    row.update(_final_metrics(r["workdir"]))
    rows.append(row)
  runs = pd.DataFrame(rows)
  if table == "runs":
    return runs
  parts = []
  for row in rows:
    found = sorted(glob.glob(os.path.join(row["workdir"], "analysis", "*.parquet")))
    names = {os.path.splitext(os.path.basename(p))[0]: p for p in found}
    if table != "all":
      names = {k: v for k, v in names.items() if k == table}
    for name, p in names.items():
      t = pd.read_parquet(p)
      clash = [c for c in t.columns if c in row]
      t = t.rename(columns={c: f"{name}/{c}" for c in clash})
      t.insert(0, "table", name)
      for k in reversed(list(row)):
        t.insert(0, k, [row[k]] * len(t))
      parts.append(t)
    if table == "all" and not names:
      parts.append(pd.DataFrame([dict(row, table=None)]))
  if not parts:
    if table != "all":
      raise errors.AnalysisError(f"no run of sweep {directory} has analysis/{table}.parquet")
    return runs
  return pd.concat(parts, ignore_index=True)
