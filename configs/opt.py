"""Run card: OPT-family sizes (125m ... 6.7b) for accelerators, bf16 compute, fp32 params/optimizer.

  python train.py --config=configs/opt.py:opt-125m --workdir=runs/opt125m \
      --config.data.source.kind=text --config.data.source.path='corpus/*.txt'
  python train.py --config=configs/opt.py:opt-350m --workdir=... --config.mesh.fsdp=8   # one 8-GPU node

Learned positions, ReLU, pre-LN, tied embeddings, sequence 2048, AdamW (β2 0.95), warmup 2000 +
cosine — OPT's recipe at small batch. Default data is byte-level text from `data.source.path`.
Expected result: not measured — it depends on your corpus (training loss falls steadily; eval loss
in nats per byte-level token). Runtime (opt-125m, an arithmetic estimate, not a measurement): 20,000
steps × 64 × 2048 tokens × 0.97 GFLOP/token (lib/model.py flops_per_token) = 2.5e18 FLOPs, ~1.8 h on
one H100 at 40% MFU; `bash bench/gpu_check.sh` measures the real step time and MFU on a lent GPU.
"""

import ml_collections as mlc

from configs import base


def get_config(arg: str = "opt-125m"):
  c = base.defaults()
  c.model = base.model_config(arg or "opt-125m")
  c.model.vocab_size = -1
  c.model.dtype = "bfloat16"
  c.data.source = mlc.ConfigDict(
    dict(kind="text", path="", tokenizer="bytes", doc_tokens=2048, vocab_size=0, validation_fraction=0.01, test_fraction=0.01)
  )
  c.data.seq_len = 2048
  c.train.steps = 20_000
  c.train.batch_size = 64
  c.opt.lr = 6e-4
  c.opt.b2 = 0.95
  c.opt.warmup_steps = 2000
  c.opt.weight_decay = 0.1
  c.ckpt.schedule = "pythia:every=1000"
  c.ckpt.resume_every = 1000
  c.eval.every = 1000
  c.eval.batches = 16
  c.lock()
  return c
