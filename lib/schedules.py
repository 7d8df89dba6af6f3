"""Checkpoint-step schedules for training-dynamics research (all return sorted step lists).

A run saves an *analysis* checkpoint at every step of the union of the configured schedules
(step 0, the initialisation, always included) and *resume* checkpoints every `resume_every` steps.
"""

from __future__ import annotations

import math
from typing import Iterable

from lib import errors

SCHEDULE_KINDS = ("pythia", "exponential", "interval", "explicit", "log")


def pythia(total_steps: int, every: int = 1000, log_until: int = 512) -> list[int]:
  """Pythia: 0, 1, 2, 4, ..., log_until, then every `every` steps (154 checkpoints at 143k)."""
  if every <= 0:
    raise errors.ConfigError(f"pythia schedule: every={every} must be > 0")
  steps = {0}
  p = 1
  while p <= min(log_until, total_steps):
    steps.add(p)
    p *= 2
  steps.update(range(every, total_steps + 1, every))
  return sorted(steps)


def exponential(total_steps: int, s0: float = 100, s1: float = 25000, t1: float | None = None) -> list[int]:
  """Chang et al. 2023: the save interval grows linearly from s0 (at step 0) to s1 (at step t1).

  step(n) = s0·t1/(s1−s0)·(exp(n(s1−s0)/t1) − 1), rounded; with the paper's s0=100, s1=25000,
  t1=1e6 this gives 222 steps (0, 101, 205, 311, ..., 981536).
  """
  if s0 <= 0 or s1 <= 0:
    raise errors.ConfigError(f"exponential schedule: s0={s0} and s1={s1} must be > 0")
  t1 = float(t1 or total_steps)
  if s1 == s0:
    return list(range(0, total_steps + 1, int(s0)))
  steps, n = [], 0
  while True:
    s = round(s0 * t1 / (s1 - s0) * (math.exp(n * (s1 - s0) / t1) - 1))
    if s > total_steps:
      break
    if not steps or s != steps[-1]:
      steps.append(int(s))
    n += 1
  return steps


def log_spaced(total_steps: int, num: int = 200) -> list[int]:
  """`num` points log-uniform in [1, total_steps] (deduplicated) plus step 0."""
  if total_steps < 1:
    return [0]
  pts = {0} | {int(round(math.exp(i * math.log(total_steps) / max(num - 1, 1)))) for i in range(num)}
  return sorted(p for p in pts if p <= total_steps)


def interval(total_steps: int, every: int) -> list[int]:
  if every <= 0:
    raise errors.ConfigError(f"interval schedule: every={every} must be > 0")
  return list(range(0, total_steps + 1, every))


def analysis_steps(schedules: Iterable, total_steps: int) -> list[int]:
  """Union of schedule specs, each a dict like {"kind": "pythia", "every": 1000}."""
  out = {0}
  for spec in schedules:
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in SCHEDULE_KINDS:
      raise errors.ConfigError(f"checkpoint schedule kind {kind!r} is not one of {SCHEDULE_KINDS}")
    try:
      if kind == "pythia":
        out.update(pythia(total_steps, **spec))
      elif kind == "exponential":
        out.update(exponential(total_steps, **spec))
      elif kind == "interval":
        out.update(interval(total_steps, **spec))
      elif kind == "log":
        out.update(log_spaced(total_steps, **spec))
      else:
        out.update(int(s) for s in spec["steps"] if 0 <= int(s) <= total_steps)
    except TypeError as e:
      raise errors.ConfigError(f"bad arguments for checkpoint schedule {kind!r}: {spec} ({e})") from None
    except KeyError as e:
      raise errors.ConfigError(f"checkpoint schedule {kind!r} needs {e} (e.g. explicit:steps=5/50/500)") from None
  return sorted(out)


def parse_schedules(text: str) -> list[dict]:
  """'pythia:every=1000;exponential:s0=100,s1=25000' -> list of specs (for config strings)."""
  specs = []
  for part in filter(None, (p.strip() for p in text.split(";"))):
    kind, _, args = part.partition(":")
    spec = {"kind": kind.strip()}
    for kv in filter(None, (a.strip() for a in args.split(","))):
      k, _, v = kv.partition("=")
      try:
        if k.strip() == "steps":
          spec["steps"] = [int(x) for x in v.split("/") if x]
        else:
          spec[k.strip()] = float(v) if "." in v or "e" in v else int(v)
      except ValueError:
        want = "integers joined by '/'" if k.strip() == "steps" else "a number"
        raise errors.ConfigError(f"checkpoint schedule {part!r}: {k.strip()}={v!r} is not {want}") from None
    specs.append(spec)
  return specs
