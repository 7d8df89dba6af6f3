"""Ahead-of-time compile of a run card's train step for a TPU slice, from a CPU host (no TPU needed).

  python -m bench.aot --config=configs/opt.py:opt-1.3b --topology=v5e:4x4 [--batch=256] [--mesh.fsdp=16]
  python -m bench.aot --config=configs/opt.py:opt-1.3b --topology=v5e:4x4 --batch=256 --search

Needs libtpu (`pip install "jax[tpu]==<this venv's jax version>"`, best in a separate venv; see
docs/aot.md). The step is the trainer's own (lib/steps.train_step with the card's AdamW, shardings from
lib/sharding.RULES), lowered on abstract arrays carrying NamedShardings of a Mesh of the topology's
devices and compiled by libtpu. Prints, per device: memory by kind (arguments, outputs, temporaries,
code; donated state counted once) against the chip's HBM; XLA's FLOP count beside the trainer's
analytic 6N + attention count; a roofline step time (max of analytic FLOPs / bf16 peak, XLA's HBM
bytes / HBM bandwidth, collective bytes / ICI bandwidth) with the binding term and the modelled MFU;
the collectives parsed from the compiled HLO (kind, count, bytes). `--search` compiles meshes
(fsdp x tensor x data), remat and micro-batching and prints the fastest modelled setting that fits.

A mesh that cannot divide the batch (or its micro-batches) or the attention heads is refused in one
line before anything is compiled (and without libtpu).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys

from lib import errors
from lib.sharding import MESH_AXES

GiB = 1024**3
# libtpu takes /tmp/libtpu_lockfile to guard a real TPU; compiling only, two processes may share the host
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures (Google Cloud TPU docs). `hbm`: usable bytes; `ici`: bidirectional, all ports."""

  name: str
  hbm: float
  peak: float  # dense bf16 FLOP/s
  hbm_bw: float  # bytes/s
  ici: float  # bytes/s


CHIPS = {
  "v5e": Chip("TPU v5e", 15.75 * GiB, 197e12, 819e9, 400e9),
  "v4": Chip("TPU v4", 32 * GiB, 275e12, 1200e9, 300e9),
  "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, 600e9),
  "v6e": Chip("TPU v6e", 31.25 * GiB, 918e12, 1640e9, 448e9),
}
# AOT topologies list TensorCores: v4 and v5p chips have two, v4's device is one core (v5p's megacore is one)
CORES_PER_DEVICE_CHIP = {"v4": 2}


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", name.strip())
  if not m or m.group(1) not in CHIPS:
    raise errors.ConfigError(f"--topology={name!r}: expected <{'|'.join(CHIPS)}>:AxB[xC], e.g. v5e:4x4 or v5p:4x4x4")
  return m.group(1), tuple(int(x) for x in m.group(2).split("x"))


def device_count(topology: str) -> int:
  gen, dims = parse_topology(topology)
  return math.prod(dims) * CORES_PER_DEVICE_CHIP.get(gen, 1)


def per_device(chip: Chip, gen: str) -> Chip:
  k = CORES_PER_DEVICE_CHIP.get(gen, 1)
  return Chip(chip.name + (f" (1 of {k} cores)" if k > 1 else ""), chip.hbm / k, chip.peak / k, chip.hbm_bw / k, chip.ici / k)


@dataclasses.dataclass(frozen=True)
class Setting:
  mesh: tuple[int, int, int]  # data, fsdp, tensor
  remat: bool = False
  grad_accum: int = 1
  loss_chunk: int = 0  # model.loss_chunk: logits made this many positions at a time (0 = all at once)
  attn_chunk: int = 0  # model.attn_chunk: attention scores for this many queries at a time (0 = all at once)
  scan: bool = False  # model.scan_layers: the blocks as one lax.scan (one layer's gathered weights live at a time)
  program: str = "train"  # train: the train step | hvp: the flatness job's Hessian-vector product on one batch

  def label(self) -> str:
    d, f, t = self.mesh
    chunk = (f" loss_chunk={self.loss_chunk}" if self.loss_chunk else "") + (
      f" attn_chunk={self.attn_chunk}" if self.attn_chunk else ""
    )
    scan = " layers=scanned" if self.scan else ""
    prog = "" if self.program == "train" else f"{self.program}: "
    remat = "on" if self.remat else "off"
    return f"{prog}data={d} fsdp={f} tensor={t} remat={remat} micro-batches={self.grad_accum}{chunk}{scan}"


