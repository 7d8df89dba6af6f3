"""Sampling from checkpoints: jitted KV-cache decoding, Xia's mixture-of-models decoding, and a job that
writes per-checkpoint samples with repetition metrics and exact grammar scores.

  python -m analysis.generate --workdir=W [--steps=all] [--num=32] [--max_new=32] [--method=sample]
      [--temperature=1] [--top_k=0] [--top_p=1] [--prompt_len=0] [--seed=0]
  -> W/analysis/generations.parquet   one row per (step, sample): prompt, tokens, text, length, distinct-n,
                                      repeated n-gram rate and, on synthetic languages, in_language /
                                      true_logprob (exact log p of the sentence under the grammar)
     W/analysis/generations_summary.parquet   one row per step: means, fraction in language, exact
                                      log-prob per token, total variation between sampled and true lengths

Decoding (`generate`): prompts are LEFT-padded to a common length P; pad slots are masked out of attention
and positions count from each prompt's first real token, so a batch of ragged prompts decodes exactly as
each prompt alone. A prefill pass writes the K/V cache of the P prompt slots, then one jitted
`lax.fori_loop` step per new token (cache [layers, B, P+N, H, K]). `cache=False` recomputes the full
forward of `lib.model` every step (the reference the cached path is tested against). Methods: greedy
(temperature 0) or sampling with temperature, top-k and top-p (nucleus; the smallest set whose mass
reaches p, the top token always kept).

Mixture of models (Xia et al. 2022, released code utils.OPTSubtract): for models with
weights λ_i (e.g. λ_l = 1, λ_s = -1), p = Σ λ_i softmax(logits_i); negative entries are clipped to 0,
1e-7 is added and the log is taken; the sampler's softmax renormalises (no explicit renormalisation).

Works on any mesh: parameters keep their shardings (restore them onto a mesh) and the jitted functions
follow them; the batch is replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from analysis.jobs import Workdir, option
from lib import errors
from lib import io as lib_io
from lib import model as M

log = logging.getLogger("lmtrace")
Array = jax.Array
MIX_EPS = 1e-7


# ----------------------------------------------------------------------------------------------
# Functional forward with a KV cache (the same maths as lib.model.Transformer, tested equal)


def _norm(cfg: M.ModelConfig, p, x):
  x = x.astype(jnp.float32)
  if cfg.norm == "rmsnorm":
    p = p["RMSNorm_0"]
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * p["scale"]
  p = p["LayerNorm_0"]
  mu = x.mean(-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
  y = (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"]
  return y + p["bias"] if "bias" in p else y


def _proj(p, x, spec: str):
  y = jnp.einsum(spec, x, p["kernel"])
  return y + p["bias"] if "bias" in p else y


def _mlp(cfg, p, x):
  h = _proj(p["wi"], x, "...d,df->...f")
  if cfg.mlp == "swiglu":
    h = jax.nn.silu(_proj(p["wi_gate"], x, "...d,df->...f")) * h
  elif cfg.mlp == "relu":
    h = jax.nn.relu(h)
  elif cfg.mlp == "gelu_exact":
    h = jax.nn.gelu(h, approximate=False)
  else:
    h = jax.nn.gelu(h)
  return _proj(p["wo"], h, "...f,fd->...d")


def _attn(cfg, p, x_BxTxD, pos_BxT, ck_BxSxHxK, cv_BxSxHxK, start, valid_BxS):
  """Attention of T new tokens at cache slots start..start+T-1 over slots [0, start+T)."""
  q = _proj(p["query"], x_BxTxD, "btd,dhk->bthk")
  k = _proj(p["key"], x_BxTxD, "btd,dhk->bthk")
  v = _proj(p["value"], x_BxTxD, "btd,dhk->bthk")
  if cfg.pos == "rope":
    q = M.partial_rope(q, pos_BxT, cfg.rope_base, cfg.rotary_dim)
    k = M.partial_rope(k, pos_BxT, cfg.rope_base, cfg.rotary_dim)
  ck = jax.lax.dynamic_update_slice(ck_BxSxHxK, k.astype(ck_BxSxHxK.dtype), (0, start, 0, 0))
  cv = jax.lax.dynamic_update_slice(cv_BxSxHxK, v.astype(cv_BxSxHxK.dtype), (0, start, 0, 0))
  T, S = x_BxTxD.shape[1], ck.shape[1]
  slot_T = start + jnp.arange(T)
  allowed_BxTxS = (jnp.arange(S)[None, None, :] <= slot_T[None, :, None]) & valid_BxS[:, None, :]
  s_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q, ck) / math.sqrt(q.shape[-1])
  s_BxHxTxS = jnp.where(allowed_BxTxS[:, None], s_BxHxTxS, -1e30)
  o = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s_BxHxTxS, -1), cv)
  return _proj(p["out"], o, "bthk,hkd->btd"), ck, cv


def forward_cached(cfg: M.ModelConfig, params, tokens_BxT, pos_BxT, cache, start, valid_BxS):
  """logits_BxTxV of T new tokens written at cache slot `start`; returns (logits, new cache)."""
  x = jnp.take(params["embed"], tokens_BxT, axis=0).astype(jnp.float32)
  if cfg.embed_proj_dim:
    x = x @ params["proj_in"]["kernel"]
  if cfg.pos == "learned":
    x = x + jnp.take(params["pos_embed"], pos_BxT + 2, axis=0)
  ks, vs = [], []
  for i in range(cfg.n_layers):
    p = params[f"layer_{i}"]
    ck, cv = cache["k"][i], cache["v"][i]
    if cfg.parallel_residual:
      a, ck, cv = _attn(cfg, p["attn"], _norm(cfg, p["ln_attn"], x), pos_BxT, ck, cv, start, valid_BxS)
      x = x + a + _mlp(cfg, p["mlp"], _norm(cfg, p["ln_mlp"], x))
    elif cfg.post_ln:
      a, ck, cv = _attn(cfg, p["attn"], x, pos_BxT, ck, cv, start, valid_BxS)
      x = _norm(cfg, p["ln_attn"], x + a)
      x = _norm(cfg, p["ln_mlp"], x + _mlp(cfg, p["mlp"], x))
    else:
      a, ck, cv = _attn(cfg, p["attn"], _norm(cfg, p["ln_attn"], x), pos_BxT, ck, cv, start, valid_BxS)
      x = x + a
      x = x + _mlp(cfg, p["mlp"], _norm(cfg, p["ln_mlp"], x))
    ks.append(ck)
    vs.append(cv)
  if not cfg.post_ln:
    x = _norm(cfg, params["final_norm"], x)
  if cfg.embed_proj_dim:
    x = x @ params["proj_out"]["kernel"]
  head = params["embed"].T if cfg.tied_embeddings else params["head"]
  logits = jnp.einsum("bte,ev->btv", x, head, preferred_element_type=jnp.float32)
  return logits, ({"k": jnp.stack(ks), "v": jnp.stack(vs)} if ks else cache)


def empty_cache(cfg: M.ModelConfig, batch: int, slots: int):
  h, k = cfg.n_heads, cfg.d_model // cfg.n_heads
  z = jnp.zeros((cfg.n_layers, batch, slots, h, k), jnp.float32)
  return {"k": z, "v": z}


# ----------------------------------------------------------------------------------------------
# Sampling


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off


def mix_logits(logits_list: Sequence[Array], weights: Sequence[float]) -> Array:
  """Xia's mixture: log(clip(Σ λ_i softmax(logits_i), 0) + 1e-7) (renormalised later by softmax)."""
  p = sum(w * jax.nn.softmax(lg.astype(jnp.float32), -1) for lg, w in zip(logits_list, weights))
  return jnp.log(jnp.maximum(p, 0.0) + MIX_EPS)


