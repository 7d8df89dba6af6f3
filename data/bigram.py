"""A tiny first-order Markov language with exact conditionals (fast; tests)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


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

  # The Language protocol (data/types.py).
  def sentences(self, n: int, seed: int) -> list[np.ndarray]:
    return self.sample(n, seed)

  def token_logprobs_batch(self, sentences: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [self.token_logprobs(s) for s in sentences]

  def downstream_tasks(self, n: int, seed: int) -> dict[str, list[tuple[np.ndarray, int]]]:
    return {}  # no latent structure
