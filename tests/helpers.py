"""Shared test helpers: a tiny, fast run card on the bigram language."""

from configs import base


def tiny_cfg(data_dir: str, **over):
  """A nano model on a bigram language: 12 steps of 8x32 tokens; `over` = {"section.key": value}."""
  c = base.defaults()
  c.model = base.model_config("nano")
  c.model.vocab_size = -1
  c.model.max_len = 32
  c.data.data_dir = data_dir
  c.data.seq_len = 32
  c.data.source.n_train = 2000
  c.data.source.n_validation = 200
  c.data.source.n_test = 50
  c.train.steps = 12
  c.train.batch_size = 8
  c.train.log_every = 1
  c.eval.every = 6
  c.eval.batches = 1
  c.eval.batch_size = 8
  c.ckpt.schedule = "pythia:every=4"
  c.ckpt.resume_every = 3
  c.log.tensorboard = False
  c.update_from_flattened_dict(over)
  return c
