"""k seeds trained as one vectorised program vs one after another: wall-time ratio, in one run.

  python -m bench.vectorised [--k=5] [--steps=200] [--presets=nano,tiny]

Both sides run the full trainer (`train.train_and_evaluate`: data, eval, logging, checkpoints) on the
bigram language with 16x64 batches; compilation is included on both sides (the sequential runs pay it
k times unless the persistent cache hits, which it does here for runs 2..k, so it is disabled for both).
Target: ratio <= 0.5 on a CPU (tiny models are overhead-bound, so k runs share one dispatch per step).
It also prints the ratio of process CPU time, which is steadier than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import jax

import train
from configs import base
from lib import metrics as MX


def cfg_for(preset: str, steps: int, data_dir: str, **over):
  c = base.defaults()
  c.model = base.model_config(preset)
  c.model.vocab_size = -1
  c.data.data_dir = data_dir
  c.train.steps = steps
  c.train.log_every = 50
  c.eval.every = steps
  c.ckpt.schedule = f"explicit:steps={steps}"
  c.ckpt.resume_every = steps
  c.log.tensorboard = False
  for k, v in over.items():
    node = c
    *path, key = k.split(".")
    for p in path:
      node = node[p]
    node[key] = v
  return c


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--k", type=int, default=5)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--presets", default="nano,tiny")
  a = ap.parse_args()
  MX.quiet_logs()
  jax.config.update("jax_enable_compilation_cache", False)
  root = tempfile.mkdtemp(prefix="bench_vec_")
  data_dir = os.path.join(root, "tfds")
  seeds = list(range(a.k))
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; loadavg {open('/proc/loadavg').read().split()[:3]}")
  train.train_and_evaluate(cfg_for("nano", 2, data_dir), os.path.join(root, "warm"))  # builds the dataset once
  try:
    for preset in a.presets.split(","):
      t0, c0 = time.perf_counter(), time.process_time()
      for s in seeds:
        train.train_and_evaluate(cfg_for(preset, a.steps, data_dir, seed=s), os.path.join(root, f"{preset}_seq_{s}"))
      t_seq, c_seq = time.perf_counter() - t0, time.process_time() - c0
      t0, c0 = time.perf_counter(), time.process_time()
      train.train_and_evaluate(
        cfg_for(preset, a.steps, data_dir, **{"train.seeds": ",".join(map(str, seeds))}), os.path.join(root, f"{preset}_vec")
      )
      t_vec, c_vec = time.perf_counter() - t0, time.process_time() - c0
      print(
        f"RESULT {preset}: k={a.k} x {a.steps} steps: sequential {t_seq:.1f} s, vectorised {t_vec:.1f} s, "
        f"ratio {t_vec / t_seq:.2f} (target <= 0.5); process CPU time {c_seq:.1f} s vs {c_vec:.1f} s, ratio {c_vec / c_seq:.2f}; "
        f"loadavg {open('/proc/loadavg').read().split()[:3]}",
        flush=True,
      )
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
