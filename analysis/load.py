"""One-call loaders for a notebook: analysis results of workdirs as pandas DataFrames / xarray.

  from analysis import load
  da = load.load_trajectories(["runs/s0", "runs/s1"], unit="bits")   # [run, step, token]
  df = load.load_token_metrics("runs/s0")                             # one row per probe token
  bad = load.load_invalid("runs/s0")                                  # checkpoints that could not be measured
  m = load.load_metrics("runs/s0")                                    # one row per step

Shape legend: R runs, C checkpoints (steps), T probe tokens.

Each analysis job writes its own tables under W/analysis/. This module holds the loaders of the
trainer's metrics, the trajectory store and the flatness table; the other jobs' loaders live beside
their jobs (`load_downstream` in analysis/downstream.py, `load_icl` in analysis/icl.py,
`load_generations` in analysis/generate.py, `load_sweep` in analysis/sweeps.py). `import analysis`
re-exports all of them (analysis/__init__.py's `LOADERS`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from analysis import probe_store as PS

UNITS = {"nats": 1.0, "bits": 1.0 / math.log(2.0)}


def _scale(unit: str) -> float:
  if unit not in UNITS:
    raise ValueError(f"unit must be one of {sorted(UNITS)}, got {unit!r}")
  return UNITS[unit]


# ----------------------------------------------------------------------------------------------
# Training metrics (metrics.jsonl)


def load_metrics(workdir: str) -> pd.DataFrame:
  """metrics.jsonl as one row per step (train, eval and perf rows of a step merged; when a resumed
  run logged a step twice, the later value wins), columns = the flat metric keys, sorted by step."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} has no metrics.jsonl")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows:
    return pd.DataFrame({"step": pd.Series([], dtype=np.int64)}).set_index("step", drop=False)
  df = pd.DataFrame(rows)
  df = df.groupby("step", sort=True).last()  # last non-null value per column and step
  df.insert(0, "step", df.index.astype(np.int64))
  df.index.name = None
  return df.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Per-token trajectories (analysis/trajectories.py)


def load_probes(workdir: str, store: str = PS.STORE) -> pd.DataFrame:
  """One row per probe token: doc, group, row, position, context_len, token, true_logprob (nats)."""
  return pd.DataFrame(PS.ProbeSet.load(PS.store_dir(workdir, store)).token_columns())


def load_invalid(workdir: str, store: str = PS.STORE) -> pd.DataFrame:
  """One row per checkpoint the trajectory job could not measure: step, reason (an unreadable or
  damaged checkpoint, or non-finite surprisals), source ('offline' | 'hook'), time. A rerun of
  python -m analysis.trajectories retries them; a success removes the row."""
  rows = PS.Store.of(workdir, store).invalid()
  cols = ["step", "reason", "source", "time"]
  df = pd.DataFrame(rows)
  df = df.reindex(columns=cols + [c for c in df.columns if c not in cols])
  return df.astype({"step": np.int64})


def load_index(workdir: str, store: str = PS.STORE, include_invalid: bool = False) -> pd.DataFrame:
  """One row per stored checkpoint: run, seed, n_params, step, tokens_seen, flops, probe_loss and
  probe_ppl (nats / perplexity on the probe set), source ('offline' | 'hook'), and eval_loss /
  eval_ppl from metrics.jsonl at that step where it was evaluated (else NaN). With include_invalid,
  also the checkpoints marked invalid (`load_invalid`), and columns `valid` and `reason`."""
  st = PS.Store.of(workdir, store)
  rows = [st.row(s) for s in st.steps()]
  if include_invalid:
    rows = [dict(r, valid=True, reason="") for r in rows] + [dict(r, valid=False) for r in st.invalid()]
  df = pd.DataFrame(rows)
  if df.empty:
    return df
  df = df.drop(columns=["mesh"], errors="ignore")
  try:
    m = load_metrics(workdir)
    ev = m.set_index("step")["eval/loss"] if "eval/loss" in m else pd.Series(dtype=float)
  except FileNotFoundError:
    ev = pd.Series(dtype=float)
  df["eval_loss"] = df["step"].map(ev).astype(float)
  df["eval_ppl"] = np.exp(df["eval_loss"])
  return df.sort_values("step").reset_index(drop=True)


def _unique_names(names: list[str]) -> list[str]:
  seen: dict[str, int] = {}
  out = []
  for n in names:
    seen[n] = seen.get(n, 0) + 1
    out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
  return out


