"""The one place where mesh axes and logical-to-mesh partition rules live.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state
sharded, ZeRO-3 style), `tensor` (Megatron-style: heads / MLP hidden / vocab split).

Logical axis names used by `lib/model.py` (params) and activations:
  batch, length            activations' batch and sequence axes
  embed / act_embed        model width in parameters / activations
  heads / act_heads        attention heads
  kv                       per-head dim
  mlp / act_mlp            MLP hidden
  vocab / act_vocab        vocabulary
  pos                      learned-position table rows
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lib import errors

log = logging.getLogger("lmtrace")

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every data-parallel axis

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", BATCH_AXES),
  ("length", None),
  ("embed", "fsdp"),
  ("act_embed", None),
  ("heads", "tensor"),
  ("act_heads", "tensor"),
  ("kv", None),
  ("mlp", "tensor"),
  ("act_mlp", "tensor"),
  ("vocab", "tensor"),
  ("act_vocab", "tensor"),
  ("pos", None),
)


ShardingError = errors.ShardingError  # re-exported


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves a {data, fsdp, tensor} config (one entry may be -1) against the device count."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ShardingError(
        f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not divide the {num_devices} available devices."
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ShardingError(
      f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but "
      f"{num_devices} are available; set e.g. --config.mesh.data=-1."
    )
  return tuple(sizes)


def make_mesh(mesh_cfg=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (Explicit breaks embedding gathers)."""
  devices = list(devices if devices is not None else jax.devices())
  cfg = mesh_cfg if mesh_cfg is not None else {"data": -1, "fsdp": 1, "tensor": 1}
  shape = mesh_shape(cfg, len(devices))
  if devices[0].platform in ("tpu", "gpu", "cuda", "rocm"):
    from jax.experimental import mesh_utils

    try:  # topology-aware order (ICI / NVLink neighbours on the fast axes)
      dev = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError) as e:  # a slice shape mesh_utils cannot tile
      log.info("mesh_utils cannot lay out %s on these devices (%s); using row-major order", shape, e)
      dev = np.asarray(devices).reshape(shape)
  else:  # CPU (incl. fake devices): no topology, row-major order
    dev = np.asarray(devices).reshape(shape)
  return Mesh(dev, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1, timeout_s: int = 300) -> None:
  """Joins a multi-process job (before any other JAX call): '' = single process, 'auto' = let JAX
  detect the cluster (TPU pods, SLURM), 'host:port' = explicit coordinator (GPU clusters, or local
  processes sharing CPU devices over gloo). ShardingError after `timeout_s` without the coordinator."""
  if not coordinator or jax.distributed.is_initialized():
    return
  # Cross-process collectives for CPU devices (a no-op for GPU/TPU backends; jax 0.10's default, set
  # explicitly for other versions). Must not touch the backend before initialize(), so no
  # jax.default_backend() here.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if coordinator == "auto":  # TPU pods, SLURM (srun): jax reads the cluster's environment
      jax.distributed.initialize(initialization_timeout=int(timeout_s))
      return
    if process_id != 0:  # XLA's client aborts the process (no Python error) when it cannot connect: look first
      _wait_for_coordinator(coordinator, num_processes, process_id, timeout_s)
    jax.distributed.initialize(
      coordinator, num_processes=num_processes, process_id=process_id, initialization_timeout=int(timeout_s)
    )
  except RuntimeError as e:  # XlaRuntimeError: DEADLINE_EXCEEDED / UNAVAILABLE from the coordination service
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise ShardingError(
      f"could not join the job at coordinator {coordinator!r} as process {process_id} of {num_processes} within "
      f"{timeout_s}s ({first}); check the address and that process 0 runs (distributed.timeout_s sets the wait)"
    ) from None


