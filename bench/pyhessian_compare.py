"""Side by side on this CPU: time per Hutchinson probe, lmtrace (JAX) vs PyHessian (PyTorch).

  pip install torch==2.13.0 pyhessian        # benchmark-only; not in requirements.txt
  python -m bench.pyhessian_compare [--preset=small --batch=8 --seq_len=128 --probes=20]

The same architecture on both sides (pre-LN GPT: learned positions, GELU MLP, tied embeddings,
LayerNorm, biases; lmtrace's `lib.model` vs an equivalent torch.nn module), the same batch shape and
loss (mean next-token cross-entropy), fp32, one batch (PyHessian's `data=` mode, which keeps the
first-order graph alive and does one double-backward per probe). Both sides run Rademacher probes;
lmtrace uses forward-over-reverse HVPs (jax.jvp of jax.grad), jitted, through
`analysis.hessian.hutchinson_trace`. Prints seconds per probe and the ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from analysis import hessian as H  # noqa: E402
from lib import model as M  # noqa: E402
from lib import sharding  # noqa: E402


def torch_model(cfg: M.ModelConfig):
  import torch
  from torch import nn

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
      self.pos = nn.Embedding(cfg.max_len + 2, cfg.d_model)
      layer = nn.TransformerEncoderLayer(
        cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
      )
      self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
      self.norm = nn.LayerNorm(cfg.d_model)
      for p in self.parameters():
        if p.dim() > 1:
          nn.init.normal_(p, std=0.02)

    def forward(self, x):
      L = x.shape[1]
      h = self.embed(x) + self.pos(torch.arange(L) + 2)[None]
      mask = torch.triu(torch.full((L, L), float("-inf")), diagonal=1)
      h = self.norm(self.blocks(h, mask=mask, is_causal=True))
      return (h @ self.embed.weight.T).reshape(-1, cfg.vocab_size)

  return GPT()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="small")
  ap.add_argument("--vocab", type=int, default=204)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--probes", type=int, default=20)
  args = ap.parse_args()
  import torch
  from pyhessian import hessian as pyhessian

  torch.set_num_threads(os.cpu_count() or 2)

  cfg = M.preset(args.preset, vocab_size=args.vocab, max_len=args.seq_len, mlp="gelu")
  rng = np.random.default_rng(0)
  x = rng.integers(4, args.vocab, (args.batch, args.seq_len + 1))
  inputs, targets = x[:, :-1], x[:, 1:]

  # --- PyHessian ----------------------------------------------------------------------------------
  torch.manual_seed(0)
  tm = torch_model(cfg).eval()
  n_torch = sum(p.numel() for p in tm.parameters())
  crit = torch.nn.CrossEntropyLoss()
  data = (torch.as_tensor(inputs), torch.as_tensor(targets.reshape(-1)))
  from torch.nn.attention import SDPBackend, sdpa_kernel

  with sdpa_kernel([SDPBackend.MATH]):  # CPU flash attention has no double-backward
    t0 = time.perf_counter()
    hc = pyhessian(tm, crit, data=data, cuda=False)  # builds and keeps the first-order graph
    setup = time.perf_counter() - t0
    hc.trace(maxIter=2, tol=-1.0)  # warm-up
    t0 = time.perf_counter()
    # PyHessian's stop test divides by (trace + 1e-6) without abs(), so with a negative running trace
    # it can return early even with tol < 0: divide by the probes it actually ran.
    samples = hc.trace(maxIter=args.probes, tol=-1.0)
    torch_probe = (time.perf_counter() - t0) / len(samples)

  # --- lmtrace ------------------------------------------------------------------------------------
  model = M.make(cfg)
  params = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  n_jax = M.param_count(model)
  batch = {
    "inputs": jnp.asarray(inputs, jnp.int32),
    "targets": jnp.asarray(targets, jnp.int32),
    "mask": jnp.ones(inputs.shape, jnp.int32),
    "segment_ids": jnp.ones(inputs.shape, jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(args.seq_len, dtype=jnp.int32), inputs.shape),
  }
  loss_fn = lambda p, b: M.mean_loss(model, p, b)  # noqa: E731
  matvec = H.make_hvp(loss_fn, [batch])
  run = lambda n, seed: H.hutchinson_trace(matvec, params, jax.random.key(seed), n)  # noqa: E731
  how = "analysis.hessian.hutchinson_trace"
  run(args.probes, 1)  # compile (the estimator jits its whole probe loop: warm up with the same count)
  t0 = time.perf_counter()
  res = run(args.probes, 2)
  jax.block_until_ready(getattr(res, "estimate", res))
  jax_probe = (time.perf_counter() - t0) / args.probes

  print(
    f"model {args.preset}: lmtrace {n_jax:,} params, torch {n_torch:,} params; batch {args.batch}x{args.seq_len}, "
    f"{os.cpu_count()} CPU threads"
  )
  print(
    f"PyHessian (torch {torch.__version__}, double-backward, graph kept): {torch_probe * 1e3:.1f} ms/probe "
    f"(setup {setup:.2f} s; {len(samples)} probes; trace ≈ {np.mean(samples):.1f})"
  )
  print(f"lmtrace ({how}): {jax_probe * 1e3:.1f} ms/probe")
  print(
    f"ratio lmtrace / PyHessian time per probe = {jax_probe / torch_probe:.2f}  "
    f"(< 1: lmtrace is faster; {math.log2(torch_probe / jax_probe):+.2f} doublings)"
  )


if __name__ == "__main__":
  main()
