"""HVP cost relative to a gradient: time of one forward-over-reverse HVP ÷ time of loss+gradient.

  python bench/hvp.py                          # tiny and opt-125m presets on this machine's devices
  python bench/hvp.py --presets=opt-125m --batch=8 --seq_len=512

Both are jitted, fp32, on the same batch; medians of several runs after compilation (the HVP is
`analysis.hessian.hvp`). Also the per-probe time of `hutchinson_trace` with amortised probes (one
linearisation per batch, 8 probes through the tangent map). Target: HVP / (loss+grad) ≤ 2.5.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from analysis import hessian as H  # noqa: E402
from lib import model as M  # noqa: E402
from lib import sharding  # noqa: E402


def median_time(f, *args, reps: int = 5) -> float:
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def bench(preset: str, batch: int, seq_len: int, reps: int) -> None:
  vocab = M.OPT_VOCAB if preset.startswith("opt") else 204
  cfg = M.preset(preset, vocab_size=vocab, max_len=max(seq_len, 16), dtype="float32")
  model = M.make(cfg)
  params = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  x = np.random.default_rng(0).integers(4, vocab, (batch, seq_len + 1)).astype(np.int32)
  b = {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]), "mask": jnp.ones((batch, seq_len), jnp.int32),
       "segment_ids": jnp.ones((batch, seq_len), jnp.int32),
       "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))}
  loss = lambda p: M.mean_loss(model, p, b)  # noqa: E731
  grad = jax.jit(jax.value_and_grad(loss))
  v = H.rademacher_like(jax.random.key(1), params)
  hvp = jax.jit(lambda p, v: H.hvp(lambda q, _: loss(q), p, None, v))
  t_g, t_h = median_time(grad, params, reps=reps), median_time(hvp, params, v, reps=reps)
  mv = H.make_hvp(lambda q, bb: M.mean_loss(model, q, bb), [b])
  n_probe = 8
  H.hutchinson_trace(mv, params, jax.random.key(2), n_probe, chunk=n_probe)  # compile (cached on `mv`)
  t0 = time.perf_counter()
  H.hutchinson_trace(mv, params, jax.random.key(3), n_probe, chunk=n_probe)
  t_a = (time.perf_counter() - t0) / n_probe
  print(f"{preset:>9s} ({M.param_count(model):>11,} params, batch {batch}x{seq_len}, {jax.devices()[0].device_kind}): "
        f"loss+grad {t_g * 1e3:8.1f} ms | HVP {t_h * 1e3:8.1f} ms | ratio HVP/grad {t_h / t_g:.2f} | "
        f"amortised Hutchinson {t_a * 1e3:8.1f} ms/probe (ratio {t_a / t_g:.2f}, {n_probe} probes per linearisation)")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--presets", default="tiny,opt-125m")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  for p in args.presets.split(","):
    bench(p, args.batch, args.seq_len, args.reps)


if __name__ == "__main__":
  main()
