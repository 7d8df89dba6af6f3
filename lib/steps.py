"""Pure train / eval step functions (jitted at the call site with shardings and donation).

State is a dict pytree: params, opt_state, step (int32 []), rng (uint32 [2]), mixture (controller
state). Legend: B batch, L length, A gradient-accumulation microbatches, G groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from lib import model as M


def _sums(loss_BxL, batch, num_groups: int) -> dict:
  """Loss sums and token counts (total, per group, and the exact optimum where known)."""
  mask_BxL = batch["mask"].astype(jnp.float32)
  out = {"loss_sum": loss_BxL.sum(), "tokens": mask_BxL.sum()}
  if "true_logprob" in batch:
    out["true_nll_sum"] = -(batch["true_logprob"] * mask_BxL).sum()
  if num_groups > 1:
    g_B = batch["group"]
    out["group_loss_sum"] = jax.ops.segment_sum(loss_BxL.sum(1), g_B, num_segments=num_groups)
    out["group_tokens"] = jax.ops.segment_sum(mask_BxL.sum(1), g_B, num_segments=num_groups)
    if "true_logprob" in batch:
      out["group_true_nll_sum"] = jax.ops.segment_sum(-(batch["true_logprob"] * mask_BxL).sum(1), g_B, num_segments=num_groups)
  return out


def train_step(
  state: dict,
  batch: dict,
  *,
  model: M.Transformer,
  tx: optax.GradientTransformation,
  schedule,
  grad_accum: int = 1,
  num_groups: int = 1,
  extra_loss=None,
) -> tuple[dict, dict]:
  """One optimizer update on the mean per-token loss of the whole (accumulated) batch.

  extra_loss(params, key) -> (scalar, metrics), optional: added to the objective (its gradient is added
  to the mean-loss gradient), e.g. data/adversarial.py's −λ·(downstream head loss).
  """
  rng = jax.random.fold_in(state["rng"], state["step"])
  deterministic = not model.cfg.dropout

  def loss_sum(params, mb, key):
    loss_BxL = M.per_token_loss(model, params, mb, deterministic=deterministic, rngs=None if deterministic else {"dropout": key})
    return loss_BxL.sum(), _sums(loss_BxL, mb, num_groups)

  grad_fn = jax.grad(loss_sum, has_aux=True)
  if grad_accum == 1:
    grads, sums = grad_fn(state["params"], batch, rng)
  else:

    def split(x):  # row i*A + a -> microbatch a, so each device's rows feed every microbatch
      return jnp.swapaxes(x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]), 0, 1)

    micro = jax.tree.map(split, batch)

    def body(carry, xs):
      mb, i = xs
      g, s = grad_fn(state["params"], mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (g, s)), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state["params"], jax.tree.map(lambda x: x[0], micro), rng))
    (grads, sums), _ = jax.lax.scan(body, zero, (micro, jnp.arange(grad_accum)))
  n_tok = jnp.maximum(sums["tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / n_tok, grads)
  extra_metrics = {}
  if extra_loss is not None:
    g_extra, extra_metrics = jax.grad(extra_loss, has_aux=True)(state["params"], rng)
    grads = jax.tree.map(jnp.add, grads, g_extra)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {
    "train/loss": sums["loss_sum"] / n_tok,
    "train/grad_norm": optax.tree.norm(grads),
    "train/lr": schedule(state["step"]),
    "train/tokens": sums["tokens"],
    "train/param_norm": optax.tree.norm(params),
    **extra_metrics,
  }
  if "true_nll_sum" in sums:
    metrics["train/excess_loss"] = (sums["loss_sum"] - sums["true_nll_sum"]) / n_tok
  if num_groups > 1:
    metrics["train/group_loss"] = sums["group_loss_sum"] / jnp.maximum(sums["group_tokens"], 1.0)
    metrics["train/group_tokens"] = sums["group_tokens"]
  new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
  return new_state, metrics


def eval_step(params, batch: dict, *, model: M.Transformer, num_groups: int = 1) -> dict:
  """Loss sums for one held-out batch (summed over batches on the host, then normalised)."""
  return _sums(M.per_token_loss(model, params, batch), batch, num_groups)


def finish_eval(sums: dict, group_names=None) -> dict:
  """Summed eval outputs (numpy) -> flat metrics: loss, optimum, excess, per-group versions."""
  n = max(float(sums["tokens"]), 1.0)
  out = {"eval/loss": float(sums["loss_sum"]) / n, "eval/tokens": float(sums["tokens"])}
  if "true_nll_sum" in sums:
    out["eval/optimal_loss"] = float(sums["true_nll_sum"]) / n
    out["eval/excess_loss"] = out["eval/loss"] - out["eval/optimal_loss"]
  if "group_loss_sum" in sums and group_names:
    for i, g in enumerate(group_names):
      gn = max(float(sums["group_tokens"][i]), 1.0)
      out[f"eval/{g}/loss"] = float(sums["group_loss_sum"][i]) / gn
      if "group_true_nll_sum" in sums:
        out[f"eval/{g}/optimal_loss"] = float(sums["group_true_nll_sum"][i]) / gn
        out[f"eval/{g}/excess_loss"] = out[f"eval/{g}/loss"] - out[f"eval/{g}/optimal_loss"]
  return out


def _group_losses(params, batch, *, model, num_groups: int, key=None):
  """Per-group mean token losses ℓ_G, the usual sums (for metrics) and the per-token losses."""
  deterministic = not model.cfg.dropout
  loss_BxL = M.per_token_loss(model, params, batch, deterministic=deterministic, rngs=None if deterministic else {"dropout": key})
  sums = _sums(loss_BxL, batch, num_groups)
  return sums["group_loss_sum"] / jnp.maximum(sums["group_tokens"], 1.0), (sums, loss_BxL)


def group_excess(loss_BxL, ref_BxL, batch, num_groups: int):
  """DoReMi's per-group excess loss from per-token losses: Σ_tokens∈g max(ℓ − ℓ_ref, 0) / #tokens∈g."""
  mask_BxL = batch["mask"].astype(jnp.float32)
  ex_B = (jnp.maximum(loss_BxL - ref_BxL, 0.0) * mask_BxL).sum(1)
  tok_G = jax.ops.segment_sum(mask_BxL.sum(1), batch["group"], num_segments=num_groups)
  return jax.ops.segment_sum(ex_B, batch["group"], num_segments=num_groups) / jnp.maximum(tok_G, 1.0)


