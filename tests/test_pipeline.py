"""Data pipeline: packing, purity in (seed, step), host splits, exact group counts, bad proportions."""

import numpy as np
import pytest

from data import pipeline as dp
from data import sources, vocab


@pytest.fixture(scope="module")
def src():
  lang = sources.Bigram.random(seed=3, n_terminals=12)
  return sources.ListSource(sources.synthetic_examples(lang, 300, sample_seed=5, with_true=True))


def test_pack_segments_positions_and_true_logprobs(src):
  docs = [src[i] for i in range(6)]
  row, used = dp.pack(docs, 40)
  n_pairs = [len(d["tokens"]) - 1 for d in docs]
  # greedy: documents that do not fit are skipped, later ones may still fit
  pos = 0
  for d, n in zip(docs, n_pairs):
    if pos + n > 40:
      continue
    seg = row["segment_ids"][pos]
    np.testing.assert_array_equal(row["inputs"][pos : pos + n], d["tokens"][:-1])
    np.testing.assert_array_equal(row["targets"][pos : pos + n], d["tokens"][1:])
    np.testing.assert_array_equal(row["positions"][pos : pos + n], np.arange(n))
    np.testing.assert_allclose(row["true_logprob"][pos : pos + n], d["true_logprob"])
    assert np.all(row["segment_ids"][pos : pos + n] == seg)
    pos += n
  assert used == len(np.unique(row["segment_ids"][row["mask"] > 0]))
  assert row["mask"].sum() == pos and np.all(row["mask"][pos:] == 0)


def test_true_logprob_is_the_exact_conditional():
  lang = sources.Bigram.random(seed=1, n_terminals=4, stop=0.3)
  w = np.array([2, 0, 3])
  lp = lang.token_logprobs(w)
  assert len(lp) == 4
  expect = [np.log(lang.init_V[2]), np.log(0.7 * lang.trans_VxV[2, 0]), np.log(0.7 * lang.trans_VxV[0, 3]), np.log(0.3)]
  np.testing.assert_allclose(lp, expect)


def test_batch_is_pure_function_of_seed_and_step_and_split_by_host(src):
  p1 = dp.Pipeline([src], seed=7, global_batch=8, seq_len=32)
  p2 = dp.Pipeline([src], seed=7, global_batch=8, seq_len=32)
  a, b = p1.batch(11), p2.batch(11)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(p1.batch(12)["inputs"], a["inputs"])
  assert not np.array_equal(dp.Pipeline([src], seed=8, global_batch=8, seq_len=32).batch(11)["inputs"], a["inputs"])
  halves = [dp.Pipeline([src], seed=7, global_batch=8, seq_len=32, rows=r).batch(11) for r in ((0, 4), (4, 8))]
  for k in a:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), a[k])
  it = p1.iterator(10, 13)
  for s in (10, 11, 12):
    np.testing.assert_array_equal(next(it)["inputs"], p1.batch(s)["inputs"])


def test_epoch_permutation_visits_every_document_once():
  idx = dp.doc_index(3, np.arange(250), 100)
  for e in range(2):
    assert sorted(idx[e * 100 : (e + 1) * 100]) == list(range(100))


@pytest.mark.parametrize(
  "p,B,expect",
  [
    ([0.5, 0.5], 8, [4, 4]),
    ([1 / 3] * 3, 8, [3, 3, 2]),
    ([0.75, 0.125, 0.125], 8, [6, 1, 1]),
    ([0.0, 1.0], 5, [0, 5]),
    ([0.7, 0.2, 0.1], 7, [5, 1, 1]),
  ],
)
def test_largest_remainder(p, B, expect):
  np.testing.assert_array_equal(dp.largest_remainder(p, B), expect)


