"""n-gram predictors for learning-curve regressions (Chang et al. 2023, Sec. 2.3).

Counts every n-gram (n = 1..max_n) of a training corpus with numpy only: each j-gram
gets an exact int64 code ``id(prefix (j-1)-gram) * (V+1) + last token`` and a dense id
from ``np.unique``, so keys never collide however large the vocabulary (a 5-gram of a
50k vocabulary does not fit in one int64 directly). Python loops run over n-gram
orders and pruning blocks, never over tokens.

Reference behaviour mirrored (Chang's ``CurveAnnotator.get_ngram_surprisals``):
  * contexts are padded with id = vocab_size before each sequence;
  * n = 1, 2 unpruned; for n >= 3 counts < 2 are pruned (Chang prunes every 1M
    sequences and once at the end: ``prune_every``; default None prunes once, exactly);
  * p = count / total of the (pruned) counts of that context; surprisal = -log2 p;
  * backoff: where p = 0 use the (n-1)-gram surprisal of the same token, down to
    unigrams; unseen unigrams get the maximum unigram surprisal.
Differences, documented: the reference fills unseen unigrams with the max unigram
surprisal over the evaluation text (``np.nanmax`` over its probe file); here it is the
model's max, -log2(min count / total), which does not depend on the probe set. The
reference tests p == 0 with ``np.isclose`` (atol 1e-8), so probabilities < 1e-8 also
back off; set ``zero_atol=1e-8`` to reproduce that.

Shape legend: M corpus positions (flat, with padding), T probe tokens, Q probe-sequence
positions, U distinct keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

PAD_INPUT = -1  # padding value in 2-D sequence arrays (not the context pad id)


def _as_sequences(sequences: Sequence[np.ndarray] | np.ndarray, pad: int) -> list[np.ndarray]:
  """List of 1-D int64 arrays; a 2-D array is split at its ``pad`` entries (right pad)."""
  if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
    keep = sequences != pad
    return [row[m].astype(np.int64) for row, m in zip(sequences, keep)]
  return [np.asarray(s, dtype=np.int64).ravel() for s in sequences]


@dataclasses.dataclass
class _Flat:
  """Sequences laid out flat, each preceded by ``n_pad`` pad ids.

  ``region`` is the index in ``tokens`` where each position's sequence region (its
  pads included) starts, so windows never cross sequence boundaries.
  """

  tokens_M: np.ndarray
  region_M: np.ndarray
  is_tok_M: np.ndarray
  seq_start: np.ndarray  # flat index of each sequence's first real token
  lengths: np.ndarray


def _flatten(seqs: list[np.ndarray], n_pad: int, pad_id: int) -> _Flat:
  lengths = np.array([s.size for s in seqs], dtype=np.int64)
  sizes = lengths + n_pad
  region_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  total = int(sizes.sum())
  tokens = np.full(total, pad_id, dtype=np.int64)
  seq_start = region_start + n_pad
  is_tok = np.zeros(total, dtype=bool)
  if lengths.sum():
    pos = np.repeat(seq_start - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    pos += np.arange(int(lengths.sum()))
    tokens[pos] = np.concatenate(seqs)
    is_tok[pos] = True
  region = np.repeat(region_start, sizes)
  return _Flat(tokens, region, is_tok, seq_start, lengths)


@dataclasses.dataclass
class NgramModel:
  """Counts for n = 1..max_n. ``dict_codes[j-1]``: sorted codes of every j-gram seen in
  the padded corpus (j = 1..max_n-1, unpruned: they only name contexts);
  ``keys[n-1]``/``counts[n-1]``: sorted (context id * (V+1) + target) keys and counts
  of the n-gram table after pruning; ``ctx_total[n-1]``: per-context total count.
  """

  vocab_size: int
  max_n: int
  dict_codes: list[np.ndarray]
  keys: list[np.ndarray]
  counts: list[np.ndarray]
  ctx_total: list[np.ndarray]
  prune_min: int
  prune_from: int

  @property
  def base(self) -> int:
    return self.vocab_size + 1

  @property
  def max_unigram_surprisal(self) -> float:
    """-log2 of the smallest nonzero unigram probability (fill for unseen unigrams)."""
    return float(-np.log2(self.counts[0].min() / self.ctx_total[0][0]))


def _codes(flat: _Flat, dicts: list[np.ndarray], base: int, upto: int) -> list[np.ndarray]:
  """Dense ids of the j-grams ending at every position (j = 1..upto), -1 if unknown
  to ``dicts`` or if the window would leave the sequence region."""
  pos_M = np.arange(flat.tokens_M.size)
  ids: list[np.ndarray] = []
  prev = None
  for j in range(1, upto + 1):
    if j == 1:
      code = flat.tokens_M.copy()
      valid = np.ones(code.size, dtype=bool)
    else:
      prefix = np.full(code.size, -1, dtype=np.int64)
      prefix[1:] = prev[:-1]
      valid = (pos_M - (j - 1) >= flat.region_M) & (prefix >= 0)
      code = prefix * base + flat.tokens_M
    d = dicts[j - 1]
    loc = np.searchsorted(d, code)
    loc_c = np.minimum(loc, max(d.size - 1, 0))
    found = valid & (d.size > 0) & (d[loc_c] == code) if d.size else np.zeros_like(valid)
    prev = np.where(found, loc_c, -1)
    ids.append(prev)
  return ids


def _merge(keys_a: np.ndarray, counts_a: np.ndarray, keys_b: np.ndarray, counts_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  keys, inv = np.unique(np.concatenate([keys_a, keys_b]), return_inverse=True)
  counts = np.bincount(inv, weights=np.concatenate([counts_a, counts_b]), minlength=keys.size)
  return keys, counts.astype(np.int64)


def build_ngram_model(
  sequences: Sequence[np.ndarray] | np.ndarray,
  vocab_size: int,
  max_n: int = 5,
  prune_min: int = 2,
  prune_from: int = 3,
  prune_every: int | None = None,
  pad_value: int = PAD_INPUT,
) -> NgramModel:
  """Count n-grams n = 1..max_n of training ``sequences`` (list of int arrays, or a
  2-D array right-padded with ``pad_value``); token ids must be in [0, vocab_size).

  Orders >= ``prune_from`` drop counts < ``prune_min``. With ``prune_every`` the
  counts are pruned after every block of that many sequences and once at the end,
  like the reference (an n-gram seen once per block then never survives).
  """
  seqs = [s for s in _as_sequences(sequences, pad_value) if s.size]
  if not seqs:
    raise ValueError("no non-empty training sequences")
  all_tok = np.concatenate(seqs)
  if all_tok.min() < 0 or all_tok.max() >= vocab_size:
    raise ValueError(f"token ids must be in [0, {vocab_size})")
  base = vocab_size + 1
  flat = _flatten(seqs, max_n - 1, vocab_size)
  # Dictionaries of context j-grams, j = 1..max_n-1 (all windows inside a region).
  dicts: list[np.ndarray] = []
  ids: list[np.ndarray] = []  # dense id of the j-gram ending at each position, or -1
  pos_M = np.arange(flat.tokens_M.size)
  prev_ids = None
  for j in range(1, max_n):
    if j == 1:
      code = flat.tokens_M
      valid = np.ones(code.size, dtype=bool)
    else:
      prefix = np.full(code.size, -1, dtype=np.int64)
      prefix[1:] = prev_ids[:-1]
      valid = (pos_M - (j - 1) >= flat.region_M) & (prefix >= 0)
      code = prefix * base + flat.tokens_M
    d = np.unique(code[valid])
    if d.size and d[-1] > np.iinfo(np.int64).max // base:
      raise OverflowError("n-gram codes overflow int64; reduce max_n or corpus size")
    dicts.append(d)
    prev_ids = np.where(valid, np.searchsorted(d, code), -1)
    ids.append(prev_ids)

  # Blocks of ``prune_every`` sequences (contiguous in the flat layout) for pruning.
  tok_pos = np.flatnonzero(flat.is_tok_M)
  step = int(prune_every) if prune_every else len(seqs)
  cuts = np.searchsorted(tok_pos, flat.seq_start[np.arange(0, len(seqs), step)])
  blocks = [slice(a, b) for a, b in zip(cuts, np.r_[cuts[1:], tok_pos.size])]
  keys_out, counts_out, totals_out = [], [], []
  for n in range(1, max_n + 1):
    if n == 1:
      ctx = np.zeros(tok_pos.size, dtype=np.int64)
      n_ctx = 1
    else:
      ctx = ids[n - 2][tok_pos - 1]
      n_ctx = dicts[n - 2].size
    key_all = ctx * base + flat.tokens_M[tok_pos]
    prune = n >= prune_from and prune_min > 1
    keys = np.empty(0, np.int64)
    counts = np.empty(0, np.int64)
    for blk in blocks:
      k_b, c_b = np.unique(key_all[blk], return_counts=True)
      keys, counts = _merge(keys, counts, k_b, c_b) if keys.size else (k_b, c_b.astype(np.int64))
      if prune and len(blocks) > 1:
        keep = counts >= prune_min
        keys, counts = keys[keep], counts[keep]
    if prune:
      keep = counts >= prune_min
      keys, counts = keys[keep], counts[keep]
    totals = np.bincount(keys // base, weights=counts, minlength=n_ctx).astype(np.int64)
    keys_out.append(keys)
    counts_out.append(counts)
    totals_out.append(totals)
  return NgramModel(vocab_size, max_n, dicts, keys_out, counts_out, totals_out, prune_min, prune_from)


def _lookup(model: NgramModel, n: int, ctx: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Conditional probability p(target | ctx) of order n; 0 if unseen/pruned."""
  keys, counts, totals = model.keys[n - 1], model.counts[n - 1], model.ctx_total[n - 1]
  key = np.where(ctx >= 0, ctx, 0) * model.base + target
  loc = np.minimum(np.searchsorted(keys, key), max(keys.size - 1, 0))
  hit = (ctx >= 0) & (keys.size > 0) & (keys[loc] == key) if keys.size else np.zeros(key.shape, bool)
  cnt = np.where(hit, counts[loc] if keys.size else 0, 0)
  tot = np.where(ctx >= 0, totals[np.clip(ctx, 0, totals.size - 1)], 0)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(tot > 0, cnt / np.maximum(tot, 1), 0.0)


