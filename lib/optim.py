"""Optax optimizers and learning-rate schedules built from the `opt` config section."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "sgd", "adafactor", "lion")
SCHEDULES = ("cosine", "linear", "constant", "inverse_sqrt")


def lr_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then the named decay down to `lr * final_lr_frac`.

  `opt.warmup_from_zero=True` (default, unchanged behaviour): the warmup starts at 0, so the first
  update is a no-op and the step-1 checkpoint equals step 0. False (Pythia/GPT-NeoX style): update k
  (k = 1..warmup) uses lr·k/warmup, so step 1 is a real point of the trajectory.
  """
  lr, warm = float(opt_cfg.lr), int(opt_cfg.warmup_steps)
  end = lr * float(opt_cfg.final_lr_frac)
  decay_steps = max(total_steps - warm, 1)
  name = opt_cfg.schedule
  if name not in SCHEDULES:
    raise ValueError(f"opt.schedule={name!r} is not one of {SCHEDULES}")
  if name == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif name == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif name == "constant":
    decay = optax.constant_schedule(lr)
  else:  # inverse square root, continuous at the end of warmup
    decay = lambda s: lr * jnp.sqrt(max(warm, 1) / (jnp.maximum(s, 0) + max(warm, 1)))  # noqa: E731
  if warm == 0:
    return decay
  if opt_cfg.get("warmup_from_zero", True):
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])
  warmup = lambda count: lr * jnp.minimum(count + 1, warm) / warm  # noqa: E731 - count = updates done so far
  return optax.join_schedules([warmup, decay], [warm])


def _decay_mask(params):
  """Weight decay on matrices only (not biases, norm scales)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  sched = lr_schedule(opt_cfg, total_steps)
  name = opt_cfg.name
  if name not in OPTIMIZERS:
    raise ValueError(f"opt.name={name!r} is not one of {OPTIMIZERS}")
  wd = float(opt_cfg.weight_decay)
  if name == "adamw":
    tx = optax.adamw(sched, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=wd, mask=_decay_mask)
  elif name == "sgd":
    m = float(opt_cfg.momentum)
    tx = optax.chain(
      optax.add_decayed_weights(wd, _decay_mask) if wd else optax.identity(),
      optax.sgd(sched, momentum=m or None, nesterov=bool(opt_cfg.nesterov) and m > 0),
    )
  elif name == "adafactor":
    tx = optax.adafactor(sched, weight_decay_rate=wd or None, weight_decay_mask=_decay_mask)
  else:
    tx = optax.lion(sched, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=wd, mask=_decay_mask)
  if opt_cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(float(opt_cfg.grad_clip)), tx)
  return tx, sched
