"""Atomic file writes: the one helper every writer of a workdir file uses.

A reader (or a run killed mid-write) sees either the previous complete file or the new complete
file, never a partial one: the bytes go to a per-process temporary next to the target, are flushed
and fsync'ed, then renamed over it (rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


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
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


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
