"""Data-pipeline benchmark: batches/s produced vs batches/s the trainer consumes, per default config.

  python -m bench.pipeline                       # configs/pcfg.py, configs/hmm.py, configs/pcfg_mix.py
  python -m bench.pipeline --configs=configs/pcfg.py --batches=100

For each run card: the pipeline alone (this host's rows, packing included) in the calling thread
and through the grain iterator (background threads), then the bare jitted train step of the card's
model on the same batch; prints the ratio pipeline / trainer (want >> 1: the pipeline is not the
bottleneck). Note on 2 cores the two compete for the same CPU, so the in-loop cost is also shown
by bench/train_step.py's full-loop / bare ratio.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax  # noqa: E402
from flax import linen as nn  # noqa: E402

from bench.train_step import load_config  # noqa: E402
from data import pipeline as dp  # noqa: E402
from data import sources  # noqa: E402
from lib import metrics as MX  # noqa: E402
from lib import mixture, optim, sharding, steps  # noqa: E402
from lib import model as M  # noqa: E402


def bench_one(path: str, n: int) -> None:
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
  pipe.batch(0, p_fn(0) if p_fn else None)
  t0 = time.perf_counter()
  for s in range(n):
    b = pipe.batch(s, p_fn(s) if p_fn else None)
  direct = n / (time.perf_counter() - t0)
  it = pipe.iterator(0, n + 8, p_fn, num_threads=cfg.data.num_threads)
  next(it)
  t0 = time.perf_counter()
  for _ in range(n):
    next(it)
  threaded = n / (time.perf_counter() - t0)

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
  print(
    f"{path}: batch {B}x{L}, {len(groups)} group(s) | pipeline {direct:,.1f} batches/s (direct), "
    f"{threaded:,.1f} (grain, {cfg.data.num_threads} threads) | trainer consumes {consume:,.1f} steps/s | "
    f"ratio pipeline/trainer = {threaded / consume:.1f}x"
  )


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", default="configs/pcfg.py,configs/hmm.py,configs/pcfg_mix.py")
  ap.add_argument("--batches", type=int, default=60)
  args = ap.parse_args()
  MX.quiet_logs()
  for c in args.configs.split(","):
    bench_one(c, args.batches)


if __name__ == "__main__":
  main()