def load_trajectories(
  workdirs: str | Sequence[str], unit: str = "nats", store: str = PS.STORE, steps: Sequence[int] | None = None
) -> xr.DataArray:
  """Probe surprisal of one or several runs as a DataArray [run, step, token] (float32, `unit`).

  Runs are aligned by step (the union of their stored steps; NaN where a run has none). Coords:
  per run `workdir`, `seed`, `n_params`; per (run, step) `tokens_seen`, `flops`, `val_loss` (mean
  probe surprisal, `unit`), `val_ppl` (probe perplexity), `eval_loss` (nats, metrics.jsonl) and
  `eval_ppl`; per token `doc`, `group`, `position`, `context_len`, `token` (target id) and
  `true_surprisal` (exact -log p in `unit`, NaN if unknown). Runs with other probe sets are refused.
  Checkpoints marked invalid (`load_invalid`) hold no values; `attrs["invalid"]` lists them as JSON
  {run: [[step, reason], ...]}.
  """
  scale = _scale(unit)
  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  stores = [PS.Store.of(w, store) for w in workdirs]
  metas = []
  for w, st in zip(workdirs, stores):
    meta = st.probe_meta()
    if meta is None:
      raise FileNotFoundError(f"{w} has no trajectory store {st.dir}; run python -m analysis.trajectories --workdir={w}")
    metas.append(meta)
    why = PS.incompatibility(metas[0], meta)
    if why:
      raise PS.IncompatibleProbes(f"cannot combine {workdirs[0]} and {w}: {why}")
  idx = [load_index(w, store) for w in workdirs]
  all_steps = sorted(set().union(*(set(i["step"]) if len(i) else set() for i in idx)))
  steps_C = np.asarray(all_steps if steps is None else sorted(set(int(s) for s in steps)), np.int64)
  R, Cn, T = len(workdirs), steps_C.size, int(metas[0]["num_tokens"])
  vals = np.full((R, Cn, T), np.nan, np.float32)
  per = {k: np.full((R, Cn), np.nan) for k in ("tokens_seen", "flops", "val_loss", "val_ppl", "eval_loss", "eval_ppl")}
  names, seeds, nparams = [], [], []
  for r, (w, st, ix) in enumerate(zip(workdirs, stores, idx)):
    names.append(str(ix["run"].iloc[0]) if len(ix) else os.path.basename(os.path.abspath(w)))
    seeds.append(int(ix["seed"].iloc[0]) if len(ix) else -1)
    nparams.append(int(ix["n_params"].iloc[0]) if len(ix) else -1)
    pos = {s: c for c, s in enumerate(steps_C.tolist())}
    for _, row in ix.iterrows():
      c = pos.get(int(row["step"]))
      if c is None:
        continue
      vals[r, c] = st.read(int(row["step"])) * scale
      per["tokens_seen"][r, c], per["flops"][r, c] = row["tokens_seen"], row["flops"]
      per["val_loss"][r, c], per["val_ppl"][r, c] = row["probe_loss"] * scale, row["probe_ppl"]
      per["eval_loss"][r, c], per["eval_ppl"][r, c] = row["eval_loss"], row["eval_ppl"]
  probes = PS.ProbeSet.load(stores[0].dir).token_columns()
  coords = {
    "run": _unique_names(names),
    "step": steps_C,
    "workdir": ("run", [os.path.abspath(w) for w in workdirs]),
    "seed": ("run", seeds),
    "n_params": ("run", nparams),
    "token": np.arange(T),
  }
  coords.update({k: (("run", "step"), v) for k, v in per.items()})
  coords.update({k: ("token", probes[k]) for k in ("doc", "group", "position", "context_len")})
  coords["token_id"] = ("token", probes["token"])
  coords["true_surprisal"] = ("token", -probes["true_logprob"].astype(np.float64) * scale)
  return xr.DataArray(
    vals,
    dims=("run", "step", "token"),
    coords=coords,
    name="surprisal",
    attrs={
      "unit": unit,
      "fingerprint": metas[0]["fingerprint"],
      "vocab_size": metas[0]["vocab_size"],
      "spec": json.dumps(metas[0]["spec"]),
      "store": store,
      "invalid": json.dumps({n: [[r["step"], r["reason"]] for r in st.invalid()] for n, st in zip(_unique_names(names), stores)}),
    },
  )


def load_token_metrics(workdir: str, path: str | None = None) -> pd.DataFrame:
  """W/analysis/token_metrics.parquet (written by `python -m analysis.trajectories --metrics`): one
  row per probe token; `.attrs` holds the runs, steps and unit it was computed from."""
  path = path or os.path.join(workdir, "analysis", PS.METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; run python -m analysis.trajectories --workdir={workdir} --metrics")
  df = pd.read_parquet(path)
  side = os.path.splitext(path)[0] + ".json"
  if os.path.exists(side):
    with open(side) as f:
      df.attrs.update(json.load(f))
  return df


# ----------------------------------------------------------------------------------------------
# Flatness (analysis/flatness.py)


def load_flatness(workdirs: str | Sequence[str], valid_only: bool = False) -> pd.DataFrame:
  """W/analysis/flatness.parquet (python -m analysis.flatness): one row per (checkpoint, estimator,
  quantity) with estimate, stderr, n_hvps, loss, tokens_seen, wall_time, valid/reason and the
  settings; several workdirs are concatenated with a `run` column."""
  if isinstance(workdirs, str):
    workdirs = [workdirs]
  frames = []
  for w in workdirs:
    path = os.path.join(w, "analysis", "flatness.parquet")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist; run python -m analysis.flatness --workdir={w}")
    df = pd.read_parquet(path)
    df.insert(0, "run", os.path.basename(os.path.normpath(w)))
    frames.append(df)
  out = pd.concat(frames, ignore_index=True).sort_values(["run", "step", "estimator", "quantity"], kind="stable")
  return out[out["valid"]].reset_index(drop=True) if valid_only else out.reset_index(drop=True)
