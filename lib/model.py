"""Decoder-only (or bidirectional, for masked LM) transformer in Flax Linen, and its pure losses.

Axis legend (used in names, einsum letters match):
  B batch, L sequence length, D model width, E embedding width (= D unless embed_proj_dim),
  H heads, K head dim, F MLP hidden, V vocabulary.

The contract with the rest of lmtrace is `per_token_loss(model, params, batch) -> loss_BxL` (float32,
zero where batch["mask"] is 0) and `logits(model, params, batch) -> logits_BxLxV`. A batch is a dict
with `inputs`, `targets`, `mask`, `segment_ids`, `positions` (all [B, L]) and optionally `group` [B].

Parameter paths (the Hessian tools group them into blocks by these names):
  embed, pos_embed, proj_in, layer_{i}/{ln_attn,attn/{query,key,value,out},ln_mlp,mlp/{wi,wi_gate,wo}},
  final_norm, proj_out, head.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lib import errors

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hashable model description; built from the `model` section of a run config."""

  vocab_size: int = 260
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  d_ff: int = 256
  max_len: int = 128
  pos: str = "learned"  # learned | rope
  mlp: str = "gelu"  # relu | gelu (tanh approximation) | gelu_exact (erf; GPT-NeoX) | swiglu
  norm: str = "layernorm"  # layernorm | rmsnorm
  tied_embeddings: bool = True
  use_bias: bool = True
  embed_proj_dim: int = 0  # OPT-350m style project_in/out (0 = off)
  causal: bool = True  # False: bidirectional encoder for the masked-LM objective
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: bool = False  # rematerialise each block in the backward pass
  scan_layers: bool = False  # run the blocks as one lax.scan over their stacked parameters (same values and tree)
  loss_chunk: int = 0  # >0: the loss makes its float32 logits this many positions at a time (0 = all at once)
  attn_chunk: int = 0  # >0: attention scores for this many queries at a time, remade in the backward pass (0 = all)
  dropout: float = 0.0
  rope_base: float = 10000.0
  init_std: float = 0.02
  # Options for imported Hugging Face checkpoints (lib/hf_import.py); the defaults keep the model above.
  parallel_residual: bool = False  # GPT-NeoX: x + attn(ln_attn(x)) + mlp(ln_mlp(x)) in one residual add
  rotary_dim: int = 0  # rope on the first rotary_dim dims of each head only (Pythia's rotary_pct); 0 = all
  post_ln: bool = False  # OPT-350m: LayerNorm after each residual add and no final norm

  @classmethod
  def from_config(cls, cfg) -> "ModelConfig":
    d = dict(cfg) if not hasattr(cfg, "to_dict") else cfg.to_dict()
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - {"preset"})
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; valid: {sorted(names)}")
    return cls(**{k: v for k, v in d.items() if k in names})

  @classmethod
  def for_run(cls, cfg, vocab_size: int) -> "ModelConfig":
    """A run config's `model` with the data's vocabulary filled in (vocab_size=-1), checked against the
    data (vocabulary, sequence length): the single run and the seed-vectorised group both build it here."""
    from lib import errors

    mcfg = cls.from_config(cfg.model)
    if mcfg.vocab_size == -1:
      mcfg = cls(**{**vars(mcfg), "vocab_size": vocab_size})
    elif mcfg.vocab_size < vocab_size:
      raise errors.ConfigError(f"model.vocab_size={mcfg.vocab_size} is smaller than the data's vocabulary ({vocab_size})")
    if cfg.data.seq_len > mcfg.max_len:
      raise errors.ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_len={mcfg.max_len}")
    return mcfg

  def validate(self) -> None:
    choices = {
      "pos": ("learned", "rope"),
      "mlp": ("relu", "gelu", "gelu_exact", "swiglu"),
      "norm": ("layernorm", "rmsnorm"),
      "dtype": tuple(DTYPES),
      "param_dtype": tuple(DTYPES),
    }
    for k, ok in choices.items():
      if getattr(self, k) not in ok:
        raise ValueError(f"model.{k}={getattr(self, k)!r} is not one of {ok}")
    if self.d_model % self.n_heads:
      raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
    if self.pos == "rope" and (self.d_model // self.n_heads) % 2:
      raise ValueError("model.pos='rope' needs an even head dimension")
    for name in ("loss_chunk", "attn_chunk"):
      if getattr(self, name) < 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be >= 0 (0 = the whole sequence at once)")
    if self.rotary_dim and (self.rotary_dim % 2 or self.rotary_dim > self.d_model // self.n_heads):
      raise ValueError(
        f"model.rotary_dim={self.rotary_dim} must be even and at most the head dimension {self.d_model // self.n_heads}"
      )


# OPT family (Zhang et al. 2022): learned positions (2 offset rows), ReLU, pre-LN, tied embeddings,
# biases everywhere. 350m projects a 512-wide embedding in and out (the published checkpoint is also
# post-LN; we keep pre-LN, which changes no parameter count).
OPT_VOCAB = 50272
PRESETS: dict[str, dict[str, Any]] = {
  "opt-125m": dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072),
  "opt-350m": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=4096, embed_proj_dim=512),
  "opt-1.3b": dict(d_model=2048, n_layers=24, n_heads=32, d_ff=8192),
  "opt-2.7b": dict(d_model=2560, n_layers=32, n_heads=32, d_ff=10240),
  "opt-6.7b": dict(d_model=4096, n_layers=32, n_heads=32, d_ff=16384),
}
for _p in PRESETS.values():
  _p.update(vocab_size=OPT_VOCAB, max_len=2048, pos="learned", mlp="relu", norm="layernorm", tied_embeddings=True, use_bias=True)
