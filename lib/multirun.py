"""Seed-vectorised training: k runs that differ only in their seed, trained by ONE jitted program.

This module holds the run-axis pieces (seeds, modes, stacking, per-run masks); the group's training loop,
which needs the data pipeline, is `train_group.py` beside train.py (lib/ must not import data/).

  python train.py --config=configs/pcfg.py:nano --workdir=runs/g --config.train.seeds=0,1,2,3,4

The train state gets a leading run axis R and one jitted step maps `lib.steps.train_step` over it:
`jax.vmap` (batched matmuls; what accelerators want) or `jax.lax.map` (the runs in turn inside one
program: one dispatch per step for all runs; on a CPU this is cheaper: XLA:CPU hands only unbatched
dots to its matmul kernels, and under vmap every weight matmul is a batched dot, so a vmapped step costs
about twice the separate ones; `python -m bench.vectorised --step_costs`) — `train.seeds_mode`, default
auto (map on CPU, vmap elsewhere). Each
run's slice is sharded exactly like a single run's state (the run axis is replicated over the mesh). Every run gets an
ordinary workdir `WORKDIR/seed_<s>` (config.json with its own `seed` and no `train.seeds`, metrics.jsonl,
checkpoints/, resume/), so analysis jobs, loaders and a later single-run resume read it unchanged;
`WORKDIR/group.json` lists the runs. A run whose loss turns non-finite stops writing checkpoints and
metrics (its workdir gets `diverged.json`); the others go on. Rerunning the command resumes the group
bit-for-bit from the runs' common newest checkpoint.

Data order: with `data.seed >= 0` every run sees the same batches (one batch, broadcast over R); with
`data.seed = -1` run s reads the order of seed s (k pipelines, stacked).

Legend: R runs (seeds), B batch, L length.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lib import ckpt, errors, runlock, session, steps

DIVERGED = "diverged.json"  # written into a run's workdir when its loss turned non-finite
GROUP = "group.json"  # written into the group's directory: seeds and run workdirs


def parse_seeds(text) -> list[int]:
  """'0,1,2' | '0-4' | [0, 1] -> [0, 1, 2, ...]; '' -> [] (a single run). Duplicates are refused."""
  if text in ("", None):
    return []
  if isinstance(text, (list, tuple)):
    out = [int(s) for s in text]
  else:
    out = []
    for part in str(text).replace(" ", "").split(","):
      try:
        if "-" in part[1:]:
          a, b = part.split("-", 1) if not part.startswith("-") else (None, None)
          out += list(range(int(a), int(b) + 1))
        else:
          out.append(int(part))
      except (TypeError, ValueError):
        raise errors.ConfigError(f"train.seeds={text!r}: expected integers like '0,1,2,3,4' or '0-4'") from None
  if len(set(out)) != len(out):
    raise errors.ConfigError(f"train.seeds={text!r} repeats a seed; each run needs its own")
  return out


def unvectorisable(cfg) -> str | None:
  """Why `cfg` cannot be trained as a seed-vectorised group (one line naming the key), or None."""
  if cfg.probes.enabled:
    return "probes.enabled=True: the probe hook keeps per-run host state; record probes offline (analysis.trajectories)"
  n_groups = len(cfg.data.groups) if cfg.data.get("groups") else 1
  if n_groups > 1 and cfg.mixture.method not in ("stratified", "static"):
    return f"mixture.method={cfg.mixture.method!r}: the controller updates host state from each run's own evals"
  if cfg.distributed.num_processes > 1 or cfg.distributed.coordinator:
    return "distributed.*: vectorised groups run in one process (launch one job per seed on a cluster)"
  return None


def run_workdirs(workdir: str, seeds) -> list[str]:
  """The ordinary workdir of each run of a group."""
  return [os.path.join(workdir, f"seed_{s}") for s in seeds]


def stacked_sharding(sh: NamedSharding) -> NamedSharding:
  """The sharding of a leaf with a leading run axis: each run's slice laid out like the single run."""
  return NamedSharding(sh.mesh, P(None, *sh.spec))


def stack(trees):
  """[tree, ...] -> one tree with a leading run axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def finite_runs(loss_R) -> np.ndarray:
  """Boolean mask of runs whose loss is finite."""
  return np.isfinite(np.asarray(loss_R, np.float64))


def run_mode(mode: str) -> str:
  """'vmap' | 'map' from `train.seeds_mode` ('auto': map on CPU, where batched matmuls cost about 2x the
  separate ones (`bench.vectorised --step_costs`), vmap on accelerators, where they fill the device)."""
  if mode not in ("auto", "vmap", "map"):
    raise errors.ConfigError(f"train.seeds_mode={mode!r}: expected auto, vmap or map")
  if mode == "auto":
    return "map" if jax.default_backend() == "cpu" else "vmap"
  return mode


def _over_runs(fn, mode: str, args, in_axes):
  """fn over the run axis of the args with in_axes 0 (None: shared): jax.vmap, or lax.map (runs in turn)."""
  if mode == "vmap":
    return jax.vmap(fn, in_axes=in_axes)(*args)
  mapped = tuple(a for a, ax in zip(args, in_axes) if ax == 0)

  def one(xs):
    it = iter(xs)
    return fn(*(next(it) if ax == 0 else a for a, ax in zip(args, in_axes)))

  return jax.lax.map(one, mapped)


def group_train_step(state_R, batch, *, shared_batch: bool, mode: str = "vmap", **kw):
  """`steps.train_step` over the run axis; `batch` is one batch (shared) or a tuple of per-run batches."""
  if not shared_batch:
    batch = stack(batch)
  return _over_runs(functools.partial(steps.train_step, **kw), mode, (state_R, batch), (0, None if shared_batch else 0))


def group_eval_step(params_R, batch, *, mode: str = "vmap", **kw):
  return _over_runs(functools.partial(steps.eval_step, **kw), mode, (params_R, batch), (0, None))


def take(state_R, i):
  """Run i's slice of a stacked state."""
  return jax.tree.map(lambda x: x[i], state_R)


class _MemberLocks:
  """The member workdirs' locks, released when the group session closes (after its checkpointers)."""

  def __init__(self, workdirs):
    self.workdirs = list(workdirs)
    self.locks = [runlock.WorkdirLock(w) for w in self.workdirs]

  def acquire(self) -> None:
    for w, lk in zip(self.workdirs, self.locks):
      os.makedirs(w, exist_ok=True)
      lk.acquire()

  def heartbeat(self) -> None:
    for lk in self.locks:
      lk.heartbeat()

  def close(self) -> None:
    for lk in self.locks:
      lk.release()


class GroupSession(session.RunSession):
  """`lib.session.RunSession` of a group: holds the group directory's lock AND every member workdir's
  (a member trained alone, or by another group, is refused in one line), stops on SIGTERM/SIGINT at a
  step boundary like a single run, and a failed fresh start removes the group directory only when no
  member holds a checkpoint."""

  def __init__(self, workdir: str, member_workdirs):
    super().__init__(workdir)
    self.members = _MemberLocks(member_workdirs)

  def __enter__(self):
    super().__enter__()
    self.closing(self.members)  # closed last: after every checkpointer registered later has finished
    try:
      self.members.acquire()
    except BaseException as e:
      self.__exit__(type(e), e, e.__traceback__)
      raise
    return self

  def stop_requested(self, step: int) -> bool:
    self.members.heartbeat()
    return super().stop_requested(step)

  def _remove_if_fresh(self) -> None:
    if not any(os.path.isdir(w) and ckpt.available_steps(w) for w in self.members.workdirs):
      super()._remove_if_fresh()
