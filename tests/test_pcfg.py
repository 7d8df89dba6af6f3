"""Tests for data/pcfg.py against brute-force enumeration on tiny grammars.

The references below never use the library's charts: they sum over derivations exhaustively
(memoised on exact string length), so the inside, prefix (left-corner) and outside code is
checked against an independent computation.
"""

import collections

import numpy as np
import pytest
from scipy import stats

from data.pcfg import PCFG

# Levelled, ambiguous, with Liu-style unary root mixture S -> S1 | S2 and an inner unary B -> D
# (so unary closures matter for one-token spans too). Max length 4.
TINY_RULES = [
  ("S", ("S1",), 0.6),
  ("S", ("S2",), 0.4),
  ("S1", ("A", "B"), 1.0),
  ("S2", ("B", "A"), 0.5),
  ("S2", ("A", "A"), 0.5),
  ("A", ("C", "D"), 0.5),
  ("A", ("C", "C"), 0.2),
  ("A", (0,), 0.3),
  ("B", ("D", "C"), 0.3),
  ("B", (1,), 0.3),
  ("B", (2,), 0.3),
  ("B", ("D",), 0.1),
  ("C", (0,), 0.5),
  ("C", (1,), 0.5),
  ("D", (1,), 0.7),
  ("D", (2,), 0.3),
]
# Left-recursive (S -> S A, A -> A B): unbounded lengths, exercises the left-corner closure.
RECURSIVE_RULES = [
  ("S", ("S", "A"), 0.25),
  ("S", ("A", "B"), 0.15),
  ("S", (0,), 0.6),
  ("A", ("A", "B"), 0.2),
  ("A", (1,), 0.8),
  ("B", (0,), 0.5),
  ("B", (1,), 0.5),
]


def _by_lhs(rules):
  by = collections.defaultdict(list)
  for lhs, rhs, p in rules:
    by[lhs].append((rhs, p))
  return by


def brute_inside(rules):
  """D(sym, n) -> {string: p(sym =>* string)} over strings of exactly n tokens, by exhaustive sums."""
  by, memo = _by_lhs(rules), {}

  def D(sym, n):
    if isinstance(sym, int):
      return {(sym,): 1.0} if n == 1 else {}
    if (sym, n) not in memo:
      out = collections.defaultdict(float)
      for rhs, p in by[sym]:
        if len(rhs) == 1:
          for s, q in D(rhs[0], n).items():
            out[s] += p * q
        else:
          for k in range(1, n):
            for s1, q1 in D(rhs[0], k).items():
              for s2, q2 in D(rhs[1], n - k).items():
                out[s1 + s2] += p * q1 * q2
      memo[(sym, n)] = dict(out)
    return memo[(sym, n)]

  return D


def brute_trees(rules, sym, n):
  """Every derivation of sym with n tokens: (string, prob, nodes) with nodes = ((label, i, j), ...)."""
  if isinstance(sym, int):
    return [((sym,), 1.0, ())] if n == 1 else []
  out = []
  for rhs, p in _by_lhs(rules)[sym]:
    if len(rhs) == 1:
      for s, q, nodes in brute_trees(rules, rhs[0], n):
        out.append((s, p * q, ((sym, 0, n),) + nodes))
    else:
      for k in range(1, n):
        for s1, q1, n1 in brute_trees(rules, rhs[0], k):
          for s2, q2, n2 in brute_trees(rules, rhs[1], n - k):
            shifted = tuple((a, i + k, j + k) for a, i, j in n2)
            out.append((s1 + s2, p * q1 * q2, ((sym, 0, n),) + n1 + shifted))
  return out


def language(rules, max_len, start="S"):
  """{sentence: p(sentence)} for all sentences of length <= max_len (exact for each string)."""
  D = brute_inside(rules)
  return {s: p for n in range(1, max_len + 1) for s, p in D(start, n).items() if p > 0}


def pooled_chi2(counts, probs, groups):
  """Pooled Pearson chi-square p-value of observed counts vs per-group multinomial probabilities.

  Within each group, cells with expected count < 5 are merged into one cell.
  """
  stat, dof = 0.0, 0
  for g in np.unique(groups):
    m = groups == g
    n = counts[m].sum()
    if n == 0:
      continue
    e, o = n * probs[m] / probs[m].sum(), counts[m]
    small = e < 5
    if small.any():
      e = np.append(e[~small], e[small].sum())
      o = np.append(o[~small], o[small].sum())
    if len(e) > 1:
      stat += float(np.sum((o - e) ** 2 / e))
      dof += len(e) - 1
  return stats.chi2.sf(stat, dof), dof