PRESETS.update(
  {
    # CPU-sized models for tests and the README's default run.
    "nano": dict(d_model=32, n_layers=2, n_heads=2, d_ff=64),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, d_ff=256),
    "mid": dict(d_model=96, n_layers=3, n_heads=4, d_ff=384),  # between tiny and small (the Xia size ladder)
    "small": dict(d_model=128, n_layers=4, n_heads=4, d_ff=512),
    # A modern variant: RoPE, SwiGLU, RMSNorm, untied head, no biases.
    "tiny-modern": dict(
      d_model=64, n_layers=2, n_heads=4, d_ff=172, pos="rope", mlp="swiglu", norm="rmsnorm", tied_embeddings=False, use_bias=False
    ),
  }
)
# Published (Hugging Face) parameter counts of the OPT checkpoints, for the preset test.
OPT_PUBLISHED_PARAMS = {
  "opt-125m": 125_239_296,
  "opt-350m": 331_196_416,
  "opt-1.3b": 1_315_758_080,
  "opt-2.7b": 2_651_596_800,
  "opt-6.7b": 6_658_473_984,
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})


def _init(std: float, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


class Norm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    c = self.cfg
    pd = DTYPES[c.param_dtype]
    if c.norm == "rmsnorm":
      return nn.RMSNorm(epsilon=1e-6, dtype=DTYPES[c.dtype], param_dtype=pd, scale_init=_ones(("act_embed",)))(x_BxLxD)
    return nn.LayerNorm(
      epsilon=1e-5,
      dtype=DTYPES[c.dtype],
      param_dtype=pd,
      use_bias=c.use_bias,
      scale_init=_ones(("act_embed",)),
      bias_init=_zeros(("act_embed",)),
    )(x_BxLxD)


def rope(x_BxLxHxK: Array, positions_BxL: Array, base: float) -> Array:
  k = x_BxLxHxK.shape[-1]
  inv_freq_K2 = 1.0 / (base ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
  ang_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_K2
  sin, cos = jnp.sin(ang_BxLxK2)[:, :, None, :], jnp.cos(ang_BxLxK2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


def partial_rope(x_BxLxHxK: Array, positions_BxL: Array, base: float, rotary_dim: int) -> Array:
  """rope on the first `rotary_dim` dims of each head, the rest passed through (0 = all dims)."""
  if not rotary_dim or rotary_dim == x_BxLxHxK.shape[-1]:
    return rope(x_BxLxHxK, positions_BxL, base)
  rot = rope(x_BxLxHxK[..., :rotary_dim], positions_BxL, base)
  return jnp.concatenate([rot, x_BxLxHxK[..., rotary_dim:]], axis=-1)


class Proj(nn.Module):
  """y = einsum(x, kernel) + bias with explicit logical axes (nn.DenseGeneral initialises a flattened
  kernel, which does not carry multi-axis logical partitioning)."""

  cfg: ModelConfig
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  names: tuple[str, ...]
  std: float

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    k = self.param("kernel", _init(self.std, self.names), self.in_shape + self.out_shape, DTYPES[c.param_dtype])
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    letters = "abcdefgh"
    ins, outs = letters[:n_in], letters[n_in : n_in + n_out]
    y = jnp.einsum(f"...{ins},{ins}{outs}->...{outs}", x.astype(DTYPES[c.dtype]), k.astype(DTYPES[c.dtype]))
    if c.use_bias:
      y = y + self.param("bias", _zeros(self.names[n_in:]), self.out_shape, DTYPES[c.param_dtype]).astype(y.dtype)
    return y


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, deterministic: bool):
    c = self.cfg
    h, k, d = c.n_heads, c.d_model // c.n_heads, c.d_model
    qkv = lambda name: Proj(c, (d,), (h, k), ("embed", "heads", "kv"), c.init_std, name=name)(x_BxLxD)  # noqa: E731
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = qkv("query"), qkv("key"), qkv("value")
    if c.pos == "rope":
      q_BxLxHxK = partial_rope(q_BxLxHxK, positions_BxL, c.rope_base, c.rotary_dim)
      k_BxLxHxK = partial_rope(k_BxLxHxK, positions_BxL, c.rope_base, c.rotary_dim)
    q_BxLxHxK = nn.with_logical_constraint(q_BxLxHxK, ("batch", "length", "act_heads", "kv"))
    # Document-aware mask for packed rows: a token attends only within its own segment.
    if c.attn_chunk:
      o_BxLxHxK = chunked_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, c.causal, c.attn_chunk)
    else:
      mask_Bx1xLxL = segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
      o_BxLxHxK = jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_Bx1xLxL, is_causal=c.causal)
    if c.dropout and not deterministic:
      o_BxLxHxK = nn.Dropout(c.dropout)(o_BxLxHxK, deterministic=False)
    return Proj(c, (h, k), (d,), ("heads", "kv", "embed"), c.init_std / math.sqrt(2 * c.n_layers), name="out")(o_BxLxHxK)


