"""Checkpoint and learning-rate schedules against hand-computed values."""

import ml_collections as mlc
import numpy as np
import pytest

from lib import optim, schedules


def test_pythia_schedule_matches_published_154_checkpoints():
  s = schedules.pythia(143_000, every=1000)
  assert len(s) == 154
  assert s[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
  assert s[-1] == 143_000


def test_chang_exponential_schedule_has_222_steps():
  s = schedules.exponential(1_000_000, s0=100, s1=25_000, t1=1_000_000)
  assert len(s) == 222
  assert s[:4] == [0, 101, 205, 311]
  assert s[-2:] == [957_299, 981_536]
  gaps = np.diff(s)
  assert np.all(np.diff(gaps) >= -1)  # intervals grow


def test_union_and_parse():
  specs = schedules.parse_schedules("pythia:every=100;explicit:steps=7/250;interval:every=60")
  s = schedules.analysis_steps(specs, 300)
  assert s == sorted(set([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 100, 200, 300, 7, 250, 60, 120, 180, 240]))
  assert schedules.analysis_steps([], 10) == [0]
  with pytest.raises(ValueError, match="kind"):
    schedules.analysis_steps([{"kind": "fibonacci"}], 10)
  log = schedules.log_spaced(1000, 50)
  assert log[0] == 0 and log[-1] == 1000 and len(log) > 30


def _opt(**kw):
  c = mlc.ConfigDict(
    dict(
      name="adamw",
      lr=1.0,
      schedule="cosine",
      warmup_steps=10,
      final_lr_frac=0.1,
      b1=0.9,
      b2=0.98,
      eps=1e-8,
      weight_decay=0.0,
      momentum=0.0,
      nesterov=False,
      grad_clip=0.0,
    )
  )
  c.update(kw)
  return c


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "inverse_sqrt"])
def test_lr_schedules(name):
  f = optim.lr_schedule(_opt(schedule=name), 110)
  assert float(f(0)) == 0.0
  assert abs(float(f(5)) - 0.5) < 1e-6
  assert abs(float(f(10)) - 1.0) < 1e-6
  end = float(f(110))
  expect = {"cosine": 0.1, "linear": 0.1, "constant": 1.0, "inverse_sqrt": np.sqrt(10 / 110)}[name]
  assert abs(end - expect) < 1e-5


def test_unknown_optimizer():
  with pytest.raises(ValueError, match="opt.name"):
    optim.make_optimizer(_opt(name="adam_w"), 10)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "inverse_sqrt"])
def test_warmup_above_zero(name):
  """warmup_from_zero=False: update k = count+1 uses lr·k/warmup (step 1 moves), lr at update 10, same decay."""
  f = optim.lr_schedule(_opt(schedule=name, warmup_from_zero=False), 110)
  g = optim.lr_schedule(_opt(schedule=name), 110)
  assert abs(float(f(0)) - 0.1) < 1e-7
  assert abs(float(f(4)) - 0.5) < 1e-6
  assert abs(float(f(9)) - 1.0) < 1e-6
  assert all(float(f(c)) == float(g(c)) for c in (10, 11, 50, 110))


@pytest.mark.parametrize("text", ["interval:every=0", "explicit:steps=a/b", "pythia:every=-1", "bogus:every=3", "explicit:"])
def test_bad_schedule_strings_are_config_errors(text):
  from lib import errors

  with pytest.raises(errors.ConfigError, match="schedule"):
    schedules.analysis_steps(schedules.parse_schedules(text), 100)