def filter_logits(logits_BxV: Array, s: Sampling) -> Array:
  """Temperature, then top-k, then top-p (nucleus) masking; masked entries are -inf."""
  lg = logits_BxV.astype(jnp.float32) / max(s.temperature, 1e-6)
  V = lg.shape[-1]
  if s.top_k and s.top_k < V:
    kth = jax.lax.top_k(lg, s.top_k)[0][..., -1:]
    lg = jnp.where(lg < kth, -jnp.inf, lg)
  if s.top_p < 1.0:
    srt = jnp.sort(lg, -1)[..., ::-1]
    probs = jax.nn.softmax(srt, -1)
    before = jnp.cumsum(probs, -1) - probs  # mass strictly above each sorted entry
    keep = before < s.top_p  # the top token always kept
    thresh = jnp.min(jnp.where(keep, srt, jnp.inf), -1, keepdims=True)
    lg = jnp.where(lg < thresh, -jnp.inf, lg)
  return lg


def choose(logits_BxV: Array, key, s: Sampling) -> Array:
  if s.temperature == 0:
    return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits_BxV, s), -1).astype(jnp.int32)


@dataclasses.dataclass
class Generated:
  tokens: np.ndarray  # [B, N] new tokens (pad after EOS)
  lengths: np.ndarray  # [B] new tokens up to and including EOS (N if none)
  prompts: list  # the prompts as given


