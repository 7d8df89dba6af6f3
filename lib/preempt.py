"""Preemption: SIGTERM/SIGINT ask the trainer to stop at the next step boundary with a resume checkpoint.

The handler only sets a flag. At each step boundary the trainer asks `stop_requested(step)`; with
several processes all of them must stop at the same step (the save is collective), so the flag is
OR-ed over processes with a tiny host allgather each step, and JAX's own preemption notice
(`multihost_utils.reached_preemption_sync_point`, active when the cluster's preemption service runs)
counts as a request too. A second signal while stopping restores the default handler (a third kills).
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

from lib import errors

log = logging.getLogger("lmtrace")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(errors.LmtraceError):
  """The run stopped on a signal after saving a resume checkpoint (CLIs exit non-zero)."""


class PreemptionGuard:
  """`with PreemptionGuard() as g:` ... `if g.stop_requested(step): save, raise g.preempted(...)`."""

  def __init__(self):
    self.signum: int | None = None
    self._old: dict = {}

  def _handle(self, signum, frame):
    if self.signum is not None:
      signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
      return
    self.signum = signum
    log.warning("received %s: saving a resume checkpoint at the next step boundary", signal.Signals(signum).name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
      for s in SIGNALS:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}

  def stop_requested(self, step: int) -> bool:
    """True on every process at the same step once any process got a signal (or JAX's notice)."""
    flag = self.signum is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      try:
        flag = flag or bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # no preemption service in this cluster: signals only
        pass
      flag = bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())
      if flag and self.signum is None:
        self.signum = int(signal.SIGTERM)
    return flag

  def preempted(self, step: int, workdir: str) -> Preempted:
    name = signal.Signals(self.signum).name if self.signum else "a preemption notice"
    return Preempted(
      f"stopped by {name} after step {step}; a resume checkpoint of step {step} is in {workdir}: rerun the same command to resume"
    )