def check_setting(s: Setting, n_devices: int, batch: int, n_heads: int, d_ff: int) -> None:
  """One-line ShardingError for a setting that cannot run, before any compile."""
  d, f, t = s.mesh
  if d * f * t != n_devices:
    raise errors.ShardingError(f"mesh data={d} fsdp={f} tensor={t} uses {d * f * t} devices; the topology has {n_devices}")
  if batch % s.grad_accum or (batch // s.grad_accum) % (d * f):
    raise errors.ShardingError(
      f"global batch {batch} in {s.grad_accum} micro-batch(es) of {batch / s.grad_accum:g} rows cannot be split over "
      f"data x fsdp = {d * f} devices; use a batch that is a multiple of {d * f * s.grad_accum}"
    )
  if n_heads % t or d_ff % t:
    raise errors.ShardingError(
      f"tensor={t} does not divide the model's {n_heads} heads and d_ff {d_ff}; use a divisor of {n_heads}"
    )


# -- the compiled program's collectives --------------------------------------------------------------
_COLL = re.compile(
  r"=\s*(\(.*?\)|\S+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\((.*)$", re.M
)
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "bf16": 2,
  "f16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
}


def _group_size(rest: str) -> int:
  """Devices per replica group: mesh['a'=4,'b'=2] {'a'} (named axes), [groups,size]<=[n] (iota) or {{0,1,..},..}."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes.get(k, 1) for k in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
  return len(m.group(1).split(",")) if m and m.group(1) else 1


_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s")
_WHILE = re.compile(r"\swhile\(.*?condition=%([\w.\-]+),\s*body=%([\w.\-]+)")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%([\w.\-]+)")


def _computations(hlo: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines} of an HLO module's text."""
  comps: dict[str, list[str]] = {}
  cur = None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m and line.rstrip().endswith("{"):
      cur = comps.setdefault(m.group(1), [])
    elif line.startswith("}"):
      cur = None
    elif cur is not None:
      cur.append(line)
  return comps


def loop_weights(hlo: str) -> dict[str, int]:
  """{computation: how many times one step runs it}: a while body runs its loop's trip count times its
  caller's count (nested loops multiply: micro-batches x scanned layers); other called computations inherit
  their caller's count. The trip count is read from the loop condition `i < N` (lax.scan's form, i from 0);
  a condition of another form counts 1."""
  comps = _computations(hlo)
  trips = {}
  for name, lines in comps.items():
    consts = [int(x) for ln in lines for x in re.findall(r"s32\[\]\S*\s+constant\((\d+)\)", ln)]
    if len(consts) == 1 and any("direction=LT" in ln for ln in lines):
      trips[name] = consts[0]
  w = {name: 1 for name in comps}
  for _ in range(8):  # nesting depth (a fixed point is reached after the deepest loop)
    changed = False
    for name, lines in comps.items():
      for ln in lines:
        loop = _WHILE.search(ln)
        callees = {loop.group(2): w[name] * trips.get(loop.group(1), 1)} if loop else {}
        for callee in _CALLS.findall(ln):
          callees.setdefault(callee, w[name])
        for callee, n in callees.items():
          if callee in w and n > w[callee]:
            w[callee], changed = n, True
    if not changed:
      break
  return w


def collectives(hlo: str) -> dict[str, dict]:
  """{kind: {count, bytes (result sizes), traffic (bytes each device sends, ring model)}} of an HLO module,
  per step: an op inside a loop body (a scanned layer stack, the micro-batch scan) counts its trip count
  times (loop_weights). Text without computations (bare instruction lines) counts each op once."""
  comps = _computations(hlo) or {"": hlo.splitlines()}
  weights = loop_weights(hlo)
  out: dict[str, dict] = {}
  for name, lines in comps.items():
    k = weights.get(name, 1)
    for shape, kind, rest in _COLL.findall("\n".join(lines)):
      if "-done" in kind:
        continue
      parts = _SHAPE.findall(shape)
      sizes = [_BYTES[t] * math.prod(int(x) for x in dims.split(",") if x) for t, dims in parts]
      # an all-reduce of a tuple reduces every element; async starts return (operand, result, u32 contexts...):
      # the larger of operand and result is what one device moves
      b = sum(sizes) if kind == "all-reduce" or not shape.startswith("(") else max(sizes, default=0)
      n = _group_size(rest)
      share = (n - 1) / n if n > 1 else 0.0
      traffic = {"all-reduce": 2 * b * share, "collective-permute": b}.get(kind, b * share)
      o = out.setdefault(kind, {"count": 0, "bytes": 0, "traffic": 0.0})
      o["count"] += k
      o["bytes"] += k * b
      o["traffic"] += k * traffic
  return out