def test_exact_group_counts_per_batch(src):
  lang2 = sources.Bigram.random(seed=9, n_terminals=12)
  src2 = sources.ListSource(sources.synthetic_examples(lang2, 200, sample_seed=1, with_true=False))
  pipe = dp.Pipeline([src, src2], seed=0, global_batch=8, seq_len=32, group_names=["a", "b"])
  for step, p in ((0, [0.75, 0.25]), (1, [0.75, 0.25]), (2, [0.1, 0.9])):
    b = pipe.batch(step, p)
    np.testing.assert_array_equal(np.bincount(b["group"], minlength=2), dp.largest_remainder(p, 8))
  # rows of group b really come from source b (its documents)
  b = pipe.batch(5, [0.5, 0.5])
  docs_b = {tuple(src2[i]["tokens"][1:-1]) for i in range(len(src2))}
  row = b["inputs"][b["group"] == 1][0]
  seg = b["segment_ids"][b["group"] == 1][0]
  first = row[(seg == 1)][1:]
  assert tuple(first) in docs_b


def test_sampled_group_rows_resolve_p_on_average(src):
  """group_rows='sampled': each row's group drawn from p, a pure function of (seed, step) and split by host
  like the exact form; the counts vary between batches but average B·p, so a p that exact rounding of 8
  rows never shows (0.47 vs 0.5: always 4 + 4) moves the mean; exact=True keeps largest-remainder counts."""
  lang2 = sources.Bigram.random(seed=9, n_terminals=12)
  src2 = sources.ListSource(sources.synthetic_examples(lang2, 200, sample_seed=1, with_true=False))
  kw = dict(seed=4, global_batch=8, seq_len=32, group_names=["a", "b"])
  exact = dp.Pipeline([src, src2], **kw)
  sampled = dp.Pipeline([src, src2], **kw, group_rows="sampled")
  p = [0.47, 0.53]
  assert all(np.bincount(exact.group_of_rows(s, p), minlength=2)[0] == 4 for s in range(50))
  counts = np.array([np.bincount(sampled.group_of_rows(s, p), minlength=2) for s in range(4000)])
  assert len({tuple(c) for c in counts[:50]}) > 2  # not the same split every step
  np.testing.assert_allclose(counts.mean(0) / 8, p, atol=0.01)  # SE of the mean share ~0.003
  again = dp.Pipeline([src, src2], **kw, group_rows="sampled")
  np.testing.assert_array_equal(sampled.group_of_rows(7, p), again.group_of_rows(7, p))
  a = sampled.batch(7, p)
  halves = [dp.Pipeline([src, src2], **kw, group_rows="sampled", rows=r).batch(7, p) for r in ((0, 3), (3, 8))]
  for k in a:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), a[k])
  np.testing.assert_array_equal(np.bincount(sampled.batch(7, [0.75, 0.25], exact=True)["group"], minlength=2), [6, 2])
  with pytest.raises(dp.DataError, match="group rows"):
    dp.Pipeline([src, src2], **kw, group_rows="random")


def test_bad_proportions_are_rejected_with_values():
  with pytest.raises(dp.DataError, match="sum to 1"):
    dp.check_proportions([0.5, 0.6], ["a", "b"])
  with pytest.raises(dp.DataError, match="non-negative"):
    dp.check_proportions([1.5, -0.5], ["a", "b"])
  with pytest.raises(dp.DataError, match="'a': 1.5"):
    dp.check_proportions([1.5, -0.5], ["a", "b"])


def test_mlm_masking(src):
  pipe = dp.Pipeline([src], seed=0, global_batch=8, seq_len=32, objective="mlm", vocab_size=16)
  b = pipe.batch(0)
  m = b["mask"] > 0
  assert 0 < m.mean() < 0.4
  assert np.all(b["targets"][m] >= vocab.N_SPECIAL)
  assert (b["inputs"][m] == vocab.MASK).mean() > 0.5
  np.testing.assert_array_equal(b["inputs"][~m & (b["segment_ids"] > 0)], b["targets"][~m & (b["segment_ids"] > 0)])
  assert "true_logprob" not in b


