"""Planted-answer tests for analysis/ngram.py.

The brute-force reference below re-implements Chang's per-token dictionary loop
(context padded with vocab_size, Counter per context, prune counts < 2 for n >= 3).
Shapes: T probe tokens.
"""

from collections import Counter, defaultdict

import numpy as np
import pytest

from analysis import ngram as ng


def brute_tables(seqs, vocab_size, max_n, prune_every=None):
  """Chang's counting loop, one dict per order (pruning blocks of sequences)."""
  tables = []
  for n in range(1, max_n + 1):
    counts = defaultdict(Counter)
    for i, seq in enumerate(seqs):
      curr = [vocab_size] * n
      for tok in seq:
        curr = curr[1:] + [int(tok)]
        counts[tuple(curr[:-1])][curr[-1]] += 1
      if n >= 3 and prune_every and (i + 1) % prune_every == 0:
        counts = prune(counts)
    tables.append(prune(counts) if n >= 3 else counts)
  return tables


def prune(counts):
  out = defaultdict(Counter)
  for ctx, c in counts.items():
    kept = Counter({t: v for t, v in c.items() if v >= 2})
    if kept:
      out[ctx] = kept
  return out


def brute_surprisal(tables, vocab_size, seq, n):
  """Surprisal with backoff; unseen unigrams -> max unigram surprisal of the table."""
  uni = tables[0][()]
  max_uni = -np.log2(min(uni.values()) / sum(uni.values()))
  out = []
  for i, tok in enumerate(seq):
    val = None
    for order in range(n, 0, -1):
      ctx = tuple(([vocab_size] * (order - 1) + [int(t) for t in seq[:i]])[-(order - 1) :]) if order > 1 else ()
      c = tables[order - 1].get(ctx, Counter())
      if c.get(int(tok), 0) > 0:
        val = -np.log2(c[int(tok)] / sum(c.values()))
        break
    out.append(max_uni if val is None else val)
  return np.array(out)


# vocab 0..4, context pad id 5; token 4 never occurs in training.
TRAIN = [np.array([0, 1, 2]), np.array([0, 1, 3]), np.array([1, 2])]
V = 5


def test_probabilities_equal_hand_counts():
  model = ng.build_ngram_model(TRAIN, V, max_n=3)
  probe = [np.array([0, 1, 2]), np.array([1, 2]), np.array([1, 3]), np.array([4])]
  pos = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 1], [3, 0]])
  # Unigrams (8 tokens): 0:2, 1:3, 2:2, 3:1.
  got1 = ng.ngram_surprisal(model, probe, pos, 1)
  want1 = -np.log2([2 / 8, 3 / 8, 2 / 8, 3 / 8, 2 / 8, 1 / 8, 1 / 8])  # last: unseen -> max
  np.testing.assert_allclose(got1, want1, rtol=1e-12)
  assert model.max_unigram_surprisal == pytest.approx(3.0)
  # Bigrams: pad->0 x2, pad->1 x1, 0->1 x2, 1->2 x2, 1->3 x1 (n=2 is never pruned).
  got2 = ng.ngram_surprisal(model, probe, pos, 2)
  want2 = -np.log2([2 / 3, 2 / 2, 2 / 3, 1 / 3, 2 / 3, 1 / 3, 1 / 8])
  np.testing.assert_allclose(got2, want2, rtol=1e-12)


def test_backoff_exactly_when_higher_order_is_zero_or_pruned():
  model = ng.build_ngram_model(TRAIN, V, max_n=3)
  probe = [np.array([0, 1, 2]), np.array([1, 2])]
  pos = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]])
  got = ng.ngram_surprisal(model, probe, pos, 3)
  # Trigrams kept (count 2): (pad,pad)->0, (pad,0)->1. Pruned (count 1): (pad,pad)->1,
  # (0,1)->2, (0,1)->3, (pad,1)->2.
  want = [
    0.0,  # p(0 | pad pad) = 2/2, trigram kept
    0.0,  # p(1 | pad 0) = 2/2, trigram kept
    -np.log2(2 / 3),  # context (0,1) fully pruned -> bigram p(2|1)
    -np.log2(1 / 3),  # (pad,pad)->1 pruned, context total 2 -> p=0 -> bigram p(1|pad)
    -np.log2(2 / 3),  # (pad,1) pruned -> bigram p(2|1)
  ]
  np.testing.assert_allclose(got, want, atol=1e-12)
  raw = ng.ngram_surprisal(model, probe, pos, 3, backoff=False)
  np.testing.assert_array_equal(np.isnan(raw), [False, False, True, True, True])