# -- building and compiling the step ---------------------------------------------------------------
def load_card(path: str):
  from bench.train_step import load_config

  return load_config(path)


def build(cfg, topology: str, s: Setting, batch: int, seq_len: int):
  """The lowered train step of `cfg` for the topology (abstract inputs only; nothing is allocated)."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  from jax.experimental import topologies

  import trainer
  from lib import model as M
  from lib import optim, sharding, steps

  topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  mesh = sharding.make_mesh(dict(zip(MESH_AXES, s.mesh)), list(topo.devices))
  cfg.model.remat = s.remat
  cfg.model.loss_chunk = s.loss_chunk
  cfg.model.attn_chunk = s.attn_chunk
  cfg.model.scan_layers = s.scan
  mcfg = model_config(cfg, seq_len)
  model = M.make(mcfg)
  tx, sched = optim.make_optimizer(cfg.opt, cfg.train.steps)
  with nn.logical_axis_rules(sharding.RULES):  # shapes and shardings on the host (no mesh set: eager ops stay on CPU)
    state_sh = trainer.state_shardings(model, tx, mesh)
    shapes, _ = M.abstract_params(model)
    abstract = {
      "params": shapes,
      "opt_state": jax.eval_shape(tx.init, shapes),
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0)),
    }
  state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, state_sh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    bsh = sharding.batch_sharding(mesh)
    tok = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=bsh)
    b = {"inputs": tok, "targets": tok, "mask": tok, "segment_ids": tok, "positions": tok}
    if s.program == "hvp":  # analysis/flatness's operator: H·v of the mean token loss, forward-over-reverse
      from analysis import hessian_ops

      params = state["params"]
      fn = lambda p, v, batch: hessian_ops.hvp(lambda q, bb: M.mean_loss(model, q, bb), p, batch, v)  # noqa: E731
      lowered = jax.jit(fn, out_shardings=state_sh["params"]).lower(params, params, b)
    else:
      fn = functools.partial(steps.train_step, model=model, tx=tx, schedule=sched, grad_accum=s.grad_accum)
      lowered = jax.jit(fn, out_shardings=(state_sh, None), donate_argnums=(0,)).lower(state, b)
  return lowered, mcfg, M.param_count(model)


def model_config(cfg, seq_len: int):
  from lib import model as M

  m = dict(cfg.model)
  if m.get("vocab_size", -1) <= 0:
    m["vocab_size"] = M.OPT_VOCAB
  m["max_len"] = max(int(m.get("max_len", seq_len)), seq_len)
  return M.ModelConfig.from_config(m)


@dataclasses.dataclass
class Report:
  setting: Setting
  fits: bool
  memory: dict
  xla_flops: float
  model_flops: float  # 6N + attention per step, per device
  hbm_bytes: float
  coll: dict
  times: dict  # compute / hbm / ici seconds
  error: str = ""

  @property
  def step_s(self) -> float:
    return max(self.times.values()) if self.times else float("inf")

  @property
  def binding(self) -> str:
    return max(self.times, key=self.times.get) if self.times else "-"


def analyse(compiled, s: Setting, chip: Chip, n_dev: int, tokens: int, fpt: float, recompute_fpt: float = 0.0) -> Report:
  """`recompute_fpt`: FLOPs per token run again beyond remat's forward (chunked loss and attention remake theirs)."""
  ma = compiled.memory_analysis()
  mem = {
    "arguments": ma.argument_size_in_bytes,
    "outputs": ma.output_size_in_bytes,
    "aliased (donated)": ma.alias_size_in_bytes,
    "temporaries": ma.temp_size_in_bytes,
    "code": ma.generated_code_size_in_bytes,
  }
  mem["total"] = mem["arguments"] + mem["outputs"] - mem["aliased (donated)"] + mem["temporaries"] + mem["code"]
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  coll = collectives(compiled.as_text())
  model_flops = fpt * tokens / n_dev
  exec_flops = model_flops * (4 / 3 if s.remat else 1.0)  # remat recomputes the forward pass (2N of 6N)
  exec_flops += recompute_fpt * tokens / n_dev
  hbm = float(ca.get("bytes accessed", 0.0))
  times = {
    "compute": exec_flops / chip.peak,
    "hbm": hbm / chip.hbm_bw,
    "ici": sum(c["traffic"] for c in coll.values()) / chip.ici,
  }
  return Report(s, mem["total"] <= chip.hbm, mem, float(ca.get("flops", 0.0)), model_flops, hbm, coll, times)


