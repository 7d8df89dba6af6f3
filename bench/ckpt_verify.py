"""Checkpoint verification cost: CRC32 of a checkpoint's files (lib/integrity.py) vs its restore.

  python -m bench.ckpt_verify                        # opt-125m-sized params (0.5 GB float32), CPU
  python -m bench.ckpt_verify --preset=small --repeats=5

Saves random parameters of the preset's shapes with Orbax (as the trainer does), seals them, then
times `integrity.verify` (what every restore adds) and `lib.ckpt.restore_params`-style restore
(StandardCheckpointer onto one device), alternating, and prints the medians and the ratio (target:
verification <= 5% of restore time). Both read the same just-written files, so both see the page
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
    tv, tr = [], []
    for _ in range(a.repeats):
      t = time.perf_counter()
      assert integrity.verify(step_dir, ("params",)) == "ok"
      tv.append(time.perf_counter() - t)
      t = time.perf_counter()
      with ocp.StandardCheckpointer() as ck:
        out = ck.restore(os.path.join(step_dir, "params"), target)
      jax.block_until_ready(out)
      tr.append(time.perf_counter() - t)
  v, r = statistics.median(tv), statistics.median(tr)
  with open("/proc/loadavg") as f:
    load = f.read().split()[:3]
  print(
    f"ckpt_verify: {a.preset} params {nbytes / 2**20:.0f} MiB in {len(jax.tree.leaves(params))} arrays; "
    f"seal {t_seal:.3f} s; verify {v:.3f} s vs restore {r:.3f} s (median of {a.repeats}) = {100 * v / r:.1f}% "
    f"[{nbytes / 2**30 / v:.2f} GiB/s verified]; loadavg {' '.join(load)}"
  )


if __name__ == "__main__":
  main()
