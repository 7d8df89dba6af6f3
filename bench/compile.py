"""First-call compile time of the Hessian estimators, against matfree's Lanczos on the same operator.

  python -m bench.compile                                   # small preset, 4x128 tokens, 30 Lanczos steps
  python -m bench.compile --presets=tiny,small --steps=30
  python -m bench.compile --before=c4d2d6e                  # adds that revision's estimators: before/after
  python -m bench.compile --only=lanczos --repeat=3 --before=main   # ours / before / matfree's, 3 rounds
  python -m bench.compile --hlo                             # compiled-HLO sizes of both Lanczos bodies
  python -m bench.compile --only=lanczos --n_layers=12      # the small preset 12 layers deep: growth with depth

Each row calls one estimator once on a fresh operator (the project's transformer, `lib.model`, fp32,
one device; the persistent compilation cache off) and prints the wall seconds JAX spent compiling in
that call (tracing + lowering + XLA compile, summed from JAX's own compile-duration events) and the CPU
seconds of that first call minus those of a second, compiled one (steadier on a loaded machine; XLA
compiles on one thread). Rows:
  HVP (the operator alone)  the floor every estimator pays: one `make_hvp(...)` call
  lanczos                   analysis.hessian.lanczos: full reorthogonalisation on one flat float32
                            vector (FlatView), unravelled only for the HVP (on one device cut at
                            runtime offsets: one kernel per leaf shape, see FlatView)
  lanczos (before)          with --before=REV (or a file): the same call into that revision's
                            analysis/hessian.py and hessian_ops.py (a file: hessian.py alone)
  lanczos (matfree)         matfree.decomp.tridiag_sym(m, reortho='full') on the raveled HVP
                            (jax.flatten_util.ravel_pytree, matfree's documented way to take pytrees)
  power / hutch++ / hutchinson  the other estimators (Hutchinson: one chunk of 8 probes); with
                            --before, each also as "<name> (before)", and its ratio is printed
The matfree row is skipped, with a note, when matfree is not installed (`pip install matfree`; it is
not a dependency of lmtrace). Target: lanczos ≤ lanczos (matfree). `--repeat=R` runs the rows
round-robin R times (each time on a fresh operator, so each compiles again) and prints each ratio per
round and its median: on a shared machine the load drifts between rows, and interleaving spreads it
(the row order alternates between rounds).

`--hlo` instead lowers and compiles the two Lanczos bodies (ours from `analysis.hessian._lanczos_fn`,
matfree's as in its row) and the HVP alone once each, and prints the compile CPU seconds and the size
of each optimised HLO module (instructions, fusions, dots, while loops, conditionals, dynamic slices)
with the instruction kinds whose counts differ most: where a compile-time gap comes from.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from analysis import hessian as H
from lib import model as M
from lib import sharding

_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)
_compile_secs = [0.0]


def _listen(event: str, duration: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    _compile_secs[0] += duration


def timed(call) -> tuple[float, float, float]:
  """(seconds compiling, wall seconds, CPU seconds of this process) of one call, its results waited for.
  On a loaded machine the CPU seconds are the steadier number (XLA's compile is mostly one thread)."""
  _compile_secs[0] = 0.0
  t0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(call())
  return _compile_secs[0], time.perf_counter() - t0, time.process_time() - c0


def batch_of(vocab: int, batch: int, seq_len: int) -> dict:
  x_Bx1pL = np.random.default_rng(0).integers(4, vocab, (batch, seq_len + 1)).astype(np.int32)
  return {
    "inputs": jnp.asarray(x_Bx1pL[:, :-1]),
    "targets": jnp.asarray(x_Bx1pL[:, 1:]),
    "mask": jnp.ones((batch, seq_len), jnp.int32),
    "segment_ids": jnp.ones((batch, seq_len), jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)),
  }


def matfree_body(mv, params, m: int):
  """(jitted f(params, v0_N, operands) -> matfree's tridiagonal, v0_N), or None without matfree."""
  try:
    from matfree import decomp
  except ImportError:
    return None
  v0_N, unravel = ravel_pytree(H.probe_like(jax.random.key(1), params))
  tridiag = decomp.tridiag_sym(m, reortho="full", materialize=False)

  @jax.jit
  def f(p, v0_N, ops):
    def matvec(v_N, p):
      return ravel_pytree(mv.apply(p, unravel(v_N), ops))[0]

    return tridiag(matvec, v0_N, p).J_small

  return f, v0_N


def matfree_lanczos(mv, params, m: int):
  """() -> the tridiagonal (diag, offdiag) by matfree on the raveled operator; None without matfree."""
  body = matfree_body(mv, params, m)
  if body is None:
    return None
  f, v0_N = body
  return lambda: f(params, v0_N, mv.operands)


