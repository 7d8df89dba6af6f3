"""Seed-vectorised training (lib/multirun.py): each run equals its seed trained alone, group resume is
bit-for-bit, a diverging run stops only itself, unvectorisable configs are refused in one line."""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from lib import ckpt as C
from lib import errors, multirun, preempt, runlock, steps
from lib import metrics as MX
from tests.helpers import tiny_cfg

STEPS = 20
OVER = {"train.steps": STEPS, "data.seed": -1, "ckpt.schedule": "pythia:every=8", "ckpt.resume_every": 5, "eval.every": 10}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def rows(workdir, key):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


@pytest.fixture(scope="module")
def group(tmp_path_factory, data_dir):
  """Seeds 0 and 1, each with its own data order, as one vectorised run of 20 steps."""
  w = str(tmp_path_factory.mktemp("group"))
  out = train.train_and_evaluate(tiny_cfg(data_dir, **OVER, **{"train.seeds": "0,1"}), w)
  return w, out


@pytest.fixture(scope="module")
def group_vmap(tmp_path_factory, data_dir):
  """The same group with jax.vmap over the run axis (batched matmuls: the accelerator path)."""
  w = str(tmp_path_factory.mktemp("group_vmap"))
  train.train_and_evaluate(tiny_cfg(data_dir, **OVER, **{"train.seeds": "0,1", "train.seeds_mode": "vmap"}), w)
  return w


@pytest.fixture(scope="module")
def singles(tmp_path_factory, data_dir):
  ws = {}
  for s in (0, 1):
    ws[s] = str(tmp_path_factory.mktemp(f"single{s}"))
    train.train_and_evaluate(tiny_cfg(data_dir, **OVER, seed=s), ws[s])
  return ws


def test_mode():
  assert multirun.run_mode("auto") == "map"  # the tests run on CPU
  with pytest.raises(errors.ConfigError, match="train.seeds_mode='scan'"):
    multirun.run_mode("scan")


def test_parse_seeds():
  assert multirun.parse_seeds("0,1,2") == [0, 1, 2]
  assert multirun.parse_seeds("3-5") == [3, 4, 5]
  assert multirun.parse_seeds("") == []
  with pytest.raises(errors.ConfigError, match="repeats a seed"):
    multirun.parse_seeds("1,1")
  with pytest.raises(errors.ConfigError, match="expected integers"):
    multirun.parse_seeds("a,b")


@pytest.mark.slow
def test_group_writes_ordinary_workdirs(group):
  w, out = group
  assert sorted(out) == [0, 1] and all(m["step"] == STEPS and not m["diverged"] for m in out.values())
  assert json.load(open(os.path.join(w, multirun.GROUP)))["seeds"] == [0, 1]
  for s in (0, 1):
    wd = os.path.join(w, f"seed_{s}")
    cfg = C.read_config(wd)
    assert cfg["seed"] == s and cfg["train"]["seeds"] == ""
    assert {0, 1, 2, 4, 8, 16, 20} <= set(C.available_steps(wd))
    assert sorted(rows(wd, "train/loss")) == list(range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["map", "vmap"])
def test_each_run_equals_its_seed_trained_alone(mode, request, singles):
  w = request.getfixturevalue("group")[0] if mode == "map" else request.getfixturevalue("group_vmap")
  for s, ws in singles.items():
    wd = os.path.join(w, f"seed_{s}")
    for key in ("train/loss", "train/grad_norm", "eval/loss"):
      a, b = rows(ws, key), rows(wd, key)
      assert sorted(a) == sorted(b) and len(a) >= 3
      np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=1e-5, err_msg=f"seed {s} {key}")
    assert set(C.available_steps(ws)) == set(C.available_steps(wd))
    for step in (0, 8, STEPS):
      x, y = C.restore_params(ws, step), C.restore_params(wd, step)
      for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        # atol: the attention key bias has an exactly zero true gradient (softmax is shift-invariant), so it holds
        # Adam-normalised rounding noise (~1e-6) that vmap's reordered sums change; every other tensor agrees to ~1e-7
        np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=1e-5, atol=1e-5)
    # the end-of-run test-split row (train.test_eval), once, at the last step
    for key in ("test/loss", "test/ppl", "test/avg_ppl"):
      a, b = rows(ws, key), rows(wd, key)
      assert list(a) == list(b) == [STEPS], key
      np.testing.assert_allclose(b[STEPS], a[STEPS], rtol=1e-5, err_msg=f"seed {s} {key}")
  # the two seeds really are different runs
  assert rows(os.path.join(w, "seed_0"), "train/loss")[STEPS] != rows(os.path.join(w, "seed_1"), "train/loss")[STEPS]