def compile_one(cfg, topology: str, s: Setting, batch: int, seq_len: int, chip: Chip) -> Report:
  import time

  from lib import model as M

  t0 = time.time()
  lowered, mcfg, n_params = build(cfg, topology, s, batch, seq_len)
  fpt = M.flops_per_token(mcfg, seq_len, n_params) * (HVP_COST if s.program == "hvp" else 1)
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001  libtpu refuses a program over HBM at compile time (RESOURCE_EXHAUSTED)
    msg = str(e).strip().splitlines()[0][:300]
    print(f"  {s.label()}: does not compile ({msg})", file=sys.stderr)
    return Report(s, False, {}, 0.0, fpt * batch * seq_len / device_count(topology), 0.0, {}, {}, error=msg)
  again = 2 * mcfg.vocab_size * (mcfg.embed_proj_dim or mcfg.d_model) if s.loss_chunk else 0  # the remade logits
  again += 4 * mcfg.n_layers * mcfg.d_model * seq_len if s.attn_chunk else 0  # the remade scores and weighted values
  r = analyse(compiled, s, chip, device_count(topology), batch * seq_len, fpt, again)
  print(f"  {s.label()}: compiled in {time.time() - t0:.0f} s, {r.memory['total'] / GiB:.2f} GiB/device", file=sys.stderr)
  return r


# -- printing --------------------------------------------------------------------------------------
def show(r: Report, chip: Chip, n_dev: int) -> None:
  print(f"setting: {r.setting.label()}")
  if r.error:
    print(f"  does not compile: {r.error}")
    return
  print(f"  memory per device ({chip.name}, {chip.hbm / GiB:.2f} GiB HBM):")
  for k, v in r.memory.items():
    print(f"    {k:<18} {v / GiB:8.2f} GiB")
  margin = chip.hbm - r.memory["total"]
  print(f"  {'FITS' if r.fits else 'DOES NOT FIT'}: {abs(margin) / GiB:.2f} GiB {'to spare' if r.fits else 'over'}")
  print(
    f"  FLOPs per device per step: XLA {r.xla_flops:.3e}, trainer's 6N+attention {r.model_flops:.3e} "
    f"(x{r.xla_flops / r.model_flops:.2f}; remat adds the forward again; XLA counts a loop body once)"
  )
  print(f"  HBM bytes per device (XLA): {r.hbm_bytes / GiB:.2f} GiB")
  print("  collectives (kind, count, result bytes, bytes sent per device on a ring):")
  for k, c in sorted(r.coll.items()):
    print(f"    {k:<19} {c['count']:5d}  {c['bytes'] / GiB:8.3f} GiB  {c['traffic'] / GiB:8.3f} GiB")
  t = r.times
  print(
    f"  roofline: compute {t['compute'] * 1e3:.1f} ms (peak {chip.peak / 1e12:.0f} TFLOP/s), HBM {t['hbm'] * 1e3:.1f} ms "
    f"({chip.hbm_bw / 1e9:.0f} GB/s), ICI {t['ici'] * 1e3:.1f} ms ({chip.ici / 1e9:.0f} GB/s): step >= {r.step_s * 1e3:.1f} ms, "
    f"bound by {r.binding}; modelled MFU {r.model_flops / (chip.peak * r.step_s):.1%}"
  )


PROGRAMS = ("train", "hvp")
HVP_COST = 2  # analytic FLOPs of forward-over-reverse H·v: about two gradients (the jvp doubles each reverse op)
CHUNK = 512  # --search's chunked candidate: positions per chunk of float32 logits and of attention queries


