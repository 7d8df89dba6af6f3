"""HVP cost relative to a gradient, on the project's transformer (`lib.model`).

  python bench/hvp.py                                  # tiny and opt-125m presets, 4x128 tokens
  python bench/hvp.py --presets=small --batch=8 --seq_len=256 --reps=7

Every computation is one jitted, fp32 function of (params, probe) on the same batch, compiled before
timing; times are medians of `--reps` runs. Rows (ratio = time / jitted loss+grad):
  loss+grad           jax.value_and_grad                                 (the unit)
  HVP fwd-over-rev    jax.jvp(jax.grad(f)): analysis.hessian.hvp / make_hvp (what the estimators use)
  HVP rev-over-fwd    jax.grad(lambda p: jax.jvp(f, (p,), (v,))[1])      (for comparison)
  HVP per probe, amortised  hutchinson_trace's path: one jax.linearize of the gradient per batch, then
                      `--probes` tangents through it (per-probe time, linearisation included)
XLA's FLOP count for each (cost_analysis) is printed next to the time: it is the portable number, CPU
times overstate the backward pass. Target: HVP / (loss+grad) ≤ 2.5 (theory for matmul nets: ≈3x FLOPs).
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


def median_time(f, *args, reps: int) -> float:
  jax.block_until_ready(f(*args))  # compile + warm up
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def flops(f, *args) -> float:
  try:
    ca = f.lower(*args).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", float("nan")))
  except Exception:  # cost analysis is best-effort on some backends
    return float("nan")


def bench(preset: str, batch: int, seq_len: int, reps: int, probes: int) -> None:
  vocab = M.OPT_VOCAB if preset.startswith("opt") else 204
  cfg = M.preset(preset, vocab_size=vocab, max_len=max(seq_len, 16), dtype="float32")
  model = M.make(cfg)
  params = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  x_Bx1pL = np.random.default_rng(0).integers(4, vocab, (batch, seq_len + 1)).astype(np.int32)
  b = {"inputs": jnp.asarray(x_Bx1pL[:, :-1]), "targets": jnp.asarray(x_Bx1pL[:, 1:]),
       "mask": jnp.ones((batch, seq_len), jnp.int32), "segment_ids": jnp.ones((batch, seq_len), jnp.int32),
       "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))}
  loss_fn = lambda p, bb: M.mean_loss(model, p, bb)  # noqa: E731
  v = H.probe_like(jax.random.key(1), params)

  grad = jax.jit(lambda p, bb: jax.value_and_grad(loss_fn)(p, bb))
  fwd_rev = jax.jit(lambda p, v, bb: H.hvp(loss_fn, p, bb, v))
  rev_fwd = jax.jit(lambda p, v, bb: jax.grad(lambda q: jax.jvp(lambda r: loss_fn(r, bb), (q,), (v,))[1])(p))
  rows = [("loss+grad", grad, (params, b), 1), ("HVP fwd-over-rev", fwd_rev, (params, v, b), 1),
          ("HVP rev-over-fwd", rev_fwd, (params, v, b), 1)]
  mv = H.make_hvp(loss_fn, [b])
  amortised = lambda p: H.hutchinson_trace(mv, p, jax.random.key(2), probes, chunk=probes).estimate  # noqa: E731
  results = {}
  for name, f, args, n in rows:
    results[name] = (median_time(f, *args, reps=reps) / n, flops(f, *args))
  results[f"HVP per probe, amortised ({probes}/linearisation)"] = (median_time(amortised, params, reps=reps) / probes,
                                                                    float("nan"))
  t_g, f_g = results["loss+grad"]
  print(f"\n{preset} ({M.param_count(model):,} params, batch {batch}x{seq_len}, fp32, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPU threads, median of {reps})")
  for name, (t, fl) in results.items():
    fl_txt = f"  XLA FLOPs {fl / f_g:4.2f}x" if np.isfinite(fl) else ""
    print(f"  {name:<42s} {t * 1e3:9.1f} ms   ratio {t / t_g:4.2f}{fl_txt}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--presets", default="tiny,opt-125m")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--probes", type=int, default=8, help="probes per linearisation in the amortised row")
  args = ap.parse_args()
  for p in args.presets.split(","):
    bench(p.strip(), args.batch, args.seq_len, args.reps, args.probes)


if __name__ == "__main__":
  main()
