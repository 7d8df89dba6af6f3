"""The AOT table: every OPT run card on several TPU slices, each at its first setting that fits.

  tpuvenv/bin/python -m bench.aot_table [--presets=opt-125m,opt-1.3b] [--topologies=v5e:4x4,v5p:4x4x4] [--csv=FILE]

For each (card, topology) it compiles the train step (bench/aot.py's compile_one) with the memory-saving
setting this project recommends for large cards (pure FSDP, remat, scanned layers, loss and attention
made 512 positions at a time) at the topology's global batch (GLOBAL_BATCH rows of 2048 tokens), with 1,
2, 4, 8 micro-batches in turn, and stops at the first that fits (fewer micro-batches are never slower on
this roofline). Prints one markdown row per cell and, with --csv, the same rows as CSV. A cell whose
8 micro-batches do not fit says so with the last compile's memory. Needs libtpu (docs/aot.md).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time

from bench import aot

PRESETS = ("opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b")
TOPOLOGIES = ("v5e:4x4", "v5e:16x16", "v5p:4x4x4", "v4:4x4x4")
GLOBAL_BATCH = {"v5e:4x4": 256, "v5e:16x16": 1024, "v5p:4x4x4": 512, "v4:4x4x4": 512}  # rows of 2048 tokens
SEQ_LEN = 2048
COLUMNS = ["card", "topology", "batch", "micro_batches", "fits", "memory_gib", "hbm_gib", "step_s", "binding", "mfu", "compile_s"]


def cell(card: str, topology: str, batch: int, chunk: int = aot.CHUNK) -> dict:
  """The first of 1, 2, 4, 8 micro-batches that fits, for one card on one topology."""
  gen, _ = aot.parse_topology(topology)
  chip, n = aot.per_device(aot.CHIPS[gen], gen), aot.device_count(topology)
  row = {}
  for accum in (1, 2, 4, 8):
    cfg = aot.load_card(f"configs/opt.py:{card}")
    s = aot.Setting((1, n, 1), True, accum, chunk, chunk, True)
    try:
      aot.check_setting(s, n, batch, cfg.model.n_heads, cfg.model.d_ff)
    except aot.errors.ShardingError:
      continue
    t0 = time.time()
    r = aot.compile_one(cfg, topology, s, batch, SEQ_LEN, chip)
    mem = r.memory.get("total", float("nan")) / aot.GiB
    row = dict(
      card=card, topology=topology, batch=batch, micro_batches=accum, fits=r.fits, memory_gib=round(mem, 2),
      hbm_gib=round(chip.hbm / aot.GiB, 2), step_s=round(r.step_s, 3) if r.fits else None, binding=r.binding if r.fits else "",
      mfu=round(r.model_flops / (chip.peak * r.step_s), 3) if r.fits else None, compile_s=round(time.time() - t0),
    )  # fmt: skip
    if r.error:
      row["binding"] = r.error[:120]
    if r.fits:
      break
  return row


def markdown_row(r: dict) -> str:
  if not r:
    return ""
  if r["fits"]:
    what = f"**{r['memory_gib']:.2f} GiB, fits** ({r['micro_batches']} micro-batch{'es' if r['micro_batches'] > 1 else ''})"
    perf = f"{r['step_s']:.3f} s ({r['binding']}) | {r['mfu']:.0%}"
  else:
    what = f"does not fit at {r['micro_batches']} micro-batches ({r['memory_gib']:.2f} GiB; {r['binding']})"
    perf = "- | -"
  head = f"| {r['card']} | {r['topology']} | {r['batch']} x {SEQ_LEN}"
  return f"{head} | {what} of {r['hbm_gib']:.2f} | {perf} | {r['compile_s']} s |"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--presets", default=",".join(PRESETS))
  ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
  ap.add_argument("--csv", default="", help="also write the rows here")
  a = ap.parse_args(argv)
  try:
    aot._check_libtpu()
  except aot.errors.LmtraceError as e:
    print(f"lmtrace: error: {e}", file=sys.stderr)
    return 2
  print("| card | topology | global batch | per-device memory of HBM (GiB) | roofline step (binding) | modelled MFU | compile |")
  print("|---|---|---|---|---|---|---|")
  rows = []
  for topology in a.topologies.split(","):
    for card in a.presets.split(","):
      r = cell(card, topology, GLOBAL_BATCH.get(topology, 256))
      rows.append(r)
      print(markdown_row(r), flush=True)
  if a.csv:
    with open(a.csv, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=COLUMNS)
      w.writeheader()
      w.writerows(r for r in rows if r)
  return 0


if __name__ == "__main__":
  sys.exit(main())
