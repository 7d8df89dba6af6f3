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

from lib.proportions import check_proportions


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


class Aioli(Controller):
  """Aioli (Chen et al. 2024), as in the released `trainer/aioli_trainer.py` (papers.md §4.3).

  Rounds of U = `update_steps` steps. Each round starts with per-group validation losses ℓ⁰, then
  LearnParams: for each of R·m sub-phases (groups in R random permutations) train s = `lp_steps` real
  steps on q^(j) = f·e_j + (1−f)/(m−1)·(1−e_j) and accumulate G[:, j] += ℓ_prev − ℓ_new; G /= R;
  solve G[i, :] = W Â[i, :] (W[j] = q^(j)); if min Â < 0 shift it; Â /= ΣÂ; then
  p ← p ⊙ exp(η·1ᵀÂ) (cumulative) or, with `ema` γ > 0, Ā = (1−γ)Â + γĀ, p ∝ exp(η·1ᵀĀ). The rest
  of the round trains on p. Config: mixture.{update_steps, lp_rounds, lp_steps, one_hot_factor, eta, ema}.
  """

  name = "aioli"
  needs = frozenset({"eval_group_loss"})

  def __init__(self, group_names, cfg=None):
    super().__init__(group_names, cfg)
    g = (lambda k, d: cfg.get(k, d)) if cfg is not None else (lambda k, d: d)  # noqa: E731
    self.U, self.R, self.s = int(g("update_steps", 250)), int(g("lp_rounds", 4)), int(g("lp_steps", 4))
    self.f, self.eta, self.ema = float(g("one_hot_factor", 0.625)), float(g("eta", 0.2)), float(g("ema", 0.0))
    self.seed = int(g("seed", 0))
    if self.R * self.s * self.m >= self.U:
      raise ValueError(
        f"Aioli: LearnParams needs R·s·m = {self.R * self.s * self.m} steps, more than a round (update_steps={self.U})"
      )
    if self.m > 1 and not (1.0 / self.m < self.f <= 1.0):
      raise ValueError(f"Aioli: one_hot_factor={self.f} must be in (1/m, 1]")

  def init(self) -> dict:
    m = self.m
    return {
      "p": np.full(m, 1.0 / m, np.float32),
      "G": np.zeros((m, m), np.float32),
      "A_ema": np.zeros((m, m), np.float32),
      "ell": np.zeros(m, np.float32),
      "rounds": np.zeros((), np.int32),
    }

  def _q(self, j: int) -> np.ndarray:
    q = np.full(self.m, (1.0 - self.f) / max(self.m - 1, 1))
    q[j] = self.f
    return q

  def _phase(self, step: int) -> tuple[int, int, int]:
    """(round, sub-phase k or -1 after LearnParams, group j of sub-phase k)."""
    r, t = divmod(int(step), self.U)
    k = t // self.s
    if k >= self.R * self.m:
      return r, -1, -1
    perm = np.concatenate([np.random.default_rng([self.seed, r, i]).permutation(self.m) for i in range(self.R)])
    return r, k, int(perm[k])

  def proportions(self, state: dict, step: int) -> np.ndarray:
    _, k, j = self._phase(step)
    return self._q(j) if k >= 0 else np.asarray(state["p"], np.float64)

  def wants_eval(self, state: dict, step: int) -> bool:
    t = int(step) % self.U
    return t % self.s == 0 and t // self.s <= self.R * self.m

  def update(self, state: dict, step: int, obs: dict) -> dict:
    ell = np.asarray(obs["eval/group_loss"], np.float64)
    state = {k: np.array(v) for k, v in state.items()}
    t = int(step) % self.U
    if t == 0:  # start of a round: ℓ⁰
      state["ell"], state["G"] = ell.astype(np.float32), np.zeros_like(state["G"])
      return state
    _, k, j = self._phase(step - 1)  # the sub-phase that just ended
    state["G"][:, j] += (state["ell"] - ell).astype(np.float32)
    state["ell"] = ell.astype(np.float32)
    if k == self.R * self.m - 1:
      G = state["G"].astype(np.float64) / self.R
      W = np.stack([self._q(i) for i in range(self.m)])
      A = np.linalg.solve(W, G.T).T if self.f != 1.0 else G  # rows i: G[i, :] = W Â[i, :]
      if A.min() < 0:
        A = A - A.min()
      A = A / max(A.sum(), 1e-12)
      if self.ema > 0:
        A_bar = (1 - self.ema) * A + self.ema * state["A_ema"]
        logits = self.eta * A_bar.sum(0)
        state["A_ema"] = A_bar.astype(np.float32)
      else:
        logits = np.log(np.maximum(state["p"], 1e-30)) + self.eta * A.sum(0)
      p = np.exp(logits - logits.max())
      state["p"] = (p / p.sum()).astype(np.float32)
      state["rounds"] = np.asarray(state["rounds"] + 1, np.int32)
    return state


METHODS = {"stratified": Stratified, "static": Static, "aioli": Aioli}


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
