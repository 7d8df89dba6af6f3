"""Checkpoint verification cost: CRC32 of a checkpoint's files (lib/integrity.py) vs its restore.

  python -m bench.ckpt_verify                        # opt-125m-sized params (0.5 GB float32), CPU
  python -m bench.ckpt_verify --preset=small --repeats=5

Saves random parameters of the preset's shapes with Orbax (as the trainer does), seals them, then
times, alternating: `integrity.verify` alone, the restore alone (StandardCheckpointer onto one
device), and both as `lib.ckpt.restore_params` runs them (verification in a thread beside the read);
prints the medians and the added cost (target: <= 5% of restore time). Both read the same just-written files, so both see the page
cache warm; on a cold cache the verification's read brings the files in for the restore that follows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from lib import integrity, sharding
from lib import model as M


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="opt-125m")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
  a = ap.parse_args()
  model = M.make(M.preset(a.preset))
  shapes, _ = M.abstract_params(model)
  mesh = sharding.single_device_mesh()
  shard = M.param_shardings(model, mesh)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s, sh: jax.device_put(rng.standard_normal(s.shape, np.float32).astype(s.dtype), sh), shapes, shard)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
    step_dir = os.path.join(tmp, "0")
    os.makedirs(step_dir)
    with ocp.StandardCheckpointer() as ck:
      ck.save(os.path.join(step_dir, "params"), params)
    t = time.perf_counter()
    integrity.seal(step_dir)
    t_seal = time.perf_counter() - t
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shard)

    def read():
      with ocp.StandardCheckpointer() as ck:
        return jax.block_until_ready(ck.restore(os.path.join(step_dir, "params"), target))

    tv, tr, tb = [], [], []
    for _ in range(a.repeats):
      t = time.perf_counter()
      assert integrity.verify(step_dir, ("params",)) == "ok"
      tv.append(time.perf_counter() - t)
      t = time.perf_counter()
      read()
      tr.append(time.perf_counter() - t)
      t = time.perf_counter()
      integrity.read_verified(step_dir, ("params",), read)  # what restore_params does
      tb.append(time.perf_counter() - t)
  v, r, b = statistics.median(tv), statistics.median(tr), statistics.median(tb)
  with open("/proc/loadavg") as f:
    load = f.read().split()[:3]
  print(
    f"ckpt_verify: {a.preset} params {nbytes / 2**20:.0f} MiB in {len(jax.tree.leaves(params))} arrays; "
    f"seal {t_seal:.3f} s; verify alone {v:.3f} s = {100 * v / r:.1f}% of restore {r:.3f} s "
    f"[{nbytes / 2**30 / v:.2f} GiB/s]; restore with verification beside it (restore_params) {b:.3f} s = "
    f"{100 * (b - r) / r:+.1f}% (medians of {a.repeats}); loadavg {' '.join(load)}"
  )


if __name__ == "__main__":
  main()
