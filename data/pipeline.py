"""Deterministic, resumable batches: the global batch at step s is a pure function of (seed, step).

Legend: B global batch rows, b this host's rows, L sequence length, K documents tried per row,
m number of groups, N examples in a source.

A *source* is anything random-access: `len(src)` and `src[i] -> {"tokens": int32 [n] (framed
[BOS ... EOS]), optional "true_logprob": float32 [n-1] (exact log p of each target)}` — a
`tfds.data_source`, an in-memory list, a grain MapDataset.

Row g (global row index g = step·B + r) tries documents number g·K .. g·K+K−1 of an epoch-wise
permutation of the source (epoch e = i // N, permutation seeded by (seed, e)), packing them greedily
into L (input, target) pairs; a document that does not fit is skipped (counted in `data/fill`).
Nothing depends on history, so resume needs only the step, and any number of hosts sees the same
global batch: host h materialises only rows [lo, hi).

Groups (data mixing): each step's B rows are split into *exact* per-group counts by largest-remainder
rounding of the proportions p (ties broken by group index), assigned to rows by a (seed, step)
permutation; row j of group g at step s uses that group's own stream position s·B + j. With
group_rows='sampled' each row's group is instead drawn from p (seeded by (seed, step)): the counts vary
from batch to batch but equal B·p on average, so a change of p smaller than 1/B still reaches the data
(Aioli's released trainer samples this way; its LearnParams batches, and any `exact=True` batch, stay exact).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import numpy as np

from data import vocab
from lib import errors, proportions

FIELDS = ("inputs", "targets", "mask", "segment_ids", "positions")
GROUP_ROWS = proportions.GROUP_ROWS  # how a step's rows are split over the groups (module docstring)


DataError = errors.DataError  # re-exported: callers use dp.DataError
largest_remainder = proportions.largest_remainder  # re-exported (lives in lib/ for lib/mixture.py)
check_proportions = proportions.check_proportions


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def doc_index(seed: int, i: np.ndarray, n: int) -> np.ndarray:
  """The i-th document of the infinite epoch-wise shuffled stream over a source of size n."""
  i = np.asarray(i, dtype=np.int64)
  out = np.empty_like(i)
  for e in np.unique(i // n):
    sel = (i // n) == e
    out[sel] = _permutation(seed, int(e), n)[i[sel] % n]
  return out


def pack(
  docs: Sequence[dict], seq_len: int, shift: bool = True, with_true: bool | None = None
) -> tuple[dict[str, np.ndarray], int]:
  """Greedily packs framed documents into one row of `seq_len` positions; returns (row, n_used).

  shift=True: causal LM pairs (inputs = tokens[:-1], targets = tokens[1:]).
  shift=False: the masked-LM layout (inputs = targets = tokens; masking happens later).
  """
  row = {k: np.zeros(seq_len, np.int32) for k in FIELDS}
  if with_true is None:
    with_true = bool(docs) and "true_logprob" in docs[0]
  has_true = shift and with_true  # causal conditionals only
  if has_true:
    row["true_logprob"] = np.zeros(seq_len, np.float32)
  used, pos = 0, 0
  for d in docs:
    tok = np.asarray(d["tokens"], dtype=np.int32)
    n = len(tok) - 1 if shift else len(tok)
    if n > seq_len:  # longer than a row: keep the first seq_len pairs (only if the row is empty)
      if pos:
        continue
      n = seq_len
    if pos + n > seq_len:
      continue
    sl = slice(pos, pos + n)
    if shift:
      row["inputs"][sl], row["targets"][sl] = tok[:n], tok[1 : n + 1]
    else:
      row["inputs"][sl], row["targets"][sl] = tok[:n], tok[:n]
    row["mask"][sl] = 1
    row["segment_ids"][sl] = used + 1
    row["positions"][sl] = np.arange(n)
    if has_true:
      row["true_logprob"][sl] = np.asarray(d["true_logprob"], np.float32)[:n]
    pos += n
    used += 1
  return row, used


def flat_documents(source, ids_RxK: np.ndarray, with_true: bool):
  """(tokens [T] int32, true [T] float32 or None, start_RxK, len_RxK): documents ids_RxK of a source
  as slices tokens[start : start + len] of one flat array (true_logprob aligned with tokens). A
  RaggedSource is sliced in place; any other source is read once per distinct document."""
  if isinstance(source, RaggedSource):
    return source.tokens, source.true, source.off[ids_RxK], source.off[ids_RxK + 1] - source.off[ids_RxK]
  ids, inv = np.unique(ids_RxK, return_inverse=True)
  exs = read_many(source, ids)
  toks = [np.asarray(ex["tokens"], np.int32) for ex in exs]
  lens = np.array([len(t) for t in toks], np.int64)
  off = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
  tokens = np.concatenate(toks) if toks else np.zeros(0, np.int32)
  true = None
  if with_true:
    tl = [
      np.concatenate([np.asarray(ex["true_logprob"], np.float32)[: n - 1], np.zeros(1, np.float32)]) for ex, n in zip(exs, lens)
    ]
    true = np.concatenate(tl).astype(np.float32)
  inv = inv.reshape(ids_RxK.shape)
  return tokens, true, off[inv], lens[inv]


def pack_rows(
  tokens: np.ndarray, true: np.ndarray | None, start_RxK: np.ndarray, len_RxK: np.ndarray, seq_len: int, shift: bool = True
) -> dict[str, np.ndarray]:
  """`pack` for R rows at once: row r packs documents tokens[start_RxK[r, k] : + len_RxK[r, k]], k = 0..K-1.

  Same greedy rule as `pack` (a document that does not fit is skipped; one longer than a row is cut to
  seq_len pairs when the row is still empty); the loop runs over the K document slots, every
  operation is vectorised over rows. Returns FIELDS (+ true_logprob when `true` is given and shift) [R, L].
  """
  L = int(seq_len)
  start_RxK = np.asarray(start_RxK, np.int64)
  # A document longer than a row is cut to L pairs, and then fits exactly when the row is empty.
  n_KxR = np.minimum(np.asarray(len_RxK, np.int64) - (1 if shift else 0), L).T.copy()
  K, R = n_KxR.shape
  pos_R = np.zeros(R, np.int64)
  take_KxR = np.zeros((K, R), bool)
  for k in range(K):  # the only sequential part: does document k fit after those taken before it?
    ok = pos_R + n_KxR[k] <= L
    take_KxR[k] = ok
    pos_R += n_KxR[k] * ok
  n_RxK, take_RxK = n_KxR.T, take_KxR.T
  taken_RxK = n_RxK * take_RxK
  at_RxK = np.cumsum(taken_RxK, 1) - taken_RxK  # start position of each taken document
  seg_RxK = np.cumsum(take_RxK, 1)  # its segment id (1-based)
  r, k = np.nonzero(take_RxK)
  m = n_RxK[r, k]
  within = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)
  dst = np.repeat(r * L + at_RxK[r, k], m) + within
  src = np.repeat(start_RxK[r, k], m) + within
  out = {f: np.zeros(R * L, np.int32) for f in FIELDS}
  out["inputs"][dst] = tokens[src]
  out["targets"][dst] = tokens[src + 1] if shift else tokens[src]
  out["mask"][dst] = 1
  out["segment_ids"][dst] = np.repeat(seg_RxK[r, k], m)
  out["positions"][dst] = within
  if shift and true is not None:
    out["true_logprob"] = np.zeros(R * L, np.float32)
    out["true_logprob"][dst] = true[src]
  return {f: v.reshape(R, L) for f, v in out.items()}


def mlm_mask(row: dict[str, np.ndarray], rng: np.random.Generator, vocab_size: int, prob: float = 0.15) -> dict:
  """BERT-style masking: of the chosen positions, 80% -> MASK, 10% random token, 10% unchanged."""
  tok = row["targets"]
  eligible = (row["mask"] > 0) & (tok >= vocab.N_SPECIAL)
  chosen = eligible & (rng.random(tok.shape) < prob)
  u = rng.random(tok.shape)
  inputs = tok.copy()
  inputs[chosen & (u < 0.8)] = vocab.MASK
  rand = chosen & (u >= 0.8) & (u < 0.9)
  inputs[rand] = rng.integers(vocab.N_SPECIAL, vocab_size, size=int(rand.sum()))
  out = dict(row, inputs=inputs, mask=chosen.astype(np.int32))
  if "true_logprob" in out:  # causal conditionals do not apply to masked tokens
    del out["true_logprob"]
  return out


def auto_docs_per_row(source, seq_len: int, shift: bool = True, sample: int = 512) -> int:
  n = len(source)
  idx = np.linspace(0, n - 1, min(n, sample)).astype(np.int64)
  mean = float(np.mean([len(source[int(i)]["tokens"]) - (1 if shift else 0) for i in idx]))
  return max(1, int(math.ceil(seq_len / max(mean, 1.0) * 1.25)) + 1)


def has_true_logprob(source) -> bool:
  """Whether a source carries exact per-target log-probs (synthetic languages' evaluation splits)."""
  return len(source) > 0 and "true_logprob" in source[0]


def read_many(source, ids: np.ndarray) -> list[dict]:
  """Batched random access when the source supports it (TFDS/grain `__getitems__`)."""
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__([int(i) for i in ids]))
  return [source[int(i)] for i in ids]