def _left_pad(prompts: Sequence[np.ndarray], pad_id: int):
  if min(len(p) for p in prompts) == 0:
    raise errors.AnalysisError("every prompt needs at least one token (e.g. BOS)")
  toks, valid, pos, _ = M.left_pad(prompts, pad_id)
  return toks, valid, pos


class _FromWorkdir:
  """Default of generate()'s eos_id/pad_id: the workdir's special ids (see special_ids)."""

  def __repr__(self):
    return "FROM_WORKDIR"


FROM_WORKDIR = _FromWorkdir()


def special_ids(workdir_or_cfg) -> dict:
  """{"bos", "eos", "pad"} ids of a run (a workdir or its config dict): an imported model's own (its
  tokenizer's, recorded at import), a text run's Hugging Face tokenizer's, else lmtrace's reserved ids
  (data/vocab.py: PAD 0, BOS 1, EOS 2)."""
  from data import vocab

  cfg = workdir_or_cfg
  if isinstance(cfg, (str, os.PathLike)):
    from lib import ckpt

    cfg = ckpt.read_config(os.fspath(cfg))
  imp = cfg.get("import") or {}
  if imp.get("special_ids"):
    return {k: int(v) for k, v in imp["special_ids"].items()}
  src = (cfg.get("data") or {}).get("source") or {}
  if src.get("kind") == "text" and src.get("tokenizer") == "hf" and src.get("tokenizer_model"):
    from lib.tokenizer import HFTokenizer

    return HFTokenizer(src["tokenizer_model"]).special_ids()
  return {"bos": vocab.BOS, "eos": vocab.EOS, "pad": vocab.PAD}


def _special(workdir, eos_id, pad_id) -> tuple[int | None, int]:
  """generate()'s (eos_id, pad_id): the given ones, the rest from `workdir`; without a workdir, no EOS
  stop and pad 0, with a warning (a caller that passes neither gets no silent stopping rule)."""
  if eos_id is FROM_WORKDIR or pad_id is FROM_WORKDIR:
    if workdir is not None:
      sp = special_ids(workdir)
      eos_id = sp["eos"] if eos_id is FROM_WORKDIR else eos_id
      pad_id = sp["pad"] if pad_id is FROM_WORKDIR else pad_id
    else:
      if eos_id is FROM_WORKDIR:
        log.warning("generate(): no eos_id and no workdir: decoding will not stop at an end-of-sequence token "
                    "(pass workdir=W to use the run's special ids, or eos_id=/pad_id=)")  # fmt: skip
      eos_id = None if eos_id is FROM_WORKDIR else eos_id
      pad_id = 0 if pad_id is FROM_WORKDIR else pad_id
  return eos_id, int(pad_id)


def text_batch(workdir: str, texts: Sequence[str], *, bos: bool = True, length: int | None = None) -> dict:
  """A left-padded next-token batch (M.ragged_batch) of `texts` encoded with the workdir's tokenizer
  (an imported model's own, or a text run's Hugging Face or byte tokenizer), each prefixed with BOS:
  per_token_loss on it equals each text scored alone."""
  from lib import ckpt

  cfg = ckpt.read_config(workdir)
  sp = special_ids(cfg)
  enc = _encoder(workdir, cfg)
  seqs = [np.concatenate([[sp["bos"]] if bos else [], enc(t)]).astype(np.int32) for t in texts]
  return M.ragged_batch(seqs, sp["pad"], length)


def _encoder(workdir: str, cfg: dict):
  imp = cfg.get("import") or {}
  src = (cfg.get("data") or {}).get("source") or {}
  path = imp.get("tokenizer") or (src.get("tokenizer_model") if src.get("tokenizer") == "hf" else None)
  if path:
    from lib.tokenizer import HFTokenizer

    return HFTokenizer(path).encode
  if src.get("kind") == "text" and src.get("tokenizer", "bytes") == "bytes":
    from data import text, vocab

    tk = text.Tokenizer("bytes")
    return lambda t: tk.encode(t) + vocab.N_SPECIAL  # lmtrace's shifted byte ids
  raise errors.AnalysisError(
    f"{workdir}: text_batch encodes text with a Hugging Face or byte tokenizer; this run's data is "
    f"{src.get('kind')!r} (tokenizer {src.get('tokenizer')!r}): encode it yourself and use lib.model.ragged_batch"
  )


