"""Atomic file writes: the one helper every writer of a workdir file uses.

A reader (or a run killed mid-write) sees either the previous complete file or the new complete
file, never a partial one: the bytes go to a per-process temporary next to the target, are flushed
and fsync'ed, then renamed over it (rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import numpy as np

from lib import errors


def atomic_write(path: str, data: bytes | str) -> None:
  """Writes `data` to `path` atomically (tmp file in the same directory + fsync + rename)."""
  tmp = f"{path}.tmp{os.getpid()}"
  mode = "wb" if isinstance(data, (bytes, bytearray, memoryview)) else "w"
  try:
    with open(tmp, mode) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    conv = errors.storage_error(e, path)  # disk full, read-only, no permission: one line, the old file intact
    if conv is not None:
      raise conv from None
    raise


def check_writable(directory: str, what: str = "") -> None:
  """errors.StorageError (one line) unless a file can be created in `directory` (made if missing): tried
  for real (a probe file made and removed), since permission bits do not stop root and a read-only
  mount or a full disk shows only on writing."""
  try:
    os.makedirs(directory, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".lmtrace-write-probe-", dir=directory)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    conv = errors.storage_error(e, directory)
    if conv is None:
      raise
    raise errors.StorageError(f"{what}{conv}") from None


def json_default(o):
  """json.dump fallback for numpy scalars and arrays (anything else: its str)."""
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def atomic_json(path: str, obj: Any, **kw) -> None:
  """`obj` as JSON (indent 1, sorted keys unless overridden), written atomically."""
  kw = {"indent": 1, "sort_keys": True, "default": json_default, **kw}
  atomic_write(path, json.dumps(obj, **kw))


def atomic_parquet(df, path: str) -> None:
  """A pandas DataFrame as a parquet table, written atomically (parent directories made)."""
  buf = io.BytesIO()
  df.to_parquet(buf, index=False)
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  except OSError as e:
    conv = errors.storage_error(e, path)
    if conv is None:
      raise
    raise conv from None
  atomic_write(path, buf.getvalue())
