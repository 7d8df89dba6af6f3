"""Data-mixture controllers: observe per-group losses and the step, return proportions p over groups.

Interface (all methods pure functions of their inputs; the state is a dict of numpy arrays that is
saved in every checkpoint, so a resumed run continues with the same p):

  init() -> state
  proportions(state, step) -> p [m]          p for the batch at `step` (exact counts are applied by
                                             the pipeline); may vary *within* a round, e.g. Aioli's
                                             LearnParams sweeps q^(j) for s real steps per group
  wants_eval(state, step) -> bool            ask the trainer for per-group validation losses at `step`
  update(state, step, obs) -> state          obs: {"eval/group_loss": [m]}
  log_fields(state) -> dict                  extra flat fields for the logged row (Aioli's Â)
  mode                                       "" or "doremi"/"doge": the jitted step reweights per-group
                                             losses/gradients and updates w on device

`needs` declares what the trainer must supply (NEEDS below; MixtureRunner refuses a method whose
needs it cannot meet, in one line). Methods that spend training steps on branches express them
through `proportions(state, step)` so those steps count towards the budget, as in Aioli's released
code. Implemented: stratified, static, aioli (+ restricted mode), skillit, doremi, doge; GS and DML
are static runs chosen with lib/mixing_laws.py (dirichlet_cover, fit_static_law, choose_p).
"""

from __future__ import annotations

import numpy as np

from lib.errors import ConfigError
from lib.proportions import check_proportions