def test_eval_batches_cover_split_in_order(src):
  ev = dp.eval_batches(src, batch_size=4, seq_len=32, num_batches=100)
  n_docs = sum(len(np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0])) for b in ev for r in range(4))
  assert n_docs == len(src)


def test_ragged_cache_is_identical_to_the_source(src):
  cached = dp.RaggedSource(src)
  assert len(cached) == len(src)
  for i in (0, 7, len(src) - 1):
    np.testing.assert_array_equal(cached[i]["tokens"], src[i]["tokens"])
    np.testing.assert_allclose(cached[i]["true_logprob"], src[i]["true_logprob"])
  a = dp.Pipeline([src], seed=1, global_batch=4, seq_len=32, cache_tokens=0).batch(3)
  b = dp.Pipeline([src], seed=1, global_batch=4, seq_len=32).batch(3)
  assert isinstance(dp.Pipeline([src], seed=1, global_batch=4, seq_len=32).sources[0], dp.RaggedSource)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_padding_mode_one_document_per_row(src):
  b = dp.Pipeline([src], seed=0, global_batch=8, seq_len=32, docs_per_row=1).batch(0)
  assert (b["segment_ids"].max(1) == 1).all()  # one document per row
  n = b["mask"].sum(1)
  assert (n > 0).all() and (n < 32).any()  # the rest is padding, masked out
  for r in range(8):
    assert (b["segment_ids"][r, n[r] :] == 0).all() and (b["mask"][r, n[r] :] == 0).all()
  ev = dp.eval_batches(src, batch_size=4, seq_len=32, num_batches=3, max_docs_per_row=1)
  assert all((e["segment_ids"].max(1) <= 1).all() for e in ev)
  np.testing.assert_array_equal(ev[0]["targets"][0, : len(src[0]["tokens"]) - 1], src[0]["tokens"][1:])


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_vectorised_batch_equals_row_by_row_packing(src, objective):
  """Pipeline.batch (all rows at once) against batch_reference (one `pack` per row): mixed groups with
  and without exact log-probs, documents longer than a row, host splits, cached and uncached sources."""
  plain = sources.ListSource(sources.synthetic_examples(sources.Bigram.random(seed=4, n_terminals=12), 200, 1, with_true=False))
  for L, k, cache in ((16, 0, 0), (16, 3, 10**9), (40, 0, 10**9), (33, 7, 0)):
    for srcs, p in (([src], None), ([src, src], (0.25, 0.75)), ([src, plain, src], (0.5, 0.3, 0.2))):
      for rows in ((0, 12), (5, 9)):
        pipe = dp.Pipeline(
          srcs,
          seed=3,
          global_batch=12,
          seq_len=L,
          rows=rows,
          docs_per_row=k,
          cache_tokens=cache,
          objective=objective,
          vocab_size=16,
        )
        for step in (0, 4, 31):
          a, b = pipe.batch(step, p), pipe.batch_reference(step, p)
          assert list(a) == list(b)
          for key in a:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} L={L} k={k} groups={len(srcs)} rows={rows}")


def test_pack_rows_equals_pack_on_ragged_documents():
  rng = np.random.default_rng(0)
  docs = [
    {"tokens": rng.integers(4, 30, size=n).astype(np.int32), "true_logprob": -rng.random(n - 1).astype(np.float32)}
    for n in rng.integers(2, 30, size=60)
  ]
  ragged = dp.RaggedSource(sources.ListSource(docs))
  ids_RxK = rng.integers(0, len(docs), size=(9, 5))
  for shift in (True, False):
    for L in (1, 7, 20, 64):
      tokens, true, start, length = dp.flat_documents(ragged, ids_RxK, True)
      got = dp.pack_rows(tokens, true, start, length, L, shift)
      for r, ids in enumerate(ids_RxK):
        want, _ = dp.pack([docs[i] for i in ids], L, shift, True)
        assert sorted(got) == sorted(want)
        for key in want:
          np.testing.assert_array_equal(got[key][r], want[key], err_msg=f"{key} row {r} L={L} shift={shift}")
