"""Liu et al.'s masked-LM loss and its exact optimum: every position of each sentence masked in turn.

For a sentence w (n words) and each position i, the model sees [BOS, w_1 .. MASK .. w_n, EOS] (one
[MASK] at word i, sentence length known) and predicts p_θ(· | w_{-i}). The loss is the *expected*
cross-entropy against the exact masked-token conditional p(· | w_{-i}) of the language, as the released
`pcfg/calculate_loss.py` computes it:

  mlm_loss     = mean_{sentences, i} −Σ_v p(v | w_{-i}) log p_θ(v | w_{-i})
  optimal_loss = mean_{sentences, i}  H(p(· | w_{-i}))            (the model equals the conditional)
  excess_loss  = mlm_loss − optimal_loss = mean KL(p ‖ p_θ) ≥ 0

Conditionals come from `PCFG.masked_conditionals_batch` (inside-outside) or `HMM.masked_conditionals`
(forward-backward). Legend: R rows (one per masked position), L row length, V model vocabulary,
W raw terminals.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from data import vocab
from lib import errors
from lib import model as M


def masked_conditionals(lang, sentences: list[np.ndarray]) -> list[np.ndarray]:
  """Per raw sentence [n, W]: exact p(w_i = v | w_{-i}) (PCFG or HMM)."""
  if hasattr(lang, "masked_conditionals_batch"):
    return lang.masked_conditionals_batch(sentences)
  if type(lang).__name__ == "HMM":
    return list(lang.masked_conditionals(np.stack(sentences).astype(np.int64)))
  raise errors.DataError(f"{type(lang).__name__} has no exact masked-token conditionals (only PCFG and HMM do)")


def masked_rows(lang, sentences: list[np.ndarray], seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
  """One row per (sentence, position): inputs with one MASK, `target_pos`, `p_true_RxV` (model ids).

  Sentences whose framed length exceeds seq_len are skipped (their count is in `skipped`).
  """
  keep = [np.asarray(s, np.int64) for s in sentences if len(s) + 2 <= seq_len and len(s) > 0]
  if not keep:
    raise errors.DataError(f"no validation sentence fits in seq_len={seq_len} for the masked-LM eval")
  conds = masked_conditionals(lang, keep)
  W = lang.n_terminals
  if vocab.N_SPECIAL + W > vocab_size:
    raise errors.DataError(f"model vocabulary {vocab_size} is smaller than the language's {vocab.N_SPECIAL + W} ids")
  R = sum(len(s) for s in keep)
  rows = {
    "inputs": np.zeros((R, seq_len), np.int32),
    "positions": np.zeros((R, seq_len), np.int32),
    "segment_ids": np.zeros((R, seq_len), np.int32),
    "target_pos": np.zeros(R, np.int32),
    "p_true": np.zeros((R, vocab_size), np.float32),
    "h_true": np.zeros(R, np.float64),  # entropy of the conditional, from the float64 conditional
  }
  r = 0
  for s, c in zip(keep, conds):
    framed = vocab.frame(s)
    n = len(framed)
    for i in range(len(s)):
      rows["inputs"][r, :n] = framed
      rows["inputs"][r, i + 1] = vocab.MASK
      rows["positions"][r, :n] = np.arange(n)
      rows["segment_ids"][r, :n] = 1
      rows["target_pos"][r] = i + 1
      rows["p_true"][r, vocab.N_SPECIAL : vocab.N_SPECIAL + W] = c[i]
      rows["h_true"][r] = entropy(c[i][None])[0]
      r += 1
  rows["skipped"] = len(sentences) - len(keep)
  return rows


def entropy(p_RxV: np.ndarray) -> np.ndarray:
  """[R] entropy in nats (0 log 0 = 0), float64."""
  p = np.asarray(p_RxV, np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)


def expected_ce_sum(params, batch: dict, *, model: M.Transformer) -> tuple[jax.Array, jax.Array]:
  """(Σ_rows weight · −Σ_v p_true log p_θ, Σ weight) for one batch of masked rows."""
  logits_RxLxV = M.logits(model, params, batch)
  lg_RxV = jnp.take_along_axis(logits_RxLxV, batch["target_pos"][:, None, None], axis=1)[:, 0]
  logp_RxV = jax.nn.log_softmax(lg_RxV.astype(jnp.float32), axis=-1)
  p_RxV = batch["p_true"]
  ce_R = -jnp.sum(jnp.where(p_RxV > 0, p_RxV * logp_RxV, 0.0), -1)
  return jnp.sum(ce_R * batch["weight"]), jnp.sum(batch["weight"])


class MaskedEval:
  """Exact masked-LM eval of one language on fixed sentences; `__call__(params) -> flat metrics`."""

  def __init__(self, model, lang, sentences, *, seq_len: int, batch_size: int, mesh=None, prefix: str = "eval/"):
    from lib import sharding

    if model.cfg.causal:
      raise errors.ConfigError("the masked-LM exact loss needs a bidirectional model (model.causal=False); this model is causal")
    self.model, self.prefix = model, prefix
    rows = masked_rows(lang, sentences, seq_len, model.cfg.vocab_size)
    self.n_rows, self.skipped = len(rows["target_pos"]), rows.pop("skipped")
    self.optimal = float(rows.pop("h_true").mean())
    pad = (-self.n_rows) % batch_size
    rows["weight"] = np.concatenate([np.ones(self.n_rows, np.float32), np.zeros(pad, np.float32)])
    for k in ("inputs", "positions", "segment_ids", "target_pos", "p_true"):
      rows[k] = np.concatenate([rows[k], np.zeros((pad,) + rows[k].shape[1:], rows[k].dtype)])
    rows["segment_ids"][self.n_rows :, 0] = 1  # padding rows attend to something (weight 0 anyway)
    self.mesh = mesh or sharding.single_device_mesh()
    lo, hi = sharding.local_rows(self.mesh, batch_size)
    self.batches = []
    for b in range(0, len(rows["weight"]), batch_size):
      local = {k: v[b + lo : b + hi] for k, v in rows.items()}
      self.batches.append(sharding.global_batch_from_local(self.mesh, local, batch_size))
    self._fn = jax.jit(functools.partial(expected_ce_sum, model=model))

  def __call__(self, params) -> dict:
    tot, n = 0.0, 0.0
    for b in self.batches:
      s, w = self._fn(params, b)
      tot, n = tot + float(s), n + float(w)
    loss = tot / max(n, 1.0)
    p = self.prefix
    return {f"{p}mlm_loss": loss, f"{p}optimal_loss": self.optimal, f"{p}excess_loss": loss - self.optimal, f"{p}mlm_rows": n}


def group_specs(data_cfg) -> dict:
  """{group name: source spec}, as `sources.make_groups` names them."""
  groups_cfg = data_cfg.get("groups") or {}
  return {k: dict(v) for k, v in dict(groups_cfg).items()} if len(groups_cfg) else {"main": dict(data_cfg["source"])}


def from_config(cfg, groups, model, mesh):
  """A callable params -> metrics for an MLM run over PCFG/HMM groups, or None when it does not apply.

  Uses the first `cfg.eval.mlm_sentences` validation sentences of each group (0 = off). One group
  logs eval/{mlm_loss, optimal_loss, excess_loss}; several groups log eval/<group>/... too, and
  the overall values over all their rows.
  """
  from data import sources

  n = int(cfg.eval.get("mlm_sentences", 0))
  if cfg.data.objective != "mlm" or n <= 0:
    return None
  specs = group_specs(cfg.data)
  evals = []
  for g in groups:
    spec = specs.get(g.name, {})
    if spec.get("kind") not in ("pcfg", "hmm"):
      continue
    src = sources.select_split(g, "validation")
    sents = [vocab.unframe(src[i]["tokens"]) for i in range(min(n, len(src)))]
    prefix = "eval/" if len(groups) == 1 else f"eval/{g.name}/"
    evals.append(
      MaskedEval(
        model, sources.language(spec), sents, seq_len=cfg.data.seq_len, batch_size=cfg.eval.batch_size, mesh=mesh, prefix=prefix
      )
    )
  if not evals:
    return None

  def run(params) -> dict:
    out = {}
    for e in evals:
      out.update(e(params))
    if len(evals) > 1:
      rows = sum(e.n_rows for e in evals)
      mlm = sum(out[f"{e.prefix}mlm_loss"] * e.n_rows for e in evals) / rows
      opt = sum(e.optimal * e.n_rows for e in evals) / rows
      out.update({"eval/mlm_loss": mlm, "eval/optimal_loss": opt, "eval/excess_loss": mlm - opt})
    return out

  return run