NEEDS = {
  "eval_group_loss": "per-group validation losses when wants_eval(step)",
  "train_group_loss": "per-group training losses inside the jitted step",
  "group_grads": "per-group gradients inside the jitted step (from the batch's group ids)",
  "reference_losses": "a reference run's per-group losses (mixture.reference = 'group=loss,...')",
  "reference_params": "a reference run's params (mixture.reference = its workdir): per-token reference losses in the step",
  "validation_batch": "a held-out validation batch (rows of every group) inside the jitted step",
  "skills_graph": "a skills graph from one-hot runs (mixture.graph)",
}


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

  def exact_rows(self, step: int) -> bool:
    """Whether `step`'s batch must have exact per-group counts even under mixture.rows='sampled' (a probe
    of the mixture, e.g. Aioli's LearnParams, whose estimate assumes its batches' proportions exactly)."""
    return False

  def wants_eval(self, state: dict, step: int) -> bool:
    return False

  def update(self, state: dict, step: int, obs: dict) -> dict:
    return state

  def log_fields(self, state: dict) -> dict:
    """Extra flat fields for the logged row (e.g. Aioli's latest Â)."""
    return {}

  def implied_A(self, state: dict, vectors: dict):
    """The LMO parameters A^t this method's latest update implies (lib/mixing_laws.implied_A), from
    its host state and the step's logged vectors; None if it has none (yet). Logged as mixture/A/<i>/<j>."""
    return None


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
  """Aioli (Chen et al. 2024), as in the released `trainer/aioli_trainer.py` of HazyResearch/aioli.

  Rounds of U = `update_steps` steps. Each round starts with per-group validation losses ℓ⁰, then
  LearnParams: for each of R·m sub-phases (groups in R random permutations) train s = `lp_steps` real
  steps on q^(j) = f·e_j + (1−f)/(m−1)·(1−e_j) and accumulate G[:, j] += ℓ_prev − ℓ_new; G /= R;
  solve G[i, :] = W Â[i, :] (W[j] = q^(j)); if min Â < 0 shift it; Â /= ΣÂ; then
  p ← p ⊙ exp(η·1ᵀÂ) (cumulative) or, with `ema` γ > 0, Ā¹ = Â¹, Āᵗ = (1−γ)Âᵗ + γĀᵗ⁻¹ and
  p ∝ p⁰ ⊙ exp(η·1ᵀĀ) (not cumulative). The rest of the round trains on p.
  Config: mixture.{update_steps, lp_rounds, lp_steps, one_hot_factor, eta, ema}.

  p⁰ is uniform, or in the restricted setting (`prior`, `prior_steps`) the prior: the run trains on the
  prior for prior_steps steps, then its rounds adjust the prior in both update forms: cumulative,
  pᵗ = prior ⊙ Π_τ exp(η·1ᵀÂ^τ) (renormalised); with the EMA, pᵗ ∝ prior ⊙ exp(η·1ᵀĀᵗ), so the prior
  is kept in every round, not only the first. (The released code restarts from uniform after the prior
  stage; we follow the paper's description, "Aioli adjusts the prior".)
  """

  name = "aioli"
  needs = frozenset({"eval_group_loss"})

  def __init__(self, group_names, cfg=None):
    super().__init__(group_names, cfg)
    g = (lambda k, d: cfg.get(k, d)) if cfg is not None else (lambda k, d: d)  # noqa: E731
    self.U, self.R, self.s = int(g("update_steps", 250)), int(g("lp_rounds", 4)), int(g("lp_steps", 4))
    self.f, self.eta, self.ema = float(g("one_hot_factor", 0.625)), float(g("eta", 0.2)), float(g("ema", 0.0))
    self.seed = int(g("seed", 0))
    # LearnParams as branches (opt-in): "" = the released chained sub-phases (they train the run itself,
    # consuming the budget); "vmap" / "sequential" = the R·m sub-phases forked from the round's start
    # state, trained as copies (vmap, or one after another: the same numbers) and discarded, each
    # G[:, j] the drop from ℓ⁰ (MixtureRunner.learn_params_branches); the run trains on p all round.
    self.branches = str(g("lp_branches", "") or "")
    if self.branches not in ("", "vmap", "sequential"):
      raise ConfigError(f"Aioli: mixture.lp_branches={self.branches!r} must be '', 'vmap' or 'sequential'")
    # Restricted setting: train on `prior` for `prior_steps` steps, then run Aioli's rounds starting
    # from p = prior. (The released code resets p to uniform after the prior stage;
    # we follow the paper's description, "Aioli adjusts the prior", and document the difference.)
    prior = g("prior", "")
    self.prior = parse_proportions(prior, group_names) if prior else None
    self.P = int(g("prior_steps", 0)) if self.prior is not None else 0
    if self.prior is None and int(g("prior_steps", 0)) > 0:
      raise ConfigError(
        f"Aioli: mixture.prior_steps={g('prior_steps', 0)} without mixture.prior (the proportions to train on first)"
      )
    if self.R * self.s * self.m >= self.U and not self.branches:  # branches do not spend the round's steps
      raise ConfigError(
        f"Aioli: LearnParams needs R·s·m = {self.R * self.s * self.m} steps, more than a round (update_steps={self.U})"
      )
    if self.m > 1 and not (1.0 / self.m < self.f <= 1.0):
      raise ConfigError(f"Aioli: one_hot_factor={self.f} must be in (1/m, 1]")

  def init(self) -> dict:
    m = self.m
    p0 = self.prior if self.prior is not None else np.full(m, 1.0 / m)
    return {
      "p": p0.astype(np.float32),
      "G": np.zeros((m, m), np.float32),
      "A_ema": np.zeros((m, m), np.float32),
      "A": np.zeros((m, m), np.float32),  # the latest round's normalised Â (logged)
      "ell": np.zeros(m, np.float32),
      "rounds": np.zeros((), np.int32),
    }

  def _q(self, j: int) -> np.ndarray:
    q = np.full(self.m, (1.0 - self.f) / max(self.m - 1, 1))
    q[j] = self.f
    return q

  def _phase(self, step: int) -> tuple[int, int, int]:
    """(round, sub-phase k or -1 after LearnParams, group j of sub-phase k); round -1 = prior stage."""
    if int(step) < self.P:
      return -1, -1, -1
    r, t = divmod(int(step) - self.P, self.U)
    k = t // self.s
    if k >= self.R * self.m or self.branches:
      return r, -1, -1
    return r, k, int(self.permutation(r)[k])

  def permutation(self, r: int) -> np.ndarray:
    """Round r's LearnParams order: R random permutations of the groups, seeded by the run seed."""
    return np.concatenate([np.random.default_rng([self.seed, r, i]).permutation(self.m) for i in range(self.R)])

  def proportions(self, state: dict, step: int) -> np.ndarray:
    _, k, j = self._phase(step)
    return self._q(j) if k >= 0 else np.asarray(state["p"], np.float64)

  def exact_rows(self, step: int) -> bool:
    return self._phase(step)[1] >= 0  # LearnParams: exact counts (the released interleave_per_batch_mapped)

  def wants_eval(self, state: dict, step: int) -> bool:
    if int(step) < self.P:
      return False
    t = (int(step) - self.P) % self.U
    if self.branches:
      return t == 0
    return t % self.s == 0 and t // self.s <= self.R * self.m

  def update(self, state: dict, step: int, obs: dict) -> dict:
    ell = np.asarray(obs["eval/group_loss"], np.float64)
    state = {k: np.array(v) for k, v in state.items()}
    t = (int(step) - self.P) % self.U
    if t == 0 and self.branches and "branch/group_loss" not in obs:  # the run's last step: no round follows
      state["ell"] = ell.astype(np.float32)
      return state
    if t == 0 and self.branches:  # the round's LearnParams, all at once: obs["branch/group_loss"] [R·m, m]
      state["ell"] = ell.astype(np.float32)
      drops = ell[None, :] - np.asarray(obs["branch/group_loss"], np.float64)
      G = np.zeros((self.m, self.m))
      for k, j in enumerate(self.permutation((int(step) - self.P) // self.U)):
        G[:, j] += drops[k]
      state["G"] = G.astype(np.float32)
      return self._finish_round(state, G / self.R)
    if t == 0:  # start of a round: ℓ⁰
      state["ell"], state["G"] = ell.astype(np.float32), np.zeros_like(state["G"])
      return state
    _, k, j = self._phase(step - 1)  # the sub-phase that just ended
    state["G"][:, j] += (state["ell"] - ell).astype(np.float32)
    state["ell"] = ell.astype(np.float32)
    if k == self.R * self.m - 1:
      state = self._finish_round(state, state["G"].astype(np.float64) / self.R)
    return state

  def estimate_A(self, G) -> np.ndarray:
    """Â from a round's averaged loss drops G [m, m] (G[i, j]: drop of group i per sub-phase probing j):
    solve G[i, :] = W Â[i, :] (W[j] = q^(j)), shift by min Â if negative, normalise to sum 1."""
    G = np.asarray(G, np.float64)
    W = np.stack([self._q(i) for i in range(self.m)])
    A = np.linalg.solve(W, G.T).T if self.f != 1.0 else G  # rows i: G[i, :] = W Â[i, :]
    if A.min() < 0:
      A = A - A.min()
    return A / max(A.sum(), 1e-12)

  def _finish_round(self, state: dict, G) -> dict:
    """Â from the round's G (estimate_A), then the proportions' update."""
    A = self.estimate_A(G)
    state["A"] = A.astype(np.float32)
    if self.ema > 0:  # Ā¹ = Â¹ (the released code's EMA starts from the first round's Â, not from 0)
      A_bar = A if int(state["rounds"]) == 0 else (1 - self.ema) * A + self.ema * state["A_ema"]
      p0 = self.prior if self.prior is not None else np.full(self.m, 1.0 / self.m)
      logits = np.log(np.maximum(p0, 1e-30)) + self.eta * A_bar.sum(0)  # p ∝ p⁰ ⊙ exp(η·1ᵀĀ): p⁰ = the prior, or uniform
      state["A_ema"] = A_bar.astype(np.float32)
    else:
      logits = np.log(np.maximum(state["p"], 1e-30)) + self.eta * A.sum(0)
    p = np.exp(logits - logits.max())
    state["p"] = (p / p.sum()).astype(np.float32)
    state["rounds"] = np.asarray(state["rounds"] + 1, np.int32)
    return state

  def log_fields(self, state: dict) -> dict:
    """Â of the latest round (rows: evaluated group i, columns: trained group j), after the first round."""
    if "A" not in state or int(state["rounds"]) == 0:
      return {}
    A = np.asarray(state["A"])
    return {f"mixture/A/{a}/{b}": float(A[i, j]) for i, a in enumerate(self.group_names) for j, b in enumerate(self.group_names)}


def _matrix(text, m: int, what: str) -> np.ndarray:
  """'a,b;c,d' (rows split by ';') or a nested sequence -> [m, m] float array (validated)."""
  if isinstance(text, str):
    try:
      rows = [[float(x) for x in r.split(",")] for r in text.split(";") if r.strip()]
    except ValueError as e:
      raise ConfigError(f"{what}: cannot parse {text!r} as rows 'a,b;c,d' ({e})") from None
  else:
    rows = text
  A = np.asarray(rows, np.float64)
  if A.shape != (m, m) or not np.all(np.isfinite(A)):
    raise ConfigError(f"{what} must be a finite {m}x{m} matrix, got shape {A.shape}")
  return A


def skills_graph(loss_start, loss_end) -> np.ndarray:
  """Skill-It's graph from m one-hot runs: A[i, j] = (L_j(0) − L_j(end of the run trained on i)) / L_j(0).

  loss_start: [m] per-group losses at the start; loss_end: [m, m], row i = losses after training on i.
  Rows are the trained group, columns the evaluated group (the released notebook uses the transpose
  for its LMO analysis; the update below reads A[i, :] as "what training on i does to every group").
  """
  L0, L1 = np.asarray(loss_start, np.float64), np.asarray(loss_end, np.float64)
  return (L0[None, :] - L1) / L0[None, :]


class SkillIt(Controller):
  """Skill-It (Chen et al. 2023), online: every U steps, p_i ∝ exp(η Σ_j A[i, j] Σ_{τ ∈ last w evals} ℓ_j^τ).

  Not cumulative (restarts from uniform every update, as released). A = `mixture.graph` ('a,b;c,d',
  rows = trained group; build it with `skills_graph` from m one-hot runs: the method's m extra runs).

  `mixture.skillit_form` picks what the paper leaves open:
    "released" (default; the Aioli authors' released trainer): per-group validation losses every
      E = `eval_every` steps (0 = U/2, the released scripts' 250/500); at step kU (k >= 1) the update
      uses the last w evaluations taken *before* kU (a stale window: the newest is from kU − E); the
      first p is ∝ exp(η·A·1) (the paper's Alg. 1 start); off-diagonal graph entries equal to 1 are set
      to 0.5 (a no-op for graphs of relative loss drops, which stay below 1).
    "fresh": one evaluation at every kU, used at once; the first p is uniform; the graph as given.
  """

  name = "skillit"
  needs = frozenset({"eval_group_loss", "skills_graph"})

  def __init__(self, group_names, cfg=None):
    super().__init__(group_names, cfg)
    g = (lambda k, d: cfg.get(k, d)) if cfg is not None else (lambda k, d: d)  # noqa: E731
    graph = g("graph", "")
    if not graph:
      raise ConfigError("mixture.method=skillit needs mixture.graph (its skills graph from m one-hot runs)")
    self.A = _matrix(graph, self.m, "mixture.graph")
    self.U, self.eta, self.w = int(g("update_steps", 250)), float(g("eta", 0.2)), int(g("window", 3))
    if self.w < 1 or self.U < 1:
      raise ConfigError(f"Skill-It: window={self.w} and update_steps={self.U} must be >= 1")
    self.form = str(g("skillit_form", "released"))
    if self.form not in ("released", "fresh"):
      raise ConfigError(f"Skill-It: mixture.skillit_form={self.form!r} must be 'released' or 'fresh'")
    self.E = self.U
    if self.form == "released":
      self.E = int(g("eval_every", 0)) or max(self.U // 2, 1)
      if self.E < 1 or self.U % self.E:
        raise ConfigError(f"Skill-It: mixture.eval_every={self.E} must divide update_steps={self.U}")
      off = ~np.eye(self.m, dtype=bool)
      self.A = np.where(off & (self.A == 1.0), 0.5, self.A)

  def _p(self, S) -> np.ndarray:
    logits = self.eta * self.A @ np.asarray(S, np.float64)
    p = np.exp(logits - logits.max())
    return (p / p.sum()).astype(np.float32)

  def init(self) -> dict:
    p = self._p(np.ones(self.m)) if self.form == "released" else np.full(self.m, 1.0 / self.m, np.float32)
    return {
      "p": p,
      "hist": np.zeros((self.w, self.m), np.float32),
      "n": np.zeros((), np.int32),
      "S": np.zeros(self.m, np.float32),  # the window sum behind the current p (0 before the first update)
    }

  def wants_eval(self, state: dict, step: int) -> bool:
    return int(step) % self.E == 0

  def update(self, state: dict, step: int, obs: dict) -> dict:
    ell = np.asarray(obs["eval/group_loss"], np.float64)
    state = {k: np.array(v) for k, v in state.items()}
    hist, n = np.asarray(state["hist"], np.float64), int(state["n"])
    if self.form == "released" and int(step) > 0 and int(step) % self.U == 0:  # the stale window: evaluations before step
      state["S"] = hist[: min(n, self.w)].sum(0).astype(np.float32)
      state["p"] = self._p(state["S"])
    hist = np.roll(hist, 1, axis=0)
    hist[0] = ell
    n += 1
    if self.form == "fresh":
      state["S"] = hist[: min(n, self.w)].sum(0).astype(np.float32)  # Σ over the last w evaluations, this one included
      state["p"] = self._p(state["S"])
    state["hist"], state["n"] = hist.astype(np.float32), np.asarray(n, np.int32)
    return state

  def implied_A(self, state: dict, vectors: dict):
    from lib import mixing_laws

    if not np.any(state["S"]):
      return None
    return mixing_laws.implied_A("skillit", graph=self.A, window_loss=np.asarray(state["S"], np.float64))


class _Reweighting(Controller):
  """Shared by DoReMi and DoGE: data stay stratified; the jitted train step reweights per-group losses
  (or gradients) with w and updates w on device (lib/steps.mixing_train_step). The method's output is
  the average w over training (`average_weights`), used for a final static run."""

  needs = frozenset({"train_group_loss"})
  mode = ""

  def __init__(self, group_names, cfg=None):
    super().__init__(group_names, cfg)
    g = (lambda k, d: cfg.get(k, d)) if cfg is not None else (lambda k, d: d)  # noqa: E731
    self.mu, self.eps = float(g("mu", 0.01)), float(g("smoothing", 1e-3))
    if self.mu <= 0:
      raise ConfigError(f"{self.name}: mixture.mu={self.mu} must be > 0")

  def init(self) -> dict:
    m = self.m
    u = np.full(m, 1.0 / m, np.float32)
    return {"p": u, "logw": np.zeros(m, np.float32), "w": u.copy(), "w_sum": np.zeros(m, np.float32), "n": np.zeros((), np.int32)}

  @staticmethod
  def average_weights(state: dict) -> np.ndarray:
    w = np.asarray(state["w_sum"], np.float64) / max(int(state["n"]), 1)
    return w / w.sum()


class DoReMi(_Reweighting):
  """DoReMi (Xie et al. 2023) as an LMO method: A^t = diag(excess loss of group i).

  Each step (on device, after the step's forward pass): excess_g = per-token max(ℓ − ℓ_ref, 0) averaged
  over group g's tokens, where ℓ_ref is the reference model's loss on the same tokens (its forward runs
  inside the jitted step); w_t = (1−ε)·normalise(w_{t−1}·exp(μ·excess)) + ε/m, starting from the
  previous *smoothed* weights as in the paper and the released code (state "logw" = log w_{t−1}); the
  proxy's loss is Σ_i w_t,i ℓ_i (reweighted, not resampled) with the just-updated w_t. ONE optimizer update per
  step (the released trainer's per-micro-batch optimizer.step() is not copied).
  `mixture.reference`: the workdir of a same-size stratified reference run with the same model (its
  latest checkpoint's params are restored once: DoReMi proper), or 'a=3.1,b=2.0', per-group reference
  losses (the coarser variant: excess = max(ℓ_g − ℓ_ref,g, 0) on group means)."""

  name = "doremi"
  needs = frozenset({"train_group_loss", "reference_losses"})
  mode = "doremi"

  def __init__(self, group_names, cfg=None):
    import os

    super().__init__(group_names, cfg)
    ref = cfg.get("reference", "") if cfg is not None else ""
    if not ref:
      raise ConfigError("mixture.method=doremi needs a reference run: set mixture.reference to its workdir or 'group=loss,...'")
    self.ref_dir = ref if isinstance(ref, str) and os.path.isdir(ref) else None
    if self.ref_dir is not None:
      from lib import ckpt as C

      if not C.available_steps(self.ref_dir):
        raise ConfigError(f"mixture.reference={ref}: the reference run has no checkpoint to restore its params from")
      self.needs = frozenset({"train_group_loss", "reference_params"})
      self.ref = np.zeros(self.m)  # unused: the per-token reference losses come from the params
    else:
      self.ref = reference_losses(ref, self.group_names)

  def init(self) -> dict:
    return dict(super().init(), ref=self.ref.astype(np.float32))

  def implied_A(self, state: dict, vectors: dict):
    from lib import mixing_laws

    return mixing_laws.implied_A("doremi", excess=vectors["mixture/excess"]) if "mixture/excess" in vectors else None


class DoGE(_Reweighting):
  """DoGE (Fan et al. 2023): A^t_ij = ⟨∇ℓ_i^train, ∇ℓ_j^val⟩, computed inside the jitted step.

  Per-group training gradients g_i come from the batch's group ids; the target gradient g_val is the
  gradient of the mean over groups of the per-group validation losses on a held-out validation batch
  (rows of every group, cycled through the validation split: MixtureRunner.step_inputs), DoGE's
  universal-generalisation setting. s_i = clip(lr·⟨g_i, g_val⟩ / mean_i ‖g_i‖, 0, 5·lr);
  log w ← log w + s/μ; w = softmax(log w); the applied gradient is Σ_i w_i g_i with the new w.
  `mixture.doge_clip` (default 1.0, the released trainer's form): each g_i and g_val is first clipped
  to that norm (torch's clip_grad_norm_), and the clipped g_i enter the scores, the mean norm and the
  applied gradient; 0 = the unclipped form (the DoGE paper's equations)."""

  name = "doge"
  needs = frozenset({"group_grads", "validation_batch"})
  mode = "doge"

  def __init__(self, group_names, cfg=None):
    super().__init__(group_names, cfg)
    self.clip = float(cfg.get("doge_clip", 1.0)) if cfg is not None else 1.0
    if self.clip < 0:
      raise ConfigError(f"DoGE: mixture.doge_clip={self.clip} must be >= 0 (0 = off)")

  def implied_A(self, state: dict, vectors: dict):
    from lib import mixing_laws

    return mixing_laws.implied_A("doge", doge_score=vectors["mixture/doge_score"]) if "mixture/doge_score" in vectors else None


def reference_losses(ref, group_names) -> np.ndarray:
  """DoReMi's ℓ_ref: 'a=3.1,b=2.0' or a run directory (its last eval row's eval/<group>/loss)."""
  import json
  import os

  names = list(group_names)
  if isinstance(ref, str) and os.path.isdir(ref):
    path = os.path.join(ref, "metrics.jsonl")
    rows = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
    rows = [r for r in rows if all(f"eval/{n}/loss" in r for n in names)]
    if not rows:
      raise ConfigError(f"mixture.reference={ref}: no eval row with per-group losses for {names} in {path}")
    return np.array([rows[-1][f"eval/{n}/loss"] for n in names])
  if isinstance(ref, str):
    kv = {}
    for part in (x for x in ref.split(",") if x.strip()):
      if "=" not in part:
        raise ConfigError(f"mixture.reference={ref!r} is neither a run directory nor 'group=loss,...'")
      k, v = part.split("=", 1)
      kv[k.strip()] = float(v)
    missing, unknown = sorted(set(names) - set(kv)), sorted(set(kv) - set(names))
    if missing or unknown:
      raise ConfigError(f"mixture.reference: missing groups {missing}, unknown groups {unknown}; groups are {names}")
    return np.array([kv[n] for n in names])
  return np.asarray(ref, np.float64)


METHODS = {"stratified": Stratified, "static": Static, "aioli": Aioli, "skillit": SkillIt, "doremi": DoReMi, "doge": DoGE}


def parse_proportions(text, group_names) -> np.ndarray:
  """'law=0.5,code=0.5' or '0.5,0.5' or a sequence -> p [m] in group order (validated)."""
  names = list(group_names)
  if isinstance(text, str):
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if parts and all("=" in x for x in parts):
      kv = dict((k.strip(), float(v)) for k, v in (x.split("=", 1) for x in parts))
      unknown = sorted(set(kv) - set(names))
      if unknown:
        raise ConfigError(f"mixture proportions name unknown groups {unknown}; groups are {names}")
      p = np.array([kv.get(n, 0.0) for n in names])
    else:
      p = np.array([float(x) for x in parts])
  else:
    p = np.asarray(text, np.float64)
  check_proportions(p, names)
  return p


def make(mixture_cfg, group_names, seed: int = 0) -> Controller:
  """The controller named by `mixture.method`; `seed` (the run's) drives any randomness it has."""
  method = mixture_cfg.method
  if method not in METHODS:
    raise ConfigError(f"mixture.method={method!r} is not one of {sorted(METHODS)}")
  c = METHODS[method](group_names, mixture_cfg)
  c.seed = int(seed)
  if len(c.group_names) < 2 and c.needs:
    raise ConfigError(f"mixture.method={method} needs per-group data ({sorted(c.needs)}), but the data has one group")
  return c


class MixtureRunner:
  """The trainer's one handle on data mixing: the controller, its host state, the data iterator.

  The controller's state lives twice: as numpy here (what `proportions` and `update` read) and as
  device arrays in the train state's "mixture" entry (what checkpoints save and what on-device
  controllers such as DoReMi/DoGE update inside the jitted step). `observe` keeps both in step and
  restarts the data iterator, whose p-function reads a snapshot of the state taken at (re)start, so
  no closure depends on a variable the loop rebinds later.
  """

  def __init__(self, controller: Controller, pipe, *, total: int, num_threads: int, sharding=None):
    self.controller, self.pipe, self.total, self.num_threads = controller, pipe, int(total), num_threads
    self.names = controller.group_names
    self.multi = len(self.names) > 1
    self.sharding = sharding
    self.state = controller.init()
    self._it = None
    unmet = sorted(set(controller.needs) - set(NEEDS))
    if unmet:
      raise ConfigError(f"mixture.method={controller.name} needs {unmet}, which this trainer cannot supply ({sorted(NEEDS)})")

  def train_step(self, *, model, tx, schedule, grad_accum: int, extra_loss=None):
    """The (unjitted) step function: lib/steps.train_step (with an optional extra loss term, e.g. Liu's
    adversarial head), or the reweighting step of DoReMi/DoGE."""
    import functools

    from lib import steps

    mode, m = getattr(self.controller, "mode", ""), len(self.names)
    self._train_parts = dict(model=model, tx=tx, schedule=schedule)  # for branch training (learn_params_branches)
    if not mode:
      return functools.partial(
        steps.train_step, model=model, tx=tx, schedule=schedule, grad_accum=grad_accum, num_groups=m, extra_loss=extra_loss
      )
    if extra_loss is not None:
      raise ConfigError(
        f"mixture.method={self.controller.name} reweights the loss itself: it cannot be combined with adversarial.weight"
      )
    if grad_accum != 1:
      raise ConfigError(f"mixture.method={self.controller.name} reweights per-group losses in one pass: set train.grad_accum=1")
    c = self.controller
    return functools.partial(
      steps.mixing_train_step,
      model=model,
      tx=tx,
      schedule=schedule,
      num_groups=m,
      mode=mode,
      mu=c.mu,
      eps=c.eps,
      doge_clip=getattr(c, "clip", 0.0),
    )

  def prepare(self, *, eval_sets=(), mesh=None, params_like=None) -> None:
    """Device inputs the reweighting step needs beyond the training rows, built once: DoGE's
    validation batches (each = one validation batch of every group, concatenated; cycled by step) and
    DoReMi's reference params (restored from mixture.reference's latest checkpoint onto `mesh`,
    checked against this run's parameter shapes `params_like`)."""
    import jax
    import jax.numpy as jnp

    self._val, self._ref_params = [], None
    self._eval_sets, self._mesh = list(eval_sets), mesh
    if getattr(self.controller, "branches", "") and jax.process_count() > 1:
      raise ConfigError("mixture.lp_branches needs a single-process run (the branches' batches are built on one host)")
    needs = self.controller.needs
    if "validation_batch" in needs:
      by_group = [[] for _ in self.names]
      for b in eval_sets:
        by_group[int(np.asarray(b["group"].addressable_shards[0].data).reshape(-1)[0])].append(b)
      missing = [n for n, bs in zip(self.names, by_group) if not bs]
      if missing:
        raise ConfigError(f"mixture.method={self.controller.name} needs validation batches of every group; none for {missing}")
      n = max(len(bs) for bs in by_group)
      self._val = [jax.tree.map(lambda *x: jnp.concatenate(x), *(bs[k % len(bs)] for bs in by_group)) for k in range(n)]
    if "reference_params" in needs:
      from lib import ckpt as C

      ref_dir = self.controller.ref_dir
      ref = C.restore_params(ref_dir, None, mesh)
      got = jax.tree.map(lambda x: tuple(x.shape), ref)
      want = jax.tree.map(lambda x: tuple(x.shape), params_like) if params_like is not None else got
      if jax.tree.structure(got) != jax.tree.structure(want) or jax.tree.leaves(got) != jax.tree.leaves(want):
        raise ConfigError(f"mixture.reference={ref_dir}: the reference run's model differs from this run's (parameter shapes)")
      self._ref_params = ref

  def learn_params_branches(self, step: int, train_state: dict) -> np.ndarray:
    """Aioli's LearnParams as R·m branches forked from `train_state` at round start `step`: branch k
    trains lp_steps steps on q^(perm[k]) (the batches the chained sub-phase k would get) and is then
    evaluated on the validation batches; all branches at once (lib/mixing_laws.run_branches, vmap over
    copies of the state) or one after another (lp_branches=sequential; the same numbers). The branches
    are discarded. Returns their per-group validation losses [R·m, m]."""
    import functools

    import jax
    import jax.numpy as jnp

    from lib import mixing_laws, steps

    c, parts = self.controller, self._train_parts
    r = (int(step) - c.P) // c.U
    perm = c.permutation(r)
    K = len(perm)
    rows = [[self.pipe.batch(step + k * c.s + u, c._q(int(perm[k])), exact=True) for k in range(K)] for u in range(c.s)]
    batches = jax.tree.map(lambda *x: jnp.asarray(np.stack(x)), *[jax.tree.map(lambda *y: np.stack(y), *row) for row in rows])
    fn = functools.partial(steps.train_step, num_groups=len(self.names), **parts)
    out, _ = mixing_laws.run_branches(fn, train_state, batches, vectorise=c.branches == "vmap")
    ev = jax.jit(
      jax.vmap(functools.partial(steps.eval_step, model=parts["model"], num_groups=len(self.names)), in_axes=(0, None))
    )
    tot = None
    for b in self._eval_sets:
      s_ = jax.tree.map(lambda x: np.asarray(x, np.float64), ev(out["params"], b))
      tot = s_ if tot is None else jax.tree.map(np.add, tot, s_)
    return tot["group_loss_sum"] / np.maximum(tot["group_tokens"], 1.0)

  def step_inputs(self, batch: dict, step: int) -> dict:
    """The batch for the jitted step at `step`, with the reweighting step's extra inputs (prepare)."""
    if getattr(self, "_val", None):
      batch = dict(batch, val=self._val[int(step) % len(self._val)])
    if getattr(self, "_ref_params", None) is not None:
      batch = dict(batch, ref_params=self._ref_params)
    return batch

  def load(self, device_state) -> None:
    """Adopts the (restored or initial) device copy of the controller state."""
    self.state = {k: np.asarray(v) for k, v in device_state.items()}

  def to_device(self):
    import jax
    import jax.numpy as jnp

    tree = {k: jnp.asarray(v) for k, v in self.state.items()}
    return tree if self.sharding is None else jax.device_put(tree, self.sharding)

  def proportions(self, step: int) -> np.ndarray:
    return self.controller.proportions(self.state, step)

  def wants_eval(self, step: int) -> bool:
    return self.multi and self.controller.wants_eval(self.state, step)

  def start(self, step: int) -> None:
    """(Re)starts the data iterator at `step` with p from the current state."""
    snap = {k: np.array(v) for k, v in self.state.items()}
    p_fn = (lambda s: self.controller.proportions(snap, s)) if self.multi else None
    self._it = self.pipe.iterator(step, self.total, p_fn, num_threads=self.num_threads, exact_fn=self.controller.exact_rows)

  def next_batch(self) -> dict:
    return next(self._it)

  def first_eval(self, train_state: dict, evaluate, log_eval: bool) -> dict:
    """Step 0 of a fresh run: ONE evaluation serves both the log and a controller that wants ℓ⁰
    (e.g. Aioli's first round; a resumed run saved it already)."""
    if log_eval or self.wants_eval(0):
      em = evaluate(0)
      if self.wants_eval(0):
        train_state = self.observe(0, em, train_state)
    return train_state

  def observe(self, step: int, eval_metrics: dict, train_state: dict) -> dict:
    """Per-group validation losses -> controller update; returns the train state with the new
    mixture state on device and restarts the iterator at `step` (the next batch is step's)."""
    loss = eval_metrics["eval/loss"]
    obs = {"eval/group_loss": np.array([eval_metrics.get(f"eval/{n}/loss", loss) for n in self.names])}
    c = self.controller
    if getattr(c, "branches", "") and int(step) < self.total and int(step) >= c.P and (int(step) - c.P) % c.U == 0:
      obs["branch/group_loss"] = self.learn_params_branches(step, train_state)
    self.state = self.controller.update(self.state, step, obs)
    self.start(step)
    return dict(train_state, mixture=self.to_device())

  def row_fields(self, step: int, row: dict) -> dict:
    """Per-group fields of the logged row at `step` (whose batch was step-1's); pops the vectors."""
    if not self.multi:
      return {}
    p = self.proportions(step - 1)
    counts = np.bincount(self.pipe.group_of_rows(step - 1, p, self.controller.exact_rows(step - 1)), minlength=len(self.names))
    out = {}
    for gi, n in enumerate(self.names):
      out[f"mixture/p/{n}"] = float(p[gi])
      out[f"data/rows/{n}"] = int(counts[gi])
    row.pop("train/group_tokens", None)
    gl = row.pop("train/group_loss")
    for gi, n in enumerate(self.names):
      out[f"train/{n}/loss"] = float(gl[gi])
    vectors = {}
    for key in ("mixture/w", "mixture/w_avg", "mixture/excess", "mixture/val_loss", "mixture/doge_score"):  # DoReMi, DoGE
      w = row.pop(key, None)
      if w is not None:
        vectors[key] = np.asarray(w)
        for gi, n in enumerate(self.names):
          out[f"{key}/{n}"] = float(w[gi])
    A = self.controller.implied_A(self.state, vectors)
    if A is not None:
      out.update({f"mixture/A/{a}/{b}": float(A[i, j]) for i, a in enumerate(self.names) for j, b in enumerate(self.names)})
    out.update(self.controller.log_fields(self.state))
    return out
