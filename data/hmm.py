"""Hidden Markov model language with exact likelihoods (Liu et al. 2022's HMM data).

Every sentence has exactly `length` tokens: s_1 ~ init, w_t ~ emit[s_t], s_{t+1} ~ trans[s_t].
Because the length is fixed, EOS is certain after `length` tokens: its true log-prob is 0 (and
p(EOS) = 0 before). Liu et al. use 100 states, 200 tokens and sentences of 16 tokens; no
generation code was released, so rows here are seeded Dirichlet draws, optionally restricted
to a random support of k states / tokens per row to give sparser, more structured chains.

Exact quantities by the scaled forward(-backward) algorithm in float64: per-token conditionals
p(w_t | w_<t), sentence log-probs, masked conditionals p(w_t | w_{-t}) (the masked-LM optimum),
state posteriors p(s_t | w), and the entropy rate (optimal causal / masked LM loss).

Axis / shape legend (variable-name suffixes):
  N  sentences     L  positions (= length, or a prefix length)    L1 = L + 1 (with EOS)
  S  hidden states V  tokens (raw ids 0..V-1)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data.estimates import ratio_stats


def _row_sampler(p_SxK: np.ndarray):
  """Global CDF (row + cumulative prob) so that one searchsorted draws from any rows at once."""
  S, K = p_SxK.shape
  cum = np.cumsum(p_SxK, 1) / p_SxK.sum(1, keepdims=True)
  cum[:, -1] = 1.0
  last_pos_S = K - 1 - np.argmax(p_SxK[:, ::-1] > 0, 1)  # last positive entry of each row
  flat = (np.arange(S)[:, None] + cum).reshape(-1)

  def draw(rows_N: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    k = np.searchsorted(flat, rows_N + rng.random(len(rows_N)), side="right") - rows_N * K
    return np.minimum(k, last_pos_S[rows_N])  # guards the row + u -> row + 1 rounding edge

  return draw


def _dirichlet_rows(rng: np.random.Generator, n_rows: int, n_cols: int, concentration: float, support: int | None) -> np.ndarray:
  """[n_rows, n_cols] Dirichlet rows, each on a random support of `support` columns (None = all)."""
  k = n_cols if support is None else int(min(max(support, 1), n_cols))
  out = np.zeros((n_rows, n_cols))
  for r in range(n_rows):  # construction only
    cols = rng.choice(n_cols, size=k, replace=False)
    p = rng.dirichlet(np.full(k, concentration))
    if not np.isfinite(p).all() or p.sum() <= 0:  # tiny concentrations can underflow
      p = np.eye(k)[rng.integers(k)]
    out[r, cols] = p
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class HMM:
  """A fixed-length HMM: init_S, trans_SxS (rows sum to 1), emit_SxV (rows sum to 1)."""

  init_S: np.ndarray
  trans_SxS: np.ndarray
  emit_SxV: np.ndarray
  length: int = 16

  def __post_init__(self):
    init = np.asarray(self.init_S, np.float64)
    trans = np.asarray(self.trans_SxS, np.float64)
    emit = np.asarray(self.emit_SxV, np.float64)
    S = len(init)
    if trans.shape != (S, S) or emit.ndim != 2 or emit.shape[0] != S or self.length < 1:
      raise ValueError(f"bad shapes: init {init.shape}, trans {trans.shape}, emit {emit.shape}, length {self.length}")
    for name, p in (("init", init[None]), ("trans", trans), ("emit", emit)):
      if p.min() < 0 or not np.allclose(p.sum(-1), 1.0, atol=1e-9):
        raise ValueError(f"{name} rows must be probability distributions")
    object.__setattr__(self, "init_S", init)
    object.__setattr__(self, "trans_SxS", trans)
    object.__setattr__(self, "emit_SxV", emit)
    object.__setattr__(self, "length", int(self.length))

  @classmethod
  def random(
    cls,
    seed: int = 0,
    n_states: int = 100,
    n_tokens: int = 200,
    length: int = 16,
    concentration: float = 1.0,
    emission_concentration: float | None = None,
    transition_support: int | None = 10,
    emission_support: int | None = 20,
    n_terminals: int | None = None,
  ) -> HMM:
    """Seeded random HMM: Dirichlet(concentration) rows on random k-sparse supports (None = dense).

    Defaults (each state reaches 10 states and emits 20 tokens) give an optimal masked-LM loss of
    ~3.6 nats, near the 3.758 Liu et al. report for their (unreleased) HMM; dense rows give an
    almost unpredictable language (~5.1 nats of log 200 = 5.3). Small concentrations make rows
    peaked; `transition_support` / `emission_support` cap how many states / tokens a state reaches.
    `n_terminals` is an alias of `n_tokens` (the other languages' name for the vocabulary).
    """
    if n_terminals is not None:
      n_tokens = n_terminals
    rng = np.random.default_rng(seed)
    e_conc = concentration if emission_concentration is None else emission_concentration
    init = rng.dirichlet(np.ones(n_states))
    trans = _dirichlet_rows(rng, n_states, n_states, concentration, transition_support)
    emit = _dirichlet_rows(rng, n_states, n_tokens, e_conc, emission_support)
    return cls(init, trans, emit, length)

  @property
  def n_states(self) -> int:
    return len(self.init_S)

  @property
  def n_tokens(self) -> int:
    return self.emit_SxV.shape[1]

  @property
  def n_terminals(self) -> int:
    return self.n_tokens

  # ------------------------------------------------------------------ sampling

  def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n, length] int32 raw ids, states [n, length] int32), vectorised over sentences."""
    rng = np.random.default_rng(seed)
    draw_t = _row_sampler(self.trans_SxS)
    draw_e = _row_sampler(self.emit_SxV)
    states_NxL = np.zeros((n, self.length), np.int64)
    tokens_NxL = np.zeros((n, self.length), np.int64)
    states_NxL[:, 0] = _row_sampler(self.init_S[None])(np.zeros(n, np.int64), rng)
    for t in range(self.length):
      if t:
        states_NxL[:, t] = draw_t(states_NxL[:, t - 1], rng)
      tokens_NxL[:, t] = draw_e(states_NxL[:, t], rng)
    return tokens_NxL.astype(np.int32), states_NxL.astype(np.int32)

  # The Language protocol (data/types.py): sentences, token_logprobs_batch, downstream_tasks.

  def sentences(self, n: int, seed: int) -> list[np.ndarray]:
    return list(self.sample(n, seed)[0])

  def token_logprobs_batch(self, sentences) -> list[np.ndarray]:
    return list(self.token_logprobs(np.stack(sentences)))

  def downstream_tasks(self, n: int, seed: int) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Liu's hidden-state tasks: the state at 1-based position 6 / 10 (where the length allows)."""
    toks, states = self.sample(n, seed)
    out = {}
    for pos in (6, 10):
      if pos <= toks.shape[1]:
        out[f"task_state{pos}"] = [(t, int(y)) for t, y in zip(toks, self.hidden_state_labels(states, pos))]
    return {k: v for k, v in out.items() if v}

  # ------------------------------------------------------------------ exact inference

  def _as_batch(self, tokens) -> tuple[np.ndarray, bool]:
    tok = np.asarray(tokens, np.int64)
    single = tok.ndim == 1
    tok_NxL = tok[None] if single else tok
    if tok_NxL.ndim != 2 or tok_NxL.shape[1] > self.length:
      raise ValueError(f"tokens must be [N, L <= {self.length}], got {tok.shape}")
    if tok_NxL.size and (tok_NxL.min() < 0 or tok_NxL.max() >= self.n_tokens):
      raise ValueError(f"token ids must be raw ids in 0..{self.n_tokens - 1}")
    return tok_NxL, single

  def _forward(self, tok_NxL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predictive state distributions p(s_t | w_<t) [N, L, S] and p(w_t | w_<t) [N, L]."""
    N, L = tok_NxL.shape
    pred_NxLxS = np.zeros((N, L, self.n_states))
    cond_NxL = np.zeros((N, L))
    pred_NxS = np.broadcast_to(self.init_S, (N, self.n_states))
    for t in range(L):
      pred_NxLxS[:, t] = pred_NxS
      joint_NxS = pred_NxS * self.emit_SxV[:, tok_NxL[:, t]].T
      cond_NxL[:, t] = joint_NxS.sum(1)
      with np.errstate(invalid="ignore"):
        pred_NxS = (joint_NxS / cond_NxL[:, t, None]) @ self.trans_SxS
    return pred_NxLxS, cond_NxL

  def _backward(self, tok_NxL: np.ndarray) -> np.ndarray:
    """Scaled backward messages [N, L, S] proportional to p(w_>t | s_t) (scale per t arbitrary)."""
    N, L = tok_NxL.shape
    back_NxLxS = np.ones((N, L, self.n_states))
    for t in range(L - 2, -1, -1):
      b_NxS = (self.emit_SxV[:, tok_NxL[:, t + 1]].T * back_NxLxS[:, t + 1]) @ self.trans_SxS.T
      back_NxLxS[:, t] = b_NxS / np.maximum(b_NxS.max(1, keepdims=True), 1e-300)
    return back_NxLxS

  def token_logprobs(self, tokens) -> np.ndarray:
    """[N, length+1] float64 log p(w_t | w_<t), last column log p(EOS | w) = 0 ([length+1] for 1-D)."""
    tok_NxL, single = self._as_batch(tokens)
    if tok_NxL.shape[1] != self.length:
      raise ValueError(f"sentences have exactly {self.length} tokens, got {tok_NxL.shape[1]}")
    _, cond_NxL = self._forward(tok_NxL)
    with np.errstate(divide="ignore"):
      lp_NxL1 = np.concatenate([np.log(cond_NxL), np.zeros((len(tok_NxL), 1))], 1)
    return lp_NxL1[0] if single else lp_NxL1

  def log_prob(self, tokens) -> np.ndarray:
    """[N] float64 log p(sentence) (a float for one 1-D sentence)."""
    return self.token_logprobs(tokens).sum(-1)

  def next_token_distributions(self, tokens) -> np.ndarray:
    """[N, L, V]: row t = p(w_t = v | w_<t) for t < L (prefixes allowed, L <= length).

    EOS is omitted: its probability is 0 before `length` tokens and 1 after.
    """
    tok_NxL, single = self._as_batch(tokens)
    pred_NxLxS, _ = self._forward(tok_NxL)
    dist_NxLxV = pred_NxLxS @ self.emit_SxV
    return dist_NxLxV[0] if single else dist_NxLxV

  def posterior_states(self, tokens) -> np.ndarray:
    """[N, L, S] p(s_t | w_1..w_L) by forward-backward."""
    tok_NxL, single = self._as_batch(tokens)
    pred_NxLxS, _ = self._forward(tok_NxL)
    post_NxLxS = pred_NxLxS * np.moveaxis(self.emit_SxV[:, tok_NxL], 0, -1) * self._backward(tok_NxL)
    with np.errstate(invalid="ignore"):
      post_NxLxS /= post_NxLxS.sum(-1, keepdims=True)
    return post_NxLxS[0] if single else post_NxLxS

  def masked_conditionals(self, tokens) -> np.ndarray:
    """[N, L, V] p(w_t = v | w_{-t}): the masked-LM optimum (one forward-backward pass)."""
    tok_NxL, single = self._as_batch(tokens)
    pred_NxLxS, _ = self._forward(tok_NxL)
    cond_NxLxV = (pred_NxLxS * self._backward(tok_NxL)) @ self.emit_SxV
    with np.errstate(invalid="ignore"):
      cond_NxLxV /= cond_NxLxV.sum(-1, keepdims=True)
    return cond_NxLxV[0] if single else cond_NxLxV

  @staticmethod
  def hidden_state_labels(states, position: int) -> np.ndarray:
    """Liu's task-6 / task-10 labels: the hidden state at 1-based `position` ([N] int32)."""
    states_NxL = np.asarray(states)
    if not 1 <= position <= states_NxL.shape[-1]:
      raise ValueError(f"position is 1-based in 1..{states_NxL.shape[-1]}, got {position}")
    return states_NxL[..., position - 1].astype(np.int32)

  # ------------------------------------------------------------------ entropy

  def enumerate_sentences(self, limit: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """All V**length sentences and their log-probs (tiny HMMs only)."""
    if self.n_tokens**self.length > limit:
      raise ValueError(f"{self.n_tokens}**{self.length} sentences are too many to enumerate")
    tok_NxL = np.array(list(np.ndindex(*(self.n_tokens,) * self.length)), np.int64)
    return tok_NxL, self.log_prob(tok_NxL)

  def entropy_rate(self, n_samples: int = 2000, seed: int = 0, exact: bool = False, mlm: bool = True) -> dict:
    """Optimal causal-LM / masked-LM loss in nats per predicted token, as for the PCFG.

    causal_loss counts length + 1 predicted tokens per sentence (EOS, with loss 0, included, as
    the trainer predicts it); causal_loss_per_word excludes EOS. exact=True enumerates sentences.
    """
    L = self.length
    if exact:
      tok_NxL, lp_N = self.enumerate_sentences()
      w_N = np.exp(lp_N)
      h = float(np.sum(w_N * -lp_N))
      res = {
        "method": "exact",
        "n_sentences": len(tok_NxL),
        "mass": float(w_N.sum()),
        "sentence_entropy": h,
        "sentence_entropy_se": 0.0,
        "causal_loss": h / (L + 1),
        "causal_loss_se": 0.0,
        "causal_loss_per_word": h / L,
        "mean_len": float(L),
      }
      res["causal_loss_ci95"] = (res["causal_loss"],) * 2
      if mlm:
        cond_NxLxV = self.masked_conditionals(tok_NxL)
        nll_N = -np.log(np.take_along_axis(cond_NxLxV, tok_NxL[..., None], -1)[..., 0]).sum(1)
        res.update({"mlm_loss": float(np.sum(w_N * nll_N) / L), "mlm_loss_se": 0.0})
        res["mlm_loss_ci95"] = (res["mlm_loss"],) * 2
      return res
    tok_NxL, _ = self.sample(n_samples, seed)
    nll_N = -self.log_prob(tok_NxL)
    causal = ratio_stats(nll_N, np.full(n_samples, L + 1.0))
    res = {
      "method": "sampled",
      "n_sentences": n_samples,
      "seed": seed,
      "causal_loss": causal["mean"],
      "causal_loss_se": causal["se"],
      "causal_loss_ci95": causal["ci95"],
      "causal_loss_per_word": causal["mean"] * (L + 1) / L,
      "sentence_entropy": float(nll_N.mean()),
      "sentence_entropy_se": float(nll_N.std(ddof=1) / np.sqrt(n_samples)) if n_samples > 1 else float("nan"),
      "mean_len": float(L),
    }
    if mlm:
      tok64 = tok_NxL.astype(np.int64)
      cond_NxLxV = self.masked_conditionals(tok64)
      mnll_N = -np.log(np.take_along_axis(cond_NxLxV, tok64[..., None], -1)[..., 0]).sum(1)
      m = ratio_stats(mnll_N, np.full(n_samples, float(L)))
      res.update({"mlm_loss": m["mean"], "mlm_loss_se": m["se"], "mlm_loss_ci95": m["ci95"]})
    return res

  def describe(self, n_samples: int = 500, seed: int = 0) -> dict:
    """Summary numbers for logging (entropy estimated from n_samples; 0 = skip)."""

    def ent(p: np.ndarray) -> float:
      return float(np.mean(-np.sum(p * np.log(np.where(p > 0, p, 1.0)), -1)))

    d = {
      "n_states": self.n_states,
      "n_tokens": self.n_tokens,
      "length": self.length,
      "mean_transition_entropy": ent(self.trans_SxS),
      "mean_emission_entropy": ent(self.emit_SxV),
    }
    if n_samples:
      e = self.entropy_rate(n_samples=n_samples, seed=seed)
      d.update({k: e[k] for k in ("causal_loss", "causal_loss_se", "sentence_entropy", "mlm_loss", "mlm_loss_se")})
    return d