def hlo_size(compiled) -> collections.Counter:
  """Instruction kinds of an optimised HLO module (every computation, fusion bodies included)."""
  return collections.Counter(m.group(1) for m in re.finditer(r" = .*? ([a-z][\w\-]*)\(", compiled.as_text()))


def hlo_report(params, loss_fn, b, m: int) -> None:
  """Compile CPU seconds and optimised-HLO sizes of our Lanczos body, matfree's and the HVP alone."""
  key, v0 = jax.random.key(1), H.probe_like(jax.random.key(1), params)
  mv = H.make_hvp(loss_fn, [b])
  bodies = {
    "HVP alone": (jax.jit(mv.apply), (params, v0, mv.operands)),
    "lanczos": (H._lanczos_fn(mv, H.FlatView(params, None), m, "full", False), (params, v0, key, mv.operands)),
  }
  mf = matfree_body(H.make_hvp(loss_fn, [b]), params, m)
  if mf is not None:
    bodies["lanczos (matfree)"] = (mf[0], (params, mf[1], H.make_hvp(loss_fn, [b]).operands))
  sizes = {}
  for name, (f, args) in bodies.items():
    c0 = time.process_time()
    compiled = f.lower(*args).compile()
    cpu = time.process_time() - c0
    sizes[name] = n = hlo_size(compiled)
    print(
      f"  {name:<20s} lower+compile {cpu:5.1f} s CPU   HLO: {sum(n.values()):6d} instructions, {n['fusion']:5d} fusions, "
      f"{n['dot']:4d} dots, {n['while']} while, {n['conditional']} conditional, {n['dynamic-slice']:4d} dynamic-slice",
      flush=True,
    )
  if "lanczos (matfree)" in sizes:
    a, c = sizes["lanczos"], sizes["lanczos (matfree)"]
    diff = sorted(set(a) | set(c), key=lambda k: -abs(a[k] - c[k]))[:8]
    print("  ours − matfree's, by instruction kind: " + ", ".join(f"{k} {a[k] - c[k]:+d}" for k in diff if a[k] != c[k]))


def _load(name: str, path: str, source: str | None = None):
  if source is not None:
    path = os.path.join(tempfile.mkdtemp(prefix="bench_compile_"), f"{name}.py")
    with open(path, "w") as f:
      f.write(source)
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  return mod


