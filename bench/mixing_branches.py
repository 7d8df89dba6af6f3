"""Branch sweeps forked from one state: vmap-in-scan over K copies vs one branch after another.

  python -m bench.mixing_branches   # nano model; K = 8 (Aioli LearnParams R·m = 4·2) and 11 (dynamic-law sweep)
  python -m bench.mixing_branches --preset=tiny --batch=16 --seq_len=64 --steps=4 --branches=8,11

Each branch trains `--steps` steps from the same state on its own batches (as LearnParams' perturbed
branches q^(j) and the 11-mixture dynamic-law sweeps do). Both variants are compiled first, then
timed over `--repeats` runs; prints the seconds per sweep and the speed-up, plus the largest
difference in the branches' final losses (they must agree to float tolerance).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lib import mixing_laws, sharding, steps
from lib import model as M


def sweep_inputs(preset: str, batch: int, seq_len: int, n_steps: int, K: int, vocab: int = 64):
  cfg = M.preset(preset, vocab_size=vocab, max_len=seq_len)
  model = M.make(cfg)
  params = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  tx = optax.adamw(1e-3)
  state = {
    "params": params,
    "opt_state": tx.init(params),
    "step": jnp.zeros((), jnp.int32),
    "rng": jax.random.PRNGKey(0),
    "mixture": {},
  }
  rng = np.random.default_rng(0)
  x = rng.integers(4, vocab, (n_steps, K, batch, seq_len)).astype(np.int32)
  batches = {
    "inputs": x,
    "targets": np.roll(x, -1, -1),
    "mask": np.ones_like(x),
    "segment_ids": np.ones_like(x),
    "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), x.shape).copy(),
    "group": rng.integers(0, 2, (n_steps, K, batch)).astype(np.int32),
  }
  fn = functools.partial(steps.train_step, model=model, tx=tx, schedule=lambda s: 1e-3, num_groups=2)
  return fn, state, jax.tree.map(jnp.asarray, batches)


def timed(f, repeats: int) -> tuple[float, object]:
  out = jax.block_until_ready(f())  # compile
  t = time.perf_counter()
  for _ in range(repeats):
    out = jax.block_until_ready(f())
  return (time.perf_counter() - t) / repeats, out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="nano")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq_len", type=int, default=32)
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--branches", default="8,11")
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  for K in (int(k) for k in a.branches.split(",")):
    fn, state, batches = sweep_inputs(a.preset, a.batch, a.seq_len, a.steps, K)
    tv, (_, mv) = timed(lambda: mixing_laws.run_branches(fn, state, batches, vectorise=True), a.repeats)
    ts, (_, ms) = timed(lambda: mixing_laws.run_branches(fn, state, batches, vectorise=False), a.repeats)
    diff = float(np.abs(np.asarray(mv["train/loss"]) - np.asarray(ms["train/loss"])).max())
    res = dict(
      preset=a.preset, K=K, steps=a.steps, batch=a.batch, seq_len=a.seq_len, device=jax.devices()[0].device_kind,
      vectorised_s=round(tv, 4), sequential_s=round(ts, 4), speedup=round(ts / tv, 2), max_loss_diff=diff,
    )  # fmt: skip
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
  main()
