"""Per-token loss trajectories: the surprisal of fixed probe tokens at every checkpoint of a run (CLI).

  python -m analysis.trajectories --workdir=runs/a [--workdir=runs/b ...] [--steps=all|0,100,...]
      [--sequences=N --positions=K --probe_seed=S] [--batch_size=64] [--prefetch=2] [--mesh=data,fsdp,tensor]
      [--metrics [--unit=nats|bits] [--ngram_n=5]]

The pieces live in their own modules; this one is the command line and re-exports their names:
  analysis/probe_store.py  the store format (probe sets, per-checkpoint records, invalid markers)
  analysis/probes.py       the probe engine: probe sets, packed surprisal, ProbeHook, `extract`
  analysis/token_table.py  the per-token table (curve metrics + n-gram predictors) and Chang's
                           regressions
  analysis/load.py         the loaders (`load_trajectories` -> xarray [run, step, token])

A checkpoint that cannot be restored or whose surprisals are not finite is skipped, listed, and
recorded invalid in the store with its reason (a rerun retries it).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

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


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m analysis.trajectories", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", action="append", required=True, help="run directory (repeat for several runs)")
  p.add_argument("--name", action="append", help="run name per --workdir (default: the workdir's basename)")
  p.add_argument("--steps", default="all", help="'all' or comma-separated steps")
  p.add_argument("--sequences", type=int, help="probe documents per group (default: the run's probes.sequences)")
  p.add_argument("--positions", type=int, help="random positions per document, 0 = all (default: probes.positions)")
  p.add_argument("--probe_seed", type=int, help="probe selection seed (default: probes.seed)")
  p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH, help="rows per forward pass")
  p.add_argument(
    "--prefetch", type=int, default=2, help="checkpoints restored ahead in threads (each holds a copy of the params)"
  )
  p.add_argument("--mesh", default="", help="data,fsdp,tensor sizes (default: one device)")
  p.add_argument("--store", default=STORE, help="store name under W/analysis/")
  p.add_argument("--metrics", action="store_true", help="also write W/analysis/token_metrics.parquet (first W)")
  p.add_argument("--unit", choices=("nats", "bits"), default="nats", help="unit of the printed losses and metrics")
  p.add_argument("--freq_docs", type=int, default=100_000, help="training documents counted for log_freq and n-grams")
  p.add_argument("--ngram_n", type=int, default=DEFAULT_NGRAM_N, help="n-gram predictors n=1..N joined by --metrics (0: none)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  a = p.parse_args(argv)
  if a.ngram_n < 0 or a.freq_docs < 1 or a.batch_size < 1 or a.prefetch < 1:
    p.error("--ngram_n must be >= 0, --freq_docs, --batch_size and --prefetch >= 1")
  MX.quiet_logs()  # orbax and tfds log every read at INFO
  sharding.enable_compilation_cache()
  kept = "the store keeps every checkpoint stored so far: rerun the same command to add the rest"
  with errors.one_line_interrupt("lmtrace trajectories", kept):
    return _main(a)


def _main(a) -> int:
  try:
    spec = {"sequences": a.sequences, "positions": a.positions, "seed": a.probe_seed}
    rep = extract(
      a.workdir,
      steps=a.steps,
      spec=spec,
      batch_size=a.batch_size,
      mesh=sharding.mesh_from_flag(a.mesh),
      names=a.name,
      store=a.store,
      progress=not a.quiet,
      prefetch=a.prefetch,
    )
    scale = 1.0 / math.log(2.0) if a.unit == "bits" else 1.0
    for name, w in rep.workdirs.items():
      st = Store.of(w, a.store)
      rows = [st.row(s) for s in st.steps()]
      last = f", last step {rows[-1]['step']}: probe loss {rows[-1]['probe_loss'] * scale:.4f} {a.unit}" if rows else ""
      bad = st.invalid()
      inval = f", {len(bad)} invalid (steps {[r['step'] for r in bad]}; rerun retries them)" if bad else ""
      print(f"{name}: {len(rows)} checkpoints stored ({len(rep.computed[name])} new){inval}{last} -> {st.dir}")
    if rep.skipped:
      print(f"skipped {len(rep.skipped)} checkpoint(s):")
      for w, s, why in rep.skipped:
        print(f"  {w} step {s}: {why}")
    if a.metrics:
      df, path = write_token_metrics(a.workdir, unit=a.unit, store=a.store, freq_docs=a.freq_docs, ngram_n=a.ngram_n)
      print(f"token metrics for {len(df)} probe tokens -> {path}")
  except errors.LmtraceError as e:
    print(f"lmtrace trajectories: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
