"""Synthetic languages by spec, and their examples: {"tokens": framed int32 [n+2], "true_logprob": float32 [n+1]}.

Kinds: bigram (data/bigram.py), pcfg (data/pcfg.py), hmm (data/hmm.py); each implements the
`Language` protocol of data/types.py, and everything here uses only that protocol.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from data import vocab
from data.bigram import Bigram
from data.hmm import HMM
from data.pcfg import PCFG
from data.types import DataError, Language

# kind -> constructor from the spec's language parameters.
LANGUAGES: dict[str, Callable[..., Language]] = {"bigram": Bigram.random, "pcfg": PCFG.random, "hmm": HMM.random}

# Keys of a source spec that describe the dataset rather than the language's parameters.
NON_LANGUAGE_KEYS = {
  "kind",
  "n_train",
  "n_validation",
  "n_test",
  "n_downstream",
  "sample_seed",  # offset of every split's sampling seed: the same language, other sentences (default 0)
  "name",
  "data_dir",
  "path",
  "feature",
  "tokenizer",
  "vocab_size",
  "split_map",
  "true_logprob_splits",
}


def language(spec) -> Any:
  """The language object for a synthetic source spec (bigram / pcfg / hmm)."""
  kind = spec["kind"]
  if kind not in LANGUAGES:
    raise DataError(f"{kind!r} is not a synthetic language kind")
  params = {k: v for k, v in dict(spec).items() if k not in NON_LANGUAGE_KEYS}
  return LANGUAGES[kind](**params)


def synthetic_examples(lang: Language, n: int, sample_seed: int, with_true: bool) -> list[dict]:
  """Samples n sentences and frames them; exact per-target log-probs when `with_true`."""
  sents = lang.sentences(n, sample_seed)
  out = [{"tokens": vocab.frame(s)} for s in sents]
  if with_true:
    for ex, lp in zip(out, lang.token_logprobs_batch(sents)):
      ex["true_logprob"] = np.asarray(lp, np.float32).reshape(-1)
  return out


def downstream_tasks(lang: Language, n: int, seed: int) -> dict[str, list[dict]]:
  """{split name: [{tokens, label}]} for a language's latent-structure tasks (none for bigram)."""
  if n <= 0:
    return {}
  return {k: [{"tokens": vocab.frame(t), "label": int(y)} for t, y in v] for k, v in lang.downstream_tasks(n, seed).items()}
