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

Module layout (no import cycles; `python -m lib.import_graph` checks): leaves data/types.py (Group,
ListSource, the Source and Language protocols), data/vocab.py, data/estimates.py; languages
data/bigram.py, data/pcfg.py, data/hmm.py; data/languages.py (spec -> language, examples, tasks, by
the Language protocol only); builders data/tfds_builders.py and data/text.py; this module on top.
Group, ListSource, Bigram, language, synthetic_examples stay importable from here.
"""

from __future__ import annotations

from data import text, tfds_builders
from data.bigram import Bigram  # noqa: F401  (re-exported)
from data.languages import NON_LANGUAGE_KEYS, language, synthetic_examples  # noqa: F401  (re-exported)
from data.types import DataError, Group, ListSource  # noqa: F401  (re-exported)

KINDS = ("bigram", "pcfg", "hmm", "text", "tfds")
SPLITS = ("train", "validation", "test")


def make_group(name: str, spec, data_dir: str | None) -> Group:
  """Builds (or opens the cached TFDS build of) one group's splits."""
  spec = dict(spec)
  kind = spec.get("kind")
  if kind not in KINDS:
    raise DataError(f"data group {name!r}: unknown kind {kind!r}; valid kinds: {KINDS}")
  if kind in ("bigram", "pcfg", "hmm"):
    return tfds_builders.synthetic_group(name, spec, data_dir)
  if kind == "text":
    return text.text_group(name, spec, data_dir)
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
