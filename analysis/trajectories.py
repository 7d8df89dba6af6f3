"""Per-token loss trajectories: the surprisal of fixed probe tokens at every checkpoint of a run (CLI).

  python -m analysis.trajectories --workdir=runs/a [--workdir=runs/b ...] [--steps=all|0,100,...]
      [--sequences=N --positions=K --probe_seed=S] [--batch_size=64] [--prefetch=2] [--mesh=data,fsdp,tensor]
      [--metrics [--unit=nats|bits] [--ngram_n=5]]

In Python: `run(workdirs, Job(...))` (the CLI builds the same Job from its flags). The token probe set
is fixed (document, position) pairs, shared by every workdir of a job. The pieces live in their own
modules; this one is the job and its command line, and re-exports their names:
  analysis/probe_store.py  the store format (probe sets, per-checkpoint records, invalid markers)
  analysis/probes.py       the probe engine: probe sets, packed surprisal, ProbeHook, `extract`
  analysis/token_table.py  the per-token table (curve metrics + n-gram predictors) and Chang's
                           regressions
  analysis/load.py         the loaders (`load_trajectories` -> xarray [run, step, token])

A checkpoint that cannot be restored or whose surprisals are not finite is skipped, listed, and
recorded invalid in the store with its reason (a rerun retries it).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Sequence

import pandas as pd

from analysis.jobs import Workdir, option
from analysis.probe_store import (  # noqa: F401 - re-exported
  METRICS_FILE,
  PROBES_JSON,
  PROBES_NPZ,
  ROW_FIELDS,
  STEPS_DIR,
  STORE,
  IncompatibleProbes,
  PackedRows,
  ProbeSet,
  ProbeSpec,
  Store,
  incompatibility,
  pack_rows,
  read_probe_meta,
  store_dir,
)
from analysis.probes import (  # noqa: F401 - re-exported
  DEFAULT_BATCH,
  ProbeHook,
  Report,
  SurprisalFn,
  _Restorer,
  build_probe_set,
  check_runs,
  extract,
  open_run,
  parse_steps,
)
from analysis.token_table import (  # noqa: F401 - re-exported
  DEFAULT_NGRAM_N,
  chang_regressions,
  ngram_predictors,
  unigram_counts,
  write_token_metrics,
)
from lib import errors, sharding
from lib import metrics as MX


@dataclasses.dataclass(frozen=True)
class Job:
  """Surprisals of one token probe set (fixed (document, position) pairs) at the checkpoints of one or
  more workdirs that share it; the probe spec fields left None come from the store or the run config."""

  steps: str = option("all", "'all' or comma-separated steps")
  names: tuple[str, ...] = option((), "run name per --workdir (default: the workdir's basename)", flag="name", append=True)
  sequences: int | None = option(None, "probe documents per group (default: the run's probes.sequences)")
  positions: int | None = option(None, "random positions per document, 0 = all (default: probes.positions)")
  probe_seed: int | None = option(None, "probe selection seed (default: probes.seed)")
  batch_size: int = option(DEFAULT_BATCH, "rows per forward pass")
  prefetch: int = option(2, "checkpoints restored ahead in threads (each holds a copy of the params)")
  mesh: str = option("", "data,fsdp,tensor sizes (default: one device)")
  store: str = option(STORE, "store name under W/analysis/")
  metrics: bool = option(False, "also write W/analysis/token_metrics.parquet (first W)")
  unit: str = option("nats", "unit of the printed losses and metrics", choices=("nats", "bits"))
  freq_docs: int = option(100_000, "training documents counted for log_freq and n-grams")
  ngram_n: int = option(DEFAULT_NGRAM_N, "n-gram predictors n=1..N joined by --metrics (0: none)")
  quiet: bool = option(False, "no progress bar")

  def __post_init__(self):
    if self.ngram_n < 0 or self.freq_docs < 1 or self.batch_size < 1 or self.prefetch < 1:
      raise errors.ConfigError("--ngram_n must be >= 0, --freq_docs, --batch_size and --prefetch >= 1")


def run(workdirs: Workdir | str | Sequence[Workdir | str], job: Job) -> pd.DataFrame:
  """Extracts into each workdir's store; returns the index of stored checkpoints of every run (one row per
  (run, step), `analysis.load.load_index`), with `extract`'s Report in `.attrs["report"]` and, with
  job.metrics, the token-metrics path in `.attrs["token_metrics"]`."""
  from analysis import load

  ws = [workdirs] if isinstance(workdirs, (str, Workdir)) else list(workdirs)
  paths = [w.path if isinstance(w, Workdir) else w for w in ws]
  spec = {"sequences": job.sequences, "positions": job.positions, "seed": job.probe_seed}
  rep = extract(
    paths,
    steps=job.steps,
    spec=spec,
    batch_size=job.batch_size,
    mesh=sharding.mesh_from_flag(job.mesh),
    names=list(job.names) or None,
    store=job.store,
    progress=not job.quiet,
    prefetch=job.prefetch,
  )
  frames = [load.load_index(w, job.store).assign(run=name) for name, w in rep.workdirs.items()]
  df = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else pd.DataFrame()
  df.attrs["report"] = rep
  if job.metrics:
    tm, path = write_token_metrics(paths, unit=job.unit, store=job.store, freq_docs=job.freq_docs, ngram_n=job.ngram_n)
    df.attrs["token_metrics"] = (len(tm), path)
  return df


def _report(w, df, a) -> None:
  rep = df.attrs["report"]
  scale = 1.0 / math.log(2.0) if a.unit == "bits" else 1.0
  for name, wd in rep.workdirs.items():
    st = Store.of(wd, a.store)
    rows = [st.row(s) for s in st.steps()]
    last = f", last step {rows[-1]['step']}: probe loss {rows[-1]['probe_loss'] * scale:.4f} {a.unit}" if rows else ""
    bad = st.invalid()
    inval = f", {len(bad)} invalid (steps {[r['step'] for r in bad]}; rerun retries them)" if bad else ""
    print(f"{name}: {len(rows)} checkpoints stored ({len(rep.computed[name])} new){inval}{last} -> {st.dir}")
  if rep.skipped:
    print(f"skipped {len(rep.skipped)} checkpoint(s):")
    for wd, s, why in rep.skipped:
      print(f"  {wd} step {s}: {why}")
  if "token_metrics" in df.attrs:
    n, path = df.attrs["token_metrics"]
    print(f"token metrics for {n} probe tokens -> {path}")


def _setup(a) -> None:
  MX.quiet_logs()  # orbax and tfds log every read at INFO
  sharding.enable_compilation_cache()


def main(argv: Sequence[str] | None = None) -> int:
  from analysis import jobs

  kept = "the store keeps every checkpoint stored so far: rerun the same command to add the rest"
  return jobs.main(Job, run, argv, prog="trajectories", doc=__doc__, workdirs="joint", setup=_setup, report=_report, kept=kept)


if __name__ == "__main__":
  sys.exit(main())
