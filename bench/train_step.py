"""Training-step benchmark: bare jitted step vs the full loop (data + logging + async checkpoints).

  python -m bench.train_step                                   # tiny model, bigram data, CPU
  python -m bench.train_step --config=configs/pcfg.py --preset=small --steps=300
  python -m bench.train_step --preset=opt-125m --seq_len=2048 --batch=16 --dtype=bfloat16 --steps=60  # GPU MFU

Prints step time, tokens/s and MFU (6N + 12·n_layers·d_model·seq_len FLOPs per token against the
device's dense bf16 peak), and the ratio (full-loop step time) / (bare jitted step time), both
measured in this run after compilation. The full loop uses the Pythia checkpoint schedule
(0, 1, 2, 4, ..., 512, then every `--ckpt_every`) with async Orbax saves.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time

import jax  # noqa: E402
from flax import linen as nn  # noqa: E402
from ml_collections import config_flags  # noqa: E402,F401

import train  # noqa: E402
import trainer  # noqa: E402
from configs import base  # noqa: E402
from data import pipeline as dp  # noqa: E402
from data import sources  # noqa: E402
from lib import metrics as MX  # noqa: E402
from lib import model as M  # noqa: E402
from lib import optim, sharding, steps  # noqa: E402


def load_config(path: str):
  import importlib.util

  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("cfgmod", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config(arg) if arg else mod.get_config()
  return cfg.unlock() if hasattr(cfg, "unlock") else cfg


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/base.py")
  ap.add_argument("--preset", default="small")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--ckpt_every", type=int, default=100)
  ap.add_argument("--log_every", type=int, default=10)
  ap.add_argument("--skip_loop", action="store_true", help="only the bare step (e.g. for MFU on big presets)")
  args = ap.parse_args()
  MX.quiet_logs()

  cfg = load_config(args.config)
  cfg.model = base.model_config(args.preset)
  cfg.model.vocab_size = -1
  cfg.model.dtype = args.dtype
  cfg.model.remat = args.remat
  cfg.model.max_len = max(cfg.model.max_len, args.seq_len)
  cfg.data.seq_len = args.seq_len
  cfg.train.batch_size = args.batch
  cfg.train.steps = args.steps
  cfg.train.log_every = args.log_every
  cfg.eval.every = 0
  cfg.ckpt.schedule = f"pythia:every={args.ckpt_every}"
  cfg.ckpt.resume_every = args.ckpt_every
  cfg.log.tensorboard = True

  # --- bare jitted step on a batch already on device --------------------------------------------
  mesh = sharding.make_mesh(cfg.mesh)
  groups = sources.make_groups(cfg.data)
  vocab = groups[0].vocab_size
  if args.preset.startswith("opt-"):
    vocab = max(vocab, M.OPT_VOCAB)  # benchmark the published size (tokens are still in-range)
  mcfg = M.ModelConfig(**{**vars(M.ModelConfig.from_config(cfg.model)), "vocab_size": vocab})
  model = M.make(mcfg)
  tx, sched = optim.make_optimizer(cfg.opt, args.steps)
  pipe = dp.Pipeline(
    [sources.select_split(g, "train") for g in groups], seed=0, global_batch=args.batch, seq_len=args.seq_len, vocab_size=vocab
  )
  batch = sharding.global_batch_from_local(mesh, pipe.batch(0), args.batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    state_sh = trainer.state_shardings(model, tx, mesh)
    params = M.init_params(model, jax.random.key(0), mesh)
    state = {
      "params": params,
      "opt_state": jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params),
      "step": jax.numpy.zeros((), jax.numpy.int32),
      "rng": jax.random.PRNGKey(0),
      "mixture": {},
    }
    step_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, schedule=sched), donate_argnums=(0,))
    state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    n = min(args.steps, 50) if not args.skip_loop else args.steps
    t0 = time.perf_counter()
    for _ in range(n):
      state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    bare = (time.perf_counter() - t0) / n
  n_params = M.param_count(model)
  fpt = M.flops_per_token(mcfg, args.seq_len, n_params)
  tps = args.batch * args.seq_len / bare
  peak = MX.peak_flops_per_device()
  mfu = tps * fpt / (peak * jax.device_count()) if peak else float("nan")
  print(
    f"model {args.preset} ({n_params:,} params, {args.dtype}), batch {args.batch}x{args.seq_len}, "
    f"devices {jax.device_count()} x {jax.devices()[0].device_kind}"
  )
  print(
    f"bare jitted step: {bare * 1e3:.1f} ms  {tps:,.0f} tokens/s  MFU {mfu:.1%} (flops/token {fpt:.3g}, peak {peak or 'unknown'})"
  )
  if args.skip_loop:
    return
  del state

  # --- the full loop: train_and_evaluate with async checkpoints on the Pythia schedule -------------
  with tempfile.TemporaryDirectory() as w:
    cfg.model.vocab_size = vocab
    train.train_and_evaluate(cfg, w)
    rows = [json.loads(x) for x in open(os.path.join(w, "metrics.jsonl"))]
    t = {r["step"]: r["time"] for r in rows if "train/loss" in r}
    first = min(s for s in t if s >= args.log_every)  # after compilation
    loop = (t[args.steps] - t[first]) / (args.steps - first)
    n_ckpt = len(os.listdir(os.path.join(w, "checkpoints")))
  print(
    f"full loop step:  {loop * 1e3:.1f} ms  (steps {first}->{args.steps}, {n_ckpt} analysis checkpoints, "
    f"log every {args.log_every})"
  )
  print(f"ratio full-loop / bare step = {loop / bare:.3f}  (target <= 1.10)")


if __name__ == "__main__":
  main()
