"""Probabilistic context-free grammars with exact likelihoods (Liu et al. 2022's PCFG language).

A `PCFG` holds dense float64 rule tables: binary rules A -> B C, lexical rules A -> t and unary
rules A -> B (used for the root mixture S -> S_k of Liu's `rule_deep_mlm.txt`; any acyclic unary
rules work). Everything exact is computed in float64 without rescaling: sentence probabilities of
the default grammar reach ~1e-41 (inside / outside products ~1e-80), far above float64's 1e-308
but beyond float32's range; very long sentences of recursive grammars would need log-space.

Exact quantities (all vectorised over a batch of equal-length sentences; Python loops run over
span widths / positions only, never over rules or vocabulary items):
  log_prob                  inside algorithm.
  token_logprobs            log p(w_k | w_<k) for every word and log p(EOS | w), from prefix
                            probabilities (Jelinek & Lafferty 1991) computed in *adjoint* form:
                            h_k[A] = mass of partial derivations that yield exactly w_<k and leave
                            A as the left-most open non-terminal at position k (left-corner closure
                            included). Then p(w_<k v ...) = h_k . lex[:, v] and p(w_<k, EOS) =
                            inside(S, 0, k), so one pass gives every next-token distribution.
  masked_conditionals       p(w_i = v | w_{-i}) = outside(., i, i+1) . lex[:, v] (normalised), the
                            masked-LM optimum; one inside-outside pass gives every position.
  span_labels               Liu's downstream tasks A/B/C, code and paper definitions.
The prefix method needs a *consistent* grammar (every non-terminal derives a finite string with
probability 1); the constructor checks that the expected-children matrix has spectral radius < 1.

Random grammars (`PCFG.random`) are levelled like Liu's: S -> S_1..S_9 (unary, random weights);
S_k -> pair of level-1 non-terminals; level-l non-terminals -> pair of level-(l+1) non-terminals
or a terminal; the deepest level is purely lexical. With L A-levels every derivation yields at
most 2**L tokens (16 for Liu's 4 levels), so `max_len` is respected *by construction* and samples
follow the PCFG's distribution exactly. (Liu's generator rejects sentences of >= 32 tokens; with
his grammar's 4 strict levels that rejection can never fire either, so the two agree.)

Axis / shape legend (variable-name suffixes):
  N  non-terminals        V  terminals (raw ids 0..V-1)      R  rules (flat rule table)
  B  sentences in a batch (all of one length L)               L1 = L + 1 (span end, exclusive)
  S  span starts of one width    D  split offsets of a span   K  prefixes (L + 1 of them)
  P  parents of binary rules     C  children of binary rules  (restricted index sets)
Charts: inside_BxLxL1xN[b, i, j, A] = p(A =>* w_i .. w_{j-1}); outside_BxLxL1xN likewise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from data.estimates import ratio_stats

_LEX, _UNARY, _BINARY = 0, 1, 2
_MAX_BATCH = 256  # sentences per chart batch: bounds chart memory (B*L*L1*N*8 bytes)
PAPER_SPAN_LEN = {"A": 32, "B": 16, "C": 8}  # Liu et al.'s text: "spans of length 32, 16, 8"
CODE_PREFIX_LEN = {"B": 4, "C": 2}  # generate_downstream.py: inside of the first 4 / 2 tokens


def _groups_by_length(sentences: Sequence[np.ndarray], max_batch: int = _MAX_BATCH):
  """Yields (indices, tokens_BxL) batches of equal-length sentences (charts need one length)."""
  lens = np.array([len(s) for s in sentences], np.int64)
  for n in np.unique(lens):
    idx = np.nonzero(lens == n)[0]
    for c in range(0, len(idx), max_batch):
      sel = idx[c : c + max_batch]
      yield sel, np.stack([np.asarray(sentences[i], np.int64) for i in sel]).reshape(len(sel), n)


@dataclasses.dataclass(frozen=True, eq=False)
class PCFG:
  """A consistent PCFG in (extended) Chomsky normal form with dense float64 rule tables.

  For every non-terminal A: sum(binary_NxNxN[A]) + sum(lexical_NxV[A]) + sum(unary_NxN[A]) = 1.
  """

  binary_NxNxN: np.ndarray  # [A, B, C] = p(A -> B C)
  lexical_NxV: np.ndarray  # [A, t] = p(A -> t)
  unary_NxN: np.ndarray  # [A, B] = p(A -> B); must be acyclic (e.g. the root mixture)
  start: int = 0
  names: tuple[str, ...] = ()
  levels: tuple[int, ...] = ()  # level of each non-terminal (random grammars; informational)

  def __post_init__(self):
    R = np.asarray(self.binary_NxNxN, np.float64)
    lex = np.asarray(self.lexical_NxV, np.float64)
    U = np.asarray(self.unary_NxN, np.float64)
    N = lex.shape[0]
    if R.shape != (N, N, N) or U.shape != (N, N) or lex.ndim != 2:
      raise ValueError(f"shape mismatch: binary {R.shape}, lexical {lex.shape}, unary {U.shape}")
    if min(R.min(), lex.min(), U.min()) < 0:
      raise ValueError("rule probabilities must be non-negative")
    tot_N = R.sum((1, 2)) + lex.sum(1) + U.sum(1)
    if not np.allclose(tot_N, 1.0, atol=1e-9):
      bad = np.nonzero(~np.isclose(tot_N, 1.0, atol=1e-9))[0]
      raise ValueError(f"rule probabilities of non-terminals {bad.tolist()} sum to {tot_N[bad]}, not 1")
    if not 0 <= self.start < N:
      raise ValueError(f"start symbol {self.start} outside 0..{N - 1}")
    reach_NxN = U > 0  # unary paths of length 1, 2, ...: acyclic <=> none of length N exists
    for _ in range(N):
      reach_NxN = (reach_NxN.astype(np.int64) @ (U > 0).astype(np.int64)) > 0
    if reach_NxN.any():
      raise ValueError("unary rules must be acyclic")
    # Expected numbers of children: spectral radius < 1 <=> finite expected tree size, which
    # implies consistency (no probability lost to infinite derivations).
    child_NxN = R.sum(2) + R.sum(1) + U
    rho = max(abs(np.linalg.eigvals(child_NxN))) if N else 0.0
    if rho >= 1 - 1e-9:
      raise ValueError(
        f"grammar is not subcritical (spectral radius {rho:.4f} >= 1): "
        "derivations may be infinite, prefix probabilities would be wrong"
      )
    names = tuple(self.names) or tuple(f"N{i}" for i in range(N))
    if len(names) != N:
      raise ValueError(f"{len(names)} names for {N} non-terminals")
    put = lambda k, v: object.__setattr__(self, k, v)  # caches on a frozen dataclass
    put("binary_NxNxN", R)
    put("lexical_NxV", lex)
    put("unary_NxN", U)
    put("names", names)
    eye = np.eye(N)
    put("_unary_closure_NxN", np.linalg.inv(eye - U))  # (I - U)^-1
    put("_left_corner_NxN", np.linalg.inv(eye - R.sum(2) - U))  # (I - P_L - U)^-1
    put("_child_NxN", child_NxN)
    # Restrict charts to parents (P) / children (C) of binary rules: cuts the O(N^3) contraction.
    parents_P = np.nonzero(R.sum((1, 2)) > 0)[0]
    children_C = np.nonzero((R.sum((0, 2)) + R.sum((0, 1))) > 0)[0]
    put("_parents_P", parents_P)
    put("_children_C", children_C)
    rsub = R[parents_P][:, children_C][:, :, children_C]
    put("_binary_PxCC", rsub.reshape(len(parents_P), -1))
    put("_rules", self._rule_table())

  # ------------------------------------------------------------------ construction

  @classmethod
  def from_rules(cls, rules: Iterable[tuple], start: str = "S", n_terminals: int | None = None) -> PCFG:
    """Grammar from (lhs, rhs, prob) triples; rhs items: str = non-terminal, int = terminal id.

    Example: [("S", ("A", "B"), 1.0), ("A", (0,), 0.7), ("A", (1,), 0.3), ("B", (1,), 1.0)].
    Duplicate rules add up. Non-terminals are numbered in order of appearance, `start` first.
    """
    rules = [(lhs, tuple(rhs), float(p)) for lhs, rhs, p in rules]
    names = [start]
    for lhs, rhs, _ in rules:
      for s in (lhs, *rhs):
        if isinstance(s, str) and s not in names:
          names.append(s)
    idx = {s: i for i, s in enumerate(names)}
    terms = [t for _, rhs, _ in rules for t in rhs if not isinstance(t, str)]
    V = n_terminals if n_terminals is not None else (max(terms) + 1 if terms else 0)
    N = len(names)
    R, lex, U = np.zeros((N, N, N)), np.zeros((N, V)), np.zeros((N, N))
    for lhs, rhs, p in rules:
      kinds = tuple(isinstance(s, str) for s in rhs)
      if kinds == (True, True):
        R[idx[lhs], idx[rhs[0]], idx[rhs[1]]] += p
      elif kinds == (False,):
        if not 0 <= int(rhs[0]) < V:
          raise ValueError(f"terminal {rhs[0]} outside 0..{V - 1}")
        lex[idx[lhs], int(rhs[0])] += p
      elif kinds == (True,):
        U[idx[lhs], idx[rhs[0]]] += p
      else:
        raise ValueError(f"rule {lhs} -> {rhs} is not binary (A -> B C), lexical (A -> t) or unary (A -> B)")
    return cls(R, lex, U, start=0, names=tuple(names))

  @classmethod
  def random(
    cls,
    seed: int = 0,
    n_nonterminals: int = 50,
    n_terminals: int = 200,
    levels: int | Sequence[int] = 4,
    n_roots: int = 9,
    binary_rules_per_nt: int = 20,
    root_rules_per_nt: int = 1,
    lexical_rules_per_nt: int = 1,
    deepest_lexical_rules_per_nt: int = 100,
    lexical_mass: float = 0.2,
    concentration: float = 1.0,
    max_len: int = 31,
  ) -> PCFG:
    """A seeded random levelled grammar in the layout of Liu et al.'s rule_deep_mlm.txt.

    Non-terminals: S, S1..S{n_roots}, then `levels` A-levels (an int splits the remaining
    n_nonterminals - 1 - n_roots evenly; a sequence gives the level sizes). S -> S_k with
    Dirichlet weights; S_k -> `root_rules_per_nt` level-1 pairs; level-l non-terminals (l < L)
    -> `binary_rules_per_nt` distinct level-(l+1) pairs plus `lexical_rules_per_nt` terminals,
    with total lexical probability ~ Beta(10 m, 10 (1 - m)), m = `lexical_mass` (Liu's A1..A3
    lexical rules carry ~0.2 on average, giving ~10 tokens per sentence); deepest level ->
    terminals only.
    Within each group, probabilities are Dirichlet(`concentration`). Every next-level
    non-terminal is used by some rule and every terminal by some deepest-level rule.
    Raises if 2**L > max_len: lengths are bounded by construction, never by rejection.
    """
    if not 0 <= lexical_mass < 1:
      raise ValueError(f"lexical_mass must be in [0, 1), got {lexical_mass}")
    rng = np.random.default_rng(seed)
    n_a = n_nonterminals - 1 - n_roots
    if isinstance(levels, int):
      sizes = [n_a // levels + (i < n_a % levels) for i in range(levels)]
    else:
      sizes = [int(s) for s in levels]
    if sum(sizes) != n_a or min(sizes, default=0) < 1 or n_roots < 1:
      raise ValueError(f"level sizes {sizes} must be >= 1 and sum to n_nonterminals - 1 - n_roots = {n_a}")
    if 2 ** len(sizes) > max_len:
      raise ValueError(
        f"{len(sizes)} levels allow sentences of 2**{len(sizes)} = {2 ** len(sizes)} tokens > max_len={max_len}; use fewer levels"
      )
    names = ["S"] + [f"S{k + 1}" for k in range(n_roots)]
    groups = [list(range(1, 1 + n_roots))]
    for l, size in enumerate(sizes):
      groups.append(list(range(len(names), len(names) + size)))
      names += [f"A{l + 1}_{k}" for k in range(size)]
    N, V = len(names), n_terminals
    R, lex, U = np.zeros((N, N, N)), np.zeros((N, V)), np.zeros((N, N))
    U[0, groups[0]] = rng.dirichlet(np.full(n_roots, concentration))
    dirichlet = lambda k: rng.dirichlet(np.full(k, concentration))
    for l in range(len(groups) - 1):
      parents, kids = groups[l], np.array(groups[l + 1])
      k = root_rules_per_nt if l == 0 else binary_rules_per_nt
      k = min(k, len(kids) ** 2)
      pairs_PxKx2 = cls._covering_pairs(rng, len(parents), k, len(kids))
      for p, a in enumerate(parents):
        probs = dirichlet(k)
        if l > 0 and lexical_rules_per_nt > 0 and lexical_mass > 0:
          p_lex = rng.beta(10 * lexical_mass, 10 * (1 - lexical_mass))
          terms = rng.choice(V, size=min(lexical_rules_per_nt, V), replace=False)
          lex[a, terms] = p_lex * dirichlet(len(terms))
          probs = probs * (1 - p_lex)
        np.add.at(R[a], (kids[pairs_PxKx2[p, :, 0]], kids[pairs_PxKx2[p, :, 1]]), probs)
    deep = groups[-1]
    k = min(deepest_lexical_rules_per_nt, V)
    cover = rng.permutation(V)
    for p, a in enumerate(deep):
      must = cover[p :: len(deep)][:k]  # round-robin: every terminal gets a rule where possible
      rest = rng.permutation(np.setdiff1d(np.arange(V), must))[: k - len(must)]
      terms = np.concatenate([must, rest])
      lex[a, terms] = dirichlet(len(terms))
    lev = (0,) + (1,) * n_roots + tuple(l + 2 for l, s in enumerate(sizes) for _ in range(s))
    g = cls(R, lex, U, start=0, names=tuple(names), levels=lev)
    assert g.max_len <= max_len, (g.max_len, max_len)
    return g

  @staticmethod
  def _covering_pairs(rng: np.random.Generator, n_parents: int, k: int, n_kids: int) -> np.ndarray:
    """[n_parents, k, 2] distinct child pairs per parent; retries until every child is used."""
    for _ in range(1000):
      flat = np.stack([rng.choice(n_kids * n_kids, size=k, replace=False) for _ in range(n_parents)])
      pairs = np.stack([flat // n_kids, flat % n_kids], -1)
      if len(np.unique(pairs)) == n_kids:
        return pairs
    return pairs  # cannot cover (too few slots): keep the last draw

  def _rule_table(self) -> dict:
    """Flat rule table sorted by lhs (kind: 0 lexical, 1 unary, 2 binary); drives the sampler."""
    la, lt = np.nonzero(self.lexical_NxV)
    ua, ub = np.nonzero(self.unary_NxN)
    ba, bb, bc = np.nonzero(self.binary_NxNxN)
    lhs = np.concatenate([la, ua, ba])
    kind = np.concatenate([np.full(len(la), _LEX), np.full(len(ua), _UNARY), np.full(len(ba), _BINARY)])
    left = np.concatenate([lt, ub, bb])
    right = np.concatenate([np.full(len(la) + len(ua), -1), bc])
    prob = np.concatenate([self.lexical_NxV[la, lt], self.unary_NxN[ua, ub], self.binary_NxNxN[ba, bb, bc]])
    order = np.argsort(lhs, kind="stable")
    lhs, kind, left, right, prob = lhs[order], kind[order], left[order], right[order], prob[order]
    N = self.n_nonterminals
    first_N = np.searchsorted(lhs, np.arange(N), "left")
    last_N = np.searchsorted(lhs, np.arange(N), "right") - 1
    # Global CDF: lhs + cumulative prob within lhs, so one searchsorted draws rules of any lhs.
    cum = np.empty(len(prob))
    for a in range(N):  # setup only (N iterations), not a hot path
      sl = slice(first_N[a], last_N[a] + 1)
      c = np.cumsum(prob[sl]) / prob[sl].sum()
      c[-1] = 1.0
      cum[sl] = a + c
    return {"lhs": lhs, "kind": kind, "left": left, "right": right, "prob": prob, "cum": cum, "first": first_N, "last": last_N}

  # ------------------------------------------------------------------ properties

  @property
  def n_nonterminals(self) -> int:
    return self.lexical_NxV.shape[0]

  @property
  def n_terminals(self) -> int:
    return self.lexical_NxV.shape[1]

  @property
  def rules(self) -> dict:
    """Flat rule table {lhs, kind (0 lex, 1 unary, 2 binary), left, right, prob} [R]; tree rule ids index it."""
    return {k: self._rules[k] for k in ("lhs", "kind", "left", "right", "prob")}

  @property
  def max_len(self) -> float:
    """Longest possible sentence (inf for recursive grammars), from the rule structure."""
    N = self.n_nonterminals
    ml = np.where(self.lexical_NxV.sum(1) > 0, 1.0, 0.0)
    kids = self._rules
    for _ in range(N + 2):  # longest-path relaxation; still changing after N+1 rounds => cycle
      b = kids["kind"] == _BINARY
      u = kids["kind"] == _UNARY
      cand = np.zeros(N)
      np.maximum.at(cand, kids["lhs"][b], ml[kids["left"][b]] + ml[kids["right"][b]])
      np.maximum.at(cand, kids["lhs"][u], ml[kids["left"][u]])
      new = np.maximum(ml, cand)
      if np.array_equal(new, ml):
        return float(ml[self.start])
      ml = new
    return math.inf

  def expected_length(self) -> float:
    """Exact E[sentence length]: expected yields solve (I - child matrix) y = lexical mass."""
    y_N = np.linalg.solve(np.eye(self.n_nonterminals) - self._child_NxN, self.lexical_NxV.sum(1))
    return float(y_N[self.start])

  def derivation_entropy(self) -> float:
    """Exact entropy of the derivation tree (nats); >= the sentence entropy (ambiguity gap)."""
    p = self._rules["prob"]
    local_N = np.zeros(self.n_nonterminals)
    np.add.at(local_N, self._rules["lhs"], -p * np.log(p))
    h_N = np.linalg.solve(np.eye(self.n_nonterminals) - self._child_NxN, local_N)
    return float(h_N[self.start])

  # ------------------------------------------------------------------ sampling

  def sample(self, n: int, seed: int, return_trees: bool = False):
    """n iid sentences (list of int32 raw-id arrays); with return_trees also their constituents.

    Vectorised top-down: every round expands all open non-terminals of all sentences at once
    (one searchsorted draws all rules), so the number of rounds is the tree depth.
    Trees: per sentence an int32 [m, 4] array of (start, end, non-terminal, rule id) rows, one
    per node (unary nodes share their child's span), root first, then by depth and position;
    rule ids index `rules`. Same (n, seed) -> same sentences.
    """
    rng = np.random.default_rng(seed)
    ru = self._rules
    val = np.full(n, self.start, np.int64)  # symbol: non-terminal id or terminal id
    is_nt = np.ones(n, bool)
    sent = np.arange(n)
    history = []  # per round: (nt entry indices, their rules, parent map of the next frontier)
    while is_nt.any():
      nt = np.nonzero(is_nt)[0]
      lhs = val[nt]
      r = np.searchsorted(ru["cum"], lhs + rng.random(len(nt)), side="right")
      r = np.minimum(r, ru["last"][lhs])
      kind = ru["kind"][r]
      n_child = np.ones(len(val), np.int64)
      n_child[nt] = np.where(kind == _BINARY, 2, 1)
      parent = np.repeat(np.arange(len(val)), n_child)
      first = np.ones(len(parent), bool)
      first[1:] = parent[1:] != parent[:-1]
      left_val, left_nt = val.copy(), is_nt.copy()
      left_val[nt], left_nt[nt] = ru["left"][r], kind != _LEX
      right_val = np.zeros(len(val), np.int64)
      right_val[nt] = ru["right"][r]
      val = np.where(first, left_val[parent], right_val[parent])
      is_nt = np.where(first, left_nt[parent], True)
      sent = sent[parent]
      if return_trees:
        history.append((nt, r, parent))
    counts = np.bincount(sent, minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sentences = np.split(val.astype(np.int32), np.cumsum(counts)[:-1])
    if not return_trees:
      return sentences
    anc = np.arange(len(val))  # each leaf's ancestor index in the current round's frontier
    rows = []
    for nt, r, parent in reversed(history):
      anc = parent[anc]
      lo = np.searchsorted(anc, nt, "left")
      hi = np.searchsorted(anc, nt, "right")
      s = sent[lo]
      rows.append(np.stack([s, lo - offsets[s], hi - offsets[s], ru["lhs"][r], r], 1))
    rows = np.concatenate(rows[::-1])
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    trees = np.split(rows[:, 1:].astype(np.int32), np.cumsum(np.bincount(rows[:, 0], minlength=n))[:-1])
    return sentences, trees

  # The Language protocol (data/types.py): sentences, token_logprobs_batch, downstream_tasks.

  def sentences(self, n: int, seed: int) -> list[np.ndarray]:
    return self.sample(n, seed)

  def downstream_tasks(self, n: int, seed: int) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Liu's tasks A, B, C (code definitions) and task_span8 (paper definition of C, span [0, 8)) on
    the sampled sentences with 4 < n < 32; sentences whose label is undefined are dropped."""
    sents = [s for s in self.sample(n, seed) if 4 < len(s) < 32]
    out = {}
    for task in ("A", "B", "C"):
      try:
        lab = self.span_labels(sents, task, definition="code")
      except ValueError:  # e.g. a grammar without unary root rules has no code task A
        continue
      out[f"task_{task}"] = [(t, int(y)) for t, y in zip(sents, lab) if y >= 0]
    lab = self.span_labels(sents, "C", definition="paper", span_len=8)
    out["task_span8"] = [(t, int(y)) for t, y in zip(sents, lab) if y >= 0]
    return {k: v for k, v in out.items() if v}

  # ------------------------------------------------------------------ charts

  def _check_tokens(self, tok_BxL: np.ndarray) -> None:
    if tok_BxL.size and (tok_BxL.min() < 0 or tok_BxL.max() >= self.n_terminals):
      raise ValueError(f"token ids must be raw terminal ids in 0..{self.n_terminals - 1}")

  def _inside(self, tok_BxL: np.ndarray) -> np.ndarray:
    """Inside chart [B, L, L+1, N] (float64) for a batch of equal-length sentences."""
    self._check_tokens(tok_BxL)
    Bn, L = tok_BxL.shape
    N = self.n_nonterminals
    P, C = self._parents_P, self._children_C
    ucl_T = self._unary_closure_NxN.T
    inside_BxLxL1xN = np.zeros((Bn, L, L + 1, N))
    s = np.arange(L)
    inside_BxLxL1xN[:, s, s + 1] = np.moveaxis(self.lexical_NxV[:, tok_BxL], 0, -1) @ ucl_T
    for w in range(2, L + 1):
      s = np.arange(L - w + 1)[:, None, None]  # span starts   [S, 1, 1]
      d = np.arange(1, w)[None, :, None]  # split offsets [1, D, 1]
      left_BxSxDxC = inside_BxLxL1xN[:, s, s + d, C]  # (i, i+d)
      right_BxSxDxC = inside_BxLxL1xN[:, s + d, s + w, C]  # (i+d, i+w)
      pair_BxSxCxC = np.swapaxes(left_BxSxDxC, -1, -2) @ right_BxSxDxC
      bl_BxSxP = pair_BxSxCxC.reshape(Bn, L - w + 1, -1) @ self._binary_PxCC.T
      full_BxSxN = np.zeros((Bn, L - w + 1, N))
      full_BxSxN[..., P] = bl_BxSxP
      s1 = np.arange(L - w + 1)
      inside_BxLxL1xN[:, s1, s1 + w] = full_BxSxN @ ucl_T
    return inside_BxLxL1xN

  def _outside(self, inside_BxLxL1xN: np.ndarray) -> np.ndarray:
    """Outside chart [B, L, L+1, N]: outside(A, i, j) = p(w_<i, A over (i, j), w_>=j)."""
    Bn, L, _, N = inside_BxLxL1xN.shape
    P, C = self._parents_P, self._children_C
    ucl = self._unary_closure_NxN
    nC = len(C)
    pre_BxLxL1xN = np.zeros_like(inside_BxLxL1xN)  # contexts from binary parents / the root
    outside_BxLxL1xN = np.zeros_like(inside_BxLxL1xN)
    pre_BxLxL1xN[:, 0, L, self.start] = 1.0
    for w in range(L, 0, -1):
      s1 = np.arange(L - w + 1)
      out_BxSxN = pre_BxLxL1xN[:, s1, s1 + w] @ ucl  # add contexts reached through unary parents
      outside_BxLxL1xN[:, s1, s1 + w] = out_BxSxN
      if w == 1:
        break
      # T[B, C] = sum_A outside(A) R[A, B, C] for each parent span of width w.
      t_BxSxCxC = (out_BxSxN[..., P] @ self._binary_PxCC).reshape(Bn, len(s1), nC, nC)
      s = s1[:, None, None]
      d = np.arange(1, w)[None, :, None]
      left_in_BxSxDxC = inside_BxLxL1xN[:, s, s + d, C]
      right_in_BxSxDxC = inside_BxLxL1xN[:, s + d, s + w, C]
      pre_BxLxL1xN[:, s, s + d, C] += right_in_BxSxDxC @ np.swapaxes(t_BxSxCxC, -1, -2)
      pre_BxLxL1xN[:, s + d, s + w, C] += left_in_BxSxDxC @ t_BxSxCxC
    return outside_BxLxL1xN

  def _next_unnormalised(self, tok_BxL: np.ndarray, inside_BxLxL1xN: np.ndarray):
    """Unnormalised next-token masses [B, K, V] and EOS masses [B, K] for all K = L+1 prefixes.

    Adjoint prefix recursion: g_0 = e_S; h_i = g_i @ LC (left-corner closure);
    g_j += sum_B inside(B, i, j) * sum_A h_i[A] R[A, B, C] for j > i. Then
    p(prefix w_<k followed by v) = h_k . lex[:, v] and p(sentence = w_<k) = inside(S, 0, k).
    """
    Bn, L = tok_BxL.shape
    N = self.n_nonterminals
    P, C = self._parents_P, self._children_C
    nC = len(C)
    g_BxKxN = np.zeros((Bn, L + 1, N))
    h_BxKxN = np.zeros((Bn, L + 1, N))
    g_BxKxN[:, 0, self.start] = 1.0
    for i in range(L + 1):
      h_BxKxN[:, i] = g_BxKxN[:, i] @ self._left_corner_NxN
      if i == L:
        break
      m_BxCxC = (h_BxKxN[:, i][:, P] @ self._binary_PxCC).reshape(Bn, nC, nC)
      span_BxJxC = inside_BxLxL1xN[:, i, i + 1 :][:, :, C]  # inside(B, i, j) for j = i+1..L
      g_BxKxN[:, i + 1 :, C] += span_BxJxC @ m_BxCxC
    next_BxKxV = h_BxKxN @ self.lexical_NxV
    eos_BxK = np.zeros((Bn, L + 1))  # k = 0: the empty sentence has probability 0
    if L:
      eos_BxK[:, 1:] = inside_BxLxL1xN[:, 0, 1:, self.start]
    return next_BxKxV, eos_BxK

  # ------------------------------------------------------------------ exact likelihoods

  def log_prob(self, sentences: Sequence[np.ndarray]) -> np.ndarray:
    """[N] float64 log p(sentence) by the inside algorithm (batched by length)."""
    out = np.full(len(sentences), -np.inf)
    for idx, tok in _groups_by_length(sentences):
      if tok.shape[1] == 0:
        continue
      with np.errstate(divide="ignore"):
        out[idx] = np.log(self._inside(tok)[:, 0, -1, self.start])
    return out

  def next_token_distributions_batch(self, sentences: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per sentence a [n+1, V+1] array: row k = p(. | w_<k) over terminals then EOS (last col)."""
    out = [None] * len(sentences)
    for idx, tok in _groups_by_length(sentences):
      nxt_BxKxV, eos_BxK = self._next_unnormalised(tok, self._inside(tok))
      dist_BxKxV1 = np.concatenate([nxt_BxKxV, eos_BxK[..., None]], -1)
      with np.errstate(invalid="ignore", divide="ignore"):
        dist_BxKxV1 /= dist_BxKxV1.sum(-1, keepdims=True)  # nan rows after impossible prefixes
      for b, i in enumerate(idx):
        out[i] = dist_BxKxV1[b]
    return out

  def next_token_distributions(self, sentence: np.ndarray) -> np.ndarray:
    """[n+1, V+1]: exact p(w_k = v | w_<k) for k = 0..n, last column EOS; rows sum to 1."""
    return self.next_token_distributions_batch([np.asarray(sentence)])[0]

  def next_token_distribution(self, prefix: np.ndarray) -> np.ndarray:
    """[V+1]: exact next-token distribution after any prefix (last entry = EOS); sums to 1."""
    dist = self.next_token_distributions(prefix)[-1]
    if not np.all(np.isfinite(dist)):
      raise ValueError("prefix has probability 0 under the grammar")
    return dist

  def token_logprobs_batch(self, sentences: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per sentence [n+1] float64: log p(w_k | w_<k) for k < n, then log p(EOS | w)."""
    out = [None] * len(sentences)
    for idx, tok in _groups_by_length(sentences):
      L = tok.shape[1]
      nxt_BxKxV, eos_BxK = self._next_unnormalised(tok, self._inside(tok))
      z_BxK = nxt_BxKxV.sum(-1) + eos_BxK
      word_BxL = np.take_along_axis(nxt_BxKxV[:, :L], tok[..., None], -1)[..., 0]
      hit_BxK = np.concatenate([word_BxL, eos_BxK[:, L:]], 1)
      with np.errstate(divide="ignore", invalid="ignore"):
        lp_BxK = np.log(hit_BxK) - np.log(z_BxK)
      for b, i in enumerate(idx):
        out[i] = lp_BxK[b]
    return out

  def token_logprobs(self, sentence: np.ndarray) -> np.ndarray:
    """[n+1] float64: exact log p(w_k | w_<k) for each word, then log p(EOS | w)."""
    return self.token_logprobs_batch([np.asarray(sentence)])[0]

  def masked_conditionals_batch(self, sentences: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per sentence [n, V]: p(w_i = v | w_{-i}) (sentence length known), by inside-outside."""
    out = [None] * len(sentences)
    for idx, tok in _groups_by_length(sentences):
      L = tok.shape[1]
      outside = self._outside(self._inside(tok))
      s = np.arange(L)
      cond_BxLxV = outside[:, s, s + 1] @ self.lexical_NxV
      with np.errstate(invalid="ignore"):
        cond_BxLxV /= cond_BxLxV.sum(-1, keepdims=True)
      for b, i in enumerate(idx):
        out[i] = cond_BxLxV[b]
    return out

  def masked_conditionals(self, sentence: np.ndarray) -> np.ndarray:
    """[n, V]: exact p(w_i = v | w_{-i}) for every position i (the masked-LM optimum)."""
    return self.masked_conditionals_batch([np.asarray(sentence)])[0]

  # ------------------------------------------------------------------ entropy

  def enumerate_sentences(self, max_len: int | None = None, limit: int = 200_000):
    """All sentences of length <= max_len with p > 0, and their log-probs (tiny grammars only)."""
    if max_len is None and math.isinf(self.max_len):
      raise ValueError("recursive grammar: its sentences are unbounded, pass max_len")
    max_len = int(self.max_len if max_len is None else max_len)
    V = self.n_terminals
    if sum(V**n for n in range(1, max_len + 1)) > limit:
      raise ValueError(f"{V} terminals up to length {max_len} is too many strings to enumerate")
    sents = [np.array(t, np.int64).reshape(-1) for n in range(1, max_len + 1) for t in np.ndindex(*(V,) * n)]
    lp = self.log_prob(sents)
    keep = np.isfinite(lp)
    return [s for s, k in zip(sents, keep) if k], lp[keep]

  def entropy_rate(self, n_samples: int = 2000, seed: int = 0, exact: bool = False, mlm: bool = True) -> dict:
    """Optimal causal-LM and masked-LM losses (nats per predicted token).

    causal_loss = sum_x -log p(x) / sum_x (n_x + 1) (EOS predicted too): the cross-entropy of the
    exact next-token model on iid sentences, a ratio estimator with delta-method SE and 95% CI.
    mlm_loss = mean over positions of -log p(w_i | w_{-i}). exact=True enumerates every sentence
    (tiny grammars) and weights by p(x) instead of sampling: then se = 0.
    """
    if exact:
      sents, lp = self.enumerate_sentences()
      w = np.exp(lp)
      mass = float(w.sum())
      lens = np.array([len(s) for s in sents], np.float64)
      res = {
        "method": "exact",
        "n_sentences": len(sents),
        "mass": mass,
        "causal_loss": float(np.sum(w * -lp) / np.sum(w * (lens + 1))),
        "causal_loss_se": 0.0,
        "sentence_entropy": float(np.sum(w * -lp)),
        "sentence_entropy_se": 0.0,
        "mean_len": float(np.sum(w * lens)),
      }
      res["causal_loss_ci95"] = (res["causal_loss"],) * 2
      if mlm:
        cond = self.masked_conditionals_batch(sents)
        nll = np.array([-np.log(c[np.arange(len(s)), s]).sum() for s, c in zip(sents, cond)])
        res["mlm_loss"] = float(np.sum(w * nll) / np.sum(w * lens))
        res["mlm_loss_se"] = 0.0
        res["mlm_loss_ci95"] = (res["mlm_loss"],) * 2
      return res
    sents = self.sample(n_samples, seed)
    tlp = self.token_logprobs_batch(sents)
    nll_M = np.array([-t.sum() for t in tlp])
    lens_M = np.array([len(s) for s in sents], np.float64)
    causal = ratio_stats(nll_M, lens_M + 1)
    res = {
      "method": "sampled",
      "n_sentences": n_samples,
      "seed": seed,
      "causal_loss": causal["mean"],
      "causal_loss_se": causal["se"],
      "causal_loss_ci95": causal["ci95"],
      "sentence_entropy": float(nll_M.mean()),
      "sentence_entropy_se": float(nll_M.std(ddof=1) / np.sqrt(n_samples)) if n_samples > 1 else float("nan"),
      "mean_len": float(lens_M.mean()),
    }
    if mlm:
      cond = self.masked_conditionals_batch(sents)
      mnll_M = np.array([-np.log(c[np.arange(len(s)), s]).sum() for s, c in zip(sents, cond)])
      m = ratio_stats(mnll_M, lens_M)
      res.update({"mlm_loss": m["mean"], "mlm_loss_se": m["se"], "mlm_loss_ci95": m["ci95"]})
    return res

  # ------------------------------------------------------------------ downstream labels

  def label_classes(self, task: str, definition: str = "code") -> np.ndarray:
    """Non-terminal ids of the classes of `span_labels` (labels index this array).

    Code task A: the start symbol's unary children (S1..S9; 9-way). Otherwise every non-terminal
    except the start symbol when the start symbol never occurs on a right-hand side (it can only
    label the whole sentence; Liu's CYK table never holds it either).
    """
    if definition not in ("code", "paper"):
      raise ValueError(f"definition must be 'code' or 'paper', not {definition!r}")
    if task not in ("A", "B", "C"):
      raise ValueError(f"task must be 'A', 'B' or 'C', not {task!r}")
    if definition == "code" and task == "A":
      kids = np.nonzero(self.unary_NxN[self.start])[0]
      if not len(kids):
        raise ValueError("code task A needs unary root rules S -> S_k")
      return kids
    N = self.n_nonterminals
    on_rhs = (self.binary_NxNxN.sum((0, 2)) + self.binary_NxNxN.sum((0, 1)) + self.unary_NxN.sum(0)) > 0
    return np.array([a for a in range(N) if a != self.start or on_rhs[self.start]])

  def span_labels(
    self,
    sentences: Sequence[np.ndarray],
    task: str = "B",
    definition: str = "code",
    span_len: int | None = None,
    span_start: int = 0,
  ) -> np.ndarray:
    """[N] int32 labels (indices into `label_classes(task, definition)`; -1 = undefined).

    definition='code' (Liu's generate_downstream.py): A = argmax over S_k of inside(S_k, 0, n)
    (unweighted by p(S -> S_k), as in the code); B / C = argmax over non-terminals of
    inside(A, 0, 4) / inside(A, 0, 2). Liu keeps only sentences with 4 < n < 32: filter yourself.
    definition='paper': the most probable non-terminal of the span (span_start, span_start +
    span_len): argmax_A inside(A, i, j) * outside(A, i, j) (posterior that a node labelled A spans
    it, marginalising over parses); span_len defaults to the paper's 32 / 16 / 8 for A / B / C.
    A label is -1 when the sentence is shorter than the span or no non-terminal can produce it
    (Liu's code would then return its first key). Ties go to the lowest class index.
    """
    classes = self.label_classes(task, definition)
    out = np.full(len(sentences), -1, np.int32)
    if definition == "code":
      i0, k = 0, (None if task == "A" else (span_len or CODE_PREFIX_LEN[task]))
    else:
      i0, k = span_start, (span_len or PAPER_SPAN_LEN[task])
    for idx, tok in _groups_by_length(sentences):
      L = tok.shape[1]
      j = L if k is None else i0 + k
      if L == 0 or j > L or i0 < 0:
        continue
      inside = self._inside(tok)
      score_BxN = inside[:, i0, j]
      if definition == "paper":
        score_BxN = score_BxN * self._outside(inside)[:, i0, j]
      score_BxK = score_BxN[:, classes]
      lab = np.argmax(score_BxK, 1).astype(np.int32)
      lab[score_BxK.max(1) <= 0] = -1
      out[idx] = lab
    return out

  # ------------------------------------------------------------------ summary

  def describe(self, n_samples: int = 500, seed: int = 0) -> dict:
    """Summary numbers for logging; the entropy rate is estimated from n_samples (0 = skip)."""
    ru = self._rules
    d = {
      "n_nonterminals": self.n_nonterminals,
      "n_terminals": self.n_terminals,
      "n_binary_rules": int(np.sum(ru["kind"] == _BINARY)),
      "n_lexical_rules": int(np.sum(ru["kind"] == _LEX)),
      "n_unary_rules": int(np.sum(ru["kind"] == _UNARY)),
      "max_len": self.max_len,
      "mean_len": self.expected_length(),
      "derivation_entropy": self.derivation_entropy(),
    }
    if n_samples:
      e = self.entropy_rate(n_samples=n_samples, seed=seed)
      d.update({k: e[k] for k in ("causal_loss", "causal_loss_se", "sentence_entropy", "mlm_loss", "mlm_loss_se")})
    return d