@pytest.fixture(scope="module")
def tiny():
  return PCFG.from_rules(TINY_RULES)


@pytest.fixture(scope="module")
def tiny_lang():
  return language(TINY_RULES, 4)


@pytest.fixture(scope="module")
def default():
  return PCFG.random(seed=0)


# ---------------------------------------------------------------- construction


def test_from_rules_validates():
  with pytest.raises(ValueError, match="sum to"):
    PCFG.from_rules([("S", ("A", "A"), 0.5), ("A", (0,), 1.0)])
  with pytest.raises(ValueError, match="subcritical"):  # S -> S S w.p. 0.6: infinite derivations
    PCFG.from_rules([("S", ("S", "S"), 0.6), ("S", (0,), 0.4)])
  with pytest.raises(ValueError, match="acyclic"):
    PCFG.from_rules([("S", ("A",), 0.5), ("S", (0,), 0.5), ("A", ("S",), 0.5), ("A", (1,), 0.5)])
  with pytest.raises(ValueError, match="not binary"):
    PCFG.from_rules([("S", ("A", 0), 1.0), ("A", (0,), 1.0)])


def test_tiny_structure(tiny):
  assert tiny.names[:3] == ("S", "S1", "S2")
  assert tiny.n_terminals == 3 and tiny.n_nonterminals == 7
  assert tiny.max_len == 4
  assert PCFG.from_rules(RECURSIVE_RULES).max_len == np.inf


# ---------------------------------------------------------------- exact probabilities


def test_log_prob_matches_enumeration(tiny, tiny_lang):
  assert sum(tiny_lang.values()) == pytest.approx(1.0, abs=1e-12)
  sents, lp = tiny.enumerate_sentences()
  assert {tuple(s) for s in sents} == set(tiny_lang)
  np.testing.assert_allclose(np.exp(lp), [tiny_lang[tuple(s)] for s in sents], rtol=1e-12)
  # Strings outside the language get -inf, including too-long and empty ones.
  assert tiny.log_prob([np.array([2, 2]), np.array([0, 0, 0, 0, 0]), np.array([], int)]).tolist() == [-np.inf] * 3


def _prefix_mass(lang):
  pre = collections.defaultdict(float)
  for s, p in lang.items():
    for k in range(len(s) + 1):
      pre[s[:k]] += p
  return pre


def test_token_logprobs_are_prefix_ratios(tiny, tiny_lang):
  pre = _prefix_mass(tiny_lang)
  sents = [np.array(s) for s in tiny_lang]
  batch = tiny.token_logprobs_batch(sents)
  for s, tl in zip(tiny_lang, batch):
    want = [np.log(pre[s[: k + 1]] / pre[s[:k]]) for k in range(len(s))] + [np.log(tiny_lang[s] / pre[s])]
    np.testing.assert_allclose(tl, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tiny.token_logprobs(np.array(s)), tl, rtol=1e-12)
    assert tl.sum() == pytest.approx(np.log(tiny_lang[s]), rel=1e-10)


def test_next_token_distribution_matches_enumeration(tiny, tiny_lang):
  pre = _prefix_mass(tiny_lang)
  V = tiny.n_terminals
  for w in [p for p in pre if pre[p] > 0]:
    dist = tiny.next_token_distribution(np.array(w, int))
    want = [pre.get(w + (v,), 0.0) / pre[w] for v in range(V)] + [tiny_lang.get(w, 0.0) / pre[w]]
    np.testing.assert_allclose(dist, want, rtol=1e-10, atol=1e-14)
    assert dist.sum() == pytest.approx(1.0, abs=1e-12)
  with pytest.raises(ValueError, match="probability 0"):
    tiny.next_token_distribution(np.array([2, 2]))
  # The batched per-prefix rows equal the single-prefix calls.
  s = next(iter(tiny_lang))
  rows = tiny.next_token_distributions(np.array(s))
  for k in range(len(s) + 1):
    np.testing.assert_allclose(rows[k], tiny.next_token_distribution(np.array(s[:k], int)), rtol=1e-12)


