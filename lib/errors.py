"""The project's own errors: one base class, one subclass per concern.

CLIs catch exactly `LmtraceError` and print its message as one line; anything else is a genuine bug
and keeps its traceback. Library code raises the most specific subclass that names the problem.
"""

import contextlib
import sys


class LmtraceError(Exception):
  """Base of every error that means "bad input or state", not "bug"."""


class ConfigError(LmtraceError, ValueError):
  """A run card, override or settings object that cannot be used as given."""


class DataError(LmtraceError, ValueError):
  """A data source, split or batch that cannot be built or read."""


class CheckpointError(LmtraceError, ValueError):
  """A workdir or checkpoint that is missing, damaged or belongs to another run."""


class ShardingError(LmtraceError, ValueError):
  """A mesh that cannot be built or does not divide the data or the devices."""


class TrainingDiverged(LmtraceError, RuntimeError):
  """A non-finite loss; earlier checkpoints remain readable."""


class AnalysisError(LmtraceError, ValueError):
  """An analysis job asked for something its workdir cannot provide."""


class StorageError(LmtraceError, OSError):
  """A write the file system refused (no space left, read-only, no permission); what was written before
  it is intact. Also an OSError, so callers that handle OSError keep working."""


_STORAGE_ERRNOS = {
  28: "no space left on device",
  122: "disk quota exceeded",
  30: "read-only file system",
  13: "permission denied",
  1: "operation not permitted",
}


def free_space(path: str) -> str:
  """Free space of the file system holding `path` (or its nearest existing parent), e.g. '412.0 KiB'."""
  import os
  import shutil

  p = os.path.abspath(path)
  while not os.path.exists(p) and os.path.dirname(p) != p:
    p = os.path.dirname(p)
  try:
    n = float(shutil.disk_usage(p).free)
  except OSError:
    return "unknown"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return ""  # pragma: no cover


def is_disk_full(e: BaseException) -> bool:
  """An OSError with ENOSPC/EDQUOT, or a wrapped one (Orbax and TensorStore re-raise it as text)."""
  if isinstance(e, OSError) and e.errno in (28, 122):
    return True
  return "No space left on device" in str(e) or "Disk quota exceeded" in str(e)


def storage_error(e: BaseException, path: str) -> StorageError | None:
  """The one-line StorageError for a failed write of `path` (naming the free space when the disk is
  full), or None if `e` is not a storage refusal."""
  if isinstance(e, StorageError):
    return e
  if is_disk_full(e):
    code, msg = (
      28,
      (
        f"no space left on device writing {path} ({free_space(path)} free there): free some space, then rerun the same "
        "command (everything written before is intact)"
      ),
    )
  elif isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
    code, msg = e.errno, f"cannot write {path}: {_STORAGE_ERRNOS[e.errno]}"
  else:
    return None
  err = StorageError(msg)
  err.errno = code
  return err


@contextlib.contextmanager
def one_line_interrupt(prog: str, kept: str = ""):
  """For a CLI's main: Ctrl-C (KeyboardInterrupt) prints one line, '<prog>: interrupted (Ctrl-C)' plus
  what is kept, and exits 130 (128 + SIGINT), as the shell reports a job killed by SIGINT; no traceback."""
  try:
    yield
  except KeyboardInterrupt:
    print(f"{prog}: interrupted (Ctrl-C){'; ' + kept if kept else ''}", file=sys.stderr, flush=True)
    raise SystemExit(130) from None