@pytest.mark.slow
def test_group_resume_is_bit_identical(group, tmp_path, data_dir):
  w0, _ = group
  w = str(tmp_path / "resumed")
  train.train_and_evaluate(tiny_cfg(data_dir, **OVER, **{"train.seeds": "0,1", "train.stop_at": 7}), w)
  assert max(C.available_steps(os.path.join(w, "seed_1"))) == 7
  assert not rows(os.path.join(w, "seed_1"), "test/avg_ppl")  # stopped early: no test-split row
  out = train.train_and_evaluate(tiny_cfg(data_dir, **OVER, **{"train.seeds": "0,1"}), w)
  assert out[1]["step"] == STEPS
  for s in (0, 1):
    a, b = os.path.join(w0, f"seed_{s}"), os.path.join(w, f"seed_{s}")
    for u, v in zip(jax.tree.leaves(C.restore_params(a, STEPS)), jax.tree.leaves(C.restore_params(b, STEPS))):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    la, lb = rows(a, "train/loss"), rows(b, "train/loss")
    assert all(la[k] == lb[k] for k in range(8, STEPS + 1))
    assert rows(a, "test/avg_ppl") == rows(b, "test/avg_ppl") and list(rows(b, "test/avg_ppl")) == [STEPS]
  # a finished group does nothing more (no second test-split row either)
  again = train.train_and_evaluate(tiny_cfg(data_dir, **OVER, **{"train.seeds": "0,1"}), w)
  assert again[0]["step"] == STEPS and "test/avg_ppl" not in again[0]
  n_test = [
    sum("test/avg_ppl" in r for r in map(json.loads, open(os.path.join(w, f"seed_{s}", "metrics.jsonl")))) for s in (0, 1)
  ]
  assert n_test == [1, 1]


@pytest.mark.slow
def test_diverging_run_stops_only_itself(group, tmp_path, data_dir, monkeypatch):
  """Seed 1's update at step 5 is poisoned with NaN inside the program; seed 0 must be untouched."""
  orig = steps.train_step
  bad_rng = jax.random.fold_in(jax.random.PRNGKey(1), 1)

  def poisoned(state, batch, **kw):
    new, m = orig(state, batch, **kw)
    hit = jnp.all(state["rng"] == bad_rng) & (state["step"] >= 5)
    new = dict(new, params=jax.tree.map(lambda p: jnp.where(hit, jnp.nan, p), new["params"]))
    return new, dict(m, **{"train/loss": jnp.where(hit, jnp.nan, m["train/loss"])})

  monkeypatch.setattr(steps, "train_step", poisoned)
  w = str(tmp_path / "nan")
  out = train.train_and_evaluate(tiny_cfg(data_dir, **OVER, **{"train.seeds": "0,1"}), w)
  assert out[1]["diverged"] and not out[0]["diverged"]
  bad, good = os.path.join(w, "seed_1"), os.path.join(w, "seed_0")
  assert json.load(open(os.path.join(bad, multirun.DIVERGED)))["step"] == 6
  assert max(C.available_steps(bad)) == 5 and max(rows(bad, "train/loss")) == 5
  assert not rows(bad, "test/avg_ppl") and list(rows(good, "test/avg_ppl")) == [STEPS]  # a diverged run writes no test row
  for s in C.available_steps(bad):
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(C.restore_params(bad, s)))
  ref = rows(os.path.join(group[0], "seed_0"), "train/loss")
  assert rows(good, "train/loss") == ref  # same program shape, same numbers for the healthy run
  # rerunning skips the diverged run and finishes (nothing left to do)
  again = train.train_and_evaluate(tiny_cfg(data_dir, **OVER, **{"train.seeds": "0,1"}), w)
  assert again[1]["diverged"] and again[0]["step"] == STEPS