def candidates(n_dev: int, batch: int, n_heads: int, d_ff: int) -> list[Setting]:
  """Meshes (pure FSDP first, then FSDP x tensor, then data x FSDP) x (no remat; remat with scanned layers; remat
  unrolled) x micro-batches x chunking, cheapest first."""
  meshes = []
  for t in (1, 2, 4, 8):
    for d in (1, 2, 4):
      if n_dev % (t * d) == 0:
        meshes.append((d, n_dev // (t * d), t))
  out = []
  for remat, scan in ((False, False), (True, True), (True, False)):
    for accum in (1, 2, 4, 8):
      for chunk in (0, CHUNK):
        for m in meshes:
          s = Setting(m, remat, accum, chunk, chunk, scan)
          try:
            check_setting(s, n_dev, batch, n_heads, d_ff)
          except errors.ShardingError:
            continue
          out.append(s)
  return out


def search(cfg, topology: str, batch: int, seq_len: int, chip: Chip, budget: int) -> Report | None:
  """Compiles candidates in order until `budget` compiles; a mesh is dropped once one setting of it fits
  (more remat or micro-batching only adds time). Returns the fastest modelled setting that fits."""
  n = device_count(topology)
  fitted: set = set()
  best, tried = None, 0
  for s in candidates(n, batch, cfg.model.n_heads, cfg.model.d_ff):
    if s.mesh in fitted or tried >= budget:
      continue
    tried += 1
    r = compile_one(cfg, topology, s, batch, seq_len, chip)
    if r.fits:
      fitted.add(s.mesh)
      if best is None or r.step_s < best.step_s:
        best = r
  return best


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default="configs/opt.py:opt-1.3b")
  ap.add_argument("--topology", default="v5e:4x4")
  ap.add_argument("--batch", type=int, default=0, help="global batch (rows); default: the card's train.batch_size")
  ap.add_argument("--seq_len", type=int, default=0, help="default: the card's data.seq_len")
  for a in MESH_AXES:
    ap.add_argument(f"--mesh.{a}", dest=a, type=int, default=None)
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step")
  ap.add_argument("--loss_chunk", type=int, default=0, help="make the loss's float32 logits this many positions at a time")
  ap.add_argument("--attn_chunk", type=int, default=0, help="make the attention scores for this many queries at a time")
  ap.add_argument("--scan_layers", action="store_true", help="run the blocks as one lax.scan (model.scan_layers)")
  ap.add_argument("--program", default="train", choices=PROGRAMS, help="train step, or the flatness job's HVP on one batch")
  ap.add_argument("--dtype", default="", help="compute dtype (default: the card's)")
  ap.add_argument("--search", action="store_true", help="try meshes, remat and micro-batching; print the best that fits")
  ap.add_argument("--budget", type=int, default=8, help="--search: at most this many compiles")
  a = ap.parse_args(argv)
  try:
    return run(a)
  except errors.LmtraceError as e:
    print(f"lmtrace: error: {e}", file=sys.stderr)
    return 2


def run(a) -> int:
  gen, _ = parse_topology(a.topology)
  chip, n = per_device(CHIPS[gen], gen), device_count(a.topology)
  cfg = load_card(a.config)
  batch, seq_len = a.batch or cfg.train.batch_size, a.seq_len or cfg.data.seq_len
  if a.dtype:
    cfg.model.dtype = a.dtype
  default = {"data": 1, "fsdp": -1, "tensor": 1}  # pure FSDP unless told otherwise
  sizes = [getattr(a, k) if getattr(a, k) is not None else default[k] for k in MESH_AXES]
  if sizes.count(-1) > 1 and a.fsdp is None:
    sizes[1] = 1
  from lib import sharding

  mesh = sharding.mesh_shape(dict(zip(MESH_AXES, sizes)), n)
  s = Setting(mesh, a.remat, a.grad_accum, a.loss_chunk, a.attn_chunk, a.scan_layers, a.program)
  if a.program == "hvp" and (a.grad_accum != 1 or a.search):
    raise errors.ConfigError("--program=hvp compiles one batch's Hessian-vector product: no --grad_accum or --search")
  if not a.search:
    check_setting(s, n, batch, cfg.model.n_heads, cfg.model.d_ff)
  _check_libtpu()
  print(f"{a.config} on {a.topology} ({n} x {chip.name}), global batch {batch} x {seq_len} tokens")
  if a.search:
    best = search(cfg, a.topology, batch, seq_len, chip, a.budget)
    if best is None:
      print("no setting tried fits; raise --budget, lower --batch, or use a larger slice")
      return 1
    print("best setting that fits (lowest modelled step time):")
    show(best, chip, n)
    return 0
  r = compile_one(cfg, a.topology, s, batch, seq_len, chip)
  show(r, chip, n)
  return 0 if r.fits else 1


def _check_libtpu() -> None:
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise errors.ConfigError(
      'bench.aot needs libtpu to compile for TPUs: pip install "jax[tpu]==<your jax version>" (a separate venv is fine)'
    ) from None


if __name__ == "__main__":
  sys.exit(main())