def sequence_surprisals(
  model: NgramModel,
  sequences: Sequence[np.ndarray] | np.ndarray,
  n: int,
  backoff: bool = True,
  zero_atol: float = 0.0,
  pad_value: int = PAD_INPUT,
) -> list[np.ndarray]:
  """n-gram surprisal (bits) of every token of every sequence, with backoff.

  Without backoff, p <= zero_atol gives NaN (the reference's raw per-order arrays).
  """
  if not 1 <= n <= model.max_n:
    raise ValueError(f"n must be in [1, {model.max_n}]")
  seqs = _as_sequences(sequences, pad_value)
  flat = _flatten(seqs, model.max_n - 1, model.vocab_size)
  ids = _codes(flat, model.dict_codes, model.base, n - 1) if n > 1 else []
  tok_pos = np.flatnonzero(flat.is_tok_M)
  target = flat.tokens_M[tok_pos]
  out_Q = np.full(tok_pos.size, np.nan)
  orders = range(n, 0, -1) if backoff else [n]
  for order in orders:
    todo = np.isnan(out_Q)
    if not todo.any():
      break
    ctx = np.zeros(int(todo.sum()), np.int64) if order == 1 else ids[order - 2][tok_pos[todo] - 1]
    p = _lookup(model, order, ctx, target[todo])
    with np.errstate(divide="ignore"):
      out_Q[todo] = np.where(p > zero_atol, -np.log2(np.maximum(p, 1e-300)), np.nan)
  if backoff:
    out_Q = np.where(np.isnan(out_Q), model.max_unigram_surprisal, out_Q)
  return np.split(out_Q, np.cumsum(flat.lengths)[:-1])