class RaggedSource:
  """A source decoded once into flat arrays (tokens + offsets): O(1) numpy slicing per document.

  TFDS decoding costs ~40 µs per example; a training split of a synthetic language (~10^6 tokens)
  is cached in a few seconds and then packs ~10x faster.
  """

  def __init__(self, source, chunk: int = 4096):
    n = len(source)
    toks, tls, lens = [], [], np.zeros(n, np.int64)
    self.with_true = has_true_logprob(source)
    for lo in range(0, n, chunk):
      for k, ex in enumerate(read_many(source, np.arange(lo, min(lo + chunk, n)))):
        t = np.asarray(ex["tokens"], np.int32)
        toks.append(t)
        lens[lo + k] = len(t)
        if self.with_true:
          tls.append(np.concatenate([np.asarray(ex["true_logprob"], np.float32), [0.0]]).astype(np.float32))
    self.off = np.concatenate([[0], np.cumsum(lens)])
    self.tokens = np.concatenate(toks) if toks else np.zeros(0, np.int32)
    self.true = np.concatenate(tls) if tls else None

  def __len__(self) -> int:
    return len(self.off) - 1

  def __getitem__(self, i: int) -> dict:
    a, b = self.off[i], self.off[i + 1]
    ex = {"tokens": self.tokens[a:b]}
    if self.true is not None:
      ex["true_logprob"] = self.true[a : b - 1]
    return ex

  def __getitems__(self, ids) -> list[dict]:
    return [self[int(i)] for i in ids]


