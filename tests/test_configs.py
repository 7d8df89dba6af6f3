"""Every run card in configs/ loads, is locked (typos are refused) and trains 2 steps."""

import glob
import importlib
import os

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARDS = sorted(
  os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not p.endswith("__init__.py")
)


def _shrink(c, data_dir, corpus):
  c.unlock()
  c.model.d_model, c.model.n_heads, c.model.d_ff, c.model.n_layers = 32, 2, 64, 1
  c.model.max_len = max(32, c.model.get("max_len", 32)) if not c.model.preset.startswith("opt") else 32
  c.model.dtype = "float32"
  c.data.seq_len = 32
  c.data.data_dir = data_dir
  specs = list(c.data.groups.values()) if len(c.data.groups) else [c.data.source]
  for s in specs:
    if s.kind == "text":
      s.path = corpus
      s.doc_tokens = 32
    else:
      s.n_train, s.n_validation, s.n_test = 300, 40, 10
  c.train.steps, c.train.batch_size, c.train.log_every = 2, 8, 1
  c.eval.batch_size, c.eval.batches, c.eval.every = 8, 1, 2
  c.probes.sequences = 4
  c.log.tensorboard = False
  return c


@pytest.mark.slow
@pytest.mark.parametrize("card", CARDS)
def test_config_card_runs_two_steps(card, tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.txt").write_text("\n\n".join(f"paragraph {i} of a small test corpus." for i in range(200)))
  c = importlib.import_module(f"configs.{card}").get_config()
  assert c.is_locked, f"configs/{card}.py must return a locked config"
  with pytest.raises(AttributeError):
    c.opt.lrr = 1.0  # noqa: B018 - a typo must not silently add a key
  out = train.train_and_evaluate(_shrink(c, str(tmp_path / "data"), str(corpus)), str(tmp_path / "w"))
  assert out["step"] == 2


def test_set_keys_applies_dotted_overrides_and_refuses_unknown_keys():
  from configs import base
  from lib import config_check, errors

  c = base.defaults()
  c.lock()
  config_check.set_keys(c, {"opt.lr": 0.5, "data.source.kind": "hmm", "train.seeds": "0-1"})
  assert (c.opt.lr, c.data.source.kind, c.train.seeds) == (0.5, "hmm", "0-1")
  with pytest.raises(errors.ConfigError, match=r"unknown config key 'opt\.lrr' \(did you mean 'opt\.lr'\?\)"):
    config_check.set_keys(c, {"opt.lrr": 1.0})
  with pytest.raises(errors.ConfigError, match=r"config key 'opt\.lr' cannot take 'abc'"):
    config_check.set_keys(c, {"opt.lr": "abc"})
  assert c.opt.lr == 0.5  # a refused override changes nothing
