"""Run card: a causal LM on a random HMM language (Liu et al. 2022's HMM setting, causal objective).

  python train.py --config=configs/hmm.py --workdir=runs/hmm

HMM: 100 hidden states, 200 tokens, 16-token sentences (data/hmm.py); exact next-token log-probs by the
forward algorithm, so eval/excess_loss is the model's loss above the optimum.
Expected (measured, tiny, seed 0, 1000 steps): eval excess loss 0.573 nats/token at step 250, 0.542
at step 1000 (eval loss 4.860 vs the exact optimum 4.317): the tiny model learns this HMM slowly.
Runtime: 2.9 min wall on a shared 2-core CPU (dataset build included).
"""

import ml_collections as mlc

from configs import base


def get_config(arg: str = "tiny"):
  c = base.defaults()
  c.model = base.model_config(arg or "tiny")
  c.model.vocab_size = -1
  c.data.source = mlc.ConfigDict(
    dict(kind="hmm", seed=0, n_states=100, n_tokens=200, length=16, n_train=50_000, n_validation=1_000, n_test=1_000)
  )
  c.data.seq_len = 64
  c.train.steps = 1000
  c.ckpt.schedule = "pythia:every=250"
  c.ckpt.resume_every = 250
  c.eval.every = 250
  c.lock()
  return c
