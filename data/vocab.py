"""Token-id layout shared by every lmtrace language and the trainer.

Synthetic languages (PCFG, HMM) produce *raw* terminal ids 0..n_terminals-1. The model sees
them shifted by N_SPECIAL, framed as [BOS, w_1+N_SPECIAL, ..., w_n+N_SPECIAL, EOS]. Training
pairs a framed sentence's inputs = framed[:-1] with targets = framed[1:], so a sentence of n
words has n+1 predicted tokens (the last one is EOS).
"""

import numpy as np

PAD, BOS, EOS, MASK = 0, 1, 2, 3
N_SPECIAL = 4


def vocab_size(n_terminals: int) -> int:
  """Model vocabulary size for a language with `n_terminals` raw terminals."""
  return n_terminals + N_SPECIAL


def frame(raw_tokens) -> np.ndarray:
  """Raw terminal ids [n] -> model ids [n+2] = [BOS, ..., EOS] (int32)."""
  raw = np.asarray(raw_tokens, dtype=np.int32)
  return np.concatenate([[BOS], raw + N_SPECIAL, [EOS]]).astype(np.int32)


def unframe(model_tokens) -> np.ndarray:
  """Inverse of `frame`: drops BOS/EOS/PAD and shifts back to raw ids."""
  t = np.asarray(model_tokens)
  return (t[t >= N_SPECIAL] - N_SPECIAL).astype(np.int32)
