"""HVP cost relative to a gradient, on the project's transformer (`lib.model`).

  python -m bench.hvp                                  # tiny and opt-125m presets, 4x128 tokens
  python -m bench.hvp --presets=small --batch=8 --seq_len=256 --reps=7 --batches=2

Every computation is one jitted, fp32 function, compiled ONCE (its FLOP count read from that compiled
object's cost_analysis) and timed round-robin for `--reps` rounds; each ratio is the median over rounds
of (row time / loss+grad time of one batch in the same round). Progress is printed as it goes. Rows:
  loss+grad           jax.value_and_grad on one batch                    (the unit)
  HVP fwd-over-rev    jax.jvp(jax.grad(f)): analysis.hessian.hvp / make_hvp (what the estimators use)
  HVP rev-over-fwd    jax.grad(lambda p: jax.jvp(f, (p,), (v,))[1])      (for comparison)
  GGN-vp              jvp of the logits, the CE Hessian in the logits, vjp
  probe, K batch(es), plain / amortised   hutchinson_trace's jitted chunk of `--probes` probes over K
                      batches, one HVP per probe and batch (amortise=False) or one jax.linearize per
                      batch shared by the chunk's probes (amortise=True); time per probe and batch.
What amortisation buys: with ONE batch nothing: the forward pass does not depend on the probe, so XLA
hoists it out of the probe loop in the plain path too (the two rows time alike). With K ≥ 2 batches the
plain path scans the batches inside the probe loop and recomputes each forward per probe; linearising
each batch once removes that, so it pays from two batches on (compare the K-batch rows).
XLA's FLOP count (cost_analysis) is printed for the loop-free rows (a loop body is counted once, so the
probe rows have none). For matmul layers a lone HVP needs 8 matmul units against the gradient's 3
(primal forward and input-cotangent pass, 2 + 2 + 4 tangent terms; XLA drops the primal weight
gradients): 2.67x; a probe through an existing linearisation needs the 6 tangent units: 2.0x.
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


def compile_rows(fns: dict, progress=print) -> dict:
  """name -> (compiled, args, XLA flops): each row lowered and compiled once, its FLOPs from that object."""
  out = {}
  for name, (f, args) in fns.items():
    progress(f"  compiling {name} ...")
    compiled = f.lower(*args).compile()
    out[name] = (compiled, args, flops(compiled))
  return out


def interleaved_times(rows: dict, reps: int, progress=print) -> dict[str, np.ndarray]:
  """Seconds per call of each compiled row, timed round-robin (one warm-up call each, then one call of
  every row per round), so drift in the machine's speed hits all rows alike."""
  for c, args, _ in rows.values():
    jax.block_until_ready(c(*args))
  ts = {name: [] for name in rows}
  for i in range(reps):
    for name, (c, args, _) in rows.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(*args))
      ts[name].append(time.perf_counter() - t0)
    if (i + 1) % max(1, reps // 5) == 0 or i + 1 == reps:
      progress(f"  timed round {i + 1}/{reps}")
  return {name: np.asarray(v) for name, v in ts.items()}


def flops(compiled) -> float:
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", float("nan")))
  except Exception:  # cost analysis is best-effort on some backends
    return float("nan")


def make_batch(vocab: int, batch: int, seq_len: int, seed: int) -> dict:
  x_Bx1pL = np.random.default_rng(seed).integers(4, vocab, (batch, seq_len + 1)).astype(np.int32)
  return {
    "inputs": jnp.asarray(x_Bx1pL[:, :-1]),
    "targets": jnp.asarray(x_Bx1pL[:, 1:]),
    "mask": jnp.ones((batch, seq_len), jnp.int32),
    "segment_ids": jnp.ones((batch, seq_len), jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)),
  }


