"""Hooks on the trainer's loop (lib/trainloop.py): `every=N` fires at exactly the expected steps, in order,
before the step's checkpoint, and a resumed run fires them at the same steps as an uninterrupted one — in
the loop alone, in a single run and in a seed-vectorised group."""

import json
import os

import jax
import numpy as np
import pytest

import train
from lib import trainloop
from lib.trainloop import Hook
from tests.helpers import tiny_cfg


class CountRuns:
  """State = the step count; records rows, saves and the order of calls."""

  def __init__(self):
    self.calls, self.rows = [], {}

  def train(self, state, step):
    return state + 1, {"train/loss": np.float32(state)}, {}

  def log(self, step, fetched, batch_np, *, dt, n_steps):
    self.calls.append(("log", step))

  def write(self, step, rows, show=False):
    self.rows.setdefault(step, []).append(rows)

  def wants_save(self, step, last):
    return last

  def save(self, step, state, last):
    self.calls.append(("save", step, state))


def loop_run(runs, hooks, start, stop=None, total=10, fresh=False):
  loop = trainloop.Loop(total=total, log_every=4, stop=stop)
  for h in hooks:
    loop.add_hook(h)
  return loop.run(runs, start, start, fresh=fresh)


def test_every_n_fires_at_exactly_its_steps_in_order_before_the_save():
  r, fired = CountRuns(), []
  hooks = [
    Hook(lambda i: fired.append(("a", i.step, i.state)), every=3),
    Hook(lambda i: fired.append(("b", i.step)), every=5, at_total=True),
    Hook(lambda i: fired.append(("c", i.step)), when=lambda s: s == 7, row_first=True),
  ]
  assert loop_run(r, hooks, 0, fresh=True) == (10, 10)
  want = [("a", 0, 0), ("b", 0), ("a", 3, 3), ("b", 5), ("a", 6, 6), ("c", 7), ("a", 9, 9), ("b", 10)]
  assert fired == want
  # the fresh start's hooks come before its first save; `row_first` logs step 7 (not a log step) first
  assert r.calls[0] == ("save", 0, 0) and ("log", 7) in r.calls and r.calls[-1] == ("save", 10, 10)


def test_a_resumed_loop_fires_at_the_same_steps():
  fired = []
  hooks = [Hook(lambda i: fired.append(i.step), every=3), Hook(lambda i: fired.append(-i.step), at_total=True)]
  loop_run(CountRuns(), hooks, 0, fresh=True)
  straight, fired[:] = list(fired), []
  assert loop_run(CountRuns(), hooks, 0, stop=6, fresh=True) == (6, 6)  # stop_at=6: fires at 6, then saves it
  assert loop_run(CountRuns(), hooks, 6) == (10, 10)  # resumed from the checkpoint of step 6
  assert fired == straight == [0, 3, 6, 9, -10]


def test_a_hook_may_replace_the_state_and_write_rows():
  r = CountRuns()
  hooks = [
    Hook(lambda i: i.state + 100, every=5, updates_state=True),
    Hook(lambda i: i.write({"hook/state": i.state}), every=5),
    Hook(lambda i: "ignored", every=1),  # a return value counts only with updates_state
  ]
  loop_run(r, hooks, 1, stop=6)
  assert r.rows == {5: [{"hook/state": 105}]} and r.calls[-1] == ("save", 6, 106)


# ---------------------------------------------------------------- in the trainer: a single run and a group


STEPS = 12
OVER = {"train.steps": STEPS, "eval.every": 6, "ckpt.resume_every": 4}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


class Recorder:
  """A user hook: records (step, leading shape of a parameter) and writes one row per run."""

  def __init__(self):
    self.seen = []

  def __call__(self, info):
    leaf = jax.tree.leaves(info.params["embed"])[0]
    self.seen.append((info.step, leaf.shape[0]))
    x = np.asarray(leaf, np.float64)
    if x.ndim == 3:  # a group: one row per run
      info.write([{"hook/norm": float(np.sqrt((x_i**2).sum()))} for x_i in x])
    else:
      info.write({"hook/norm": float(np.sqrt((x**2).sum()))})


def hook_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["hook/norm"] for r in map(json.loads, f) if "hook/norm" in r}


def train_with(cfg, workdir, rec):
  return train.train_and_evaluate(cfg, workdir, hooks=[Hook(rec, every=5, name="recorder")])


@pytest.mark.slow
def test_single_run_hook_fires_at_its_steps_and_resumes_identically(tmp_path, data_dir):
  straight, a = Recorder(), str(tmp_path / "straight")
  out = train_with(tiny_cfg(data_dir, **OVER), a, straight)
  assert [s for s, _ in straight.seen] == [0, 5, 10] and sorted(hook_rows(a)) == [0, 5, 10]
  assert out["hook/norm"] == hook_rows(a)[10]
  first, second, b = Recorder(), Recorder(), str(tmp_path / "resumed")
  train_with(tiny_cfg(data_dir, **OVER, **{"train.stop_at": 7}), b, first)
  train_with(tiny_cfg(data_dir, **OVER), b, second)
  assert [s for s, _ in first.seen] == [0, 5] and [s for s, _ in second.seen] == [10]
  assert hook_rows(b) == hook_rows(a)  # the same steps and values, each once


@pytest.mark.slow
def test_group_hook_sees_the_run_axis_and_resumes_identically(tmp_path, data_dir):
  over = {**OVER, "train.seeds": "0,1", "data.seed": -1}
  straight, a = Recorder(), str(tmp_path / "group")
  train_with(tiny_cfg(data_dir, **over), a, straight)
  assert straight.seen == [(0, 2), (5, 2), (10, 2)]  # every leaf has the leading run axis
  ra, rb = hook_rows(os.path.join(a, "seed_0")), hook_rows(os.path.join(a, "seed_1"))
  assert sorted(ra) == sorted(rb) == [0, 5, 10] and ra[10] != rb[10]  # each run its own row
  single = str(tmp_path / "seed1_alone")
  train_with(tiny_cfg(data_dir, **OVER, seed=1, **{"data.seed": -1}), single, Recorder())
  np.testing.assert_allclose([rb[k] for k in (0, 5, 10)], [hook_rows(single)[k] for k in (0, 5, 10)], rtol=1e-5)
  first, second, b = Recorder(), Recorder(), str(tmp_path / "resumed")
  train_with(tiny_cfg(data_dir, **over, **{"train.stop_at": 7}), b, first)
  train_with(tiny_cfg(data_dir, **over), b, second)
  assert [s for s, _ in first.seen] == [0, 5] and [s for s, _ in second.seen] == [10]
  for s in (0, 1):
    assert hook_rows(os.path.join(b, f"seed_{s}")) == hook_rows(os.path.join(a, f"seed_{s}"))
