"""Data-pipeline benchmark: batches/s produced vs batches/s the trainer consumes, per default config.

  python -m bench.pipeline                       # configs/pcfg.py, configs/hmm.py, configs/pcfg_mix.py
  python -m bench.pipeline --configs=configs/pcfg.py --batches=100

For each run card: the pipeline alone (this host's rows, packing included) in the calling thread
and through the grain iterator (background threads), each with the row-by-row reference packing
(`Pipeline.batch_reference`, the code before vectorised packing) and the vectorised packing
(`Pipeline.batch`, what the trainer uses), in one run, interleaved; the batches are checked equal.
Then the bare jitted train step of the card's model on the same batch; prints the ratio pipeline /
trainer (want >> 1: the pipeline is not the bottleneck). Note on 2 cores the two compete for the
same CPU, so the in-loop cost is also shown by bench/train_step.py's full-loop / bare ratio.
Synthetic datasets are built on first use under $LMTRACE_DATA_DIR (default ~/.cache/lmtrace/tfds).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from bench.train_step import load_config  # noqa: E402
from data import pipeline as dp  # noqa: E402
from data import sources  # noqa: E402
from lib import metrics as MX  # noqa: E402
from lib import mixture, optim, sharding, steps  # noqa: E402
from lib import model as M  # noqa: E402


def bench_one(path: str, n: int, reps: int = 3) -> None:
  cfg = load_config(path)
  groups = sources.make_groups(cfg.data)
  names = [g.name for g in groups]
  B, L = cfg.train.batch_size, cfg.data.seq_len
  pipe = dp.Pipeline(
    [sources.select_split(g, "train") for g in groups],
    seed=0,
    global_batch=B,
    seq_len=L,
    objective=cfg.data.objective,
    vocab_size=groups[0].vocab_size,
    group_names=names,
  )
  ctrl = mixture.make(cfg.mixture, names)
  st = ctrl.init()
  p_fn = (lambda s: ctrl.proportions(st, s)) if len(groups) > 1 else None
  fns = {"reference": pipe.batch_reference, "vectorised": pipe.batch}
  for s in range(3):  # warm-up, and the two agree bit for bit
    a, b = (f(s, p_fn(s) if p_fn else None) for f in fns.values())
    assert list(a) == list(b) and all(a[k].tobytes() == b[k].tobytes() for k in a), f"batches differ at step {s}"
  rates = {}
  for _ in range(reps):  # interleaved, so load changes hit both alike
    for name, f in fns.items():
      t0 = time.perf_counter()
      for s in range(n):
        b = f(s, p_fn(s) if p_fn else None)
      rates.setdefault(f"{name} direct", []).append(n / (time.perf_counter() - t0))
      it = _grain_iterator(f, 0, n + 1, p_fn, cfg.data.num_threads)  # exhausted below: no thread left running
      next(it)
      t0 = time.perf_counter()
      for _ in range(n):
        next(it)
      rates.setdefault(f"{name} grain", []).append(n / (time.perf_counter() - t0))
  med = {k: float(np.median(v)) for k, v in rates.items()}
  threaded = med["vectorised grain"]

  mcfg = M.ModelConfig(**{**vars(M.ModelConfig.from_config(cfg.model)), "vocab_size": groups[0].vocab_size})
  model = M.make(mcfg)
  tx, sched = optim.make_optimizer(cfg.opt, cfg.train.steps)
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    params = M.init_params(model, jax.random.key(0), mesh)
    state = {
      "params": params,
      "opt_state": tx.init(params),
      "step": jax.numpy.zeros((), jax.numpy.int32),
      "rng": jax.random.PRNGKey(0),
      "mixture": {},
    }
    fn = jax.jit(
      functools.partial(steps.train_step, model=model, tx=tx, schedule=sched, num_groups=len(groups)), donate_argnums=(0,)
    )
    batch = sharding.global_batch_from_local(mesh, b, B)
    state, m = fn(state, batch)
    jax.block_until_ready(m)
    k = 20
    t0 = time.perf_counter()
    for _ in range(k):
      state, m = fn(state, batch)
    jax.block_until_ready(m)
    consume = k / (time.perf_counter() - t0)
  shown = ", ".join(f"{k} {v:,.0f}" for k, v in med.items())
  print(
    f"{path}: batch {B}x{L}, {len(groups)} group(s), grain {cfg.data.num_threads} threads | batches/s (median of {reps}): "
    f"{shown} | vectorised/reference: direct {med['vectorised direct'] / med['reference direct']:.2f}x, "
    f"grain {med['vectorised grain'] / med['reference grain']:.2f}x; vectorised grain / reference direct "
    f"{med['vectorised grain'] / med['reference direct']:.2f}x | trainer consumes {consume:,.1f} steps/s | "
    f"ratio pipeline/trainer = {threaded / consume:.1f}x",
    flush=True,
  )


def _grain_iterator(fn, start: int, end: int, p_fn, num_threads: int, prefetch: int = 4):
  """Pipeline.iterator's grain dataset around any batch function (reference or vectorised)."""
  import grain

  f = (lambda s: fn(s)) if p_fn is None else (lambda s: fn(s, p_fn(s)))
  ds = grain.MapDataset.range(start, end).map(f)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="configs/pcfg.py,configs/hmm.py,configs/pcfg_mix.py")
  ap.add_argument("--batches", type=int, default=60)
  ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions; medians are printed")
  args = ap.parse_args()
  MX.quiet_logs()
  with open("/proc/loadavg") as f:
    print(f"load average before: {f.read().split()[:3]}", flush=True)
  for c in args.configs.split(","):
    bench_one(c, args.batches, args.reps)


if __name__ == "__main__":
  main()
