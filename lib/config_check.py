"""Whole-config validation before a run writes anything, and config differences on resume.

`validate(cfg)` raises `errors.ConfigError` with one line naming the key and the problem; the
trainer calls it before it creates or touches the workdir, so a bad command leaves nothing behind.
`resume_differences(old, new)` lists the keys a resumed run changes (recorded in the workdir's
`resume_history.jsonl`, see `record_resume`). `set_keys(cfg, {"opt.lr": 1e-3, ...})` applies dotted-key
overrides (ml_collections' `update_from_flattened_dict`), refusing unknown keys with a suggestion.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import socket
import time
from typing import Any, Mapping

from lib import errors, mixture, optim, proportions, schedules
from lib import model as M

OBJECTIVES = ("clm", "mlm")
# Keys that may change on resume without being recorded: where and how the run executes, not what it computes.
UNRECORDED_ON_RESUME = ("train.stop_at", "data.num_threads", "data.data_dir", "model.preset", "log.tensorboard")
UNRECORDED_SECTIONS = ("distributed",)
RESUME_HISTORY = "resume_history.jsonl"
log = logging.getLogger("lmtrace")


def _leaf_keys(cfg, prefix: str = "") -> list[str]:
  out = []
  for k, v in cfg.items():
    if hasattr(v, "items") and not isinstance(v, dict):
      out += _leaf_keys(v, f"{prefix}{k}.")
    out.append(f"{prefix}{k}")
  return out


def set_keys(cfg, overrides: Mapping[str, Any]) -> None:
  """cfg['a.b.c'] = value for each dotted key of `overrides` (ml_collections' update_from_flattened_dict);
  an unknown key or a value of the wrong type is a ConfigError naming the key (with the nearest known key)."""
  for key, value in overrides.items():
    node = cfg
    *path, last = key.split(".")
    try:
      for p in path:
        node = node[p]
      if last not in node:
        raise KeyError(last)
    except (KeyError, AttributeError, TypeError):
      near = difflib.get_close_matches(key, _leaf_keys(cfg), n=1)
      hint = f" (did you mean {near[0]!r}?)" if near else ""
      raise errors.ConfigError(f"unknown config key {key!r}{hint}; keys are listed in configs/base.py") from None
    try:
      cfg.update_from_flattened_dict({key: value})
    except (TypeError, ValueError) as e:
      raise errors.ConfigError(f"config key {key!r} cannot take {value!r}: {e}") from None


def _fail(msg: str):
  raise errors.ConfigError(msg)


def _positive(cfg, *keys: str, allow_zero: bool = False) -> None:
  for key in keys:
    node = cfg
    for part in key.split("."):
      node = node[part]
    if isinstance(node, (int, float)) and not isinstance(node, bool) and not math.isfinite(node):
      _fail(f"{key}={node!r} must be a finite number")
    ok = isinstance(node, (int, float)) and not isinstance(node, bool) and (node >= 0 if allow_zero else node > 0)
    if not ok:
      _fail(f"{key}={node!r} must be {'>= 0' if allow_zero else '> 0'}")


def parse_schedule(text: str, key: str, total_steps: int) -> list[int]:
  """The steps of a ';'-joined schedule string, or ConfigError naming `key` and the bad part."""
  try:
    specs = schedules.parse_schedules(text)
  except ValueError as e:
    _fail(f"{key}={text!r} does not parse: {e} (expected e.g. 'pythia:every=1000;explicit:steps=5/50/500')")
  for spec in specs:
    for k, v in spec.items():
      if k in ("every", "num", "log_until", "s0", "s1") and not v > 0:
        _fail(f"{key}={text!r}: {spec['kind']}:{k}={v} must be > 0")
  try:
    return schedules.analysis_steps(specs, total_steps)
  except (ValueError, ZeroDivisionError, OverflowError) as e:
    _fail(f"{key}={text!r}: {e}")


def _check_mixture(cfg) -> None:
  if cfg.get("mixture") is None:
    return
  if cfg.mixture.method not in mixture.METHODS:
    _fail(f"mixture.method={cfg.mixture.method!r} is not one of {sorted(mixture.METHODS)}")
  if cfg.mixture.get("rows", "exact") not in proportions.GROUP_ROWS:
    _fail(f"mixture.rows={cfg.mixture.rows!r} is not one of {proportions.GROUP_ROWS}")


def validate(cfg) -> M.ModelConfig:
  """Checks every section a run needs; returns the ModelConfig (vocab_size may still be -1)."""
  _positive(cfg, "train.steps", "train.batch_size", "train.log_every", "train.grad_accum", "data.seq_len")
  _positive(cfg, "train.stop_at", "ckpt.resume_every", "eval.every", "opt.warmup_steps", "opt.lr", allow_zero=True)
  _positive(cfg, "ckpt.keep_resume", "eval.batch_size")
  if cfg.eval.every:
    _positive(cfg, "eval.batches")
  if cfg.opt.warmup_steps > cfg.train.steps:
    log.warning(
      "opt.warmup_steps=%s exceeds train.steps=%s: the learning rate never reaches opt.lr=%s (it ends at %.3g of it)",
      cfg.opt.warmup_steps, cfg.train.steps, cfg.opt.lr, cfg.train.steps / cfg.opt.warmup_steps,
    )  # fmt: skip
  if cfg.train.batch_size % cfg.train.grad_accum:
    _fail(f"train.batch_size={cfg.train.batch_size} is not divisible by train.grad_accum={cfg.train.grad_accum}")
  if cfg.data.objective not in OBJECTIVES:
    _fail(f"data.objective={cfg.data.objective!r} is not one of {OBJECTIVES}")
  if cfg.opt.name not in optim.OPTIMIZERS:
    _fail(f"opt.name={cfg.opt.name!r} is not one of {optim.OPTIMIZERS}")
  if cfg.opt.schedule not in optim.SCHEDULES:
    _fail(f"opt.schedule={cfg.opt.schedule!r} is not one of {optim.SCHEDULES}")
  _check_mixture(cfg)
  parse_schedule(cfg.ckpt.schedule, "ckpt.schedule", cfg.train.steps)
  if cfg.get("probes") is not None and cfg.probes.enabled:
    parse_schedule(cfg.probes.schedule, "probes.schedule", cfg.train.steps)
  try:
    mcfg = M.ModelConfig.from_config(cfg.model)
    mcfg.validate()
  except (ValueError, TypeError) as e:
    _fail(f"model: {e}")
  for f in ("d_model", "n_layers", "n_heads", "d_ff", "max_len"):
    if not getattr(mcfg, f) > 0:
      _fail(f"model.{f}={getattr(mcfg, f)!r} must be > 0")
  if mcfg.vocab_size != -1 and mcfg.vocab_size <= 0:
    _fail(f"model.vocab_size={mcfg.vocab_size} must be > 0 (or -1: from the data)")
  if cfg.data.seq_len > mcfg.max_len:
    _fail(f"data.seq_len={cfg.data.seq_len} exceeds model.max_len={mcfg.max_len}")
  if cfg.data.objective == "mlm" and mcfg.causal:
    _fail("data.objective='mlm' needs a bidirectional model: set --config.model.causal=False")
  return mcfg


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def resume_differences(old: dict, new: dict) -> dict[str, list]:
  """{dotted key: [old, new]} for every recorded key a resumed run changes."""
  a, b = _flat(old), _flat(new)
  out = {}
  for k in sorted(set(a) | set(b)):
    if k in UNRECORDED_ON_RESUME or k.split(".")[0] in UNRECORDED_SECTIONS:
      continue
    if a.get(k) != b.get(k):
      out[k] = [a.get(k), b.get(k)]
  return out


def summary(diffs: dict[str, list], limit: int = 6) -> str:
  shown = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in list(diffs.items())[:limit])
  return shown + (f" (+{len(diffs) - limit} more)" if len(diffs) > limit else "")


def record_resume(workdir: str, step: int, diffs: dict[str, list]) -> None:
  """Appends one line to WORKDIR/resume_history.jsonl (process 0): when, where, from which step, what changed."""
  row = {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "step": int(step), "changed": diffs}
  with open(os.path.join(workdir, RESUME_HISTORY), "a") as f:
    f.write(json.dumps(row, default=str) + "\n")
