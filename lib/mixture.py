"""Data-mixture controllers: observe per-group losses and the step, return proportions p over groups.

Interface (all methods pure functions of their inputs; the state is a dict of numpy arrays that is
saved in every checkpoint, so a resumed run continues with the same p):

  init(group_names) -> state
  proportions(state, step) -> p [m]          p for the batch at `step` (exact counts are applied by
                                             the pipeline); may vary *within* a round, e.g. Aioli's
                                             LearnParams sweeps q^(j) for s real steps per group
  wants_eval(state, step) -> bool            ask the trainer for per-group validation losses at `step`
  update(state, step, obs) -> state          obs: {"train/group_loss": [m], "eval/group_loss": [m], ...}

Online methods plug in here (Aioli, DoReMi, DoGE, Skill-It, data-mixing laws): `needs` declares what
the trainer must supply ("eval_group_loss", "group_grads", "reference_losses"); methods that spend
training steps on branches express them through `proportions(state, step)` so those steps count
towards the budget, as in Aioli's released code.
"""

from __future__ import annotations

import numpy as np

from data.pipeline import check_proportions


class Controller:
  name = "base"
  needs: frozenset = frozenset()

  def __init__(self, group_names, cfg=None):
    self.group_names = list(group_names)
    self.m = len(self.group_names)
    self.cfg = cfg

  def init(self) -> dict:
    return {"p": np.full(self.m, 1.0 / self.m, np.float32)}

  def proportions(self, state: dict, step: int) -> np.ndarray:
    return np.asarray(state["p"], np.float64)

  def wants_eval(self, state: dict, step: int) -> bool:
    return False

  def update(self, state: dict, step: int, obs: dict) -> dict:
    return state


class Stratified(Controller):
  """p = 1/m for every group (the Aioli paper's baseline)."""
  name = "stratified"


class Static(Controller):
  """Fixed proportions from the config (e.g. a grid-search point or a DML / DoReMi result)."""
  name = "static"

  def init(self) -> dict:
    p = parse_proportions(self.cfg.proportions, self.group_names)
    return {"p": p.astype(np.float32)}


METHODS = {"stratified": Stratified, "static": Static}


def parse_proportions(text, group_names) -> np.ndarray:
  """'law=0.5,code=0.5' or '0.5,0.5' or a sequence -> p [m] in group order (validated)."""
  names = list(group_names)
  if isinstance(text, str):
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if parts and all("=" in x for x in parts):
      kv = dict((k.strip(), float(v)) for k, v in (x.split("=", 1) for x in parts))
      unknown = sorted(set(kv) - set(names))
      if unknown:
        raise ValueError(f"mixture.proportions names unknown groups {unknown}; groups are {names}")
      p = np.array([kv.get(n, 0.0) for n in names])
    else:
      p = np.array([float(x) for x in parts])
  else:
    p = np.asarray(text, np.float64)
  check_proportions(p, names)
  return p


def make(mixture_cfg, group_names) -> Controller:
  method = mixture_cfg.method
  if method not in METHODS:
    raise ValueError(f"mixture.method={method!r} is not one of {sorted(METHODS)}")
  return METHODS[method](group_names, mixture_cfg)