def bench(
  preset: str, batch: int, seq_len: int, reps: int, probes: int, n_batches: int = 2, sweep: tuple[int, int] = (0, 0)
) -> None:
  vocab = M.OPT_VOCAB if preset.startswith("opt") else 204
  cfg = M.preset(preset, vocab_size=vocab, max_len=max(seq_len, 16), dtype="float32")
  model = M.make(cfg)
  params = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  batches = [make_batch(vocab, batch, seq_len, i) for i in range(max(1, n_batches))]
  b = batches[0]
  loss_fn = lambda p, bb: M.mean_loss(model, p, bb)  # noqa: E731
  v = H.probe_like(jax.random.key(1), params)
  key = jax.random.key(2)
  print(f"\n{preset} ({M.param_count(model):,} params, batch {batch}x{seq_len}, fp32): compiling", flush=True)

  grad = jax.jit(lambda p, bb: jax.value_and_grad(loss_fn)(p, bb))
  fwd_rev = jax.jit(lambda p, v, bb: H.hvp(loss_fn, p, bb, v))
  rev_fwd = jax.jit(lambda p, v, bb: jax.grad(lambda q: jax.jvp(lambda r: loss_fn(r, bb), (q,), (v,))[1])(p))
  ggn = jax.jit(lambda p, v, bb: H.ggn_linearised(lambda q, c: M.logits(model, q, c), p, bb)(v))
  fns = {
    "loss+grad": (grad, (params, b)),
    "HVP fwd-over-rev": (fwd_rev, (params, v, b)),
    "HVP rev-over-fwd": (rev_fwd, (params, v, b)),
    "GGN-vp (jvp, CE Hessian, vjp)": (ggn, (params, v, b)),
  }
  per_call = {name: 1 for name in fns}
  for k in sorted({1, len(batches)}):
    mv = H.make_hvp(loss_fn, batches[:k])
    for amortise in (False, True):
      name = f"probe, {k} batch{'es' if k > 1 else ''}, {'amortised' if amortise else 'plain'}"
      fns[name] = (H._hutchinson_chunk(mv, params, "rademacher", None, probes, amortise), (params, key, 0, mv.operands))
      per_call[name] = probes * k  # time per probe and batch
  rows = compile_rows(fns, progress=lambda m: print(m, flush=True))
  reps = reps if M.param_count(model) > 10_000_000 else 6 * reps  # small models: cheap rounds, more of them
  ts = interleaved_times(rows, reps, progress=lambda m: print(m, flush=True))
  fl_g = rows["loss+grad"][2]
  print(
    f"{preset} ({M.param_count(model):,} params, batch {batch}x{seq_len}, fp32, {jax.devices()[0].device_kind}, "
    f"{os.cpu_count()} CPU threads, load average {' '.join(open('/proc/loadavg').read().split()[:3])}, {reps} interleaved "
    f"rounds; ratio = median over rounds of time / loss+grad time; probe rows: {probes} probes per call, per probe·batch)"
  )
  for name in rows:
    t_med = float(np.median(ts[name])) / per_call[name]
    r = ts[name] / per_call[name] / ts["loss+grad"]
    fl = rows[name][2] if per_call[name] == 1 else float("nan")
    fl_txt = f"  XLA FLOPs {fl / fl_g:4.2f}x" if np.isfinite(fl) else ""
    print(f"  {name:<42s} {t_med * 1e3:9.1f} ms   ratio {np.median(r):4.2f} (range {r.min():.2f}-{r.max():.2f}){fl_txt}")
  if sweep[0]:
    k = len(batches)
    names = [f"probe, {k} batch{'es' if k > 1 else ''}, {m}" for m in ("plain", "amortised")]
    best = min(names, key=lambda n: float(np.median(ts[n])))
    per_probe = float(np.median(ts[best])) / probes  # all k batches
    n_ckpt, n_probe = sweep
    print(
      f"  sweep: {n_ckpt} checkpoints x {n_probe} Hutchinson probes on {k} {batch}x{seq_len} batch(es) = "
      f"{n_ckpt * n_probe * per_probe / 60:.1f} min (restores not included)"
    )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--presets", default="tiny,opt-125m")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--probes", type=int, default=8, help="probes per jitted chunk in the probe rows")
  ap.add_argument("--batches", type=int, default=2, help="K: batches of the multi-batch probe rows (1 = only one-batch rows)")
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
    bench(p.strip(), args.batch, args.seq_len, args.reps, args.probes, args.batches, (args.sweep_checkpoints, args.sweep_probes))


if __name__ == "__main__":
  main()