def test_pruning_removes_count_one_ngrams_only_for_n_ge_3():
  model = ng.build_ngram_model(TRAIN, V, max_n=4)
  base = model.base
  for n, want in ((1, 8), (2, 8), (3, 4), (4, 4)):
    assert model.counts[n - 1].sum() == want, n
  assert model.counts[2].min() >= 2 and model.counts[3].min() >= 2
  assert (model.counts[1] == 1).any()  # bigram count-1 entries survive
  unpruned = ng.build_ngram_model(TRAIN, V, max_n=3, prune_min=1)
  assert unpruned.counts[2].sum() == 8 and (unpruned.counts[2] == 1).sum() == 4
  # Context totals are the totals of the kept counts.
  ctx = model.keys[2] // base
  np.testing.assert_array_equal(
    np.bincount(ctx, weights=model.counts[2], minlength=model.ctx_total[2].size),
    model.ctx_total[2],
  )


def test_periodic_pruning_matches_reference_blocks():
  seqs = [np.array([0, 1, 2, 3]), np.array([0, 1, 2, 4]), np.array([3, 0, 1, 2])]
  once = ng.build_ngram_model(seqs, V, max_n=3)
  every1 = ng.build_ngram_model(seqs, V, max_n=3, prune_every=1)
  # (0,1)->2 occurs once per sequence: survives a single final prune, never a per-
  # sequence prune.
  key = (np.searchsorted(once.dict_codes[1], 0 * once.base + 1)) * once.base + 2
  assert key in set(once.keys[2]) and key not in set(every1.keys[2])
  for k in (1, 2):
    brute = brute_tables(seqs, V, 3, prune_every=k)
    got = ng.build_ngram_model(seqs, V, max_n=3, prune_every=k)
    assert got.counts[2].sum() == sum(sum(c.values()) for c in brute[2].values())


def test_matches_brute_force_on_random_corpus_large_vocab():
  rng = np.random.default_rng(0)
  vocab = 50_000
  motifs = rng.integers(0, vocab, (30, 6))  # repeated motifs so 3..5-grams survive
  train = []
  for _ in range(200):
    parts = [motifs[rng.integers(30)][: rng.integers(2, 7)] for _ in range(rng.integers(1, 5))]
    parts.append(rng.integers(0, vocab, rng.integers(0, 4)))
    train.append(np.concatenate(parts))
  model = ng.build_ngram_model(train, vocab, max_n=5)
  tables = brute_tables(train, vocab, 5)
  probes = train[:20] + [np.concatenate([motifs[0], rng.integers(0, vocab, 3)])]
  for n in (1, 3, 5):
    got = ng.sequence_surprisals(model, probes, n)
    for seq, g in zip(probes, got):
      np.testing.assert_allclose(g, brute_surprisal(tables, vocab, seq, n), rtol=1e-12)
  assert any((model.counts[4] >= 2).tolist())  # 5-grams do survive pruning here
  # 2-D right-padded input gives the same model.
  width = max(s.size for s in train)
  arr = np.full((len(train), width), -1, dtype=np.int64)
  for i, s in enumerate(train):
    arr[i, : s.size] = s
  model2 = ng.build_ngram_model(arr, vocab, max_n=5)
  for a, b in zip(model.keys + model.counts, model2.keys + model2.counts):
    np.testing.assert_array_equal(a, b)


def test_zero_atol_reproduces_reference_isclose_quirk():
  train = [np.array([0] * 200 + [1])]
  model = ng.build_ngram_model(train, V, max_n=1)
  pos = np.array([[0, 200]])
  p1 = 1 / 201
  assert ng.ngram_surprisal(model, train, pos, 1)[0] == pytest.approx(-np.log2(p1))
  # With atol above p(1), the reference treats it as zero and fills the max surprisal.
  got = ng.ngram_surprisal(model, train, pos, 1, zero_atol=0.01)
  assert got[0] == pytest.approx(model.max_unigram_surprisal)
  assert np.isnan(ng.ngram_surprisal(model, train, pos, 1, backoff=False, zero_atol=0.01))[0]


def test_context_predictors_match_reference_loop():
  rng = np.random.default_rng(1)
  train = [rng.integers(0, 8, rng.integers(5, 30)) for _ in range(60)]
  model = ng.build_ngram_model(train, 8, max_n=3)
  tables = brute_tables(train, 8, 3)
  probes = train[:5]
  pos = np.array([[s, p] for s in range(5) for p in range(1, probes[s].size, 3)])
  for n, window in ((1, None), (2, None), (3, 4), (3, None)):
    got = ng.context_logprob(model, probes, pos, n=n, window=window)
    per = [[brute_surprisal(tables, 8, probes[s], j) for s in range(5)] for j in range(1, n + 1)]
    want = []
    for s, p in pos:
      start = 0 if window is None else max(p - window, 0)
      total = 0.0
      for i in range(n - 1):  # reference: lower orders for the first window tokens
        if start + i >= p:
          break
        total += per[i][s][start + i]
      if start + n - 1 < p:
        total += per[n - 1][s][start + n - 1 : p].sum()
      want.append(-total / (p - start))
    np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"n={n} window={window}")
  np.testing.assert_allclose(ng.context_loglen(pos), np.log2(pos[:, 1]))
  assert np.isnan(ng.context_loglen(np.array([[0, 0]])))[0]