def test_unvectorisable_config_is_one_clear_line(tmp_path, data_dir):
  cfg = tiny_cfg(data_dir, **{"train.seeds": "0,1", "probes.enabled": True})
  with pytest.raises(errors.ConfigError, match=r"cannot be vectorised with probes.enabled=True: .*") as e:
    train.train_and_evaluate(cfg, str(tmp_path / "p"))
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "p")  # nothing half-written


def test_group_refuses_a_locked_member_and_writes_nothing(tmp_path, data_dir):
  """A member workdir held by another live trainer: one clear line, the fresh group dir is removed again."""
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    w = tmp_path / "g"
    os.makedirs(w / "seed_1")
    lock = {"host": socket.gethostname(), "pid": holder.pid, "pid_start": runlock._pid_start(holder.pid), "since": "now"}
    (w / "seed_1" / runlock.LOCK).write_text(json.dumps(lock))
    with pytest.raises(errors.CheckpointError, match=rf"seed_1 is in use by another trainer \(pid {holder.pid} on") as e:
      train.train_and_evaluate(tiny_cfg(data_dir, **OVER, **{"train.seeds": "0,1"}), str(w))
    assert "\n" not in str(e.value)
    # nothing half-written: no configs, no group.json, seed_0's lock released; the other trainer's lock kept
    assert sorted(os.listdir(w)) == ["seed_0", "seed_1"] and os.listdir(w / "seed_0") == []
    assert os.listdir(w / "seed_1") == [runlock.LOCK]
  finally:
    holder.kill()
    holder.wait()


@pytest.mark.slow
def test_group_sigterm_saves_and_resumes_bit_identical(group, tmp_path, data_dir, monkeypatch):
  """SIGTERM (a real signal to this process) during step 6's log: every run gets a resume checkpoint of
  step 7, the locks are released, and the rerun ends bit-identical to the uninterrupted group."""
  orig = MX.console_line

  def line_then_signal(step, total, row):
    if step == 6:  # the loop asks at the next step boundary
      os.kill(os.getpid(), signal.SIGTERM)
    return orig(step, total, row)

  monkeypatch.setattr(MX, "console_line", line_then_signal)
  w = str(tmp_path / "g")
  with pytest.raises(preempt.Preempted, match=r"stopped by SIGTERM after step 7; a resume checkpoint of step 7 is in") as e:
    train.train_and_evaluate(tiny_cfg(data_dir, **OVER, **{"train.seeds": "0,1"}), w)
  assert "\n" not in str(e.value)
  monkeypatch.setattr(MX, "console_line", orig)
  for s in (0, 1):
    wd = os.path.join(w, f"seed_{s}")
    assert max(C.available_steps(wd, need_full=True)) == 7 and not os.path.exists(os.path.join(wd, runlock.LOCK))
  assert not os.path.exists(os.path.join(w, runlock.LOCK))
  out = train.train_and_evaluate(tiny_cfg(data_dir, **OVER, **{"train.seeds": "0,1"}), w)
  assert out[0]["step"] == out[1]["step"] == STEPS
  for s in (0, 1):
    a, b = os.path.join(group[0], f"seed_{s}"), os.path.join(w, f"seed_{s}")
    for u, v in zip(jax.tree.leaves(C.restore_params(a, STEPS)), jax.tree.leaves(C.restore_params(b, STEPS)), strict=True):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    la, lb = rows(a, "train/loss"), rows(b, "train/loss")
    assert la == lb  # the same loss at every step
    n = [sum(1 for _ in open(os.path.join(d, "metrics.jsonl"))) for d in (a, b)]
    assert n[0] == n[1]  # and every row once
