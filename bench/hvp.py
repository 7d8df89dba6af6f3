"""HVP cost relative to a gradient, on the project's transformer (`lib.model`).

  python -m bench.hvp                                  # tiny and opt-125m presets, 4x128 tokens
  python -m bench.hvp --presets=small --batch=8 --seq_len=256 --reps=7

Every computation is one jitted, fp32 function of (params, probe) on the same batch, compiled before
timing; the rows are timed round-robin for `--reps` rounds and each ratio is the median over rounds
of (row time / loss+grad time in the same round). Rows:
  loss+grad           jax.value_and_grad                                 (the unit)
  HVP fwd-over-rev    jax.jvp(jax.grad(f)): analysis.hessian.hvp / make_hvp (what the estimators use)
  HVP rev-over-fwd    jax.grad(lambda p: jax.jvp(f, (p,), (v,))[1])      (for comparison)
  HVP per probe, amortised  hutchinson_trace's path: one jax.linearize of the gradient per batch, then
                      `--probes` tangents through it (per-probe time, linearisation included)
XLA's FLOP count for each (cost_analysis) is printed next to the time: the portable number. For matmul
layers a lone HVP needs 8 matmul units against the gradient's 3 (primal forward and input-cotangent pass,
2 + 2 + 4 tangent terms; XLA drops the primal weight gradients): 2.67x. A probe through an existing
linearisation needs only the 6 tangent units: 2.0x, plus 2/(3·probes) for the shared linearisation.
Target: HVP / (loss+grad) ≤ 2.5.
"""

from __future__ import annotations

import argparse
import os
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from analysis import hessian as H  # noqa: E402
from lib import model as M  # noqa: E402
from lib import sharding  # noqa: E402


def interleaved_times(fns: dict, reps: int) -> dict[str, np.ndarray]:
  """Seconds per call of each `name -> (f, args)`, timed round-robin (one call of every row per round,
  after a compile + warm-up call each), so drift in the machine's speed hits all rows alike."""
  for f, args in fns.values():
    jax.block_until_ready(f(*args))
  ts = {name: [] for name in fns}
  for _ in range(reps):
    for name, (f, args) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      ts[name].append(time.perf_counter() - t0)
  return {name: np.asarray(v) for name, v in ts.items()}


def flops(f, *args) -> float:
  try:
    ca = f.lower(*args).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", float("nan")))
  except Exception:  # cost analysis is best-effort on some backends
    return float("nan")


def bench(preset: str, batch: int, seq_len: int, reps: int, probes: int, sweep: tuple[int, int] = (0, 0)) -> None:
  vocab = M.OPT_VOCAB if preset.startswith("opt") else 204
  cfg = M.preset(preset, vocab_size=vocab, max_len=max(seq_len, 16), dtype="float32")
  model = M.make(cfg)
  params = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  x_Bx1pL = np.random.default_rng(0).integers(4, vocab, (batch, seq_len + 1)).astype(np.int32)
  b = {
    "inputs": jnp.asarray(x_Bx1pL[:, :-1]),
    "targets": jnp.asarray(x_Bx1pL[:, 1:]),
    "mask": jnp.ones((batch, seq_len), jnp.int32),
    "segment_ids": jnp.ones((batch, seq_len), jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)),
  }
  loss_fn = lambda p, bb: M.mean_loss(model, p, bb)  # noqa: E731
  v = H.probe_like(jax.random.key(1), params)

  grad = jax.jit(lambda p, bb: jax.value_and_grad(loss_fn)(p, bb))
  fwd_rev = jax.jit(lambda p, v, bb: H.hvp(loss_fn, p, bb, v))
  rev_fwd = jax.jit(lambda p, v, bb: jax.grad(lambda q: jax.jvp(lambda r: loss_fn(r, bb), (q,), (v,))[1])(p))
  ggn = jax.jit(lambda p, v, bb: H.ggn_linearised(lambda q, c: M.logits(model, q, c), p, bb)(v))
  mv = H.make_hvp(loss_fn, [b])
  # hutchinson_trace's jitted body: `probes` probes through one linearisation of the gradient
  chunk = H._hutchinson_chunk(mv, params, "rademacher", None, probes, True)
  key = jax.random.key(2)
  amort = f"HVP per probe, amortised ({probes}/linearisation)"
  fns = {
    "loss+grad": (grad, (params, b)),
    "HVP fwd-over-rev": (fwd_rev, (params, v, b)),
    "HVP rev-over-fwd": (rev_fwd, (params, v, b)),
    amort: (chunk, (params, key, 0, mv.operands)),
    "GGN-vp (jvp, CE Hessian, vjp)": (ggn, (params, v, b)),
  }
  per_call = {name: 1 for name in fns} | {amort: probes}
  reps = reps if M.param_count(model) > 10_000_000 else 6 * reps  # small models: cheap rounds, more of them
  ts = interleaved_times(fns, reps)
  fl_g = flops(grad, params, b)
  print(
    f"\n{preset} ({M.param_count(model):,} params, batch {batch}x{seq_len}, fp32, {jax.devices()[0].device_kind}, "
    f"{os.cpu_count()} CPU threads, {reps} interleaved rounds; ratio = median over rounds of time / loss+grad time)"
  )
  for name, (f, args) in fns.items():
    t_med = float(np.median(ts[name])) / per_call[name]
    r = ts[name] / per_call[name] / ts["loss+grad"]
    fl = flops(f, *args) if per_call[name] == 1 else float("nan")  # a loop body is counted once: no per-probe count
    fl_txt = f"  XLA FLOPs {fl / fl_g:4.2f}x" if np.isfinite(fl) else ""
    print(f"  {name:<42s} {t_med * 1e3:9.1f} ms   ratio {np.median(r):4.2f} (range {r.min():.2f}-{r.max():.2f}){fl_txt}")
  if sweep[0]:
    per_probe = float(np.median(ts[amort])) / probes
    n_ckpt, n_probe = sweep
    print(
      f"  sweep: {n_ckpt} checkpoints x {n_probe} Hutchinson probes on this {batch}x{seq_len} batch = "
      f"{n_ckpt * n_probe * per_probe / 60:.1f} min (restores not included)"
    )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--presets", default="tiny,opt-125m")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--probes", type=int, default=8, help="probes per linearisation in the amortised row")
  ap.add_argument(
    "--matmul_precision",
    default="highest",
    help="as analysis.flatness: 'highest' = true fp32 (its default), 'default' = TF32 on GPUs",
  )
  ap.add_argument("--sweep_checkpoints", type=int, default=0, help="also print the cost of a flatness sweep")
  ap.add_argument("--sweep_probes", type=int, default=32)
  args = ap.parse_args()
  jax.config.update("jax_default_matmul_precision", args.matmul_precision)
  print(f"matmul precision: {args.matmul_precision}")
  for p in args.presets.split(","):
    bench(p.strip(), args.batch, args.seq_len, args.reps, args.probes, (args.sweep_checkpoints, args.sweep_probes))


if __name__ == "__main__":
  main()