def _masked_brute(lang, s, V):
  out = np.zeros((len(s), V))
  for i in range(len(s)):
    for v in range(V):
      out[i, v] = lang.get(s[:i] + (v,) + s[i + 1 :], 0.0)
  return out / out.sum(1, keepdims=True)


def test_masked_conditionals_match_enumeration(tiny, tiny_lang):
  sents = list(tiny_lang)
  got = tiny.masked_conditionals_batch([np.array(s) for s in sents])
  for s, g in zip(sents, got):
    np.testing.assert_allclose(g, _masked_brute(tiny_lang, s, tiny.n_terminals), rtol=1e-10, atol=1e-14)


def test_recursive_grammar_left_corner():
  """Left recursion: exact log-probs, masked conditionals; prefix conditionals inside truncation bounds."""
  g = PCFG.from_rules(RECURSIVE_RULES)
  lang = language(RECURSIVE_RULES, 14)
  tail = 1.0 - sum(lang.values())
  assert 0 < tail < 1e-5  # the bounds below are tight (< 0.5% wide) only if the tail is tiny
  sents = [s for s in lang if len(s) <= 6]
  np.testing.assert_allclose(g.log_prob([np.array(s) for s in sents]), np.log([lang[s] for s in sents]), rtol=1e-11)
  pre = _prefix_mass(lang)
  checked = 0
  for w in [p for p in pre if len(p) <= 5 and pre[p] > 0.002]:
    dist = g.next_token_distribution(np.array(w, int))
    assert dist.sum() == pytest.approx(1.0, abs=1e-12)
    for v in range(g.n_terminals + 1):
      eos = v == g.n_terminals  # p(w) is exact; prefix masses are truncated by at most `tail`
      num = lang.get(w, 0.0) if eos else pre.get(w + (v,), 0.0)
      lo = num / (pre[w] + tail)
      hi = (num + (0.0 if eos else tail)) / pre[w]
      assert lo - 1e-12 <= dist[v] <= hi + 1e-12, (w, v, lo, dist[v], hi)
      checked += 1
  assert checked > 60
  # Wrong left-corner handling would break this: tokens telescope to the inside probability.
  for s in sents[:40]:
    assert g.token_logprobs(np.array(s)).sum() == pytest.approx(np.log(lang[s]), rel=1e-10)
  for s in [s for s in sents if len(s) == 5][:10]:
    np.testing.assert_allclose(g.masked_conditionals(np.array(s)), _masked_brute(lang, s, g.n_terminals), rtol=1e-10)


# ---------------------------------------------------------------- entropy


def test_entropy_exact_equals_analytic(tiny, tiny_lang):
  p = np.array(list(tiny_lang.values()))
  lens = np.array([len(s) for s in tiny_lang])
  h = -np.sum(p * np.log(p))
  mlm_nll = np.array([-np.log(_masked_brute(tiny_lang, s, 3)[np.arange(len(s)), s]).sum() for s in tiny_lang])
  e = tiny.entropy_rate(exact=True)
  assert e["sentence_entropy"] == pytest.approx(h, rel=1e-10)
  assert e["causal_loss"] == pytest.approx(h / np.sum(p * (lens + 1)), rel=1e-10)
  assert e["mlm_loss"] == pytest.approx(np.sum(p * mlm_nll) / np.sum(p * lens), rel=1e-10)
  assert e["mean_len"] == pytest.approx(np.sum(p * lens), rel=1e-12)
  assert tiny.expected_length() == pytest.approx(np.sum(p * lens), rel=1e-12)
  trees = [t for n in range(1, 5) for t in brute_trees(TINY_RULES, "S", n)]
  q = np.array([t[1] for t in trees])
  assert q.sum() == pytest.approx(1.0, abs=1e-12)
  assert tiny.derivation_entropy() == pytest.approx(-np.sum(q * np.log(q)), rel=1e-10)
  assert tiny.derivation_entropy() > h + 1e-3  # the tiny grammar is ambiguous