def _probe_index(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  positions = np.asarray(positions, dtype=np.int64)
  if positions.ndim != 2 or positions.shape[1] != 2:
    raise ValueError("positions must be a [T, 2] array of (sequence index, position)")
  return positions[:, 0], positions[:, 1]


def ngram_surprisal(
  model: NgramModel,
  sequences: Sequence[np.ndarray] | np.ndarray,
  positions: np.ndarray,
  n: int,
  backoff: bool = True,
  zero_atol: float = 0.0,
  pad_value: int = PAD_INPUT,
) -> np.ndarray:
  """Surprisal (bits) of the target token at each probe (sequence, position): [T]."""
  seq_T, pos_T = _probe_index(positions)
  per_seq = sequence_surprisals(model, sequences, n, backoff, zero_atol, pad_value)
  flat_Q = np.concatenate(per_seq) if per_seq else np.empty(0)
  offsets = np.concatenate([[0], np.cumsum([s.size for s in per_seq])[:-1]])
  return flat_Q[offsets[seq_T] + pos_T]


def context_length(positions: np.ndarray) -> np.ndarray:
  """Number of context tokens of each probe (its 0-based position): [T]."""
  return _probe_index(positions)[1].copy()


def context_loglen(positions: np.ndarray) -> np.ndarray:
  """Chang's ``context_loglen`` = log2(#context tokens); NaN at position 0."""
  length = context_length(positions).astype(np.float64)
  with np.errstate(divide="ignore"):
    return np.where(length > 0, np.log2(np.maximum(length, 1)), np.nan)


def context_logprob(
  model: NgramModel,
  sequences: Sequence[np.ndarray] | np.ndarray,
  positions: np.ndarray,
  n: int = 1,
  window: int | None = None,
  zero_atol: float = 0.0,
  pad_value: int = PAD_INPUT,
) -> np.ndarray:
  """Chang's ``context_logprob``: minus the mean n-gram surprisal (bits) of the context
  tokens [start, pos) with start = 0 or pos - window. As in the reference, the first
  n-1 tokens of the window use the 1..n-1-gram (counting from the window start),
  the rest the n-gram, all with backoff. NaN for position 0 (no context)."""
  seq_T, pos_T = _probe_index(positions)
  per_order = [np.concatenate(sequence_surprisals(model, sequences, j, True, zero_atol, pad_value)) for j in range(1, n + 1)]
  lengths = np.array([s.size for s in _as_sequences(sequences, pad_value)], dtype=np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  start_T = np.zeros_like(pos_T) if window is None else np.maximum(pos_T - int(window), 0)
  total_T = np.zeros(pos_T.size)
  for i in range(n - 1):  # lower orders for the first tokens of the window
    q = start_T + i
    use = q < pos_T
    total_T[use] += per_order[i][offsets[seq_T[use]] + q[use]]
  cum = np.concatenate([[0.0], np.cumsum(per_order[-1])])
  lo = start_T + n - 1
  use = lo < pos_T
  total_T[use] += cum[offsets[seq_T[use]] + pos_T[use]] - cum[offsets[seq_T[use]] + lo[use]]
  n_ctx = (pos_T - start_T).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n_ctx > 0, -total_T / n_ctx, np.nan)