def map_chunks(fn, chunk: int, *xs_BxL):
  """fn(start, *x_chunks) over `chunk` positions (axis 1) at a time, rematerialised in the backward pass
  (jax.checkpoint), so only one chunk's intermediates live at once; `start` is the chunk's first position.
  The inputs are padded to a multiple of `chunk`; the outputs' pad positions are dropped. Returns [B, L, ...]."""
  B, L = xs_BxL[0].shape[:2]
  n = -(-L // chunk)

  def split(x):
    x = jnp.pad(x, ((0, 0), (0, n * chunk - L)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)

  one = jax.checkpoint(fn)
  out_NxBxC = jax.lax.map(lambda a: one(a[0], *a[1:]), (jnp.arange(n) * chunk, *map(split, xs_BxL)))
  return out_NxBxC.swapaxes(0, 1).reshape(B, n * chunk, *out_NxBxC.shape[3:])[:, :L]


def chunked_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, causal: bool, chunk: int) -> Array:
  """Attention (same masks as the whole-sequence call) for `chunk` queries at a time: each chunk's float32
  scores [B, H, chunk, L] live only while it is computed and are remade in the backward pass, instead of
  [B, H, L, L] per layer."""
  L = q_BxLxHxK.shape[1]

  def one(start, q_BxCxHxK, qseg_BxC):
    mask_Bx1xCxL = qseg_BxC[:, None, :, None] == segment_ids_BxL[:, None, None, :]
    if causal:
      qpos_C = start + jnp.arange(chunk)
      mask_Bx1xCxL &= (jnp.arange(L)[None, :] <= qpos_C[:, None])[None, None]
    return jax.nn.dot_product_attention(q_BxCxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_Bx1xCxL)

  return map_chunks(one, chunk, q_BxLxHxK, segment_ids_BxL)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool):
    c = self.cfg
    dense = (
      lambda feat, names, name, std=c.init_std: nn.Dense(  # noqa: E731
        feat,
        dtype=DTYPES[c.dtype],
        param_dtype=DTYPES[c.param_dtype],
        use_bias=c.use_bias,
        kernel_init=_init(std, names),
        bias_init=_zeros(names[1:]),
        name=name,
      )
    )
    h_BxLxF = dense(c.d_ff, ("embed", "mlp"), "wi")(x_BxLxD)
    if c.mlp == "swiglu":
      h_BxLxF = nn.silu(dense(c.d_ff, ("embed", "mlp"), "wi_gate")(x_BxLxD)) * h_BxLxF
    elif c.mlp == "relu":
      h_BxLxF = nn.relu(h_BxLxF)
    elif c.mlp == "gelu_exact":
      h_BxLxF = nn.gelu(h_BxLxF, approximate=False)
    else:
      h_BxLxF = nn.gelu(h_BxLxF)
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "act_mlp"))
    if c.dropout and not deterministic:
      h_BxLxF = nn.Dropout(c.dropout)(h_BxLxF, deterministic=False)
    return dense(c.d_model, ("mlp", "embed"), "wo", c.init_std / math.sqrt(2 * c.n_layers))(h_BxLxF)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, deterministic: bool = True):
    c = self.cfg
    attn, mlp = Attention(c, name="attn"), Mlp(c, name="mlp")
    ln_attn, ln_mlp = Norm(c, name="ln_attn"), Norm(c, name="ln_mlp")
    if c.parallel_residual:
      x_BxLxD = (
        x_BxLxD + attn(ln_attn(x_BxLxD), positions_BxL, segment_ids_BxL, deterministic) + mlp(ln_mlp(x_BxLxD), deterministic)
      )
    elif c.post_ln:
      x_BxLxD = ln_attn(x_BxLxD + attn(x_BxLxD, positions_BxL, segment_ids_BxL, deterministic))
      x_BxLxD = ln_mlp(x_BxLxD + mlp(x_BxLxD, deterministic))
    else:
      x_BxLxD = x_BxLxD + attn(ln_attn(x_BxLxD), positions_BxL, segment_ids_BxL, deterministic)
      x_BxLxD = x_BxLxD + mlp(ln_mlp(x_BxLxD), deterministic)
    return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))


