"""Named data sources for the trainer: a `data` config section -> random-access sources per split.

Kinds:
  bigram  a tiny first-order Markov language with exact conditionals (fast; tests)
  pcfg    random PCFG (data/pcfg.py), exact next-token log-probs by prefix probabilities
  hmm     random HMM (data/hmm.py), exact log-probs by the forward algorithm
  text    a user's text files (data/text.py), byte-level or SentencePiece
  tfds    any prepared TFDS dataset in a data_dir, by name and feature key

Synthetic kinds are materialised as TFDS array_record datasets (data/tfds_builders.py) under
`data_dir` on first use and read back with `tfds.data_source` (random access, no TensorFlow).
Every example is {"tokens": framed int32 [n], "true_logprob": float32 [n-1] where known}.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from data import vocab
from data.pipeline import DataError

KINDS = ("bigram", "pcfg", "hmm", "text", "tfds")
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class Group:
  """One data group: its name, random-access sources per split, and what is known about it."""

  name: str
  splits: dict[str, Any]
  vocab_size: int
  info: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. optimal_loss, its stderr


class ListSource:
  """In-memory random-access source (a list of example dicts)."""

  def __init__(self, examples: Sequence[dict]):
    self.examples = list(examples)

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i: int) -> dict:
    return self.examples[i]


@dataclasses.dataclass(frozen=True)
class Bigram:
  """A random first-order Markov chain over n_terminals words with a stop probability.

  Sentences: w_1 ~ init, w_{k+1} ~ trans[w_k], stop after each word with prob `stop` (max_len cap).
  Exact: log p(w_k | w_<k) and log p(EOS | w) are read off the parameters.
  """

  init_V: np.ndarray
  trans_VxV: np.ndarray
  stop: float
  max_len: int

  @classmethod
  def random(
    cls, seed: int = 0, n_terminals: int = 16, stop: float = 0.15, max_len: int = 24, concentration: float = 0.3
  ) -> "Bigram":
    rng = np.random.default_rng(seed)
    return cls(
      rng.dirichlet(np.full(n_terminals, concentration)),
      rng.dirichlet(np.full(n_terminals, concentration), size=n_terminals),
      stop,
      max_len,
    )

  @property
  def n_terminals(self) -> int:
    return len(self.init_V)

  def sample(self, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    cum = np.cumsum(self.trans_VxV, axis=1)
    for _ in range(n):
      w = [int(rng.choice(self.n_terminals, p=self.init_V))]
      while len(w) < self.max_len and rng.random() >= self.stop:
        w.append(min(int(np.searchsorted(cum[w[-1]], rng.random())), self.n_terminals - 1))
      out.append(np.asarray(w, np.int32))
    return out

  def token_logprobs(self, w: np.ndarray) -> np.ndarray:
    """[n+1]: log p(w_k | w_<k) for every word, then log p(EOS | w)."""
    w = np.asarray(w)
    lp = [np.log(self.init_V[w[0]])]
    for a, b in zip(w[:-1], w[1:]):
      lp.append(np.log1p(-self.stop) + np.log(self.trans_VxV[a, b]))
    lp.append(0.0 if len(w) >= self.max_len else np.log(self.stop))
    return np.asarray(lp, np.float64)


def language(spec) -> Any:
  """The language object for a synthetic source spec (bigram / pcfg / hmm)."""
  kind = spec["kind"]
  params = {k: v for k, v in dict(spec).items() if k not in NON_LANGUAGE_KEYS}
  if kind == "bigram":
    return Bigram.random(**params)
  if kind == "pcfg":
    from data import pcfg

    return pcfg.PCFG.random(**params)
  if kind == "hmm":
    from data import hmm

    return hmm.HMM.random(**params)
  raise DataError(f"{kind!r} is not a synthetic language kind")


# Keys of a source spec that describe the dataset rather than the language's parameters.
NON_LANGUAGE_KEYS = {
  "kind",
  "n_train",
  "n_validation",
  "n_test",
  "n_downstream",
  "name",
  "data_dir",
  "path",
  "feature",
  "tokenizer",
  "vocab_size",
  "split_map",
  "true_logprob_splits",
}


def synthetic_examples(lang, n: int, sample_seed: int, with_true: bool) -> list[dict]:
  """Samples n sentences and frames them; exact per-target log-probs when `with_true`."""
  sents = lang.sample(n, sample_seed)
  if isinstance(sents, tuple):  # HMM returns (tokens [n, L], states [n, L])
    sents = list(sents[0])
  out = [{"tokens": vocab.frame(s)} for s in sents]
  if with_true:
    if hasattr(lang, "token_logprobs_batch"):  # vectorised over sentences (PCFG)
      lps = lang.token_logprobs_batch(sents)
    elif _is_hmm(lang):
      lps = list(lang.token_logprobs(np.stack(sents)))
    else:
      lps = [lang.token_logprobs(s) for s in sents]
    for ex, lp in zip(out, lps):
      ex["true_logprob"] = np.asarray(lp, np.float32).reshape(-1)
  return out


def _is_hmm(lang) -> bool:
  return type(lang).__name__ == "HMM"


def make_group(name: str, spec, data_dir: str | None) -> Group:
  """Builds (or opens the cached TFDS build of) one group's splits."""
  spec = dict(spec)
  kind = spec.get("kind")
  if kind not in KINDS:
    raise DataError(f"data group {name!r}: unknown kind {kind!r}; valid kinds: {KINDS}")
  if kind in ("bigram", "pcfg", "hmm"):
    from data import tfds_builders

    return tfds_builders.synthetic_group(name, spec, data_dir)
  if kind == "text":
    from data import text

    return text.text_group(name, spec, data_dir)
  from data import tfds_builders

  return tfds_builders.catalog_group(name, spec, data_dir)


def make_groups(data_cfg) -> list[Group]:
  """All groups of a data config: `data.groups` if non-empty, else the single `data.source`."""
  groups_cfg = data_cfg.get("groups") or {}
  specs = dict(groups_cfg) if len(groups_cfg) else {"main": data_cfg.source}
  groups = [make_group(n, s, data_cfg.get("data_dir") or None) for n, s in specs.items()]
  vs = {g.vocab_size for g in groups}
  if len(vs) != 1:
    raise DataError(f"data groups disagree on vocabulary size: {{{', '.join(f'{g.name}: {g.vocab_size}' for g in groups)}}}")
  return groups


def select_split(group: Group, split: str):
  if split not in group.splits:
    raise DataError(f"data group {group.name!r} has no split {split!r}; it has {sorted(group.splits)}")
  return group.splits[split]