def generate(
  models: Sequence[tuple[M.ModelConfig, object]],
  prompts: Sequence[np.ndarray],
  max_new: int,
  *,
  sampling: Sampling = Sampling(),
  seed: int = 0,
  eos_id=FROM_WORKDIR,
  pad_id=FROM_WORKDIR,
  workdir: str | None = None,
  weights: Sequence[float] | None = None,
  cache: bool = True,
) -> Generated:
  """Decodes `max_new` tokens after each prompt. `models` is [(cfg, params)]; with several models,
  `weights` are Xia's λs (mixture-of-models decoding). Same seed -> same tokens, cached or not.

  eos_id (stop; None = never) and pad_id (fills after EOS) default to the special ids of `workdir`
  (`special_ids`: an imported model's tokenizer, else lmtrace's PAD 0 / EOS 2); given explicitly, they win."""
  eos_id, pad_id = _special(workdir, eos_id, pad_id)
  models = list(models)
  weights = list(weights) if weights is not None else [1.0] * len(models)
  if len(weights) != len(models):
    raise errors.AnalysisError(f"{len(weights)} mixture weights for {len(models)} models")
  prompts = [np.asarray(p, np.int32) for p in prompts]
  toks, valid, pos = _left_pad(prompts, pad_id)
  B, P = toks.shape
  for cfg, _ in models:
    if P + max_new > cfg.max_len:
      raise errors.AnalysisError(f"prompt ({P} tokens) + max_new ({max_new}) exceeds the model's max_len {cfg.max_len}")
  if len({c.vocab_size for c, _ in models}) != 1:
    raise errors.AnalysisError("mixture models have different vocabularies")
  cfgs = tuple(c for c, _ in models)
  params = [p for _, p in models]
  fn = _decode_cached if cache else _decode_uncached
  out = fn(cfgs, tuple(weights), sampling, int(max_new), -1 if eos_id is None else int(eos_id), int(pad_id))(
    params, jnp.asarray(toks), jnp.asarray(valid), jnp.asarray(pos), jax.random.key(seed)
  )
  new = np.asarray(out)
  if eos_id is None:
    lengths = np.full(B, max_new, np.int32)
  else:
    hit = new == eos_id
    lengths = np.where(hit.any(1), hit.argmax(1) + 1, max_new).astype(np.int32)
  return Generated(new, lengths, prompts)


def _finish(tok_B, done_B, eos_id, pad_id):
  tok_B = jnp.where(done_B, pad_id, tok_B)
  return tok_B, done_B | (tok_B == eos_id)


@functools.lru_cache(maxsize=64)
def _decode_cached(cfgs, weights, sampling, max_new, eos_id, pad_id):
  @jax.jit
  def run(params, toks_BxP, valid_BxP, pos_BxP, key):
    B, P = toks_BxP.shape
    S = P + max_new
    valid_BxS = jnp.concatenate([valid_BxP, jnp.ones((B, max_new), bool)], 1)
    caches, lgs = [], []
    for cfg, prm in zip(cfgs, params):
      lg, c = forward_cached(cfg, prm, toks_BxP, pos_BxP, empty_cache(cfg, B, S), 0, valid_BxS)
      caches.append(c)
      lgs.append(lg[:, -1])
    last_pos = pos_BxP[:, -1]
    out = jnp.full((B, max_new), pad_id, jnp.int32)
    done = jnp.zeros((B,), bool)

    def body(t, carry):
      out, done, caches, lgs, key = carry
      key, sub = jax.random.split(key)
      lg = lgs[0] if len(cfgs) == 1 and weights == (1.0,) else mix_logits(lgs, weights)
      tok, done2 = _finish(choose(lg, sub, sampling), done, eos_id, pad_id)
      out = out.at[:, t].set(tok)
      new_c, new_l = [], []
      for cfg, prm, c in zip(cfgs, params, caches):
        lg1, c = forward_cached(cfg, prm, tok[:, None], (last_pos + 1 + t)[:, None], c, P + t, valid_BxS)
        new_c.append(c)
        new_l.append(lg1[:, 0])
      return out, done2, new_c, new_l, key

    out, *_ = jax.lax.fori_loop(0, max_new, body, (out, done, caches, lgs, key))
    return out

  return run