def test_entropy_sampled_within_standard_errors(tiny):
  exact = tiny.entropy_rate(exact=True)
  est = tiny.entropy_rate(n_samples=4000, seed=3)
  for k in ("causal_loss", "mlm_loss"):
    assert 0 < est[k + "_se"] < 0.05
    assert abs(est[k] - exact[k]) < 4 * est[k + "_se"], (k, est[k], exact[k], est[k + "_se"])
    lo, hi = est[k + "_ci95"]
    assert lo < est[k] < hi
  assert abs(est["sentence_entropy"] - exact["sentence_entropy"]) < 4 * est["sentence_entropy_se"]


# ---------------------------------------------------------------- sampling


def test_sentence_frequencies_chi2(tiny, tiny_lang):
  sents = tiny.sample(20000, seed=1)
  keys = list(tiny_lang)
  index = {s: i for i, s in enumerate(keys)}
  counts = np.bincount([index[tuple(s.tolist())] for s in sents], minlength=len(keys))
  pval, dof = pooled_chi2(counts, np.array([tiny_lang[s] for s in keys]), np.zeros(len(keys)))
  assert dof > 20 and pval > 1e-3, pval
  assert all(s.dtype == np.int32 for s in sents[:10])
  # Sampling is deterministic in (n, seed).
  a, b, c = tiny.sample(200, seed=1), tiny.sample(200, seed=1), tiny.sample(200, seed=2)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _check_tree(g, sent, tree):
  ru = g.rules
  nodes = {(int(i), int(j), int(a)) for i, j, a, _ in tree}
  assert (0, len(sent), g.start) in nodes
  for i, j, a, r in tree:
    assert ru["lhs"][r] == a
    if ru["kind"][r] == 0:
      assert j - i == 1 and sent[i] == ru["left"][r]
    elif ru["kind"][r] == 1:
      assert (i, j, ru["left"][r]) in nodes
    else:
      assert any((i, k, ru["left"][r]) in nodes and (k, j, ru["right"][r]) in nodes for k in range(i + 1, j))


def test_rule_usage_chi2_and_trees(tiny):
  sents, trees = tiny.sample(20000, seed=2, return_trees=True)
  for s, t in zip(sents[:300], trees[:300]):
    _check_tree(tiny, s, t)
  used = np.concatenate([t[:, 3] for t in trees])
  ru = tiny.rules
  counts = np.bincount(used, minlength=len(ru["prob"]))
  pval, dof = pooled_chi2(counts, ru["prob"], ru["lhs"])
  assert dof == len(ru["prob"]) - tiny.n_nonterminals and pval > 1e-3, pval


def test_default_grammar_rule_usage_chi2(default):
  sents, trees = default.sample(20000, seed=5, return_trees=True)
  ru = default.rules
  counts = np.bincount(np.concatenate([t[:, 3] for t in trees]), minlength=len(ru["prob"]))
  for kind in (0, 2):  # lexical and binary rules separately (renormalised within each lhs)
    m = ru["kind"] == kind
    pval, dof = pooled_chi2(counts[m], ru["prob"][m], ru["lhs"][m])
    assert dof > 100 and pval > 1e-3, (kind, pval)
  for s, t in zip(sents[:50], trees[:50]):
    _check_tree(default, s, t)


# ---------------------------------------------------------------- downstream labels


def test_span_labels_code_definition(tiny, tiny_lang):
  D = brute_inside(TINY_RULES)
  sents = list(tiny_lang)
  arr = [np.array(s) for s in sents]
  for task, k in (("A", None), ("B", 4), ("C", 2)):
    classes = tiny.label_classes(task, "code")
    names = [tiny.names[c] for c in classes]
    assert names == (["S1", "S2"] if task == "A" else ["S1", "S2", "A", "B", "C", "D"])
    labels = tiny.span_labels(arr, task=task)
    assert labels.dtype == np.int32
    for s, lab in zip(sents, labels):
      if k is not None and len(s) < k:
        assert lab == -1
        continue
      span = s if k is None else s[:k]
      score = np.array([D(n, len(span)).get(span, 0.0) for n in names])
      if score.max() == 0:
        assert lab == -1
        continue
      assert score[lab] >= score.max() * (1 - 1e-9)
      if np.sum(score >= score.max() * (1 - 1e-9)) == 1:
        assert lab == np.argmax(score)
    assert (labels >= 0).sum() > 10