def maybe_cache(source, max_tokens: int, sample: int = 256):
  """RaggedSource(source) when its estimated token count is below `max_tokens`, else `source`."""
  n = len(source)
  if max_tokens <= 0 or n == 0 or isinstance(source, RaggedSource):
    return source
  idx = np.linspace(0, n - 1, min(n, sample)).astype(np.int64)
  est = n * float(np.mean([len(ex["tokens"]) for ex in read_many(source, idx)]))
  return RaggedSource(source) if est <= max_tokens else source


class Pipeline:
  """Batches for training: `batch(step, p)` -> this host's rows of the global batch at `step`."""

  def __init__(
    self,
    sources: Sequence[Any],
    *,
    seed: int,
    global_batch: int,
    seq_len: int,
    rows: tuple[int, int] | None = None,
    docs_per_row: int = 0,
    objective: str = "clm",
    vocab_size: int = 0,
    group_names: Sequence[str] | None = None,
    cache_tokens: int = 50_000_000,
    group_rows: str = "exact",
  ):
    if not sources:
      raise DataError("no data sources")
    for i, s in enumerate(sources):
      if len(s) == 0:
        raise DataError(f"data source {group_names[i] if group_names else i} is empty")
    if group_rows not in GROUP_ROWS:
      raise DataError(f"group rows {group_rows!r} is not one of {GROUP_ROWS}")
    self.group_rows = group_rows
    self.sources = [maybe_cache(s, cache_tokens) for s in sources]
    self.group_names = list(group_names or [f"group_{i}" for i in range(len(sources))])
    self.seed, self.B, self.L = int(seed), int(global_batch), int(seq_len)
    self.lo, self.hi = rows or (0, self.B)
    self.shift = objective == "clm"
    self.objective = objective
    self.vocab_size = vocab_size
    self.K = [docs_per_row or auto_docs_per_row(s, self.L, self.shift) for s in self.sources]
    self.with_true = [has_true_logprob(s) for s in self.sources]

  @property
  def num_groups(self) -> int:
    return len(self.sources)

  def group_of_rows(self, step: int, p: Sequence[float] | None, exact: bool = False) -> np.ndarray:
    """[B] group id of every global row at `step`: exact largest-remainder counts, or (group_rows='sampled'
    and not `exact`) each row's group drawn from p."""
    m = self.num_groups
    if m == 1:
      return np.zeros(self.B, np.int32)
    p = np.asarray(p if p is not None else np.full(m, 1.0 / m), np.float64)
    if self.group_rows == "sampled" and not exact:
      return np.random.default_rng([self.seed, int(step), 0x6A1]).choice(m, size=self.B, p=p / p.sum()).astype(np.int32)
    counts = largest_remainder(p, self.B)
    groups = np.repeat(np.arange(m, dtype=np.int32), counts)
    return np.random.default_rng([self.seed, int(step), 0x6A0]).permutation(groups)

  def _doc_ids(self, step: int, group: int, j: int) -> np.ndarray:
    src, K = self.sources[group], self.K[group]
    pos = int(step) * self.B + j  # this group's stream position (unique per step and row)
    return doc_index(self.seed + 1000003 * group, np.arange(pos * K, pos * K + K), len(src))

  def batch(self, step: int, p: Sequence[float] | None = None, exact: bool = False) -> dict[str, np.ndarray]:
    """This host's rows [lo, hi) of the global batch at `step` (vectorised over rows: `pack_rows`)."""
    groups_B = self.group_of_rows(step, p, exact)
    rank_B = np.zeros(self.B, np.int64)  # rank of each row within its group
    for g in range(self.num_groups):
      sel = groups_B == g
      rank_B[sel] = np.arange(int(sel.sum()))
    rows_R = np.arange(self.lo, self.hi)
    groups_R = groups_B[rows_R]
    present = [int(g) for g in np.unique(groups_R)]
    with_true = self.shift and all(self.with_true[g] for g in present)
    out = {k: np.zeros((len(rows_R), self.L), np.int32) for k in FIELDS}
    if with_true:
      out["true_logprob"] = np.zeros((len(rows_R), self.L), np.float32)
    for g in present:
      local = np.nonzero(groups_R == g)[0]
      K = self.K[g]
      pos_R = int(step) * self.B + rank_B[rows_R[local]]  # this group's stream positions
      ids_RxK = doc_index(self.seed + 1000003 * g, (pos_R[:, None] * K + np.arange(K)).ravel(), len(self.sources[g]))
      tokens, true, start_RxK, len_RxK = flat_documents(self.sources[g], ids_RxK.reshape(len(local), K), with_true)
      for k, v in pack_rows(tokens, true if with_true else None, start_RxK, len_RxK, self.L, self.shift).items():
        out[k][local] = v
    if self.objective == "mlm":
      for i, r in enumerate(rows_R):
        row = mlm_mask(
          {k: v[i] for k, v in out.items()}, np.random.default_rng([self.seed, int(step), int(r), 0x3A5]), self.vocab_size
        )
        out["inputs"][i], out["mask"][i] = row["inputs"], row["mask"]
    out = {k: out[k] for k in sorted(out)}
    if self.num_groups > 1:
      out["group"] = groups_R.astype(np.int32)
    return out

  def batch_reference(self, step: int, p: Sequence[float] | None = None, exact: bool = False) -> dict[str, np.ndarray]:
    """`batch` computed row by row with `pack` (the exact reference for tests and bench/pipeline.py)."""
    groups_B = self.group_of_rows(step, p, exact)
    plan = []  # (row, group, document ids)
    for r in range(self.lo, self.hi):
      g = int(groups_B[r])
      j = int(np.sum(groups_B[:r] == g))  # rank of this row within its group
      plan.append((r, g, self._doc_ids(step, g, j)))
    docs = {}
    for g in {g for _, g, _ in plan}:  # one batched read per group (much faster than one per doc)
      ids = np.unique(np.concatenate([d for _, gg, d in plan if gg == g]))
      docs.update({(g, int(i)): ex for i, ex in zip(ids, read_many(self.sources[g], ids))})
    rows = []
    for r, g, ids in plan:
      row, _ = pack([docs[(g, int(i))] for i in ids], self.L, self.shift, self.with_true[g])
      if self.objective == "mlm":
        row = mlm_mask(row, np.random.default_rng([self.seed, int(step), r, 0x3A5]), self.vocab_size)
      rows.append(row)
    keys = set.intersection(*(set(r) for r in rows))
    out = {k: np.stack([r[k] for r in rows]) for k in sorted(keys)}
    if self.num_groups > 1:
      out["group"] = groups_B[self.lo : self.hi].astype(np.int32)
    return out

  def iterator(
    self,
    start_step: int,
    end_step: int,
    p_fn: Callable[[int], Any] | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
    exact_fn: Callable[[int], bool] | None = None,
  ):
    """A grain iterator over steps [start_step, end_step) with background prefetch; `p_fn(step)` the
    proportions, `exact_fn(step)` whether that step's rows are exact counts under group_rows='sampled'."""
    import grain

    exact_fn = exact_fn or (lambda s: False)
    fn = (lambda s: self.batch(s)) if p_fn is None else (lambda s: self.batch(s, p_fn(s), exact_fn(s)))
    ds = grain.MapDataset.range(start_step, end_step).map(fn)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


