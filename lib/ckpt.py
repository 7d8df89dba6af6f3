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
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lib import errors

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

  def wants(self, step: int, last: bool = False) -> tuple[bool, bool]:
    """(save an analysis checkpoint, save a resume checkpoint) at `step`."""
    a = step in self.analysis_steps
    r = last or (self.resume_every > 0 and step > 0 and step % self.resume_every == 0)
    if a and r and not self.params_only:
      r = False  # the analysis checkpoint already holds the full state
    return a, r

  def save(self, step: int, state: dict, meta: dict, last: bool = False) -> bool:
    a, r = self.wants(step, last)
    train = {"step": state["step"], "rng": state["rng"], "mixture": state.get("mixture", {})}
    full = dict(
      params=ocp.args.StandardSave(state["params"]),
      opt_state=ocp.args.StandardSave(state["opt_state"]),
      train=ocp.args.StandardSave(train),
      meta=ocp.args.JsonSave(meta),
    )
    # A step that already exists was written by the identical (deterministic) earlier pass of a
    # resumed run: keep it rather than overwrite.
    if a and step not in self.analysis.all_steps():
      items = full if not self.params_only else dict(params=full["params"], meta=full["meta"])
      self.analysis.save(step, args=ocp.args.Composite(**items), force=True)
    if r and step not in self.resume.all_steps():
      self.resume.save(step, args=ocp.args.Composite(**full), force=True)
    return a or r

  def wait(self) -> None:
    self.analysis.wait_until_finished()
    self.resume.wait_until_finished()

  def close(self) -> None:
    self.analysis.close()
    self.resume.close()

  def restore_latest(self, target_state: dict) -> tuple[dict, dict] | None:
    """The newest readable full-state checkpoint restored onto `target_state`'s shardings, or None.

    Unreadable (half-written or corrupted) checkpoints are skipped with a warning.
    """
    candidates = []
    for mngr, sub in ((self.resume, RESUME_DIR), (self.analysis, ANALYSIS_DIR)):
      for s in mngr.all_steps():
        if {"params", "opt_state", "train"} <= _items(os.path.join(self.workdir, sub, str(s))):
          candidates.append((s, sub, mngr))
    for step, sub, mngr in sorted(candidates, key=lambda c: -c[0]):
      try:
        train_t = {"step": target_state["step"], "rng": target_state["rng"], "mixture": target_state.get("mixture", {})}
        out = mngr.restore(
          step,
          args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(target_state["params"])),
            opt_state=ocp.args.StandardRestore(_abstract(target_state["opt_state"])),
            train=ocp.args.StandardRestore(_abstract(train_t)),
            meta=ocp.args.JsonRestore(),
          ),
        )
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, loudly
        if "shape" in str(e).lower() and "mismatch" in str(e).lower():
          raise CheckpointError(f"{self.workdir}/{sub}/{step} holds arrays of other shapes than this model: {e}") from e
        bad = os.path.join(self.workdir, sub, str(step))
        aside = f"{bad}.unreadable"
        log.warning(
          "skipping unreadable checkpoint %s (%s: %s); moved to %s, trying the previous one",
          bad,
          type(e).__name__,
          str(e)[:300],
          aside,
        )
        if jax.process_index() == 0 and os.path.isdir(bad):
          os.replace(bad, aside)
        mngr.reload()
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


# ----------------------------------------------------------------------------------------------
# Reading runs (analysis side)


def read_config(workdir: str) -> dict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isdir(workdir):
    raise CheckpointError(f"workdir {workdir} does not exist")
  if not os.path.exists(path):
    raise CheckpointError(f"{workdir} has no config.json: not an lmtrace workdir (train with train.py --workdir={workdir})")
  with open(path) as f:
    return json.load(f)


def available_steps(workdir: str, need_full: bool = False) -> dict[int, str]:
  """{step: subdir} of every finished checkpoint (analysis ones preferred when both exist)."""
  out: dict[int, str] = {}
  for sub in (RESUME_DIR, ANALYSIS_DIR):
    root = os.path.join(workdir, sub)
    if not os.path.isdir(root):
      continue
    for name in os.listdir(root):
      if not name.isdigit():
        continue  # orbax temporaries (half-written saves) have suffixes
      items = _items(os.path.join(root, name))
      if "params" in items and (not need_full or "opt_state" in items):
        out[int(name)] = sub
  return dict(sorted(out.items()))


def load_model(workdir: str):
  """(model, ModelConfig, run config dict) of a workdir."""
  from lib import model as M

  cfg = read_config(workdir)
  mcfg = M.ModelConfig.from_config(cfg["model"])
  return M.make(mcfg), mcfg, cfg


def read_meta(workdir: str, step: int) -> dict:
  steps = available_steps(workdir)
  if step not in steps:
    return {}
  path = os.path.join(workdir, steps[step], str(step), "meta", "metadata")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def resolve_step(workdir: str, step) -> int:
  steps = available_steps(workdir)
  if not steps:
    raise CheckpointError(f"{workdir} has no finished checkpoints under {ANALYSIS_DIR}/ or {RESUME_DIR}/")
  if step is None or step in ("latest", "last", -1):
    return max(steps)
  step = int(step)
  if step not in steps:
    near = sorted(steps, key=lambda s: abs(s - step))[:5]
    raise CheckpointError(f"{workdir} has no checkpoint at step {step}; nearest: {sorted(near)} ({len(steps)} steps available)")
  return step


def restore_params(workdir: str, step=None, mesh=None):
  """Parameters of checkpoint `step` (None = latest) placed on `mesh` (None = one device).

  Works across meshes: a run trained on 8 devices restores onto 1 and vice versa.
  """
  from lib import model as M
  from lib import sharding

  model, _, _ = load_model(workdir)
  step = resolve_step(workdir, step)
  sub = available_steps(workdir)[step]
  mesh = mesh or sharding.single_device_mesh()
  shapes, _ = M.abstract_params(model)
  target = _abstract(shapes, M.param_shardings(model, mesh))
  path = os.path.join(os.path.abspath(workdir), sub, str(step), "params")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path, target)
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot restore params from {path}: {type(e).__name__}: {str(e)[:500]}") from e


def save_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
  os.replace(tmp, path)


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)
