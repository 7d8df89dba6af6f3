"""Liu et al.'s adversarial pre-training objective (App. A.4): keep the loss, hurt transfer.

  minimise  L_pretrain(θ) − λ · L_head(θ)

L_head is the validation loss of a downstream head fitted on a *disjoint* split: at every step, a fresh
random draw of 2·k examples of the task's adversarial part (examples [70%, 80%) of the task split, kept
apart from the probe's train and test parts in analysis/downstream.py) is cut in two halves A and B;
a ridge-regression head is fitted in closed form on A's features (final-layer states of the word
positions, concatenated, as the probe uses) to the centred one-hot labels, and L_head is its mean
squared error on B. The closed form is differentiable, so the gradient of −λ·L_head pushes the
representation to make the task hard for a linear read-out while the MLM/CLM loss keeps its value.
The ridge strength is relative to the kernel's mean diagonal, so rescaling the features does not help
the adversary. (The paper's head and inner loop are not released; this is our reading, see README.)

Config: `adversarial.weight` (λ, 0 = off), `adversarial.task`, `adversarial.examples` (k), `adversarial.ridge`.
Legend: P pool examples, K = 2k drawn, L length, D width, C classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data import vocab
from lib import errors
from lib import model as M

PARTS = {"train": (0.0, 0.7), "adversarial": (0.7, 0.8), "test": (0.8, 1.0)}  # of every task split


def part_examples(src, part: str) -> list[dict]:
  """The examples of one part of a task split (index ranges of PARTS)."""
  n = len(src)
  lo, hi = (int(round(f * n)) for f in PARTS[part])
  return [src[i] for i in range(lo, hi)]


def pad_tokens(exs) -> tuple[np.ndarray, np.ndarray]:
  L = max(len(e["tokens"]) for e in exs)
  tok = np.zeros((len(exs), L), np.int32)
  for i, e in enumerate(exs):
    tok[i, : len(e["tokens"])] = e["tokens"]
  return tok, np.array([int(e["label"]) for e in exs], np.int32)


def head_loss(model, params, tok_KxL, y_K, n_classes: int, ridge: float) -> jax.Array:
  """MSE on half B of a ridge head fitted (closed form, dual) on half A; K even."""
  seg = (tok_KxL != vocab.PAD).astype(jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(tok_KxL.shape[1], dtype=jnp.int32), tok_KxL.shape)
  h_KxLxD = M.hidden(model, params, {"inputs": tok_KxL, "positions": pos, "segment_ids": seg}).astype(jnp.float32)
  word = (tok_KxL >= vocab.N_SPECIAL).astype(jnp.float32)[..., None]
  X = (h_KxLxD * word)[:, 1:-1].reshape(tok_KxL.shape[0], -1)
  k = tok_KxL.shape[0] // 2
  Xa, Xb = X[:k], X[k:]
  Y = jax.nn.one_hot(y_K, n_classes)
  Ya, Yb = Y[:k] - Y[:k].mean(0), Y[k:] - Y[:k].mean(0)
  K = Xa @ Xa.T
  alpha = ridge * jnp.trace(K) / k + 1e-6
  pred = Xb @ Xa.T @ jnp.linalg.solve(K + alpha * jnp.eye(k), Ya)
  return jnp.mean(jnp.sum((pred - Yb) ** 2, -1))


def from_config(cfg, groups, model):
  """extra_loss(params, key) -> (−λ·L_head, metrics) for lib.steps.train_step, or None when λ = 0."""
  a = cfg.get("adversarial")
  if a is None or not a.weight:
    return None
  src = groups[0].splits.get(a.task)
  if src is None:
    tasks = sorted(k for k in groups[0].splits if k.startswith("task_"))
    raise errors.ConfigError(f"adversarial.task={a.task!r} is not a task split of the data; it has {tasks or 'none'}")
  exs = part_examples(src, "adversarial")
  k = int(a.examples)
  if len(exs) < 2 * k or k < 2:
    raise errors.ConfigError(
      f"adversarial.examples={k}: the {a.task} adversarial part has {len(exs)} examples, needs >= 2·k and k >= 2"
    )
  tok, y = pad_tokens(exs)
  n_classes = int(y.max()) + 1
  tok_PxL, y_P = jnp.asarray(tok), jnp.asarray(y)
  lam, ridge, P = float(a.weight), float(a.ridge), len(y)

  def extra_loss(params, key):
    idx = jax.random.choice(jax.random.fold_in(key, 0xAD), P, (2 * k,), replace=False)
    lh = head_loss(model, params, tok_PxL[idx], y_P[idx], n_classes, ridge)
    return -lam * lh, {"train/adv_head_loss": lh}

  return extra_loss
