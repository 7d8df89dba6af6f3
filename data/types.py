"""Leaf module: the data layer's shared types (no imports from the rest of lmtrace but lib/errors).

Source    anything random-access: `len(src)` and `src[i] -> {"tokens": int32 [n] framed [BOS ... EOS],
          optional "true_logprob": float32 [n-1], optional "label": int}` (a `tfds.data_source`,
          a `ListSource`, a grain MapDataset, `pipeline.RaggedSource`).
Group     one data group: its name, sources per split, vocabulary size and what is known about it.
Language  a synthetic language with exact likelihoods (PCFG, HMM, bigram): sample sentences, their
          exact per-token log-probs, and latent-structure downstream tasks. The dataset builders
          use only this protocol, never a class name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from lib.errors import DataError

__all__ = ["DataError", "Group", "Language", "ListSource", "Source"]


@runtime_checkable
class Source(Protocol):
  def __len__(self) -> int: ...

  def __getitem__(self, i: int) -> dict: ...


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


@runtime_checkable
class Language(Protocol):
  """A synthetic language with exact likelihoods over raw terminal ids 0..n_terminals-1."""

  @property
  def n_terminals(self) -> int: ...

  def sentences(self, n: int, seed: int) -> list[np.ndarray]:
    """n iid sentences (int32 raw ids each); same (n, seed) -> same sentences."""
    ...

  def token_logprobs_batch(self, sentences: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per sentence of n words, [n+1]: log p(w_k | w_<k) for every word, then log p(EOS | w)."""
    ...

  def downstream_tasks(self, n: int, seed: int) -> dict[str, list[tuple[np.ndarray, int]]]:
    """{task split name: [(raw sentence, label)]} from n sentences sampled with `seed` ({} if none)."""
    ...