@functools.lru_cache(maxsize=64)
def _decode_uncached(cfgs, weights, sampling, max_new, eos_id, pad_id):
  """Reference: the full lib.model forward over the whole sequence at every step (no cache)."""
  mods = [M.make(c) for c in cfgs]

  @jax.jit
  def run(params, toks_BxP, valid_BxP, pos_BxP, key):
    B, P = toks_BxP.shape
    seq = jnp.concatenate([toks_BxP, jnp.full((B, max_new), pad_id, jnp.int32)], 1)
    pos = jnp.concatenate([pos_BxP, pos_BxP[:, -1:] + 1 + jnp.arange(max_new)[None]], 1)
    seg = jnp.concatenate([valid_BxP, jnp.ones((B, max_new), bool)], 1).astype(jnp.int32)  # pad slots: segment 0
    out = jnp.full((B, max_new), pad_id, jnp.int32)
    done = jnp.zeros((B,), bool)

    def body(t, carry):
      seq, out, done, key = carry
      key, sub = jax.random.split(key)
      lgs = [m.apply({"params": prm}, seq, pos, seg)[:, P - 1 + t] for m, prm in zip(mods, params)]
      lg = lgs[0] if len(cfgs) == 1 and weights == (1.0,) else mix_logits(lgs, weights)
      tok, done = _finish(choose(lg, sub, sampling), done, eos_id, pad_id)
      seq = jax.lax.dynamic_update_slice(seq, tok[:, None], (0, P + t))
      return seq, out.at[:, t].set(tok), done, key

    _, out, _, _ = jax.lax.fori_loop(0, max_new, body, (seq, out, done, key))
    return out

  return run


# ----------------------------------------------------------------------------------------------
# Metrics


def ngrams(seq: Sequence[int], n: int) -> list[tuple]:
  return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seq: Sequence[int], n: int) -> float:
  """Distinct n-grams / n-grams in one sample (nan when shorter than n)."""
  g = ngrams(list(seq), n)
  return len(set(g)) / len(g) if g else float("nan")


def repeated_ngram_rate(seq: Sequence[int], n: int = 3) -> float:
  """Fraction of n-grams that already occurred earlier in the same sample."""
  g = ngrams(list(seq), n)
  if not g:
    return float("nan")
  seen, rep = set(), 0
  for x in g:
    rep += x in seen
    seen.add(x)
  return rep / len(g)


def grammar_score(lang, new_tokens: np.ndarray, length: int, eos_id: int, n_special: int) -> tuple[bool, float]:
  """(in the language, exact log p of the sentence incl. EOS) of a sample generated after BOS."""
  seq = np.asarray(new_tokens[:length])
  if length == 0 or seq[-1] != eos_id:
    return False, float("-inf")  # never ended
  words = seq[:-1]
  if words.size == 0 or (words < n_special).any():
    return False, float("-inf")
  raw = (words - n_special).astype(np.int32)
  if (raw >= lang.n_terminals).any():
    return False, float("-inf")
  with np.errstate(divide="ignore"):
    lp = float(np.sum(lang.token_logprobs(raw)))
  return bool(np.isfinite(lp)), lp


# ----------------------------------------------------------------------------------------------
# The job


def _prompts(run_cfg: dict, num: int, prompt_len: int, seed: int, max_len: int) -> tuple[list[np.ndarray], dict]:
  """Fixed seeded prompts: [BOS] for synthetic languages (or prompt_len=0), else the first prompt_len
  tokens of seeded validation documents."""
  import ml_collections

  from data import sources

  data = ml_collections.ConfigDict(run_cfg["data"])
  special = special_ids(run_cfg)
  if prompt_len <= 0:
    return [np.asarray([special["bos"]], np.int32)] * num, special
  if prompt_len >= max_len:
    raise errors.AnalysisError(f"--prompt_len={prompt_len} is not below the model's max_len {max_len}")
  g = sources.make_groups(data)[0]
  val = sources.select_split(g, "validation")
  rng = np.random.default_rng(seed)
  idx = rng.permutation(len(val))
  out = []
  for i in idx:
    t = np.asarray(val[int(i)]["tokens"], np.int32)
    if len(t) > prompt_len:
      out.append(t[:prompt_len])
    if len(out) == num:
      break
  if not out:
    raise errors.AnalysisError(f"no validation document is longer than --prompt_len={prompt_len}")
  return out, special


