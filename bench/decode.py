"""Decoding benchmark: KV-cache decoding (analysis.generate) vs recomputing the full forward every step.

  python -m bench.decode                                    # 'small' preset, batch 8, 16-token prompts, 112 new
  python -m bench.decode --preset=opt-125m --vocab=50272 --batch=16 --max_new=256 --max_len=512   # on a GPU

Prints new tokens/s of both paths (each timed after a compile run, best of --repeats) and their ratio;
checks that both decode the same tokens (greedy).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import linen as nn

from analysis import generate as G
from lib import model as M
from lib import sharding


def main(argv=None) -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="small")
  ap.add_argument("--vocab", type=int, default=512)
  ap.add_argument("--max_len", type=int, default=128)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--max_new", type=int, default=112)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args(argv)
  cfg = M.preset(a.preset, vocab_size=a.vocab, max_len=a.max_len)
  params = nn.unbox(M.init_params(M.make(cfg), jax.random.key(0), sharding.single_device_mesh()))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(4, a.vocab, a.prompt) for _ in range(a.batch)]
  res = {}
  for cache in (True, False):
    G.generate([(cfg, params)], prompts, a.max_new, sampling=G.Sampling(0.0), cache=cache)  # compile
    best = float("inf")
    for _ in range(a.repeats):
      t0 = time.perf_counter()
      out = G.generate([(cfg, params)], prompts, a.max_new, sampling=G.Sampling(0.0), cache=cache)
      best = min(best, time.perf_counter() - t0)
    res[cache] = (best, out.tokens)
    print(f"{'kv-cache' if cache else 'uncached'}: {a.batch * a.max_new / best:,.0f} new tokens/s ({best:.3f} s)")
  same = np.array_equal(res[True][1], res[False][1])
  print(f"speed-up kv-cache / uncached: {res[False][0] / res[True][0]:.2f}x; same tokens: {same}")
  n = M.param_count(M.make(cfg))
  print(f"{a.preset} ({n:,} params), batch {a.batch}, prompt {a.prompt}, new {a.max_new}, {jax.devices()[0].platform}")


if __name__ == "__main__":
  main()
