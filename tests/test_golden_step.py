"""Golden one-step test (as nanodo has): fixed init seed, a fixed batch from the real data path (a seeded
bigram language packed by the pipeline), one AdamW step; the loss before and after, the gradient norm
and a few parameter values are pinned to literal numbers. Any change to the data layout, the model's
initialisation or forward pass, the loss or the optimizer update moves them."""

import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from data import pipeline as dp
from data import sources, vocab
from lib import model as M
from lib import optim, sharding, steps

OPT = dict(name="adamw", lr=1e-2, schedule="constant", warmup_steps=0, final_lr_frac=1.0, b1=0.9, b2=0.98, eps=1e-8)
OPT.update(weight_decay=0.1, momentum=0.9, nesterov=False, grad_clip=1.0)


def _golden_step():
  lang = sources.Bigram.random(seed=0, n_terminals=20)
  src = sources.ListSource(sources.synthetic_examples(lang, 64, 0, with_true=True))
  batch = dp.Pipeline([src], seed=0, global_batch=4, seq_len=32).batch(0)
  cfg = M.preset("nano", vocab_size=vocab.vocab_size(20), max_len=32)
  model = M.make(cfg)
  params = M.init_params(model, jax.random.key(0), sharding.single_device_mesh())
  tx, sched = optim.make_optimizer(mlc.ConfigDict(OPT), 10)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0)}
  state["mixture"] = {}
  batch = jax.tree.map(jnp.asarray, batch)
  new, metrics = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, schedule=sched))(state, batch)
  after = jax.jit(lambda p: M.mean_loss(model, p, batch))(new["params"])
  return batch, metrics, float(after), new["params"]


def test_golden_one_step():
  batch, m, after, p = _golden_step()
  assert int(batch["mask"].sum()) == GOLDEN["tokens"]
  got = {
    "loss": float(m["train/loss"]),
    "excess_loss": float(m["train/excess_loss"]),
    "grad_norm": float(m["train/grad_norm"]),
    "loss_after": after,
    "embed[5, :3]": np.asarray(p["embed"][5, :3]),
    "layer_0/mlp/wi/kernel[0, :3]": np.asarray(p["layer_0"]["mlp"]["wi"]["kernel"][0, :3]),
    "layer_1/attn/out/kernel[0, 0, :3]": np.asarray(p["layer_1"]["attn"]["out"]["kernel"][0, 0, :3]),
  }
  for k, v in got.items():
    np.testing.assert_allclose(v, GOLDEN[k], rtol=2e-5, atol=1e-7, err_msg=k)


# Measured once on CPU (jax 0.10.2, float32) from the code at the time of writing; see the module docstring.
GOLDEN = {
  "tokens": 116,
  "loss": 3.17583966255188,  # ~ log(24): a fresh model is near uniform over the 24-token vocabulary
  "excess_loss": 0.8969039916992188,
  "grad_norm": 1.7733798027038574,
  "loss_after": 2.9657583236694336,
  "embed[5, :3]": [-0.01014140248298645, -0.000644537212792784, -0.0031696127261966467],
  "layer_0/mlp/wi/kernel[0, :3]": [0.014412875287234783, 0.0039004292339086533, 0.015265615656971931],
  "layer_1/attn/out/kernel[0, 0, :3]": [-0.026268767192959785, -0.031110908836126328, -0.021256310865283012],
}
