"""Flat metric dicts: metrics.jsonl (the source of truth), TensorBoard (optional), console lines;
and the FLOPs / MFU arithmetic."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from lib import errors
from lib import io as lio

# Dense bf16 peak FLOP/s per device (no sparsity). MFU is reported against these.
PEAK_FLOPS = {
  "H100": 989e12,
  "H200": 989e12,
  "A100": 312e12,
  "L4": 121e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
}


def quiet_logs() -> None:
  """Keeps the console to lmtrace's own progress lines (orbax/tfds log every save at INFO)."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger("lmtrace").setLevel(logging.INFO)
  try:
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
  except ImportError:
    pass


def peak_flops_per_device(override: float = 0.0) -> float | None:
  if override:
    return float(override)
  kind = jax.devices()[0].device_kind
  for k, v in PEAK_FLOPS.items():
    if k.lower() in kind.lower():
      return v
  return None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a/b': 1}; arrays of size > 1 -> 'key/i' entries."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "/"))
      continue
    a = np.asarray(v)
    if a.ndim == 0:
      out[key] = a.item()
    else:
      for i, x in enumerate(a.reshape(-1).tolist()):
        out[f"{key}/{i}"] = x
  return out


def progress_enabled(stream=None) -> bool:
  """Progress bars only on a terminal: redirected output (log files, CI) gets no escape codes."""
  stream = stream or sys.stderr
  return bool(getattr(stream, "isatty", lambda: False)())


def truncate_jsonl(path: str, keep_upto: int) -> int:
  """Rewrites metrics.jsonl (atomically) without rows of steps > keep_upto and without a half-written
  last line (a killed run); returns the number of rows dropped. A resumed run replays those steps."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
        ok = int(row["step"]) <= keep_upto
      except (ValueError, KeyError, TypeError):
        ok = False
      if ok:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    lio.atomic_write(path, "".join(kept))
  return dropped


class Writer:
  """Appends flat dicts to WORKDIR/metrics.jsonl (process 0 only) and to TensorBoard.

  `keep_upto`: the step the run (re)starts from; rows logged after it by an earlier, interrupted pass
  are dropped first (metrics.jsonl truncated, TensorBoard events purged), so every step appears once.
  """

  def __init__(self, workdir: str, tensorboard: bool = True, keep_upto: int | None = None):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if self.active and keep_upto is not None:
      truncate_jsonl(self.path, keep_upto)
    if self.active and tensorboard:
      try:
        from tensorboardX import SummaryWriter

        purge = None if keep_upto is None else keep_upto + 1
        self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge)
      except ImportError:
        self.tb = None
    self._f = open(self.path, "a") if self.active else None

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": int(step), "time": time.time(), **flatten(metrics)}
    try:
      self._f.write(json.dumps(row, default=float, allow_nan=True) + "\n")
      self._f.flush()
    except OSError as e:
      conv = errors.storage_error(e, self.path)
      if conv is None:
        raise
      self._drop()  # its buffered bytes could not be written: closing it would only fail again
      raise conv from None
    if self.tb is not None:
      for k, v in row.items():
        if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(k, v, int(step))

  def _drop(self) -> None:
    f, self._f = self._f, None
    try:
      f.close()
    except OSError:
      pass

  def close(self) -> None:
    if self._f:
      f, self._f = self._f, None
      f.close()
    if self.tb is not None:
      self.tb.close()


def console_line(step: int, total: int, m: dict) -> str:
  parts = [f"step {step:>6d}/{total}"]
  for key, fmt in (
    ("train/loss", "loss {:.4f}"),
    ("train/excess_loss", "excess {:.4f}"),
    ("eval/loss", "eval {:.4f}"),
    ("eval/excess_loss", "eval_excess {:.4f}"),
    ("train/lr", "lr {:.2e}"),
    ("train/grad_norm", "gnorm {:.3f}"),
    ("perf/tokens_per_s", "{:,.0f} tok/s"),
    ("perf/mfu", "mfu {:.1%}"),
  ):
    if key in m and m[key] is not None and np.isfinite(m[key]):
      parts.append(fmt.format(m[key]))
  return "  ".join(parts)