def _wait_for_coordinator(coordinator: str, num_processes: int, process_id: int, timeout_s: float) -> None:
  """Returns once a TCP connection to `coordinator` (host:port) succeeds; ShardingError after timeout_s."""
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise ShardingError(f"distributed.coordinator={coordinator!r} is not host:port (or 'auto')")
  deadline, err = time.monotonic() + float(timeout_s), None
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        return
    except OSError as e:
      err = e
    if time.monotonic() >= deadline:
      raise ShardingError(
        f"could not join the job at coordinator {coordinator!r} as process {process_id} of {num_processes} within "
        f"{timeout_s}s ({type(err).__name__}: {err}); check the address and that process 0 runs "
        "(distributed.timeout_s sets the wait)"
      )
    time.sleep(0.5)


def enable_compilation_cache(path: str | None = None, min_compile_secs: float = 1.0) -> None:
  """Persists XLA executables across runs (a resumed run or a rerun analysis job skips recompiling).
  Defaults to ~/.cache/lmtrace/jax; an explicit JAX_COMPILATION_CACHE_DIR or config setting wins."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", path or os.path.join(os.path.expanduser("~"), ".cache", "lmtrace", "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
  return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [device or jax.devices()[0]])


def batch_size_per_shard(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(mesh: Mesh, global_batch: int, what: str = "batch_size") -> None:
  n = batch_size_per_shard(mesh)
  if global_batch % n:
    raise ShardingError(
      f"{what}={global_batch} is not divisible by the data-parallel mesh size {n} "
      f"(mesh {dict(mesh.shape)}); use a multiple of {n}."
    )
  if global_batch % jax.process_count():
    raise ShardingError(f"{what}={global_batch} is not divisible by the {jax.process_count()} processes.")


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (e.g. a 204-token vocab on tensor=8)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    axes_t = axes if isinstance(axes, tuple) else (axes,)
    kept = []
    for a in axes_t:
      size = math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]
      if dim % size == 0:
        kept.append(a)
    out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*out)


def logical_to_sharding(logical_tree, abstract_tree, mesh: Mesh):
  """Logical PartitionSpecs (from nn.get_partition_spec) -> NamedShardings that fit the shapes."""
  mesh_specs = nn.logical_to_mesh(logical_tree, RULES)

  def one(spec, x):
    spec = spec if isinstance(spec, P) else P()
    return NamedSharding(mesh, _fit(spec, x.shape, mesh))

  return jax.tree.map(one, mesh_specs, abstract_tree, is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """The contiguous [lo, hi) range of global batch rows this process's devices hold."""
  sh = batch_sharding(mesh)
  idx = sh.addressable_devices_indices_map((global_batch, 1))
  starts = [s[0].start or 0 for s in idx.values()]
  stops = [s[0].stop if s[0].stop is not None else global_batch for s in idx.values()]
  lo, hi = min(starts), max(stops)
  if (hi - lo) * jax.process_count() != global_batch:
    raise ShardingError(f"this process's batch rows [{lo},{hi}) are not a contiguous 1/{jax.process_count()} share.")
  return lo, hi


def global_batch_from_local(mesh: Mesh, local: dict[str, np.ndarray], global_batch: int) -> dict[str, jax.Array]:
  """Host-local rows -> global jax.Arrays sharded over the batch axes."""
  out = {}
  for k, v in local.items():
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, (global_batch,) + v.shape[1:])
  return out


def mesh_from_flag(spec: str | None = "", flag: str = "--mesh") -> Mesh:
  """The analysis CLIs' `--mesh=data,fsdp,tensor` (e.g. '2,2,2'; one size may be -1). Empty: one device,
  or every device (data-parallel) in a multi-process job, where one device would leave processes idle."""
  if spec:
    try:
      sizes = [int(x) for x in str(spec).split(",")]
    except ValueError:
      sizes = []
    if len(sizes) != len(MESH_AXES):
      raise ShardingError(f"{flag}={spec!r} needs {len(MESH_AXES)} integer sizes ({','.join(MESH_AXES)}), e.g. {flag}=2,2,2")
    return make_mesh(dict(zip(MESH_AXES, sizes)))
  if jax.process_count() > 1:
    return make_mesh({"data": jax.device_count(), "fsdp": 1, "tensor": 1})
  return single_device_mesh()
