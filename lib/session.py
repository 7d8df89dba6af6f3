"""What a training run holds while it owns a workdir: the lock, the preemption guard, the things to
close, and the rule that a failed start leaves nothing behind.

    with RunSession(workdir) as run:        # refuses a workdir that is a file or is locked
      ckpt = run.closing(C.Checkpointer(...))
      ...
      if run.stop_requested(step): ...      # preemption (all processes agree) + lock heartbeat

If the session created the workdir (its own mkdir, atomic) and the run fails before any checkpoint was
committed, the workdir is removed again (process 0), so the corrected command starts clean. A start
refused by the lock removes nothing: the workdir is the lock holder's.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax

from lib import ckpt as C
from lib import errors, preempt, runlock
from lib import io as lio

log = logging.getLogger("lmtrace")


def check_workdir_path(workdir: str) -> None:
  """ConfigError unless `workdir` is a directory or can be created as one."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.ConfigError(f"--workdir={workdir} is a file, not a directory; pass a directory (new or a run's)")
  if os.path.isdir(workdir):  # an existing workdir: it must take new files (checkpoints, metrics, the lock)
    lio.check_writable(workdir, f"--workdir={workdir} exists but this trainer cannot write it: ")
    return
  parent = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise errors.ConfigError(f"--workdir={workdir} cannot be created ({parent} is not a writable directory)")


def _has_checkpoint(workdir: str) -> bool:
  return bool(C.available_steps(workdir)) if os.path.isdir(workdir) else False


class RunSession:
  def __init__(self, workdir: str):
    check_workdir_path(workdir)
    self.workdir = workdir
    self.created = False  # set by __enter__: this process's mkdir made the workdir
    self.lock = runlock.WorkdirLock(workdir)
    self.guard = preempt.PreemptionGuard()
    self._closables: list = []

  def closing(self, obj):
    """Registers `obj` (with .close(); .wait() first if it has one) to be closed when the run ends."""
    self._closables.append(obj)
    return obj

  def stop_requested(self, step: int) -> bool:
    self.lock.heartbeat()
    return self.guard.stop_requested(step)

  def __enter__(self):
    # Only the process whose mkdir made the directory may remove it again (an atomic test: of two trainers
    # started on one new workdir, exactly one created it); a refused lock removes nothing, since the
    # workdir then belongs to the trainer that holds it.
    os.makedirs(os.path.dirname(os.path.abspath(self.workdir)), exist_ok=True)
    if jax.process_index() == 0:
      try:
        os.mkdir(self.workdir)
        self.created = True
      except FileExistsError:
        pass
    else:
      os.makedirs(self.workdir, exist_ok=True)
    self.lock.acquire()
    self.guard.__enter__()
    return self

  def _remove_if_fresh(self) -> None:
    if self.created and jax.process_index() == 0 and os.path.isdir(self.workdir) and not _has_checkpoint(self.workdir):
      shutil.rmtree(self.workdir, ignore_errors=True)

  def __exit__(self, exc_type, exc, tb):
    try:
      for obj in reversed(self._closables):
        try:
          if hasattr(obj, "wait"):
            obj.wait()
        finally:
          obj.close()
    finally:
      self.guard.__exit__()
      if exc_type is not None:
        self._remove_if_fresh()
      self.lock.release()
    return False