def test_span_labels_paper_definition(tiny, tiny_lang):
  classes = tiny.label_classes("B", "paper")
  names = [tiny.names[c] for c in classes]
  trees = collections.defaultdict(list)
  for n in range(1, 5):
    for s, p, nodes in brute_trees(TINY_RULES, "S", n):
      trees[s].append((p, set(nodes)))
  sents = list(tiny_lang)
  n_defined = 0
  for start, span_len in ((0, 1), (0, 2), (1, 2), (1, 3), (0, 4)):
    labels = tiny.span_labels([np.array(s) for s in sents], task="B", definition="paper", span_len=span_len, span_start=start)
    for s, lab in zip(sents, labels):
      if start + span_len > len(s):
        assert lab == -1
        continue
      post = np.array([sum(p for p, nodes in trees[s] if (a, start, start + span_len) in nodes) for a in names])
      if post.max() == 0:
        assert lab == -1
        continue
      n_defined += 1
      assert post[lab] >= post.max() * (1 - 1e-9)
      if np.sum(post >= post.max() * (1 - 1e-9)) == 1:
        assert lab == np.argmax(post)
  assert n_defined > 50


# ---------------------------------------------------------------- the default (Liu-sized) grammar


def test_default_grammar_layout(default):
  assert default.n_nonterminals == 50 and default.n_terminals == 200
  assert default.names[:2] == ("S", "S1") and default.names[-1] == "A4_9"
  assert len(default.label_classes("A")) == 9
  assert len(default.label_classes("B")) == 49
  assert default.max_len == 16  # 4 strict A-levels: 2**4 <= max_len=31 by construction
  assert np.all(default.lexical_NxV.sum(0) > 0)  # every terminal can be produced
  assert PCFG.random(seed=0).binary_NxNxN.tobytes() == default.binary_NxNxN.tobytes()
  assert not np.array_equal(PCFG.random(seed=1).lexical_NxV, default.lexical_NxV)
  with pytest.raises(ValueError, match="max_len"):
    PCFG.random(seed=0, levels=5, max_len=31)
  assert PCFG.random(seed=0, levels=5, max_len=32).max_len <= 32


def test_default_grammar_exact_quantities(default):
  sents = default.sample(3000, seed=7)
  lens = np.array([len(s) for s in sents])
  assert lens.max() <= default.max_len and lens.min() >= 1
  assert abs(lens.mean() - default.expected_length()) < 4 * lens.std() / np.sqrt(len(lens))
  sub = sents[:20]
  tlp = default.token_logprobs_batch(sub)  # its speed: python -m bench.languages
  lp = default.log_prob(sub)
  assert np.all(np.isfinite(lp)) and lp.min() > -200
  # Prefix (left-corner adjoint) and inside computations agree, to float64 precision.
  np.testing.assert_allclose([t.sum() for t in tlp], lp, rtol=1e-10)
  np.testing.assert_allclose(default.token_logprobs(sub[0]), tlp[0], rtol=1e-12)
  rng = np.random.default_rng(0)
  for s in sub[:8]:
    k = int(rng.integers(0, len(s) + 1))
    dist = default.next_token_distribution(s[:k])
    assert dist.shape == (201,) and dist.sum() == pytest.approx(1.0, abs=1e-12)
    assert (dist[-1] > 0) == (k > 0 and np.isfinite(default.log_prob([s[:k]])[0]))
    if k == len(s):
      assert dist[-1] > 0
  rows = default.next_token_distributions(sub[1])
  np.testing.assert_allclose(rows.sum(1), 1.0, atol=1e-12)
  np.testing.assert_allclose(np.log(rows[np.arange(len(sub[1]) + 1), list(sub[1]) + [200]]), tlp[1], rtol=1e-10)
  cond = default.masked_conditionals(sub[2])
  np.testing.assert_allclose(cond.sum(1), 1.0, atol=1e-12)
  assert np.all(cond[np.arange(len(sub[2])), sub[2]] > 0)
  e = default.entropy_rate(n_samples=300, seed=0)
  assert np.isfinite(e["causal_loss"]) and 0 < e["causal_loss"] < np.log(201)
  assert 0 < e["causal_loss_se"] < 0.1 and np.isfinite(e["mlm_loss"])
  d = default.describe(n_samples=0)
  assert d["n_unary_rules"] == 9 and d["mean_len"] == pytest.approx(default.expected_length())
  assert d["derivation_entropy"] > 0
