"""Import Hugging Face checkpoints (OPT, GPT-NeoX/Pythia, GPT-2) from LOCAL directories into a workdir.

  python -m lib.hf_import --src=pythia/step0,pythia/step1000,pythia/step2000 --workdir=runs/pythia \
      [--steps=0,1000,2000] [--probe_text=corpus.txt] [--mesh=1,8,1]

Each source directory is one revision: an HF `config.json`, weights (`*.safetensors`, sharded ones via
`model.safetensors.index.json`; `pytorch_model*.bin` when torch is installed) and, in the first source
(or `--tokenizer=DIR`), a `tokenizer.json`. Revision i becomes `W/checkpoints/<step>/`, the step read
from the revision folder's own name (`step143000`, `checkpoint-500`, a Hugging Face cache snapshot's
`step<N>` ref; never a parent folder) unless `--steps` gives them. `W/config.json`
is a full lmtrace run config (configs/base.py defaults) whose `model` section describes the imported
architecture, whose `import` section records the sources and whose `data.source` is a text source tokenized
by the model's own tokenizer (copied to `W/tokenizer/`), so the trajectory/ICL/generation jobs run on the
workdir unchanged.

Loading is lazy and sharded: every parameter is built with `jax.make_array_from_callback` on its
sharding for `--mesh`, and each callback reads only its shard's rows/columns from the file
(`safe_open(...).get_slice`), so no host ever holds more than its own shards (a 6.7B model needs no
26 GB host buffer). Checkpoints are written by `lib.ckpt.Checkpointer` (params + meta, the same path
training uses), into `W.partial/`, renamed to `W` only when every revision is written: an error leaves
nothing half-written.

Layouts (HF -> lmtrace): Linear weights are [out, in] (GPT-2's Conv1D are [in, out]); the fused
attention projections are split per head: GPT-2 c_attn columns = [q | k | v] each [H, K]; GPT-NeoX
query_key_value rows = [H, (q, k, v), K]. GPT-2's position table gets OPT's 2 offset rows (zeros) in
front, so one `pos_embed[p + 2]` lookup serves both.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np

from lib import errors, sharding
from lib import model as M

log = logging.getLogger("lmtrace")

FAMILIES = ("opt", "gpt_neox", "gpt2")


# ----------------------------------------------------------------------------------------------
# Architecture: HF config.json -> ModelConfig


def read_hf_config(src: str) -> dict:
  path = os.path.join(src, "config.json")
  if not os.path.isdir(src):
    raise errors.CheckpointError(f"--src {src}: no such directory")
  if not os.path.exists(path):
    raise errors.CheckpointError(f"--src {src} has no config.json: not a Hugging Face model directory")
  with open(path) as f:
    return json.load(f)


def _eps_ok(hf: dict, key: str, src: str) -> None:
  eps = float(hf.get(key, 1e-5))
  if abs(eps - 1e-5) > 1e-12:
    raise errors.ConfigError(f"{src}: {key}={eps} (lmtrace's LayerNorm uses 1e-5)")


def model_config(hf: dict, src: str = "") -> M.ModelConfig:
  """The lmtrace ModelConfig of an HF config dict (refuses what it cannot represent exactly)."""
  kind = hf.get("model_type")
  common = dict(norm="layernorm", dtype="float32", param_dtype="float32", dropout=0.0, use_bias=True)
  if kind == "opt":
    d = int(hf["hidden_size"])
    e = int(hf.get("word_embed_proj_dim") or d)
    act = hf.get("activation_function", "relu")
    if act != "relu":
      raise errors.ConfigError(f"{src}: OPT activation_function={act!r} (only relu is supported)")
    if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine", True):
      raise errors.ConfigError(f"{src}: OPT without biases or LayerNorm affine parameters is not supported")
    pre = bool(hf.get("do_layer_norm_before", True))
    if pre and hf.get("_remove_final_layer_norm", False):
      raise errors.ConfigError(f"{src}: OPT with _remove_final_layer_norm is not supported")
    cfg = M.ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      d_model=d,
      n_layers=int(hf["num_hidden_layers"]),
      n_heads=int(hf["num_attention_heads"]),
      d_ff=int(hf["ffn_dim"]),
      max_len=int(hf["max_position_embeddings"]),
      pos="learned",
      mlp="relu",
      tied_embeddings=bool(hf.get("tie_word_embeddings", True)),
      embed_proj_dim=e if e != d else 0,
      post_ln=not pre,
      **common,
    )
  elif kind == "gpt2":
    d = int(hf["n_embd"])
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise errors.ConfigError(f"{src}: GPT-2 activation_function={act!r} (only gelu_new is supported)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn") or not hf.get("scale_attn_weights", True):
      raise errors.ConfigError(f"{src}: GPT-2 attention-scaling variants are not supported")
    _eps_ok(hf, "layer_norm_epsilon", src)
    cfg = M.ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      d_model=d,
      n_layers=int(hf["n_layer"]),
      n_heads=int(hf["n_head"]),
      d_ff=int(hf.get("n_inner") or 4 * d),
      max_len=int(hf.get("n_positions") or hf["n_ctx"]),
      pos="learned",
      mlp="gelu",
      tied_embeddings=bool(hf.get("tie_word_embeddings", True)),
      **common,
    )
  elif kind == "gpt_neox":
    d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    rp = hf.get("rope_parameters") or {}
    pct = float(rp.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 0.25))))
    base = float(rp.get("rope_theta", hf.get("rotary_emb_base", hf.get("rope_theta", 10000.0))))
    if rp.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
      raise errors.ConfigError(f"{src}: GPT-NeoX rope scaling is not supported")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
      raise errors.ConfigError(f"{src}: GPT-NeoX hidden_act={act!r} is not supported")
    if not hf.get("attention_bias", True):
      raise errors.ConfigError(f"{src}: GPT-NeoX without attention biases is not supported")
    _eps_ok(hf, "layer_norm_eps", src)
    cfg = M.ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      d_model=d,
      n_layers=int(hf["num_hidden_layers"]),
      n_heads=h,
      d_ff=int(hf["intermediate_size"]),
      max_len=int(hf["max_position_embeddings"]),
      pos="rope",
      rope_base=base,
      rotary_dim=int((d // h) * pct),
      mlp="gelu_exact" if act == "gelu" else "gelu",
      tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
      parallel_residual=bool(hf.get("use_parallel_residual", True)),
      **common,
    )
    if cfg.rotary_dim == 0:
      raise errors.ConfigError(f"{src}: GPT-NeoX with rotary_pct={pct} gives no rotary dims")
  else:
    raise errors.ConfigError(
      f"{src}: unknown architecture model_type={kind!r} (architectures={hf.get('architectures')}); supported: {list(FAMILIES)}"
    )
  try:
    cfg.validate()
  except ValueError as e:
    raise errors.ConfigError(f"{src}: {e}") from e
  return cfg


# ----------------------------------------------------------------------------------------------
# Lazy tensor reading


class TensorFiles:
  """name -> lazily readable tensor over the weight files of one HF directory."""

  def __init__(self, src: str):
    self.src = src
    st = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    bins = sorted(glob.glob(os.path.join(src, "pytorch_model*.bin")))
    self.where: dict[str, str] = {}
    self.handles: dict[str, object] = {}
    self.kind = "safetensors" if st else "bin"
    if st:
      from safetensors import safe_open

      for f in st:
        h = safe_open(f, framework="numpy")
        self.handles[f] = h
        for k in h.keys():
          self.where[k] = f
    elif bins:
      try:
        import torch
      except ImportError as e:
        raise errors.CheckpointError(
          f"{src} holds only PyTorch .bin weights: install torch to import them, or convert to safetensors"
        ) from e
      for f in bins:
        sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        self.handles[f] = sd
        for k in sd:
          self.where[k] = f
    if not self.where:
      raise errors.CheckpointError(f"{src} holds no weights (*.safetensors or pytorch_model*.bin)")

  def resolve(self, names: Sequence[str]) -> str | None:
    """The first stored name among `names` (checkpoints differ in their 'model.'/'transformer.' prefixes)."""
    for n in names:
      if n in self.where:
        return n
    return None

  def shape(self, name: str) -> tuple[int, ...]:
    h = self.handles[self.where[name]]
    if self.kind == "safetensors":
      return tuple(h.get_slice(name).get_shape())
    return tuple(h[name].shape)

  def read(self, name: str, idx: tuple[slice, ...]) -> np.ndarray:
    """Only the slice idx of tensor `name`, as float32."""
    h = self.handles[self.where[name]]
    if self.kind == "safetensors":
      sl = h.get_slice(name)
      if sl.get_dtype() in ("BF16", "bfloat16"):  # numpy has no bfloat16: read via the flax handle
        from safetensors import safe_open

        with safe_open(self.where[name], framework="flax") as g:
          return np.asarray(g.get_slice(name)[idx], np.float32)
      return np.asarray(sl[idx], np.float32)
    return h[name][idx].float().numpy()


def _norm_idx(idx, shape) -> tuple[slice, ...]:
  out = []
  for s, n in zip(idx, shape):
    a, b, _ = s.indices(n)
    out.append(slice(a, b))
  return tuple(out)


class Recipe:
  """How one lmtrace parameter is read from one HF tensor; `read(idx)` reads only that slice."""

  def __init__(self, name: str, shape: tuple[int, ...], read: Callable, src_shape: tuple[int, ...]):
    self.name, self.shape, self.read, self.src_shape = name, shape, read, src_shape


def _plain(tf: TensorFiles, name: str, transpose: bool = False, pad_rows: int = 0) -> Recipe:
  """2-D (optionally transposed) or 1-D tensor; pad_rows zero rows in front (GPT-2's position offset)."""
  ss = tf.shape(name)
  shape = tuple(reversed(ss)) if transpose else ss
  if pad_rows:
    shape = (shape[0] + pad_rows,) + shape[1:]

  def read(idx):
    idx = _norm_idx(idx, shape)
    if pad_rows:
      r = idx[0]
      out = np.zeros(tuple(s.stop - s.start for s in idx), np.float32)
      a, b = max(r.start, pad_rows), r.stop
      if b > a:
        out[a - r.start :] = read_raw((slice(a - pad_rows, b - pad_rows),) + idx[1:])
      return out
    return read_raw(idx)

  def read_raw(idx):
    if transpose:
      return tf.read(name, tuple(reversed(idx))).T
    return tf.read(name, idx)

  return Recipe(name, shape, read, ss)


def _heads(tf: TensorFiles, name: str, role: str, H: int, K: int, offset: int, stride: int, flat_axis: int) -> Recipe:
  """A per-head tensor from a source whose `flat_axis` runs over (head, [fused part], k):
  source flat index = offset + h * stride + k. role: 'in' -> [D, H, K] (q/k/v kernels),
  'out' -> [H, K, D] (output projection), 'bias' -> [H, K] (1-D source)."""
  ss = tf.shape(name)
  if role == "bias":
    shape = (H, K)
  else:
    d = ss[1 - flat_axis]
    shape = (d, H, K) if role == "in" else (H, K, d)

  def read(idx):
    idx = _norm_idx(idx, shape)
    if role == "bias":
      hs, ks = idx
      return np.stack(
        [tf.read(name, (slice(offset + h * stride + ks.start, offset + h * stride + ks.stop),)) for h in range(hs.start, hs.stop)]
      )
    ds, hs, ks = (idx[0], idx[1], idx[2]) if role == "in" else (idx[2], idx[0], idx[1])
    parts = []
    for h in range(hs.start, hs.stop):
      f = slice(offset + h * stride + ks.start, offset + h * stride + ks.stop)
      blk = tf.read(name, (f, ds) if flat_axis == 0 else (ds, f))  # [k, d] or [d, k]
      parts.append(blk if flat_axis == 1 else blk.T)  # [d, k]
    a_DxHxK = np.stack(parts, axis=1) if parts else np.zeros((ds.stop - ds.start, 0, ks.stop - ks.start), np.float32)
    return a_DxHxK if role == "in" else np.transpose(a_DxHxK, (1, 2, 0))

  return Recipe(name, shape, read, ss)


def _ln(tf, prefix_names, dest: dict, key: str = "LayerNorm_0") -> None:
  dest[key] = {
    "scale": _plain(tf, _need(tf, [p + ".weight" for p in prefix_names])),
    "bias": _plain(tf, _need(tf, [p + ".bias" for p in prefix_names])),
  }


def _need(tf: TensorFiles, names: Sequence[str]) -> str:
  n = tf.resolve(names)
  if n is None:
    raise errors.CheckpointError(f"{tf.src}: tensor {names[0]} is missing from the weights")
  return n


def _opt_recipes(tf: TensorFiles, cfg: M.ModelConfig) -> dict:
  """Recipes of an OPT checkpoint (separate q/k/v projections)."""
  H, K = cfg.n_heads, cfg.d_model // cfg.n_heads
  p: dict = {}

  def need(*names):
    return _need(tf, names)

  pre = ["model.decoder.", "decoder.", ""]
  g = lambda s: [x + s for x in pre]  # noqa: E731
  p["embed"] = _plain(tf, _need(tf, g("embed_tokens.weight")))
  p["pos_embed"] = _plain(tf, _need(tf, g("embed_positions.weight")))
  if cfg.embed_proj_dim:
    p["proj_in"] = {"kernel": _plain(tf, _need(tf, g("project_in.weight")), transpose=True)}
    p["proj_out"] = {"kernel": _plain(tf, _need(tf, g("project_out.weight")), transpose=True)}
  if not cfg.post_ln:
    _ln(tf, g("final_layer_norm"), p.setdefault("final_norm", {}))
  if not cfg.tied_embeddings:
    p["head"] = _plain(tf, need("lm_head.weight"), transpose=True)
  for i in range(cfg.n_layers):
    L = lambda s: _need(tf, g(f"layers.{i}.{s}"))  # noqa: E731
    a = {}
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      a[ours] = {
        "kernel": _heads(tf, L(f"self_attn.{theirs}.weight"), "in", H, K, 0, K, 0),
        "bias": _heads(tf, L(f"self_attn.{theirs}.bias"), "bias", H, K, 0, K, 0),
      }
    a["out"] = {
      "kernel": _heads(tf, L("self_attn.out_proj.weight"), "out", H, K, 0, K, 1),
      "bias": _plain(tf, L("self_attn.out_proj.bias")),
    }
    lay = {"attn": a, "ln_attn": {}, "ln_mlp": {}}
    _ln(tf, g(f"layers.{i}.self_attn_layer_norm"), lay["ln_attn"])
    _ln(tf, g(f"layers.{i}.final_layer_norm"), lay["ln_mlp"])
    lay["mlp"] = {
      "wi": {"kernel": _plain(tf, L("fc1.weight"), transpose=True), "bias": _plain(tf, L("fc1.bias"))},
      "wo": {"kernel": _plain(tf, L("fc2.weight"), transpose=True), "bias": _plain(tf, L("fc2.bias"))},
    }
    p[f"layer_{i}"] = lay
  return p


def _gpt2_recipes(tf: TensorFiles, cfg: M.ModelConfig) -> dict:
  """Recipes of a GPT-2 checkpoint (fused Conv1D c_attn, in x 3D)."""
  H, K, D = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.d_model
  p: dict = {}

  def need(*names):
    return _need(tf, names)

  pre = ["transformer.", ""]
  g = lambda s: [x + s for x in pre]  # noqa: E731
  p["embed"] = _plain(tf, _need(tf, g("wte.weight")))
  p["pos_embed"] = _plain(tf, _need(tf, g("wpe.weight")), pad_rows=2)
  _ln(tf, g("ln_f"), p.setdefault("final_norm", {}))
  if not cfg.tied_embeddings:
    p["head"] = _plain(tf, need("lm_head.weight"), transpose=True)
  for i in range(cfg.n_layers):
    L = lambda s: _need(tf, g(f"h.{i}.{s}"))  # noqa: E731
    a = {}
    for j, ours in enumerate(("query", "key", "value")):
      a[ours] = {
        "kernel": _heads(tf, L("attn.c_attn.weight"), "in", H, K, j * D, K, 1),
        "bias": _heads(tf, L("attn.c_attn.bias"), "bias", H, K, j * D, K, 0),
      }
    a["out"] = {"kernel": _heads(tf, L("attn.c_proj.weight"), "out", H, K, 0, K, 0), "bias": _plain(tf, L("attn.c_proj.bias"))}
    lay = {"attn": a, "ln_attn": {}, "ln_mlp": {}}
    _ln(tf, g(f"h.{i}.ln_1"), lay["ln_attn"])
    _ln(tf, g(f"h.{i}.ln_2"), lay["ln_mlp"])
    lay["mlp"] = {
      "wi": {"kernel": _plain(tf, L("mlp.c_fc.weight")), "bias": _plain(tf, L("mlp.c_fc.bias"))},
      "wo": {"kernel": _plain(tf, L("mlp.c_proj.weight")), "bias": _plain(tf, L("mlp.c_proj.bias"))},
    }
    p[f"layer_{i}"] = lay
  return p


def _neox_recipes(tf: TensorFiles, cfg: M.ModelConfig) -> dict:
  """Recipes of a GPT-NeoX / Pythia checkpoint (fused query_key_value, interleaved per head)."""
  H, K = cfg.n_heads, cfg.d_model // cfg.n_heads
  p: dict = {}

  def need(*names):
    return _need(tf, names)

  pre = ["gpt_neox.", ""]
  g = lambda s: [x + s for x in pre]  # noqa: E731
  p["embed"] = _plain(tf, _need(tf, g("embed_in.weight")))
  _ln(tf, g("final_layer_norm"), p.setdefault("final_norm", {}))
  if not cfg.tied_embeddings:
    p["head"] = _plain(tf, need("embed_out.weight", "lm_head.weight"), transpose=True)
  for i in range(cfg.n_layers):
    L = lambda s: _need(tf, g(f"layers.{i}.{s}"))  # noqa: E731
    a = {}
    for j, ours in enumerate(("query", "key", "value")):
      a[ours] = {
        "kernel": _heads(tf, L("attention.query_key_value.weight"), "in", H, K, j * K, 3 * K, 0),
        "bias": _heads(tf, L("attention.query_key_value.bias"), "bias", H, K, j * K, 3 * K, 0),
      }
    a["out"] = {
      "kernel": _heads(tf, L("attention.dense.weight"), "out", H, K, 0, K, 1),
      "bias": _plain(tf, L("attention.dense.bias")),
    }
    lay = {"attn": a, "ln_attn": {}, "ln_mlp": {}}
    _ln(tf, g(f"layers.{i}.input_layernorm"), lay["ln_attn"])
    _ln(tf, g(f"layers.{i}.post_attention_layernorm"), lay["ln_mlp"])
    lay["mlp"] = {
      "wi": {
        "kernel": _plain(tf, L("mlp.dense_h_to_4h.weight"), transpose=True),
        "bias": _plain(tf, L("mlp.dense_h_to_4h.bias")),
      },
      "wo": {
        "kernel": _plain(tf, L("mlp.dense_4h_to_h.weight"), transpose=True),
        "bias": _plain(tf, L("mlp.dense_4h_to_h.bias")),
      },
    }
    p[f"layer_{i}"] = lay
  return p


_RECIPES = {"opt": _opt_recipes, "gpt2": _gpt2_recipes, "gpt_neox": _neox_recipes}


def recipes(tf: TensorFiles, hf: dict, cfg: M.ModelConfig) -> dict:
  """The lmtrace param tree (same structure as the model's) of Recipes for one HF directory."""
  kind = hf["model_type"]
  if kind not in _RECIPES:  # pragma: no cover - model_config refuses it first
    raise errors.ConfigError(f"unknown model_type {kind!r}")
  return _RECIPES[kind](tf, cfg)


def check_recipes(rec: dict, model, src: str) -> None:
  """Every parameter present with the model's shape (no missing, extra or mis-shaped tensor)."""
  shapes, _ = M.abstract_params(model)
  flat_s = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
  flat_r = dict(jax.tree_util.tree_flatten_with_path(rec, is_leaf=lambda x: isinstance(x, Recipe))[0])
  if set(flat_s) != set(flat_r):
    miss = sorted(jax.tree_util.keystr(k) for k in set(flat_s) - set(flat_r))
    extra = sorted(jax.tree_util.keystr(k) for k in set(flat_r) - set(flat_s))
    raise errors.CheckpointError(f"{src}: parameter tree mismatch (missing {miss[:3]}, extra {extra[:3]})")
  for k, s in flat_s.items():
    r = flat_r[k]
    if tuple(r.shape) != tuple(s.shape):
      where = jax.tree_util.keystr(k)
      raise errors.CheckpointError(
        f"{src}: tensor {r.name} of shape {r.src_shape} gives {tuple(r.shape)} for {where}, the config implies {tuple(s.shape)}"
      )


def load_params(src: str, mesh=None, dtype=np.float32):
  """(params on `mesh`, ModelConfig, HF config) of one HF directory, read lazily shard by shard."""
  from lib import sharding

  hf = read_hf_config(src)
  cfg = model_config(hf, src)
  model = M.make(cfg)
  tf = TensorFiles(src)
  rec = recipes(tf, hf, cfg)
  check_recipes(rec, model, src)
  mesh = mesh or sharding.single_device_mesh()
  shards = M.param_shardings(model, mesh)

  def build(r: Recipe, s):
    return jax.make_array_from_callback(tuple(r.shape), s, lambda idx: r.read(idx).astype(dtype))

  params = jax.tree.map(build, rec, shards, is_leaf=lambda x: isinstance(x, Recipe))
  return params, cfg, hf


# ----------------------------------------------------------------------------------------------
# Workdir


_STEP_TOKEN = re.compile(r"(?:step|checkpoint|ckpt|iter)[-_]?(\d+)", re.IGNORECASE)
_SNAPSHOT = re.compile(r"[0-9a-f]{40}")


def _snapshot_refs(src: str) -> list[str]:
  """Names of the refs (e.g. 'step1000', 'main') of a Hugging Face cache snapshot folder
  (.../models--org--name/snapshots/<commit>), read from the cache's refs/ files; [] for other folders."""
  path = os.path.abspath(src)
  name, parent = os.path.basename(path), os.path.dirname(path)
  refs = os.path.join(os.path.dirname(parent), "refs")
  if not _SNAPSHOT.fullmatch(name) or os.path.basename(parent) != "snapshots" or not os.path.isdir(refs):
    return []
  out = []
  for root, _, files in os.walk(refs):
    for f in files:
      try:
        with open(os.path.join(root, f)) as fh:
          if fh.read().strip() == name:
            out.append(os.path.relpath(os.path.join(root, f), refs))
      except OSError:
        continue
  return sorted(out)


def step_of(src: str) -> int | None:
  """The training step a revision folder names: its OWN name ('step143000', 'step-1000', 'checkpoint-500',
  'pythia-70m-step3000', or digits only like '1000'), or the step<N> ref of a Hugging Face cache snapshot.
  Parent folders never count (--src=/data/step2_runs/opt-125m names no step). None if the name gives
  no step; errors.ConfigError if it gives several."""
  name = os.path.basename(os.path.normpath(os.path.abspath(src)))
  if name.isdigit():
    return int(name)
  found = sorted({int(m) for m in _STEP_TOKEN.findall(name)})
  if not found:
    found = sorted({int(m) for r in _snapshot_refs(src) for m in _STEP_TOKEN.findall(os.path.basename(r))})
    name = f"{name} (refs {_snapshot_refs(src)})" if found else name
  if len(found) > 1:
    raise errors.ConfigError(f"--src {src}: the folder name {name!r} names several steps {found}; pass --steps=")
  return found[0] if found else None


def _steps(srcs: list[str], steps: str | None) -> list[int]:
  """One step per source: from --steps, else from each revision folder's own name (step_of). A series
  in which some folders name a step and others do not, or two name the same step, is refused."""
  if steps:
    try:
      out = [int(s) for s in steps.split(",") if s.strip()]
    except ValueError:
      raise errors.ConfigError(f"--steps={steps!r} is not comma-separated integers") from None
    if len(out) != len(srcs):
      raise errors.ConfigError(f"--steps gives {len(out)} steps for {len(srcs)} --src directories")
    if any(s < 0 for s in out):
      raise errors.ConfigError(f"--steps={steps!r}: steps must be >= 0")
  else:
    out = [step_of(s) for s in srcs]
    if None in out:
      bad = srcs[out.index(None)]
      if len(srcs) > 1:
        raise errors.ConfigError(
          f"cannot read a step from the folder name of {bad!r} (expected e.g. '.../step143000' or '.../checkpoint-500'; "
          f"parent folders are not read); pass --steps="
        )
      log.info("the folder name of %s names no step: imported as step 0 (pass --steps= to choose)", bad)
      out = [0]
  if len(set(out)) != len(out):
    dup = sorted({s for s in out if out.count(s) > 1})
    raise errors.ConfigError(f"two revisions map to the same step {dup} (steps {out}); pass --steps=")
  return out


def run_config(cfg: M.ModelConfig, hf: dict, srcs: list[str], steps: list[int], tok, probe_text: str, tokenizer_dst: str):
  """A full lmtrace run config for an imported series."""
  import dataclasses

  from configs import base

  c = base.defaults()
  for k, v in dataclasses.asdict(cfg).items():
    c.model[k] = v
  c.model.preset = f"hf:{hf.get('model_type')}"
  c.data.source = dict(
    kind="text",
    path=os.path.abspath(probe_text) if probe_text else "",
    tokenizer="hf",
    tokenizer_model=tokenizer_dst,
    vocab_size=cfg.vocab_size,
    validation_fraction=1.0,
    test_fraction=0.0,
  )
  c.data.seq_len = min(int(c.data.seq_len), cfg.max_len)
  d = c.to_dict()
  d["import"] = {
    "sources": [os.path.abspath(s) for s in srcs],
    "steps": steps,
    "model_type": hf.get("model_type"),
    "architectures": hf.get("architectures"),
    "tokenizer": tokenizer_dst,
    "special_ids": tok.special_ids() if tok else None,
    "tokenizer_vocab": tok.vocab_size if tok else None,
  }
  return d


def _checked_sources(srcs: list[str], workdir: str, steps, tokenizer, probe_text: str):
  """(steps, HF configs, model configs, tokenizer or None): every source (config, tensors, shapes), the
  tokenizer and the probe text checked before anything is written."""
  from lib.tokenizer import HFTokenizer

  if not srcs:
    raise errors.ConfigError("--src names no directory")
  if os.path.exists(workdir) and os.listdir(workdir):
    raise errors.ConfigError(f"--workdir {workdir} exists and is not empty: import into a new directory")
  step_list = _steps(list(srcs), steps)
  hfs = [read_hf_config(s) for s in srcs]
  cfgs = [model_config(h, s) for h, s in zip(hfs, srcs)]
  for s, c in zip(srcs[1:], cfgs[1:]):
    if c != cfgs[0]:
      raise errors.ConfigError(f"{s} is a different architecture from {srcs[0]}: one workdir holds one model")
  model = M.make(cfgs[0])
  for s, h in zip(srcs, hfs):
    check_recipes(recipes(TensorFiles(s), h, cfgs[0]), model, s)
  tok_dir = tokenizer or next((s for s in srcs if os.path.exists(os.path.join(s, "tokenizer.json"))), None)
  tok = None
  if tok_dir:
    tok = HFTokenizer(tok_dir)
    tok.check_model_vocab(cfgs[0].vocab_size, f" in {srcs[0]}")
  elif tokenizer is not None:
    raise errors.DataError(f"--tokenizer {tokenizer} holds no tokenizer.json")
  if probe_text and not os.path.isfile(probe_text):
    raise errors.DataError(f"--probe_text {probe_text} is not a file")
  return step_list, hfs, cfgs, tok


def _copy_tokenizer(tok, tmp: str, final: str) -> str:
  """Copies the tokenizer's files into `tmp`/tokenizer; returns where its tokenizer.json will be in `final`."""
  os.makedirs(os.path.join(tmp, "tokenizer"))
  d = os.path.dirname(tok.path)
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
    if os.path.exists(os.path.join(d, f)):
      shutil.copy(os.path.join(d, f), os.path.join(tmp, "tokenizer", f))
  return os.path.join(final, "tokenizer", "tokenizer.json")


def import_series(
  srcs: Sequence[str],
  workdir: str,
  *,
  steps: str | None = None,
  tokenizer: str | None = None,
  probe_text: str = "",
  mesh=None,
  tokens_per_step: int = 0,
) -> dict:
  """Converts revisions `srcs` into `workdir` (must not exist or be empty). Returns the run config."""
  from lib import ckpt, sharding

  srcs = [s for s in srcs if s]
  step_list, hfs, cfgs, tok = _checked_sources(srcs, workdir, steps, tokenizer, probe_text)
  mesh = mesh or sharding.single_device_mesh()
  final = os.path.abspath(workdir)
  tmp = final.rstrip("/") + ".partial"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  try:
    tok_dst = _copy_tokenizer(tok, tmp, final) if tok else ""
    ck = ckpt.Checkpointer(tmp, analysis_steps=step_list, resume_every=0, params_only=True, async_=False)
    try:
      for s, st in zip(srcs, step_list):
        t0 = time.time()
        params, _, _ = load_params(s, mesh)
        meta = {"step": st, "source": os.path.abspath(s), "imported": True}
        if tokens_per_step > 0:  # e.g. Pythia: 1024 x 2048 tokens per step
          meta["tokens_seen"] = st * int(tokens_per_step)
        ck.save(st, {"params": params, "opt_state": {}, "step": st, "rng": jax.random.key(0)}, meta)
        ck.wait()
        log.info("imported %s as step %d (%.1fs)", s, st, time.time() - t0)
        del params
    finally:
      ck.close()
    run_cfg = run_config(cfgs[0], hfs[0], list(srcs), step_list, tok, probe_text, tok_dst)
    ckpt.save_json(os.path.join(tmp, "config.json"), run_cfg)
    if os.path.isdir(final):
      os.rmdir(final)  # empty (checked above)
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return run_cfg


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m lib.hf_import", description=__doc__.split("\n\n")[0])
  ap.add_argument("--src", required=True, help="comma-separated local HF model directories, one per revision")
  ap.add_argument("--workdir", required=True, help="new lmtrace workdir")
  ap.add_argument(
    "--steps", default="", help="comma-separated steps per --src (default: read 'step<N>' from each folder's own name)"
  )
  ap.add_argument("--tokenizer", default=None, help="directory or tokenizer.json (default: the first --src that has one)")
  ap.add_argument(
    "--probe_text", default="", help="local text file for probe sets (trajectories), tokenized by the model's tokenizer"
  )
  ap.add_argument("--mesh", default="", help="data,fsdp,tensor sizes to load onto (default: one device)")
  ap.add_argument("--tokens_per_step", type=int, default=0, help="recorded as tokens seen per step (Pythia: 2097152; 0 = none)")
  a = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  with errors.one_line_interrupt("lmtrace hf_import", f"nothing imported ({a.workdir}.partial removed)"):
    return _main(a)


def _main(a) -> int:
  try:
    mesh = None
    if a.mesh:
      mesh = sharding.mesh_from_flag(a.mesh)
    cfg = import_series(
      a.src.split(","),
      a.workdir,
      steps=a.steps or None,
      tokenizer=a.tokenizer,
      probe_text=a.probe_text,
      mesh=mesh,
      tokens_per_step=a.tokens_per_step,
    )
  except errors.LmtraceError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"imported {len(cfg['import']['steps'])} checkpoints of a {cfg['import']['model_type']} model into {a.workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
