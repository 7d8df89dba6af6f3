"""Function-preserving widening of a transformer by an integer factor r (Liu et al.'s enlarge.py, fixed).

The widened model has d_model·r, n_heads·r (same head dimension) and d_ff·r. Its residual stream
carries r copies of the small one's, x' = [x, x, …, x] (np.tile along the width), so:

  * embeddings, position tables, norm scales/biases and biases are tiled (no scaling): LayerNorm and
    RMSNorm statistics of r copies equal those of one copy (same mean, same variance), exactly;
  * every kernel is tiled along each widened axis and divided by r: its one widened *input* axis sums
    r identical copies, so y' = tile(y). Heads h' = i·H + h copy head h (same scores: head dim kept);
  * with tied embeddings the logits are h'·E'ᵀ = r·h·Eᵀ, so the final norm's scale and bias are divided
    by r instead (an untied head [D, V] is tiled along D and divided by r).

Liu et al.'s released enlarge.py (tile(W, r×r)/r for hidden weights, embeddings and decoder
repeat/r, LayerNorm repeated) does not run (undefined names `args.small_model_path` and `state_dict_large`; it writes to
the wrong path) and,
in a pre-LN model, dividing the embeddings by r would not preserve the function: the residual adds
unscaled sub-layer outputs to them. The logits of the widened model equal the small model's up to
float rounding (tests/test_enlarge.py: ≤ 1e-5), so Tr(H) of a small model can be measured inside a
large architecture (`enlarge_workdir` writes an ordinary workdir that analysis.flatness reads).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from lib import errors, integrity
from lib import model as M


def widened_config(cfg: M.ModelConfig, r: int) -> M.ModelConfig:
  """The architecture r times wider (d_model, n_heads, d_ff); refuses r < 2 and unsupported models."""
  if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < 2:
    raise errors.ConfigError(f"widening factor must be an integer >= 2, got {r!r}")
  if cfg.embed_proj_dim:
    raise errors.ConfigError("widening a model with embed_proj_dim (project_in/out) is not supported")
  return dataclasses.replace(cfg, d_model=cfg.d_model * r, n_heads=cfg.n_heads * r, d_ff=cfg.d_ff * r)


def _tile(x: np.ndarray, axes: tuple[int, ...], r: int) -> np.ndarray:
  reps = [1] * x.ndim
  for a in axes:
    reps[a] = r
  return np.tile(x, reps)


def _widen_leaf(path: tuple[str, ...], x: np.ndarray, r: int, tied: bool) -> np.ndarray:
  name, leaf = path[-2] if len(path) > 1 else "", path[-1]
  top = path[0]
  if top in ("embed", "pos_embed"):  # [V, D], [P, D]
    return _tile(x, (1,), r)
  if top == "head":  # untied [D, V]
    return _tile(x, (0,), r) / r
  if top == "final_norm":
    return _tile(x, (0,), r) / (r if tied else 1)
  if any(k.startswith("ln_") for k in path):  # block norms [D] (…/ln_attn/LayerNorm_0/scale)
    return _tile(x, (0,), r)
  if name in ("query", "key", "value"):  # kernel [D, H, K], bias [H, K]
    return _tile(x, (0, 1), r) / r if leaf == "kernel" else _tile(x, (0,), r)
  if name == "out":  # kernel [H, K, D], bias [D]
    return _tile(x, (0, 2), r) / r if leaf == "kernel" else _tile(x, (0,), r)
  if name in ("wi", "wi_gate", "wo"):  # kernel [D, F] / [F, D], bias [F] / [D]
    return _tile(x, (0, 1), r) / r if leaf == "kernel" else _tile(x, (0,), r)
  raise errors.ConfigError(f"do not know how to widen parameter {'/'.join(path)} {x.shape}")


def widen_params(params, cfg: M.ModelConfig, r: int):
  """Parameters of `widened_config(cfg, r)` computing the same function as `params` (host numpy)."""
  widened_config(cfg, r)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  treedef = jax.tree_util.tree_structure(params)
  out = []
  for kp, x in flat:
    path = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in kp)
    x = np.asarray(x)
    out.append(_widen_leaf(path, x, r, cfg.tied_embeddings).astype(x.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def enlarge_workdir(src: str, dst: str, r: int, steps=None) -> list[int]:
  """Writes `dst`: the run in `src` widened by r at `steps` (None = every checkpoint).

  dst is an ordinary workdir (config.json with the wide model, checkpoints/<step>/params) so every
  analysis job reads it; refuses to overwrite an existing dst with a different source or factor.
  """
  import orbax.checkpoint as ocp

  from lib import ckpt as C

  _, mcfg, cfg = C.load_model(src)
  wide = widened_config(mcfg, r)
  todo = sorted(C.available_steps(src)) if steps is None else [C.resolve_step(src, s) for s in steps]
  if not todo:
    raise errors.CheckpointError(f"{src} has no checkpoints to widen")
  new_cfg = dict(
    cfg, model=dict(vars(wide), preset=f"{cfg['model'].get('preset', '')}x{r}"), enlarged={"from": os.path.abspath(src), "r": r}
  )
  cpath = os.path.join(dst, "config.json")
  if os.path.exists(cpath):
    with open(cpath) as f:
      old = json.load(f)
    if old.get("enlarged") != new_cfg["enlarged"]:
      raise errors.CheckpointError(f"{dst} already holds another run ({old.get('enlarged')}); choose a new directory")
  os.makedirs(dst, exist_ok=True)
  C.save_json(cpath, new_cfg)
  have = C.available_steps(dst)
  mngr = ocp.CheckpointManager(
    os.path.abspath(os.path.join(dst, C.ANALYSIS_DIR)), options=ocp.CheckpointManagerOptions(create=True)
  )
  written = []
  try:
    for s in todo:
      if s in have:
        continue
      p = widen_params(C.restore_params(src, s), mcfg, r)
      meta = dict(C.read_meta(src, s), enlarged_from=os.path.abspath(src), r=r, step=s, integrity=integrity.FORMAT)
      mngr.save(s, args=ocp.args.Composite(params=ocp.args.StandardSave(p), meta=ocp.args.JsonSave(meta)), force=True)
      written.append(s)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  for s in written:  # committed: record the checksums every restore verifies (lib/integrity.py)
    integrity.seal(os.path.join(dst, C.ANALYSIS_DIR, str(s)))
  return todo
