"""Run card: a masked LM (bidirectional encoder) on the PCFG language, as Liu et al. 2022 train.

  python train.py --config=configs/pcfg_mlm.py --workdir=runs/pcfg_mlm
  python train.py --config=configs/pcfg_mlm.py --workdir=runs/pcfg_mlm_sgd --config.opt.name=sgd \
      --config.opt.lr=0.1 --config.opt.schedule=constant --config.opt.warmup_steps=120   # their Fig. 3 recipe

15% of word tokens are selected (80% -> [MASK], 10% random, 10% unchanged) and predicted; the loss is
the mean over selected tokens. Every eval also logs Liu's exact masked-LM numbers (data/mlm_exact.py):
eval/mlm_loss (expected cross-entropy against the exact masked-token conditional, each position of
`eval.mlm_sentences` validation sentences masked in turn), eval/optimal_loss and eval/excess_loss.
Expected (measured, tiny, seed 0, 1000 steps): eval masked-token loss 4.716 nats at step 250, 4.557
at step 1000. Runtime: 3.7 min of training wall on a shared 2-core CPU, after a first-use build of
the default PCFG dataset (330 s on that machine; later runs reuse it).
"""

from configs import pcfg


def get_config(arg: str = "tiny"):
  c = pcfg.get_config(arg)
  c.unlock()
  c.model.causal = False
  c.data.objective = "mlm"
  c.lock()
  return c
