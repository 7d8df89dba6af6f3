"""HF import benchmark: seconds per GB of weights, converting a synthetic GPT-NeoX checkpoint in the HF
layout (random float16 safetensors, written here; no download, no torch) into an lmtrace workdir.

  python -m bench.hf_import                          # ~0.2 GB (d=1024, 8 layers)
  python -m bench.hf_import --d=2048 --layers=16     # ~1.7 GB
  python -m bench.hf_import --mesh=1,8,1             # lazy per-shard reads onto 8 devices

Prints the weight bytes, the import wall time (reading + placing + writing Orbax checkpoints) and s/GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np


def write_neox(d: str, dm: int, layers: int, vocab: int) -> int:
  from safetensors.numpy import save_file

  rng = np.random.default_rng(0)
  r = lambda *s: (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16)  # noqa: E731
  t = {"gpt_neox.embed_in.weight": r(vocab, dm), "embed_out.weight": r(vocab, dm)}
  t["gpt_neox.final_layer_norm.weight"], t["gpt_neox.final_layer_norm.bias"] = r(dm), r(dm)
  for i in range(layers):
    p = f"gpt_neox.layers.{i}."
    for n, shape in {
      "input_layernorm.weight": (dm,),
      "input_layernorm.bias": (dm,),
      "post_attention_layernorm.weight": (dm,),
      "post_attention_layernorm.bias": (dm,),
      "attention.query_key_value.weight": (3 * dm, dm),
      "attention.query_key_value.bias": (3 * dm,),
      "attention.dense.weight": (dm, dm),
      "attention.dense.bias": (dm,),
      "mlp.dense_h_to_4h.weight": (4 * dm, dm),
      "mlp.dense_h_to_4h.bias": (4 * dm,),
      "mlp.dense_4h_to_h.weight": (dm, 4 * dm),
      "mlp.dense_4h_to_h.bias": (dm,),
    }.items():
      t[p + n] = r(*shape)
  os.makedirs(d)
  save_file(t, os.path.join(d, "model.safetensors"))
  cfg = dict(
    model_type="gpt_neox",
    vocab_size=vocab,
    hidden_size=dm,
    num_hidden_layers=layers,
    num_attention_heads=dm // 64,
    intermediate_size=4 * dm,
    max_position_embeddings=2048,
    rotary_pct=0.25,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
  )
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  return sum(x.nbytes for x in t.values())


def main(argv=None) -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--d", type=int, default=1024)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--vocab", type=int, default=50304)
  ap.add_argument("--mesh", default="")
  a = ap.parse_args(argv)
  from lib import hf_import, sharding

  tmp = tempfile.mkdtemp(prefix="lmtrace-bench-import-")
  try:
    src = os.path.join(tmp, "step1000")
    nbytes = write_neox(src, a.d, a.layers, a.vocab)
    mesh = None
    if a.mesh:
      mesh = sharding.mesh_from_flag(a.mesh)
    t0 = time.perf_counter()
    hf_import.import_series([src], os.path.join(tmp, "w"), mesh=mesh)
    dt = time.perf_counter() - t0
    gb = nbytes / 1e9
    print(f"imported {gb:.3f} GB (float16 on disk) in {dt:.1f} s: {dt / gb:.1f} s/GB (mesh {a.mesh or 'one device'})")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