def load_module(before: str):
  """An older analysis/hessian.py: a file path, or a git revision whose analysis/hessian.py and
  analysis/hessian_ops.py are both taken (the older module then imports the older operators)."""
  if os.path.isfile(before):
    return _load("hessian_before", before)

  def show(path: str) -> str | None:
    r = subprocess.run(["git", "show", f"{before}:{path}"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None

  src = show("analysis/hessian.py")
  if src is None:
    raise SystemExit(f"--before={before!r} is neither a file nor a git revision with analysis/hessian.py")
  ops = show("analysis/hessian_ops.py")
  if ops is not None:
    _load("hessian_ops_before", "", ops)
    src = src.replace("from analysis.hessian_ops import", "from hessian_ops_before import")
  return _load("hessian_before", "", src)


def bench(
  preset: str,
  batch: int,
  seq_len: int,
  m: int,
  before=None,
  only: str = "",
  repeat: int = 1,
  hlo: bool = False,
  n_layers: int = 0,
) -> dict[str, tuple[float, float, float, float]]:
  vocab = M.OPT_VOCAB if preset.startswith("opt") else 204
  depth = {"n_layers": n_layers} if n_layers else {}
  cfg = M.preset(preset, vocab_size=vocab, max_len=max(seq_len, 16), dtype="float32", **depth)
  model = M.make(cfg)
  params = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  loss_fn = lambda p, bb: M.mean_loss(model, p, bb)  # noqa: E731
  b = batch_of(vocab, batch, seq_len)
  key = jax.random.key(1)
  v0 = H.probe_like(key, params)

  def op(mod=H):  # a fresh operator per row: nothing compiled for an earlier row is reused
    return mod.make_hvp(loss_fn, [b])

  def bind(mod, f):  # a row: makes its operator once, then (params) -> result, called twice
    def make():
      mv = op(mod)
      return lambda: f(mod, mv)

    return make

  n_leaves = len(jax.tree.leaves(params))
  print(
    f"\n{preset} ({cfg.n_layers} layers): {M.param_count(model):,} parameters in {n_leaves} leaves, "
    f"batch {batch}x{seq_len}, {m} Lanczos steps "
    f"(load average {' '.join(open('/proc/loadavg').read().split()[:3])})",
    flush=True,
  )
  if hlo:
    hlo_report(params, loss_fn, b, m)
    return {}
  rows = {
    "HVP (the operator alone)": bind(H, lambda h, mv: mv(params, v0)),
    "lanczos": bind(H, lambda h, mv: h.lanczos(mv, params, key, m).alphas),
  }
  if before is not None:
    rows["lanczos (before)"] = bind(before, lambda h, mv: h.lanczos(mv, params, key, m).alphas)
  if matfree_lanczos(op(), params, m) is not None:
    rows["lanczos (matfree)"] = lambda: matfree_lanczos(op(), params, m)
  estimators = {
    "power iteration": lambda h, mv: h.power_iteration(mv, params, key, num_iters=m).estimate,
    "hutch++": lambda h, mv: h.hutchpp_trace(mv, params, key, 3 * max(1, m // 3)).estimate,
    "hutchinson (8-probe chunk)": lambda h, mv: h.hutchinson_trace(mv, params, key, 8, chunk=8).estimate,
  }
  for name, f in estimators.items():
    rows[name] = bind(H, f)
    if before is not None:
      rows[f"{name} (before)"] = bind(before, f)
  rows = {k: v for k, v in rows.items() if not only or any(o in k for o in only.split(","))}
  per_round: dict[str, list] = {name: [] for name in rows}
  for r in range(repeat):
    if repeat > 1:
      print(f" round {r + 1}/{repeat} (load average {' '.join(open('/proc/loadavg').read().split()[:3])})", flush=True)
    for name in list(rows)[:: -1 if r % 2 else 1]:  # order alternates between rounds: no row always goes first
      print(f"  {name:<28s} ...", end="", flush=True)
      call = rows[name]()
      c, w, cpu = timed(call)
      _, w2, cpu2 = timed(call)  # compiled: the run alone
      per_round[name].append((c, w, cpu - cpu2, w2))
      print(
        f"\r  {name:<28s} compile {c:7.1f} s wall, {cpu - cpu2:7.1f} s CPU (first − second call: {w:6.1f} − {w2:6.1f} s wall)",
        flush=True,
      )
  out = {name: tuple(np.median(np.asarray(v), 0)) for name, v in per_round.items()}
  if "lanczos (matfree)" not in out and (not only or "matfree" in only or "lanczos" in only):
    print("  lanczos (matfree)            skipped: matfree is not installed (pip install matfree)")
  pairs = [("lanczos", "lanczos (matfree)", "matfree's")] + [(n, f"{n} (before)", "before") for n in ("lanczos", *estimators)]
  for ours, other, label in pairs:
    if {ours, other} <= set(out):
      r_wall = [x[0] / y[0] for x, y in zip(per_round[ours], per_round[other])]
      r_cpu = [x[2] / y[2] for x, y in zip(per_round[ours], per_round[other])]
      r_run = [x[3] / y[3] for x, y in zip(per_round[ours], per_round[other])]
      each = f" (rounds: {', '.join(f'{w:.2f}/{c:.2f}' for w, c in zip(r_wall, r_cpu))})" if repeat > 1 else ""
      target = " (target ≤ 1)" if other == "lanczos (matfree)" else ""
      print(f"  compile time {ours} / {label:<9s} {np.median(r_wall):.2f} wall, {np.median(r_cpu):.2f} CPU{target}{each}")
      below = sum(w <= 1 and c <= 1 for w, c in zip(r_wall, r_cpu))
      print(f"    rounds with {ours} ≤ {label} (wall and CPU): {below}/{len(r_wall)}; compiled run {np.median(r_run):.2f}×")
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--presets", default="small")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--steps", type=int, default=30, help="Lanczos steps (and power iterations)")
  ap.add_argument("--only", default="", help="comma-separated substrings: run only the rows whose name has one")
  ap.add_argument("--repeat", type=int, default=1, help="rounds of the rows, interleaved (medians and per-round ratios)")
  ap.add_argument("--hlo", action="store_true", help="print compiled-HLO sizes of the Lanczos bodies instead of timing rows")
  ap.add_argument("--n_layers", type=int, default=0, help="override the preset's depth (0 = the preset's)")
  ap.add_argument("--before", default="", help="git revision (or an older analysis/hessian.py) to time its estimators too")
  args = ap.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.config.update("jax_enable_compilation_cache", False)
  jax.monitoring.register_event_duration_secs_listener(_listen)
  before = load_module(args.before) if args.before else None
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU threads")
  for p in args.presets.split(","):
    bench(p.strip(), args.batch, args.seq_len, args.steps, before, args.only, args.repeat, args.hlo, args.n_layers)


if __name__ == "__main__":
  main()