def doremi_weights(logw_G, group_loss_G, ref_G, mu: float, eps: float):
  """DoReMi's update from per-group losses: excess = max(ℓ − ℓ_ref, 0), then doremi_weights_from_excess."""
  return doremi_weights_from_excess(logw_G, jnp.maximum(group_loss_G - ref_G, 0.0), mu, eps)


def doremi_weights_from_excess(logw_G, excess_G, mu: float, eps: float):
  """One DoReMi step (Xie et al. 2023, Alg. 1): α_t = (1−ε)·normalise(α_{t−1}·exp(μ·excess)) + ε/G.

  `logw_G` is log α_{t−1}, the log of the previous *smoothed* weights (any constant offset is harmless:
  zeros = uniform), so the smoothing feeds back into the next step as in the paper and the released
  trainers. Returns (log α_t, α_t)."""
  w_G = (1.0 - eps) * jax.nn.softmax(logw_G + mu * excess_G) + eps / logw_G.shape[0]
  return jnp.log(w_G), w_G


def doge_weights(logw_G, grads_GxP, lr, mu: float, g_val_P=None):
  """DoGE's update from flattened per-group training gradients g_G and the target (validation) gradient
  g_val (None: the mean of g_G, the same batch's groups): s = clip(lr·⟨g_G, g_val⟩ / mean_g ‖g_g‖, 0, 5·lr);
  log w += s/μ; w = softmax(log w). Returns (log w, w)."""
  if g_val_P is None:
    g_val_P = grads_GxP.mean(0)
  norm_mean = jnp.maximum(jnp.linalg.norm(grads_GxP, axis=1).mean(), 1e-12)
  s_G = jnp.clip(lr * (grads_GxP @ g_val_P) / norm_mean, 0.0, 5.0 * lr)
  logw_G = logw_G + s_G / mu
  return logw_G, jax.nn.softmax(logw_G)


def clip_rows(x_GxP, max_norm: float):
  """Each row scaled to norm <= max_norm (torch's clip_grad_norm_ per row); max_norm <= 0: unchanged.
  Returns (clipped rows, per-row scale [G])."""
  if max_norm <= 0:
    return x_GxP, jnp.ones(x_GxP.shape[:1], x_GxP.dtype)
  scale_G = jnp.minimum(1.0, max_norm / jnp.maximum(jnp.linalg.norm(x_GxP, axis=-1), 1e-12))
  return x_GxP * scale_G[:, None], scale_G


def _flat(tree, lead: tuple = ()):
  return jnp.concatenate([x.reshape(lead + (-1,)) for x in jax.tree.leaves(tree)], axis=-1)


def val_gradient(params, val_batch, *, model, num_groups: int):
  """DoGE's target gradient: ∇ of the mean over groups present of the per-group mean token loss on a
  held-out (validation) batch whose rows carry group ids. Returns (flat gradient [P], per-group losses [G])."""

  def mean_loss(p):
    sums = _sums(M.per_token_loss(model, p, val_batch), val_batch, num_groups)  # deterministic: held-out data
    gl_G = sums["group_loss_sum"] / jnp.maximum(sums["group_tokens"], 1.0)
    present_G = (sums["group_tokens"] > 0).astype(jnp.float32)
    return (gl_G * present_G).sum() / jnp.maximum(present_G.sum(), 1.0), gl_G

  g, gl_G = jax.grad(mean_loss, has_aux=True)(params)
  return _flat(g), gl_G


