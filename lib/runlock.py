"""One trainer per workdir: a lock file held by process 0 of the run, with stale-lock detection.

WORKDIR/lmtrace.lock holds JSON {host, pid, pid_start, since, processes}. Process 0 of a run creates
it with O_EXCL before writing anything else and removes it at exit; the other processes of the same
run (one jax.distributed job) hold it through process 0 and learn its verdict by a broadcast, so
they refuse together. A lock left by a dead holder is stale and taken over with a warning: on the
same host when its pid no longer runs (or runs another program: the start time differs); on another
host when its heartbeat (the file's mtime, touched at least every HEARTBEAT_S by the holder) is
older than STALE_S. A takeover renames the stale file away and checks that what it renamed is the file
it judged (inode, size, mtime, bytes), putting back a fresh lock another trainer made meanwhile, so two
trainers taking over one stale lock at once cannot both hold it. Readers (analysis jobs) never take the lock.
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
    self._token = ""

  def _holder(self) -> tuple[dict | None, tuple]:
    """(the lock's JSON, its identity: inode, size, mtime and bytes) as read now; (None, ()) if there is none."""
    try:
      with open(self.path, "rb") as f:
        st, raw = os.fstat(f.fileno()), f.read()
    except FileNotFoundError:
      return None, ()
    except OSError:
      return {}, ()
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, raw)
    try:
      h = json.loads(raw)
    except ValueError:
      h = None
    return (h if isinstance(h, dict) else {}), ident  # {}: being written right now, or damaged: judged by its age

  def _stale(self, h: dict, ident: tuple) -> bool:
    age = time.time() - (ident[3] / 1e9 if ident else os.path.getmtime(self.path))
    if h.get("host") == socket.gethostname() and "pid" in h:
      now = _pid_start(int(h["pid"]))
      return now is None or (now != "?" and h.get("pid_start") not in (None, now))
    return age > STALE_S

  def _take_over(self, ident: tuple) -> None:
    """Removes the stale lock judged from `ident`, atomically: whatever lock file is there now is renamed
    to a private name, and if it is not the one judged stale (another trainer took the lock over first
    and made a fresh one), it is put back (a hard link: never over a newer lock) and left alone."""
    aside = f"{self.path}.takeover.{socket.gethostname()}.{os.getpid()}.{id(self)}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # removed meanwhile: try creating again
    try:
      with open(aside, "rb") as f:
        st, raw = os.fstat(f.fileno()), f.read()
      if ident and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, raw) == ident:
        return  # exactly the stale lock: removed below
      try:
        os.link(aside, self.path)
      except FileExistsError:  # a third trainer created a lock in this instant: it holds the workdir now
        log.warning("lock %s changed hands during a takeover; the newest holder keeps it", self.path)
    finally:
      os.remove(aside)

  def _try_acquire(self) -> str:
    """'' when acquired, else the reason (one line)."""
    me = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "pid_start": _pid_start(os.getpid()),
      "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "processes": jax.process_count(),
      "token": f"{id(self):x}.{time.time_ns():x}",  # tells two locks of one process apart
    }
    for _ in range(5):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        h, ident = self._holder()
        if h is None:
          continue  # released meanwhile: try again
        if not self._stale(h, ident):
          return (
            f"workdir {os.path.dirname(self.path)} is in use by another trainer (pid {h.get('pid', '?')} on "
            f"{h.get('host', '?')} since {h.get('since', '?')}); wait for it to finish, or, if that process is gone, "
            f"delete {self.path}"
          )
        log.warning("taking over the stale lock %s of a dead trainer (%s)", self.path, h)
        self._take_over(ident)
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self._token = me["token"]
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
    h, _ = self._holder()
    if h and h.get("pid") == os.getpid() and h.get("host") == socket.gethostname() and h.get("token", self._token) == self._token:
      os.remove(self.path)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