def eval_batches(
  source,
  *,
  batch_size: int,
  seq_len: int,
  num_batches: int,
  rows: tuple[int, int] | None = None,
  objective: str = "clm",
  vocab_size: int = 0,
  seed: int = 0,
  max_docs_per_row: int | None = None,
) -> list[dict[str, np.ndarray]]:
  """Fixed held-out batches: the source's documents in order, packed greedily (no document is
  skipped or repeated; `max_docs_per_row=1` pads one document per row). Independent of the training
  seed so runs are compared on the same tokens."""
  shift = objective == "clm"
  with_true = has_true_logprob(source)
  lo, hi = rows or (0, batch_size)
  out, i, n = [], 0, len(source)
  for b in range(num_batches):
    rows_b = []
    for r in range(batch_size):
      docs = []
      used_len = 0
      while i < n and (max_docs_per_row is None or len(docs) < max_docs_per_row):
        d = source[i]
        ln = len(d["tokens"]) - (1 if shift else 0)
        if used_len + min(ln, seq_len) > seq_len:
          break
        docs.append(d)
        used_len += min(ln, seq_len)
        i += 1
      row, _ = pack(docs, seq_len, shift, with_true)
      if objective == "mlm":
        row = mlm_mask(row, np.random.default_rng([seed, b, r, 0xE7A]), vocab_size)
      rows_b.append(row)
    if i >= n and not any(r["mask"].any() for r in rows_b):
      break
    rows_b = rows_b[lo:hi]
    keys = set.intersection(*(set(r) for r in rows_b))
    out.append({k: np.stack([r[k] for r in rows_b]) for k in sorted(keys)})
  if not out:
    raise DataError("the evaluation split is empty")
  return out


def held_out_batches(groups, split: str, cfg, mesh) -> list:
  """Global eval batches of every group's `split` (rows tagged with the group id when mixing)."""
  from data.sources import select_split
  from lib import sharding

  elo, ehi = sharding.local_rows(mesh, cfg.eval.batch_size)
  out = []
  for gi, g in enumerate(groups):
    for b in eval_batches(
      select_split(g, split),
      batch_size=cfg.eval.batch_size,
      seq_len=cfg.data.seq_len,
      num_batches=cfg.eval.batches,
      rows=(elo, ehi),
      objective=cfg.data.objective,
      vocab_size=groups[0].vocab_size,
      max_docs_per_row=None if cfg.data.packing else 1,
    ):
      if len(groups) > 1:
        b["group"] = np.full(b["inputs"].shape[0], gi, np.int32)
      out.append(sharding.global_batch_from_local(mesh, b, cfg.eval.batch_size))
  return out