def _language(run_cfg: dict):
  from data import sources

  spec = dict(run_cfg["data"]["source"])
  if run_cfg["data"].get("groups") or spec.get("kind") not in ("bigram", "pcfg", "hmm"):
    return None
  return sources.language(spec)


@dataclasses.dataclass(frozen=True)
class Job:
  """Samples of every requested checkpoint of a workdir; with `mix_with`, decoded in Xia's mixture."""

  steps: str = option("all", "'all' or comma-separated steps")
  num: int = option(32, "samples per checkpoint")
  max_new: int = option(32, "new tokens per sample")
  method: str = option("sample", "sample (temperature, top-k, top-p) or greedy", choices=("sample", "greedy"))
  temperature: float = option(1.0, "sampling temperature")
  top_k: int = option(0, "keep the k most likely tokens (0 = off)")
  top_p: float = option(1.0, "nucleus: the smallest set of tokens whose mass reaches p (1 = off)")
  prompt_len: int = option(0, "0: prompts are [BOS]; else the first tokens of validation docs")
  seed: int = option(0, "seed of the prompts and the samples")
  mix_with: str = option("", "WORKDIR[@STEP]: decode each checkpoint mixed with this model (Xia)")
  weights: tuple[float, ...] = option((1.0, -1.0), "mixture weights lambda_W,lambda_mix (e.g. 1,-1: large minus small)")
  true_samples: int = option(2000, "sentences sampled from a synthetic language for its true length distribution")
  mesh: str = option("", "data,fsdp,tensor sizes (default: one device)")

  @property
  def sampling(self) -> Sampling:
    return Sampling(0.0 if self.method == "greedy" else self.temperature, self.top_k, self.top_p)


def run(workdir: Workdir | str, job: Job):
  """The samples table (one row per (step, sample)) of `job`; it and the per-step summary are written
  under W/analysis/ (`load_generations(W, summary=True)` reads the summary)."""
  from lib import sharding

  mw, _, ms = job.mix_with.partition("@")
  rows, _ = _run(
    Workdir.open(workdir), job.steps, job.num, job.max_new, job.sampling, job.prompt_len, job.seed,
    sharding.mesh_from_flag(job.mesh) if job.mesh else None, job.true_samples, mw or None, ms or None, job.weights,
  )  # fmt: skip
  return rows


def run_job(
  workdir: str,
  steps=None,
  num: int = 32,
  max_new: int = 32,
  sampling: Sampling = Sampling(),
  prompt_len: int = 0,
  seed: int = 0,
  mesh=None,
  true_samples: int = 2000,
  mix_workdir: str | None = None,
  mix_step=None,
  weights: Sequence[float] = (1.0, -1.0),
):
  """(samples, summary) per checkpoint of `workdir` (as `run`, with loose arguments). With `mix_workdir`,
  every checkpoint is decoded in Xia's mixture with that run's checkpoint `mix_step` (latest by default):
  p = weights[0]·p_W + weights[1]·p_mix."""
  wd = Workdir.open(workdir)
  return _run(wd, steps, num, max_new, sampling, prompt_len, seed, mesh, true_samples, mix_workdir, mix_step, weights)