def mixing_train_step(
  state: dict,
  batch: dict,
  *,
  model: M.Transformer,
  tx: optax.GradientTransformation,
  schedule,
  num_groups: int,
  mode: str,
  mu: float = 0.01,
  eps: float = 1e-3,
  doge_clip: float = 0.0,
) -> tuple[dict, dict]:
  """One optimizer update on group-reweighted losses, with the weights w updated on device.

  Inputs beyond the training rows travel in the batch dict (lib/mixture.MixtureRunner.step_inputs):
  mode "doremi": first the excess loss: with batch["ref_params"] (the reference model's params; DoReMi
  proper) per token, excess_g = Σ_{tokens∈g} max(ℓ − ℓ_ref, 0) / #tokens∈g with ℓ_ref from the
  reference model's forward on the same rows; without them, max(ℓ_g − ref_g, 0) from the state's
  per-group reference losses. Then w_t = (1−ε)·normalise(w_{t−1}·exp(μ·excess)) + ε/G (the previous
  smoothed weights fed back), and the proxy's loss is Σ_g w_t,g ℓ_g with the just-updated w_t, as in
  the paper's Alg. 1 and the released trainers.
  mode "doge": per-group training gradients g_G (jacrev of ℓ_G; groups from batch["group"]) and the
  target gradient g_val = ∇ mean_g ℓ_g^val on batch["val"], a held-out validation batch with rows of
  every group; s = clip(lr·⟨g_G, g_val⟩ / mean‖g_G‖, 0, 5·lr); log w += s/μ; w = softmax(log w);
  applied gradient Σ_g w_g g_g. With doge_clip > 0 (the released trainer: 1.0) every g_g and g_val is
  first clipped to that norm, and the clipped g_g enter the score, the mean norm and the applied gradient.
  Both accumulate w_sum, n for the averaged weights (lib/mixture).
  """
  rng = jax.random.fold_in(state["rng"], state["step"])
  mix = state["mixture"]
  params = state["params"]
  extras = {k: batch[k] for k in ("val", "ref_params") if k in batch}
  batch = {k: v for k, v in batch.items() if k not in extras}
  f = functools.partial(_group_losses, model=model, num_groups=num_groups, key=rng)
  lr = schedule(state["step"])
  extra_metrics = {}
  if mode == "doremi":  # forward, excess loss, new w_t; then the gradient of Σ_g w_t,g ℓ_g (one backward: vjp)
    gl_G, vjp_fn, (sums, loss_BxL) = jax.vjp(lambda p: f(p, batch), params, has_aux=True)
    if "ref_params" in extras:
      ref_BxL = M.per_token_loss(model, jax.lax.stop_gradient(extras["ref_params"]), batch)
      excess_G = group_excess(loss_BxL, ref_BxL, batch, num_groups)
    else:
      excess_G = jnp.maximum(gl_G - mix["ref"], 0.0)
    logw, w = doremi_weights_from_excess(mix["logw"], excess_G, mu, eps)
    (grads,) = vjp_fn(jax.lax.stop_gradient(w).astype(gl_G.dtype))
    extra_metrics["mixture/excess"] = excess_G
  elif mode == "doge":
    if "val" not in extras:
      raise ValueError("mixing_train_step(mode='doge') needs batch['val'], a validation batch (MixtureRunner.step_inputs)")

    def losses(p):
      gl_G, aux = f(p, batch)
      return gl_G, (gl_G, aux)

    jac, (gl_G, (sums, _)) = jax.jacrev(losses, has_aux=True)(params)  # leaves [G, ...]
    flat_GxP, scale_G = clip_rows(_flat(jac, (num_groups,)), doge_clip)
    g_val_P, val_gl_G = val_gradient(params, extras["val"], model=model, num_groups=num_groups)
    g_val_P = clip_rows(g_val_P[None], doge_clip)[0][0]
    logw, w = doge_weights(mix["logw"], flat_GxP, lr, mu, g_val_P)
    grads = jax.tree.map(lambda x: jnp.tensordot(w * scale_G, x, axes=1), jac)
    extra_metrics["mixture/val_loss"] = val_gl_G
    extra_metrics["mixture/doge_score"] = flat_GxP @ g_val_P  # ⟨g_j, g_val⟩: 1ᵀA/m of DoGE's implied LMO A
  else:
    raise ValueError(f"mixing_train_step: unknown mode {mode!r}")
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  params = optax.apply_updates(params, updates)
  n_tok = jnp.maximum(sums["tokens"], 1.0)
  new_mix = dict(mix, logw=logw, w=w, w_sum=mix["w_sum"] + w, n=mix["n"] + 1)
  metrics = {
    "train/loss": sums["loss_sum"] / n_tok,
    "train/grad_norm": optax.tree.norm(grads),
    "train/lr": lr,
    "train/tokens": sums["tokens"],
    "train/param_norm": optax.tree.norm(params),
    "train/group_loss": gl_G,
    "train/group_tokens": sums["group_tokens"],
    "mixture/w": w,
    "mixture/w_avg": new_mix["w_sum"] / new_mix["n"],  # the method's output p (averaged weights)
    **extra_metrics,
  }
  if "true_nll_sum" in sums:
    metrics["train/excess_loss"] = (sums["loss_sum"] - sums["true_nll_sum"]) / n_tok
  return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1, mixture=new_mix), metrics
