"""One trainer per workdir: a lock file held by process 0 of the run, with stale-lock detection.

WORKDIR/lmtrace.lock holds JSON {host, pid, pid_start, since, processes}. Process 0 of a run creates
it with O_EXCL before writing anything else and removes it at exit; the other processes of the same
run (one jax.distributed job) hold it through process 0 and learn its verdict by a broadcast, so
they refuse together. A lock left by a dead holder is stale and taken over with a warning: on the
same host when its pid no longer runs (or runs another program: the start time differs); on another
host when its heartbeat (the file's mtime, touched at least every HEARTBEAT_S by the holder) is
older than STALE_S. Readers (analysis jobs) never take the lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import jax
import numpy as np

from lib import errors

log = logging.getLogger("lmtrace")
LOCK = "lmtrace.lock"
HEARTBEAT_S = 60.0
STALE_S = 15 * 60.0


def _pid_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), or None if it does not run."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return None
    except PermissionError:
      pass
    return "?"  # alive (no /proc): start time unknown


class WorkdirLock:
  """`with WorkdirLock(workdir):` refuses (errors.CheckpointError, one line) if another run holds it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self.held = False
    self._beat = 0.0

  def _holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # being written right now, or damaged: judged by its age below

  def _stale(self, h: dict) -> bool:
    age = time.time() - os.path.getmtime(self.path)
    if h.get("host") == socket.gethostname() and "pid" in h:
      now = _pid_start(int(h["pid"]))
      return now is None or (now != "?" and h.get("pid_start") not in (None, now))
    return age > STALE_S

  def _try_acquire(self) -> str:
    """'' when acquired, else the reason (one line)."""
    me = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "pid_start": _pid_start(os.getpid()),
      "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "processes": jax.process_count(),
    }
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        try:
          h = self._holder()
          if h is None:
            continue  # released meanwhile: try again
          if not self._stale(h):
            return (
              f"workdir {os.path.dirname(self.path)} is in use by another trainer (pid {h.get('pid', '?')} on "
              f"{h.get('host', '?')} since {h.get('since', '?')}); wait for it to finish, or, if that process is gone, "
              f"delete {self.path}"
            )
          log.warning("taking over the stale lock %s of a dead trainer (%s)", self.path, h)
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      return ""
    return f"could not take the lock {self.path} (other processes keep creating it)"

  def acquire(self) -> None:
    reason = self._try_acquire() if jax.process_index() == 0 else ""
    if jax.process_count() > 1:  # every process of the run learns process 0's verdict
      from jax.experimental import multihost_utils

      ok = multihost_utils.broadcast_one_to_all(np.int32(reason == ""))
      if not ok and not reason:
        reason = f"process 0 could not lock {self.path}: another trainer uses this workdir"
    if reason:
      raise errors.CheckpointError(reason)
    self.held = jax.process_index() == 0
    self._beat = time.time()

  def heartbeat(self) -> None:
    """Touches the lock (cheap; at most every HEARTBEAT_S) so other hosts see the holder alive."""
    if self.held and time.time() - self._beat > HEARTBEAT_S:
      self._beat = time.time()
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    h = self._holder()
    if h and h.get("pid") == os.getpid() and h.get("host") == socket.gethostname():
      os.remove(self.path)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
