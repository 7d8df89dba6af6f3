"""Orbax checkpoints of a workdir, in two retention classes, and `restore_params` for analysis.

Workdir layout:
  config.json                   the run card as trained (written once; resume checks it)
  metrics.jsonl                 flat metric dicts, one per line
  checkpoints/<step>/           *analysis* checkpoints, kept forever: params (+ full state unless
                                ckpt.params_only), at the steps of the configured schedules; step 0 = init
  resume/<step>/                *resume* checkpoints: full state, the latest `ckpt.keep_resume`
  analysis/                     tables written by analysis jobs

Items of a checkpoint: `params`, `opt_state`, `train` ({step, rng, mixture state}) and `meta` (JSON:
step, tokens seen, data step, mixture proportions, wall time). Step N = the state after N updates
(Pythia's convention; step 0 is the initialisation).

Integrity: once Orbax has committed a step, process 0 writes `lmtrace_manifest.json` into the step
directory: the size and CRC32 of every file of the checkpoint (lib/integrity.py). Every restore (the
trainer's resume, `restore_params`, hence every analysis job) verifies the files it reads first; a
mismatch is treated like an unreadable checkpoint. A checkpoint whose `meta` says it will be sealed
but has no manifest yet is still being written (or its writer died before sealing): it is not listed
by `available_steps`; a trainer starting in the workdir moves it aside (`<step>.unsealed`: its bytes were
never hashed, and Orbax's files do not detect a flipped bit) and recomputes that step. Checkpoints
written before manifests existed load with a note.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lib import errors, integrity, schedules
from lib import io as lio

log = logging.getLogger("lmtrace")

ANALYSIS_DIR, RESUME_DIR = "checkpoints", "resume"


CheckpointError = errors.CheckpointError  # re-exported


def _abstract(tree, shardings=None):
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _manager(path: str, *, read_only: bool = False, max_to_keep: int | None = None, async_: bool = True):
  opts = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=not read_only, read_only=read_only, enable_async_checkpointing=async_
  )
  return ocp.CheckpointManager(os.path.abspath(path), options=opts)


@contextlib.contextmanager
def _storage_errors(workdir: str):
  """A full disk hit inside Orbax (raised from its writer threads as OSError or as TensorStore's text)
  becomes one errors.StorageError naming the workdir and its free space."""
  try:
    yield
  except Exception as e:
    conv = errors.storage_error(e, os.path.abspath(workdir)) if errors.is_disk_full(e) else None
    if conv is None:
      raise
    raise conv from None


class _DiskFullLogFilter(logging.Filter):
  """Drops Orbax's own tracebacks of a full disk (dozens, from its writer threads): the trainer reports
  it once, as one line naming the workdir and its free space (errors.StorageError)."""

  def filter(self, record: logging.LogRecord) -> bool:
    texts = [record.getMessage()]
    e = record.exc_info[1] if record.exc_info else None
    while e is not None and len(texts) < 8:
      texts.append(str(e))
      e = e.__cause__ or e.__context__
    return not any("No space left on device" in t or "Disk quota exceeded" in t for t in texts)


_DISK_FULL_FILTER = _DiskFullLogFilter()


def _items(step_dir: str) -> set[str]:
  return {d for d in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, d))} if os.path.isdir(step_dir) else set()


class Checkpointer:
  """Saves analysis and resume checkpoints of a training run (async) and finds where to resume."""

  def __init__(
    self, workdir: str, *, analysis_steps, resume_every: int, keep_resume: int = 2, params_only: bool = False, async_: bool = True
  ):
    self.workdir = workdir
    self.analysis_steps = set(int(s) for s in analysis_steps)
    self.resume_every = int(resume_every)
    self.params_only = params_only
    self.analysis = _manager(os.path.join(workdir, ANALYSIS_DIR), async_=async_)
    self.resume = _manager(os.path.join(workdir, RESUME_DIR), max_to_keep=max(1, keep_resume), async_=async_)
    self._unsealed: list[tuple[str, int]] = []  # (subdir, step) saved by this process, manifest not yet written
    for name in ("absl", "orbax"):
      if _DISK_FULL_FILTER not in logging.getLogger(name).filters:
        logging.getLogger(name).addFilter(_DISK_FULL_FILTER)
    self._seal_leftovers()

  @classmethod
  def from_config(cls, workdir: str, ckpt_cfg, total: int) -> Checkpointer:
    """The trainer's checkpointer from a run config's `ckpt` block (schedule, resume cadence, async)."""
    return cls(
      workdir,
      analysis_steps=schedules.analysis_steps(schedules.parse_schedules(ckpt_cfg.schedule), total),
      resume_every=ckpt_cfg.resume_every,
      keep_resume=ckpt_cfg.keep_resume,
      params_only=ckpt_cfg.params_only,
      async_=ckpt_cfg.async_save,
    )

  def _seal_leftovers(self) -> None:
    """Quarantines checkpoints that Orbax committed but nobody sealed (a killed writer, or a deleted
    manifest): their bytes were never hashed, and Orbax's own files do not detect a flipped bit in the
    array data, so nothing can show they are intact. Each is moved to `<step>.unsealed` with a warning,
    and the resume point is kept below the oldest of them (`restore_latest`), so the deterministic
    rerun recomputes and re-saves every one of those steps."""
    self.quarantined: list[int] = []
    for sub in (ANALYSIS_DIR, RESUME_DIR):
      root = os.path.join(self.workdir, sub)
      for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        d = os.path.join(root, name)
        if name.isdigit() and is_committed(d) and not integrity.sealed_or_legacy(d):
          self.quarantined.append(int(name))
          if jax.process_index() == 0:
            log.warning(
              "%s was committed but never sealed (its writer stopped before sealing it, or its manifest was deleted): its "
              "files cannot be verified, so it is moved to %s.unsealed and step %s will be recomputed", d, d, name
            )  # fmt: skip
            os.replace(d, _free_name(f"{d}.unsealed"))  # a step quarantined twice (killed twice) keeps both
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("lmtrace: unsealed leftover checkpoints moved aside")
    if self.quarantined:
      self.analysis.reload()
      self.resume.reload()

  def wants(self, step: int, last: bool = False) -> tuple[bool, bool]:
    """(save an analysis checkpoint, save a resume checkpoint) at `step`."""
    a = step in self.analysis_steps
    r = last or (self.resume_every > 0 and step > 0 and step % self.resume_every == 0)
    if a and r and not self.params_only:
      r = False  # the analysis checkpoint already holds the full state
    return a, r

  def save(self, step: int, state: dict, meta: dict, last: bool = False) -> bool:
    a, r = self.wants(step, last)
    if not (a or r):
      return False
    self.seal_committed()
    meta = dict(meta, integrity=integrity.FORMAT)  # "a manifest will follow the commit"
    train = {"step": state["step"], "rng": state["rng"], "mixture": state.get("mixture", {})}
    full = dict(
      params=ocp.args.StandardSave(state["params"]),
      opt_state=ocp.args.StandardSave(state["opt_state"]),
      train=ocp.args.StandardSave(train),
      meta=ocp.args.JsonSave(meta),
    )
    # A step that already exists was written by the identical (deterministic) earlier pass of a
    # resumed run: keep it rather than overwrite.
    a = a and step not in self.analysis.all_steps()
    r = r and step not in self.resume.all_steps()
    trees = [state["params"]] + ([state["opt_state"]] if (r or (a and not self.params_only)) else [])
    leaves = jax.tree.leaves(trees)
    # on disk: as much as the largest of the newest checkpoints (+25%), or before any was written, twice the
    # arrays' bytes and ~16 KiB of OCDBT/metadata files per array
    est = int(1.25 * self._largest_on_disk()) or 2 * sum(int(getattr(x, "nbytes", 0)) for x in leaves) + (16 << 10) * len(leaves)
    self._check_space(step, (int(a) + int(r)) * est)
    with _storage_errors(self.workdir):
      if a:
        items = full if not self.params_only else dict(params=full["params"], meta=full["meta"])
        self.analysis.save(step, args=ocp.args.Composite(**items), force=True)
        self._unsealed.append((ANALYSIS_DIR, step))
      if r:
        self.resume.save(step, args=ocp.args.Composite(**full), force=True)
        self._unsealed.append((RESUME_DIR, step))
    return True

  def _largest_on_disk(self) -> int:
    """Bytes of the largest of the newest committed checkpoints (one per kind): a measured size per save."""
    out = 0
    for sub in (ANALYSIS_DIR, RESUME_DIR):
      root = os.path.join(self.workdir, sub)
      steps = [int(n) for n in os.listdir(root) if n.isdigit()] if os.path.isdir(root) else []
      if steps:
        d = os.path.join(root, str(max(steps)))
        out = max(out, sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs))
    return out

  def _check_space(self, step: int, need: int) -> None:
    """errors.StorageError (one line, every process) before a save that the file system has no room for:
    the save is refused whole rather than torn. `need`: the estimated bytes (1 MiB is added)."""
    need = int(need) + (1 << 20)
    try:
      u = shutil.disk_usage(self.workdir)
      short = u.total > 0 and u.free < need  # total 0: a file system that reports no sizes (some FUSE mounts)
    except OSError:
      short = False
    if jax.process_count() > 1:  # the save is collective: every process refuses, or none
      from jax.experimental import multihost_utils

      short = bool(multihost_utils.broadcast_one_to_all(np.int32(short)))
    if short:
      self.wait()  # the saves already under way finish and are sealed: the message lists them
      done = sorted(available_steps(self.workdir))
      err = errors.StorageError(
        f"no space left on device for the checkpoint of step {step} in {os.path.abspath(self.workdir)}: it needs about "
        f"{need / 2**20:.1f} MiB and {errors.free_space(self.workdir)} is free there; free some space, then rerun the same "
        f"command (the checkpoints written so far are intact, the latest: {done[-3:]})"
      )
      err.errno = 28
      raise err

  def seal_committed(self) -> None:
    """Writes the manifest of every checkpoint this run saved whose (async) save has committed."""
    busy = {ANALYSIS_DIR: self.analysis.is_saving_in_progress(), RESUME_DIR: self.resume.is_saving_in_progress()}
    left = []
    for sub, step in self._unsealed:
      d = os.path.join(self.workdir, sub, str(step))
      if busy[sub]:
        left.append((sub, step))
      elif is_committed(d) and jax.process_index() == 0:
        integrity.seal(d)  # (not committed and not saving: rotated away by keep_resume)
    self._unsealed = left

  def wait(self) -> None:
    with _storage_errors(self.workdir):
      self.analysis.wait_until_finished()
      self.resume.wait_until_finished()
      self.seal_committed()

  def close(self) -> None:
    self.analysis.close()
    self.resume.close()

  def _move_aside(self, sub: str, step: int, why: str, mngr) -> None:
    bad = os.path.join(self.workdir, sub, str(step))
    aside = f"{bad}.unreadable"
    log.warning("skipping unreadable checkpoint %s (%s); moved to %s, trying the previous one", bad, why[:400], aside)
    if jax.process_index() == 0 and os.path.isdir(bad):
      os.replace(bad, aside)
    mngr.reload()

  def restore_latest(self, target_state: dict, mismatch_hint: str = "") -> tuple[dict, dict] | None:
    """The newest readable full-state checkpoint restored onto `target_state`'s shardings, or None.

    Damaged checkpoints (files that fail their manifest, half-written or unreadable ones) are moved
    aside as `<step>.unreadable` with a warning and the previous one is tried. A checkpoint whose
    saved tree (structure, shapes, dtypes) differs from the target is a changed config, not damage:
    `errors.ConfigError` naming the differences (plus `mismatch_hint`), and nothing is touched.
    """
    candidates = []
    below = min(getattr(self, "quarantined", []) or [math.inf])  # recompute every quarantined step
    for mngr, sub in ((self.resume, RESUME_DIR), (self.analysis, ANALYSIS_DIR)):
      for s in mngr.all_steps():
        if s < below and {"params", "opt_state", "train"} <= _items(os.path.join(self.workdir, sub, str(s))):
          candidates.append((s, sub, mngr))
    train_t = {"step": target_state["step"], "rng": target_state["rng"], "mixture": target_state.get("mixture", {})}
    items_t = {"params": target_state["params"], "opt_state": target_state["opt_state"], "train": train_t}
    for step, sub, mngr in sorted(candidates, key=lambda c: -c[0]):
      d = os.path.join(self.workdir, sub, str(step))
      try:
        if integrity.verify(d, ("params", "opt_state", "train", "meta")) == "legacy":
          log.info("note: %s predates integrity manifests; restored without verification", d)
        diffs = {}
        for item, tree in items_t.items():
          diffs.update({f"{item}/{k}": v for k, v in tree_differences(os.path.join(d, item), tree).items()})
      except CheckpointError as e:
        self._move_aside(sub, step, str(e), mngr)
        continue
      if diffs:
        shown = "; ".join(f"{k}: {v}" for k, v in list(diffs.items())[:4])
        more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
        hint = f" Config keys that differ from the saved run: {mismatch_hint}." if mismatch_hint else ""
        raise errors.ConfigError(
          f"cannot resume {self.workdir}: checkpoint {sub}/{step} holds a state of another shape than this config builds "
          f"({shown}{more}).{hint} Nothing was changed: rerun with the run's original settings, or use a new --workdir."
        )
      try:
        out = mngr.restore(
          step,
          args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(target_state["params"])),
            opt_state=ocp.args.StandardRestore(_abstract(target_state["opt_state"])),
            train=ocp.args.StandardRestore(_abstract(train_t)),
            meta=ocp.args.JsonRestore(),
          ),
        )
      except Exception as e:  # noqa: BLE001 - verified files whose structure matches yet fail to read: damage
        self._move_aside(sub, step, f"{type(e).__name__}: {e}", mngr)
        continue
      state = dict(
        target_state,
        params=out["params"],
        opt_state=out["opt_state"],
        step=out["train"]["step"],
        rng=out["train"]["rng"],
        mixture=out["train"]["mixture"],
      )
      return state, dict(out["meta"] or {})
    return None


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves if leaf is not None}


def tree_differences(item_dir: str, target) -> dict[str, str]:
  """{path: what differs} between the array tree saved in `item_dir` and `target` (shapes/dtypes).

  Reads only Orbax's tree metadata (never its error text); CheckpointError if that is unreadable.
  """
  try:
    with ocp.StandardCheckpointer() as ckptr:
      md = ckptr.metadata(os.path.abspath(item_dir))
  except Exception as e:  # noqa: BLE001 - any failure to read the metadata is damage
    raise CheckpointError(f"cannot read the tree metadata of {item_dir}: {type(e).__name__}: {str(e)[:300]}") from e
  saved = _flat(getattr(md, "item_metadata", md))
  saved = {k: v for k, v in saved.items() if hasattr(v, "shape")}
  want = _flat(target)
  out = {}
  for k in sorted(set(saved) | set(want)):
    if k not in want:
      out[k] = "saved, not in this config"
    elif k not in saved:
      out[k] = "in this config, not saved"
    else:
      a, b = saved[k], want[k]
      if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
        out[k] = f"saved {np.dtype(a.dtype).name}{list(a.shape)}, config {np.dtype(b.dtype).name}{list(b.shape)}"
  return out


# ----------------------------------------------------------------------------------------------
# Reading runs (analysis side)


def read_config(workdir: str) -> dict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isdir(workdir):
    raise CheckpointError(f"workdir {workdir} does not exist")
  if not os.path.exists(path):
    raise CheckpointError(f"{workdir} has no config.json: not an lmtrace workdir (train with train.py --workdir={workdir})")
  cfg = read_json(path, "the run's config")
  if not isinstance(cfg, dict):
    raise CheckpointError(f"{path} holds a {type(cfg).__name__}, not a run config")
  return cfg


def read_json(path: str, what: str):
  """The JSON in `path`; CheckpointError (one line) if it cannot be read or parsed (truncated, garbage)."""
  try:
    with open(path, "rb") as f:
      return json.loads(f.read().decode("utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} ({what}) is damaged: not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
  except OSError as e:
    raise CheckpointError(f"cannot read {path} ({what}): {e.strerror or e}") from None


def is_committed(step_dir: str) -> bool:
  """Orbax finished writing `step_dir`: its final (renamed) name exists with a commit marker."""
  return os.path.isfile(os.path.join(step_dir, "commit_success.txt")) or os.path.isfile(
    os.path.join(step_dir, "_CHECKPOINT_METADATA")
  )


def available_steps(workdir: str, need_full: bool = False) -> dict[int, str]:
  """{step: subdir} of every finished checkpoint (analysis ones preferred when both exist).

  Finished = committed by Orbax and, when it was written with integrity manifests, sealed; a
  checkpoint still being written by a running trainer is not listed.
  """
  out: dict[int, str] = {}
  for sub in (RESUME_DIR, ANALYSIS_DIR):
    root = os.path.join(workdir, sub)
    if not os.path.isdir(root):
      continue
    for name in os.listdir(root):
      if not name.isdigit():
        continue  # orbax temporaries (half-written saves) have suffixes
      d = os.path.join(root, name)
      items = _items(d)
      if "params" in items and (not need_full or "opt_state" in items) and is_committed(d) and integrity.sealed_or_legacy(d):
        out[int(name)] = sub
  return dict(sorted(out.items()))


def load_model(workdir: str):
  """(model, ModelConfig, run config dict) of a workdir."""
  from lib import model as M

  cfg = read_config(workdir)
  mcfg = M.ModelConfig.from_config(cfg["model"])
  return M.make(mcfg), mcfg, cfg


def require_causal(workdir: str, mcfg, job: str) -> None:
  """Refuses a masked-LM (bidirectional) run in a job that reads next-token probabilities."""
  if not mcfg.causal:
    raise CheckpointError(f"{workdir} holds a masked LM (model.causal=False): {job} needs a causal LM's next-token probabilities")


def read_meta(workdir: str, step: int) -> dict:
  steps = available_steps(workdir)
  if step not in steps:
    return {}
  return read_meta_at(os.path.join(workdir, steps[step], str(step)))


def read_meta_at(step_dir: str) -> dict:
  """The `meta` item of the checkpoint directory `step_dir` ({} if it has none): for a caller that
  already listed the workdir once (`available_steps`) and must not list it again per checkpoint."""
  path = os.path.join(step_dir, "meta", "metadata")
  if not os.path.exists(path):
    return {}
  meta = read_json(path, "the checkpoint's meta")
  if not isinstance(meta, dict):
    raise CheckpointError(f"{path} (the checkpoint's meta) is damaged: a {type(meta).__name__}, not a JSON object")
  return meta


def resolve_step(workdir: str, step) -> int:
  steps = available_steps(workdir)
  if not steps:
    raise CheckpointError(f"{workdir} has no finished checkpoints under {ANALYSIS_DIR}/ or {RESUME_DIR}/")
  if step is None or step in ("latest", "last", -1):
    return max(steps)
  step = int(step)
  if step not in steps:
    for sub in (ANALYSIS_DIR, RESUME_DIR):
      d = os.path.join(workdir, sub, str(step))
      if is_committed(d) and not integrity.sealed_or_legacy(d):
        raise CheckpointError(
          f"{d} exists but is unsealed: it has no integrity manifest (a trainer is still writing it, its writer stopped "
          f"before sealing it, or the manifest was deleted), so its files cannot be verified; rerunning the trainer in "
          f"{workdir} moves it aside and recomputes step {step}"
        )
    near = sorted(steps, key=lambda s: abs(s - step))[:5]
    raise CheckpointError(f"{workdir} has no checkpoint at step {step}; nearest: {sorted(near)} ({len(steps)} steps available)")
  return step


@functools.lru_cache(maxsize=16)
def _abstract_model(mcfg):
  """(ShapeDtypeStruct tree, logical PartitionSpec tree) of a model config, traced once per config
  (tracing the model's init costs ~150-450 ms, several forward passes of a small model)."""
  from lib import model as M

  return M.abstract_params(M.make(mcfg))


@functools.lru_cache(maxsize=16)
def _params_target(mcfg, mesh):
  """Abstract params with their shardings on `mesh`: derived once per (model config, mesh), not per
  checkpoint."""
  from lib import sharding

  shapes, logical = _abstract_model(mcfg)
  return _abstract(shapes, sharding.logical_to_sharding(logical, shapes, mesh))


def params_target(mcfg, mesh=None):
  """The abstract params (shapes, dtypes, shardings on `mesh`; None = one device) every restore of a
  run with model config `mcfg` produces: what a caller compiles against before the first restore."""
  from lib import sharding

  return _params_target(mcfg, mesh or sharding.single_device_mesh())


def param_count(mcfg) -> int:
  """Number of parameters of model config `mcfg` (= lib.model.param_count, without retracing)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(_abstract_model(mcfg)[0]))


def restore_params(workdir: str, step=None, mesh=None):
  """Parameters of checkpoint `step` (None = latest) placed on `mesh` (None = one device).

  Works across meshes: a run trained on 8 devices restores onto 1 and vice versa. The files are
  verified against the checkpoint's manifest (beside the read, in a thread, so it costs little wall
  time); the arrays are returned only if they pass, else `CheckpointError` naming the damage.
  """
  _, mcfg, _ = load_model(workdir)
  step = resolve_step(workdir, step)
  sub = available_steps(workdir)[step]
  return restore_params_at(os.path.join(os.path.abspath(workdir), sub, str(step)), mcfg, mesh)


def restore_params_at(step_dir: str, mcfg, mesh=None):
  """`restore_params` of the checkpoint directory `step_dir` (W/<sub>/<step>) of a run with model
  config `mcfg`, for a job that listed the workdir and read its config once: the same verification
  (CheckpointError for damaged, unsealed or unreadable files), no per-checkpoint listing."""
  target = params_target(mcfg, mesh)
  path = os.path.join(step_dir, "params")

  def read():
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path, target)

  try:
    out, verdict = integrity.read_verified(step_dir, ("params",), read)
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - verified files that still fail to read
    raise CheckpointError(f"cannot restore params from {path}: {type(e).__name__}: {str(e)[:500]}") from e
  if verdict == "legacy":
    log.info("note: %s predates integrity manifests; read without verification", step_dir)
  return out


def save_json(path: str, obj: Any) -> None:
  """`obj` as JSON, written atomically (lib/io.py)."""
  lio.atomic_json(path, obj)


def _free_name(path: str) -> str:
  """`path`, or `path.1`, `path.2`, … : the first that does not exist (os.replace cannot move a directory onto
  a non-empty one, so a second quarantine of the same step needs its own name)."""
  out, k = path, 0
  while os.path.exists(out):
    k += 1
    out = f"{path}.{k}"
  return out
