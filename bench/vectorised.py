"""k seeds trained as one vectorised program vs one after another: wall-time ratio, in one run.

  python -m bench.vectorised [--k=5] [--steps=200] [--presets=nano,tiny] [--repeats=1] [--breakdown]

Both sides run the full trainer (`train.train_and_evaluate`: data, eval, logging, checkpoints) on the
bigram language with 16x64 batches, each run with its own data order (data.seed=-1); the sequential side is
k ordinary single runs exactly as a user runs them. Compilation is included on both sides (the sequential
runs would pay it k times unless the persistent cache hits, which it does here for runs 2..k, so it is
disabled for both). Target: ratio <= 0.5 on a CPU. It also prints the ratio of process CPU time, which is
steadier than wall time on a shared machine, and the load average before and after each measurement.
`--repeats=N` interleaves N (sequential, vectorised) pairs and prints every pair's ratio and the median.
`--breakdown` prints where each side's wall time went (phase timers; phases nest, see `PHASES`).
`--step_costs` only times one jitted train step (random 16x64 batch, after compilation): a single run's vs
the k-run group's under `map` and `vmap`, wall and CPU ms per step, and counts the batched dots in each
compiled program (why `vmap` costs about 2x on XLA:CPU: every weight matmul becomes a batched dot).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import statistics
import tempfile
import time

import jax

import train
from configs import base
from lib import metrics as MX

# (label, events): wall time of the trainer's phases, from jax.monitoring duration events (the trainer
# reports '/lmtrace/<phase>' through lib.trainloop.timed; JAX reports each XLA compilation); phases nest
PHASES = [
  ("dataset open (make_groups)", ("/lmtrace/open_data",)),
  ("training split decode (Pipeline init)", ("/lmtrace/pipeline",)),
  ("XLA compile (all programs)", ("/jax/core/compile/backend_compile_duration",)),
  ("loop total", ("/lmtrace/loop",)),
  ("  step: batch wait + dispatch (incl. compile)", ("/lmtrace/train",)),
  ("  logging (incl. device sync)", ("/lmtrace/log",)),
  ("  checkpoint saves, host part", ("/lmtrace/save",)),
  ("  evals (incl. compile)", ("/lmtrace/hook/eval", "/lmtrace/hook/test")),
  ("checkpoint wait/close at exit", ("/lmtrace/ckpt_close",)),
]


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


class Timers:
  """Sums the PHASES' durations from jax.monitoring's duration events while registered."""

  def __init__(self):
    self.acc = collections.defaultdict(float)
    self.label = {e: label for label, events in PHASES for e in events}
    jax.monitoring.register_event_duration_secs_listener(self._on)

  def _on(self, event: str, duration: float, **kw) -> None:
    if event in self.label:
      self.acc[self.label[event]] += duration

  def reset(self):
    self.acc.clear()

  def restore(self):
    jax.monitoring.unregister_event_duration_listener(self._on)


def load() -> str:
  return " ".join(open("/proc/loadavg").read().split()[:3])


def measure(preset, a, data_dir, root, tag, timers):
  """(wall, cpu, breakdown) of k sequential runs and of the vectorised group."""
  out = {}
  seeds = list(range(a.k))
  for side in ("sequential", "vectorised"):
    if timers:
      timers.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    if side == "sequential":
      for s in seeds:
        train.train_and_evaluate(cfg_for(preset, a.steps, data_dir, seed=s), os.path.join(root, f"{preset}_{tag}_seq_{s}"))
    else:
      over = {"train.seeds": ",".join(map(str, seeds)), "train.seeds_mode": a.mode}
      train.train_and_evaluate(cfg_for(preset, a.steps, data_dir, **over), os.path.join(root, f"{preset}_{tag}_vec"))
    out[side] = (time.perf_counter() - t0, time.process_time() - c0, dict(timers.acc) if timers else {})
  return out


def print_breakdown(preset, res):
  (ts, _, bs), (tv, _, bv) = res["sequential"], res["vectorised"]
  print(f"BREAKDOWN {preset} (wall s; phases nest)              sequential  vectorised")
  print(f"  {'total':46s} {ts:9.1f}  {tv:9.1f}")
  for label, _ in PHASES:
    print(f"  {label:46s} {bs.get(label, 0.0):9.1f}  {bv.get(label, 0.0):9.1f}")


def step_costs(presets: str, k: int, n: int = 100) -> None:
  """Per-step wall/CPU ms of one run's step vs the k-run group's (`map`, `vmap`) and their batched-dot counts."""
  import re

  import jax.numpy as jnp
  from flax import linen as nn

  from lib import model as M
  from lib import multirun, optim, steps

  for preset in presets.split(","):
    mcfg = M.ModelConfig(**{**vars(M.ModelConfig.from_config(base.model_config(preset))), "vocab_size": 20})
    model = M.make(mcfg)
    tx, sched = optim.make_optimizer(base.defaults().opt, 200)

    def init(key, model=model, mcfg=mcfg, tx=tx):
      p = nn.unbox(model.init(key, *(M.dummy_batch(mcfg, 1, 8)[f] for f in ("inputs", "positions", "segment_ids")))["params"])
      return {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32), "rng": key}

    toks = jax.random.randint(jax.random.PRNGKey(3), (16, 65), 0, 20)
    b = dict(M.dummy_batch(mcfg, 16, 64), inputs=toks[:, :-1], targets=toks[:, 1:])
    kw = dict(model=model, tx=tx, schedule=sched)
    cases = {"single": (jax.jit(functools.partial(steps.train_step, **kw)), init(jax.random.PRNGKey(0)), b)}
    group = multirun.stack([init(jax.random.PRNGKey(s)) for s in range(k)])
    for mode in ("map", "vmap"):
      f = jax.jit(functools.partial(multirun.group_train_step, shared_batch=False, mode=mode, **kw))
      cases[mode] = (f, group, tuple(b for _ in range(k)))
    for name, (f, state, batch) in cases.items():
      exe = f.lower(state, batch).compile()
      dots = [ln for ln in exe.as_text().splitlines() if " dot(" in ln]
      batched = sum(bool(re.search(r"lhs_batch_dims=\{[^}]", ln)) for ln in dots)
      state, m = exe(state, batch)
      jax.block_until_ready(m)
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(n):
        state, m = exe(state, batch)
      jax.block_until_ready(m)
      w, c = (time.perf_counter() - t0) / n * 1e3, (time.process_time() - c0) / n * 1e3
      per = "" if name == "single" else f"; per run {c / k:.2f} ms CPU"
      print(
        f"STEP {preset} {name:6s}: {w:7.2f} ms wall, {c:7.2f} ms CPU per step{per}; {batched}/{len(dots)} dots batched",
        flush=True,
      )
  print(f"loadavg {load()}")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--k", type=int, default=5)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--presets", default="nano,tiny")
  ap.add_argument("--repeats", type=int, default=1, help="interleaved (sequential, vectorised) pairs per preset")
  ap.add_argument("--mode", default="auto", help="train.seeds_mode of the vectorised side")
  ap.add_argument("--breakdown", action="store_true", help="print where each side's wall time went")
  ap.add_argument("--step_costs", action="store_true", help="only time one train step: single vs group (map, vmap)")
  a = ap.parse_args()
  MX.quiet_logs()
  if a.step_costs:
    return step_costs(a.presets, a.k)
  jax.config.update("jax_enable_compilation_cache", False)
  root = tempfile.mkdtemp(prefix="bench_vec_")
  data_dir = os.path.join(root, "tfds")
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; loadavg {load()}")
  train.train_and_evaluate(cfg_for("nano", 2, data_dir), os.path.join(root, "warm"))  # builds the dataset once
  timers = Timers() if a.breakdown else None
  lines = []
  try:
    for preset in a.presets.split(","):
      ratios, cpu_ratios = [], []
      for r in range(a.repeats):
        l0 = load()
        res = measure(preset, a, data_dir, root, str(r), timers)
        (ts, cs, _), (tv, cv, _) = res["sequential"], res["vectorised"]
        ratios.append(tv / ts)
        cpu_ratios.append(cv / cs)
        line = (
          f"RESULT {preset}: k={a.k} x {a.steps} steps: sequential {ts:.1f} s, vectorised {tv:.1f} s, "
          f"ratio {tv / ts:.2f} (target <= 0.5); process CPU time {cs:.1f} s vs {cv:.1f} s, ratio {cv / cs:.2f}; "
          f"loadavg before {l0}, after {load()}"
        )
        print(line, flush=True)
        lines.append(line)
        if timers:
          print_breakdown(preset, res)
      if a.repeats > 1:
        line = (
          f"MEDIAN {preset} over {a.repeats} interleaved pairs: wall ratio {statistics.median(ratios):.2f} "
          f"({', '.join(f'{x:.2f}' for x in ratios)}), CPU-time ratio {statistics.median(cpu_ratios):.2f}"
        )
        print(line, flush=True)
        lines.append(line)
    print("\n".join(lines))
  finally:
    if timers:
      timers.restore()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