class Transformer(nn.Module):
  """Pre-LN transformer LM. `__call__` returns logits_BxLxV (float32), or hidden states."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    inputs_BxL,
    positions_BxL=None,
    segment_ids_BxL=None,
    deterministic: bool = True,
    return_hidden: bool = False,
    targets_BxL=None,
  ):
    c = self.cfg
    dt, pd = DTYPES[c.dtype], DTYPES[c.param_dtype]
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(inputs_BxL.shape[1]), inputs_BxL.shape)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(inputs_BxL)
    e = c.embed_proj_dim or c.d_model
    embed_VxE = self.param("embed", _init(c.init_std, ("vocab", "embed")), (c.vocab_size, e), pd)
    x_BxLxD = jnp.take(embed_VxE, inputs_BxL, axis=0).astype(dt)
    if c.embed_proj_dim:
      x_BxLxD = nn.Dense(
        c.d_model, use_bias=False, dtype=dt, param_dtype=pd, kernel_init=_init(c.init_std, (None, "embed")), name="proj_in"
      )(x_BxLxD)
    if c.pos == "learned":
      # OPT reserves 2 extra position rows (its offset); keep them so counts match the checkpoints.
      pos_PxD = self.param("pos_embed", _init(c.init_std, ("pos", "embed")), (c.max_len + 2, c.d_model), pd)
      x_BxLxD = x_BxLxD + jnp.take(pos_PxD, positions_BxL + 2, axis=0).astype(dt)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "act_embed"))
    if c.scan_layers and not self.is_initializing():
      x_BxLxD = self._scanned_blocks(x_BxLxD, positions_BxL, segment_ids_BxL, deterministic)
    else:
      block = nn.remat(Block, static_argnums=(4,)) if c.remat else Block
      for i in range(c.n_layers):
        x_BxLxD = block(c, name=f"layer_{i}")(x_BxLxD, positions_BxL, segment_ids_BxL, deterministic)
    if not c.post_ln:
      x_BxLxD = Norm(c, name="final_norm")(x_BxLxD)
    if return_hidden:
      return x_BxLxD
    if c.embed_proj_dim:
      x_BxLxD = nn.Dense(
        e, use_bias=False, dtype=dt, param_dtype=pd, kernel_init=_init(c.init_std, ("embed", None)), name="proj_out"
      )(x_BxLxD)
    if c.tied_embeddings:
      out_weight, spec = embed_VxE.astype(dt), "bce,ve->bcv"
    else:
      head_ExV = self.param("head", _init(c.init_std, ("embed", "vocab")), (e, c.vocab_size), pd)
      out_weight, spec = head_ExV.astype(dt), "bce,ev->bcv"

    def head(x_BxCxE):
      logits_BxCxV = jnp.einsum(spec, x_BxCxE, out_weight, preferred_element_type=jnp.float32)
      return nn.with_logical_constraint(logits_BxCxV, ("batch", "length", "act_vocab")).astype(jnp.float32)

    if targets_BxL is not None:
      return chunked_nll(head, x_BxLxD, targets_BxL, c.loss_chunk or x_BxLxD.shape[1])
    return head(x_BxLxD)

  def _scanned_blocks(self, x_BxLxD, positions_BxL, segment_ids_BxL, deterministic: bool):
    """The n_layers blocks as one lax.scan: the layer_{i} parameters (the tree stays the unrolled one, so
    checkpoints, imports and analyses do not change) are stacked along a new leading axis and the loop
    body applies one block. Under FSDP the body gathers one layer's parameters per iteration, so at most
    a layer's gathered weights (and, with remat, its activations) are live at once; an unrolled stack
    lets XLA gather and keep every layer's. Values equal the unrolled stack's (a test checks loss,
    gradient and Hessian-vector product); dropout draws one key per layer from the 'dropout' stream."""
    c = self.cfg
    layers = [nn.unbox(self.variables["params"][f"layer_{i}"]) for i in range(c.n_layers)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    block = Block(c, parent=None)
    use_rng = bool(c.dropout) and not deterministic
    keys = jax.random.split(self.make_rng("dropout"), c.n_layers) if use_rng else jnp.zeros((c.n_layers,), jnp.uint32)

    def body(x_BxLxD, layer):
      params, key = layer
      rngs = {"dropout": key} if use_rng else None
      return block.apply({"params": params}, x_BxLxD, positions_BxL, segment_ids_BxL, deterministic, rngs=rngs), None

    if c.remat:
      body = jax.checkpoint(body, prevent_cse=False)
    x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, (stacked, keys))
    return x_BxLxD


def token_nll(logits_BxLxV, targets_BxL) -> Array:
  """−log softmax(logits)[target] per position, float32."""
  logz_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  return logz_BxL - jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]


def chunked_nll(head, x_BxLxE, targets_BxL, chunk: int) -> Array:
  """token_nll(head(x), targets) made `chunk` positions at a time (nll_BxL): the forward keeps one chunk's
  logits alive, and the backward remakes each chunk's from x instead of storing [B, L, V] float32 (for a
  50k vocabulary that tensor, not the layers, is what decides whether a step fits)."""
  return map_chunks(lambda _, x_BxCxE, t_BxC: token_nll(head(x_BxCxE), t_BxC), chunk, x_BxLxE, targets_BxL)


def make(cfg: ModelConfig) -> Transformer:
  cfg.validate()
  return Transformer(cfg)


def logits(model: Transformer, params, batch, *, deterministic: bool = True, rngs=None) -> Array:
  """logits_BxLxV (float32) for a batch dict."""
  return model.apply(
    {"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids"), deterministic=deterministic, rngs=rngs
  )


def hidden(model: Transformer, params, batch) -> Array:
  """Final-layer (normed) hidden states h_BxLxD, e.g. for linear probes."""
  return model.apply({"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids"), return_hidden=True)


def per_token_loss(model: Transformer, params, batch, *, deterministic: bool = True, rngs=None) -> Array:
  """Next-token (or masked-token) negative log-likelihood in nats, loss_BxL float32, 0 off-mask."""
  if model.cfg.loss_chunk:
    nll_BxL = model.apply(
      {"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids"),
      deterministic=deterministic, rngs=rngs, targets_BxL=batch["targets"],
    )  # fmt: skip
  else:
    nll_BxL = token_nll(logits(model, params, batch, deterministic=deterministic, rngs=rngs), batch["targets"])
  return jnp.where(batch["mask"] > 0, nll_BxL, 0.0)


def mean_loss(model: Transformer, params, batch, **kw) -> Array:
  """Mean per-token loss over the mask (the training objective)."""
  loss_BxL = per_token_loss(model, params, batch, **kw)
  mask_BxL = batch["mask"].astype(jnp.float32)
  return loss_BxL.sum() / jnp.maximum(mask_BxL.sum(), 1.0)


PAD_SEGMENT = 0  # segment id of the pad slots of a left-padded batch (real tokens: 1); see left_pad


def left_pad(seqs, pad_id: int, length: int | None = None):
  """(tokens_BxL, valid_BxL, positions_BxL, segment_ids_BxL) of ragged token sequences, LEFT-padded to
  `length` (default: the longest). Positions count from each sequence's first real token; pad slots
  get their own segment id (PAD_SEGMENT), so no real token attends to a pad and a padded row computes
  exactly what the sequence alone computes. numpy int32 arrays (valid: bool)."""
  seqs = [np.asarray(s, np.int32).reshape(-1) for s in seqs]
  if not seqs:
    raise errors.DataError("no sequences to batch")
  L = max(len(s) for s in seqs) if length is None else int(length)
  if max(len(s) for s in seqs) > L:
    raise errors.DataError(f"a sequence of {max(len(s) for s in seqs)} tokens does not fit length {L}")
  toks = np.full((len(seqs), L), pad_id, np.int32)
  valid = np.zeros((len(seqs), L), bool)
  for i, s in enumerate(seqs):
    if len(s):
      toks[i, L - len(s) :] = s
      valid[i, L - len(s) :] = True
  pos = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
  seg = np.where(valid, PAD_SEGMENT + 1, PAD_SEGMENT).astype(np.int32)
  return toks, valid, pos, seg


def ragged_batch(seqs, pad_id: int, length: int | None = None) -> dict:
  """A next-token batch for `per_token_loss`/`logits` of ragged token sequences (each e.g. [BOS, ...]):
  row i scores seqs[i][1:] given its prefix, left-padded to `length` predicted slots (default: the
  longest sequence minus one). `mask` is 1 exactly on the real targets, so
  per_token_loss(batch)[i][mask[i] > 0] equals the loss of seqs[i] computed alone, without padding."""
  seqs = [np.asarray(s, np.int32).reshape(-1) for s in seqs]
  if any(len(s) < 2 for s in seqs):
    raise errors.DataError("every sequence needs at least two tokens (a context token, e.g. BOS, and a target)")
  toks, valid, pos, seg = left_pad([s[:-1] for s in seqs], pad_id, length)
  tgt, _, _, _ = left_pad([s[1:] for s in seqs], pad_id, toks.shape[1])
  return {"inputs": toks, "targets": tgt, "mask": valid.astype(np.int32), "positions": pos, "segment_ids": seg}


def dummy_batch(cfg: ModelConfig, batch_size: int = 1, seq_len: int | None = None) -> dict:
  L = seq_len or cfg.max_len
  z = jnp.zeros((batch_size, L), jnp.int32)
  return {
    "inputs": z,
    "targets": z,
    "mask": jnp.ones_like(z),
    "segment_ids": jnp.ones_like(z),
    "positions": jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (batch_size, L)),
  }


def abstract_params(model: Transformer):
  """(ShapeDtypeStruct tree, logical PartitionSpec tree) without allocating anything."""
  b = dummy_batch(model.cfg, 1, min(model.cfg.max_len, 8))
  boxed = jax.eval_shape(lambda r: model.init(r, b["inputs"], b["positions"], b["segment_ids"]), jax.random.key(0))["params"]
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  # unbox without applying sharding constraints (this may run under an active mesh)
  shapes = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, boxed, is_leaf=is_box)
  return shapes, nn.get_partition_spec(boxed)


def param_count(model: Transformer) -> int:
  shapes, _ = abstract_params(model)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def param_shardings(model: Transformer, mesh):
  from lib import sharding

  shapes, logical = abstract_params(model)
  return sharding.logical_to_sharding(logical, shapes, mesh)


def init_params(model: Transformer, key: Array, mesh) -> Any:
  """Initialises parameters directly into their shardings (no full copy on one device)."""
  shardings = param_shardings(model, mesh)
  b = dummy_batch(model.cfg, 1, min(model.cfg.max_len, 8))

  def init(k):
    return nn.unbox(model.init(k, b["inputs"], b["positions"], b["segment_ids"])["params"])

  with jax.set_mesh(mesh), nn.logical_axis_rules(_rules()):
    return jax.jit(init, out_shardings=shardings)(key)


def _rules():
  from lib import sharding

  return sharding.RULES


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int) -> float:
  """Training FLOPs per token: 6·N (matmuls, fwd+bwd) + 12·n_layers·d_model·seq_len (attention
  scores and values, fwd+bwd, causal mask not discounted). N excludes position tables; the
  embedding counts once (as the tied head matmul)."""
  n = n_params - (cfg.max_len + 2) * cfg.d_model * (cfg.pos == "learned")
  return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * seq_len