def _run(wd: Workdir, steps, num, max_new, sampling, prompt_len, seed, mesh, true_samples, mix_workdir, mix_step, weights):
  import pandas as pd

  workdir, cfg, run_cfg = wd.path, wd.model_config, wd.config
  wd.require_causal("generation")
  if not wd.steps:
    raise errors.CheckpointError(f"{workdir} has no finished checkpoints")
  steps = wd.select(steps)
  max_new = min(max_new, cfg.max_len - max(prompt_len, 1))
  prompts, special = _prompts(run_cfg, num, prompt_len, seed, cfg.max_len)
  lang = _language(run_cfg)
  tok = None
  tk_path = (run_cfg.get("import") or {}).get("tokenizer")
  if tk_path and os.path.exists(tk_path):
    from lib.tokenizer import HFTokenizer

    tok = HFTokenizer(tk_path)
  from data import vocab

  mix = []
  if mix_workdir:
    other = Workdir.open(mix_workdir)
    other.require_causal("mixture-of-models decoding")
    cfg2 = other.model_config
    if cfg2.vocab_size != cfg.vocab_size:
      raise errors.AnalysisError(f"{mix_workdir} has vocabulary {cfg2.vocab_size}, {workdir} has {cfg.vocab_size}: cannot mix")
    mix = [(cfg2, other.restore(mix_step, mesh))]
    if len(weights) != 2:
      raise errors.AnalysisError(
        f"--weights needs two mixture weights (lambda for W, lambda for --mix_with), got {list(weights)}"
      )
    max_new = min(max_new, cfg2.max_len - max(prompt_len, 1))
  true_len = None
  if lang is not None:
    sents = lang.sample(true_samples, seed + 1)
    sents = list(sents[0]) if isinstance(sents, tuple) else sents
    true_len = np.bincount([len(s) + 1 for s in sents], minlength=max_new + 1)  # + EOS, in new tokens
  rows, summary = [], []
  for st in steps:
    params = wd.restore(st, mesh)
    g = generate(
      [(cfg, params)] + mix,
      prompts,
      max_new,
      sampling=sampling,
      seed=seed,
      eos_id=special["eos"],
      pad_id=special["pad"],
      weights=list(weights) if mix else None,
    )
    step_rows = []
    for i in range(len(prompts)):
      seq = g.tokens[i, : g.lengths[i]].tolist()
      r = {
        "step": st,
        "sample": i,
        "prompt": prompts[i].tolist(),
        "tokens": seq,
        "length": int(g.lengths[i]),
        "ended": bool(special["eos"] in seq),
        "distinct_1": distinct_n(seq, 1),
        "distinct_2": distinct_n(seq, 2),
        "distinct_3": distinct_n(seq, 3),
        "repeated_3gram_rate": repeated_ngram_rate(seq, 3),
        "text": tok.decode(seq) if tok else "",
        "mix_with": f"{os.path.abspath(mix_workdir)}@{mix_step or 'latest'}" if mix else "",
        "mix_weights": list(weights) if mix else [],
      }
      if lang is not None:
        inl, lp = grammar_score(lang, g.tokens[i], int(g.lengths[i]), vocab.EOS, vocab.N_SPECIAL)
        r.update(in_language=inl, true_logprob=lp, true_logprob_per_token=lp / max(int(g.lengths[i]), 1))
      step_rows.append(r)
    rows += step_rows
    df = pd.DataFrame(step_rows)
    s = {
      "step": st,
      "samples": len(df),
      "mean_length": float(df.length.mean()),
      "distinct_1": float(df.distinct_1.mean()),
      "distinct_2": float(df.distinct_2.mean()),
      "distinct_3": float(df.distinct_3.mean()),
      "repeated_3gram_rate": float(df.repeated_3gram_rate.mean()),
    }
    if lang is not None:
      ok = df[df.in_language]
      s["fraction_in_language"] = float(df.in_language.mean())
      s["true_logprob_per_token"] = float(ok.true_logprob.sum() / max(ok.length.sum(), 1)) if len(ok) else float("nan")
      gen_len = np.bincount(df.length[df.ended], minlength=len(true_len))[: len(true_len)]
      pt, pg = true_len / true_len.sum(), gen_len / max(gen_len.sum(), 1)
      s["length_tv"] = float(0.5 * np.abs(pt - pg).sum())
    summary.append(s)
  os.makedirs(wd.analysis_dir, exist_ok=True)
  for name, tbl in (("generations.parquet", rows), ("generations_summary.parquet", summary)):
    write_parquet(pd.DataFrame(tbl), wd.table(name))
  return pd.DataFrame(rows), pd.DataFrame(summary)


write_parquet = lib_io.atomic_parquet  # re-exported


def load_generations(workdir: str, summary: bool = False):
  import pandas as pd

  name = "generations_summary.parquet" if summary else "generations.parquet"
  path = os.path.join(workdir, "analysis", name)
  if not os.path.exists(path):
    raise errors.AnalysisError(f"{path} does not exist: run python -m analysis.generate --workdir={workdir}")
  return pd.read_parquet(path)


def _report(w, df, args) -> None:
  print(load_generations(w, summary=True).to_string(index=False))


def main(argv: Sequence[str] | None = None) -> int:
  from analysis import jobs

  kept = "nothing written (the tables are written at the end)"
  return jobs.main(Job, run, argv, prog="generate", doc=__doc__, workdirs="one", report=_report, kept=kept, prefix="error: ")


if __name__ == "__main__":
  sys.exit(main())
