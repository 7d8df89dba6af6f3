"""Fault drills of issue 25: what still failed in the *telling* after issue 10's drills, and two lock races.

Disk full, garbage in a checkpoint's meta, a truncated config.json, a deleted manifest (with and
without a flipped bit), a read-only workdir, two trainers racing for one new workdir or one stale
lock, bad inputs, Ctrl-C in an analysis job. Each drill injects the fault into a tiny trained run (or
replays the racing code in the bad order) and checks the one line that is printed and that nothing
is torn. Full disks and read-only file systems are simulated by monkeypatching the write path (so the
drills run as root, on any box); one test also fills a real tmpfs when this box can mount one.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple

import jax
import numpy as np
import pandas as pd
import pytest

import train
from analysis import flatness as FL
from analysis import generate as G
from analysis import trajectories as TJ
from experiments import sweep as SW
from lib import ckpt as C
from lib import config_check, errors, integrity, runlock
from lib import io as lio
from lib import session as RS
from tests.helpers import tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
FAST_FLATNESS = ["--estimator=hutchinson", "--probes=2", "--batches=1", "--batch_size=8"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def cfg_(data_dir, **over):
  return tiny_cfg(data_dir, **{"train.steps": STEPS, "ckpt.async_save": False, **over})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A finished 8-step run: analysis checkpoints 0, 1, 2, 4, 8, resume checkpoint 6."""
  w = str(tmp_path_factory.mktemp("trained") / "w")
  train.train_and_evaluate(cfg_(data_dir), w)
  return w


@pytest.fixture
def run_copy(trained, tmp_path):
  w = str(tmp_path / "w")
  shutil.copytree(trained, w)
  return w


def one_line(err: str) -> str:
  lines = [ln for ln in err.strip().splitlines() if ln.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  return lines[0]


def all_verify(w):
  for s, sub in C.available_steps(w).items():
    assert integrity.verify(os.path.join(w, sub, str(s))) == "ok"
  torn = [d for sub in (C.ANALYSIS_DIR, C.RESUME_DIR) for d in os.listdir(os.path.join(w, sub)) if not d.isdigit()]
  assert not torn, torn


# ----------------------------------------------------------------------------------------------
# Disk full


def test_disk_full_before_a_save_is_one_line_and_nothing_torn(tmp_path, data_dir, monkeypatch):
  """The free space runs out at the 4th save: the trainer refuses that save whole (one line naming the
  workdir and the free space), every checkpoint written verifies, and the rerun finishes the run."""
  w = str(tmp_path / "w")
  real = shutil.disk_usage
  Usage = namedtuple("Usage", "total used free")

  def disk_usage(path):  # 100 kB free once three checkpoints exist
    u = real(path)
    saved = [
      d for sub in (C.ANALYSIS_DIR, C.RESUME_DIR) if os.path.isdir(os.path.join(w, sub)) for d in os.listdir(os.path.join(w, sub))
    ]
    return u if len(saved) < 3 else Usage(u.total, u.total - 100_000, 100_000)

  monkeypatch.setattr(shutil, "disk_usage", disk_usage)
  with pytest.raises(errors.StorageError) as e:
    train.train_and_evaluate(cfg_(data_dir), w)
  msg = str(e.value)
  assert "\n" not in msg and e.value.errno == errno.ENOSPC
  assert f"no space left on device for the checkpoint of step 3 in {os.path.abspath(w)}" in msg, msg
  assert "97.7 KiB is free there" in msg and "the latest: [0, 1, 2]" in msg, msg
  all_verify(w)
  assert sorted(C.available_steps(w)) == [0, 1, 2] and not os.path.exists(os.path.join(w, runlock.LOCK))
  monkeypatch.setattr(shutil, "disk_usage", real)
  assert train.train_and_evaluate(cfg_(data_dir), w)["step"] == STEPS
  all_verify(w)


def test_disk_full_inside_a_write_is_one_line_and_the_old_file_intact(tmp_path, monkeypatch):
  """ENOSPC raised by the write itself (metrics, JSON, tables; Orbax's as TensorStore's text)."""
  path = str(tmp_path / "config.json")
  lio.atomic_json(path, {"a": 1})

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(errors.StorageError, match=rf"no space left on device writing {path} \(.* free there\)") as e:
    lio.atomic_json(path, {"a": 2})
  assert isinstance(e.value, OSError) and "\n" not in str(e.value)
  assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["config.json"]
  orbax_text = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "x" ...: Failed to write 337 bytes to file 7: No space left on device'
  )
  with pytest.raises(errors.StorageError, match=f"no space left on device writing {tmp_path}"):
    with C._storage_errors(str(tmp_path)):
      raise orbax_text


def _can_mount_tmpfs(d):
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", d], capture_output=True).returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_real_tmpfs(tmp_path, data_dir):
  """The issue's drill on a real, small file system (skipped where this box cannot mount a tmpfs)."""
  d = str(tmp_path / "small")
  os.makedirs(d)
  if not _can_mount_tmpfs(d):
    pytest.skip("cannot mount a tmpfs here")
  try:
    with open(os.path.join(d, "filler"), "wb") as f:
      f.write(b"\0" * 2_000_000)
    w = os.path.join(d, "w")
    r = subprocess.run(
      [sys.executable, "-c", "import train; train.main()", "--config=configs/base.py:nano", f"--workdir={w}",
       f"--config.data.data_dir={data_dir}", "--config.model.max_len=32", "--config.data.seq_len=32",
       "--config.data.source.n_train=2000", "--config.data.source.n_validation=200", "--config.data.source.n_test=50",
       "--config.train.batch_size=8", "--config.eval.every=6", "--config.eval.batches=1", "--config.eval.batch_size=8",
       "--config.ckpt.schedule=pythia:every=4", "--config.ckpt.resume_every=3", "--config.log.tensorboard=False",
       "--config.train.steps=60"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lmtrace: error: no space left on device") and "free there" in last, r.stderr[-3000:]
    all_verify(w)
  finally:
    subprocess.run(["umount", "-l", d], capture_output=True)


# ----------------------------------------------------------------------------------------------
# Damaged files the analysis jobs meet


def test_garbage_meta_is_skipped_with_one_line_by_flatness_and_trajectories(run_copy, capsys):
  w = run_copy
  with open(os.path.join(w, C.ANALYSIS_DIR, "4", "meta", "metadata"), "wb") as f:
    f.write(b"\x00\x17garbage{{")
  with pytest.raises(errors.CheckpointError, match=r"checkpoints/4/meta/metadata \(the checkpoint's meta\) is damaged"):
    C.read_meta(w, 4)
  FL.main([f"--workdir={w}", "--steps=2,4,8", *FAST_FLATNESS])
  err = capsys.readouterr().err
  assert err.count("lmtrace flatness: skipping step 4:") == 1 and "meta/metadata" in err, err[-3000:]
  df = pd.read_parquet(FL.table_path(w))
  valid = dict(zip(df.step, df.valid))
  assert valid == {2: True, 4: False, 8: True}  # the later checkpoint measured
  assert TJ.main([f"--workdir={w}", "--steps=2,4,8", "--quiet"]) == 0
  out = capsys.readouterr().out
  assert "skipped 1 checkpoint(s)" in out and "step 4:" in out and "meta/metadata" in out, out
  assert TJ.Store.of(w).steps() == [2, 8]


def test_truncated_config_json_is_one_line_everywhere(run_copy, data_dir, capsys):
  w = run_copy
  path = os.path.join(w, "config.json")
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])
  want = r"config.json \(the run's config.*\) is damaged: not valid JSON"
  with pytest.raises(errors.CheckpointError, match=want) as e:
    train.train_and_evaluate(cfg_(data_dir), w)
  assert "\n" not in str(e.value)
  with pytest.raises(errors.CheckpointError, match=want):
    C.restore_params(w, 4)
  with pytest.raises(SystemExit) as ex:
    FL.main([f"--workdir={w}", *FAST_FLATNESS])
  assert ex.value.code == 2
  assert "is damaged: not valid JSON" in one_line(capsys.readouterr().err)
  assert open(path, "rb").read() == data[: len(data) // 2]  # nothing rewritten


def test_deleted_manifest_is_named_unsealed(run_copy):
  w = run_copy
  os.remove(os.path.join(w, C.ANALYSIS_DIR, "4", integrity.MANIFEST))
  with pytest.raises(errors.CheckpointError, match=r"checkpoints/4 exists but is unsealed: it has no integrity manifest") as e:
    C.restore_params(w, 4)
  assert "\n" not in str(e.value)


def test_deleted_manifest_and_a_flipped_bit_are_not_resealed_as_good(run_copy, trained, data_dir, caplog):
  """The trainer must not seal files nobody hashed (Orbax's own files do not detect a flipped bit in
  the array data): the unsealed checkpoint is moved aside and its step recomputed, bit for bit."""
  w = run_copy
  d = os.path.join(w, C.ANALYSIS_DIR, str(STEPS))
  os.remove(os.path.join(d, integrity.MANIFEST))
  f = max((os.path.join(r, x) for r, _, xs in os.walk(os.path.join(d, "params")) for x in xs), key=os.path.getsize)
  data = bytearray(open(f, "rb").read())
  data[len(data) // 2] ^= 0x04
  open(f, "wb").write(bytes(data))
  caplog.set_level("WARNING")
  assert train.train_and_evaluate(cfg_(data_dir), w)["step"] == STEPS
  assert "was committed but never sealed" in caplog.text and os.path.isdir(d + ".unsealed")
  assert integrity.verify(d) == "ok"
  for x, y in zip(jax.tree.leaves(C.restore_params(trained, STEPS)), jax.tree.leaves(C.restore_params(w, STEPS)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------------------
# Read-only workdir (simulated: as root, permission bits do not stop a write)


def _read_only(monkeypatch, below: str):
  import tempfile

  real = tempfile.mkstemp

  def mkstemp(*a, dir=None, **kw):
    if dir is not None and os.path.abspath(dir).startswith(os.path.abspath(below)):
      raise OSError(errno.EROFS, "Read-only file system", dir)
    return real(*a, dir=dir, **kw)

  monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_read_only_workdir_is_one_correct_line_for_trainer_and_flatness(run_copy, data_dir, monkeypatch, capsys):
  w = run_copy
  _read_only(monkeypatch, w)
  with pytest.raises(errors.StorageError) as e:
    train.train_and_evaluate(cfg_(data_dir), w)
  assert str(e.value) == f"--workdir={w} exists but this trainer cannot write it: cannot write {w}: read-only file system"
  with pytest.raises(SystemExit) as ex:
    FL.main([f"--workdir={w}", *FAST_FLATNESS])
  assert ex.value.code == 2
  line = one_line(capsys.readouterr().err)
  assert line == f"lmtrace flatness: error: flatness cannot write its table: cannot write {w}/analysis: read-only file system"
  assert not os.path.exists(FL.table_path(w))


# ----------------------------------------------------------------------------------------------
# Lock races, replayed in the bad order


@pytest.mark.parametrize("first", ["A", "B"])
def test_two_new_trainers_on_one_new_workdir_refused_one_deletes_nothing(tmp_path, monkeypatch, first):
  """A makes the workdir and B takes the lock before A does (first='B'), or A takes it first (first='A'):
  the refused one must leave the holder's workdir (its lock and config.json) alone."""
  w = str(tmp_path / "new")
  a, b = RS.RunSession(w), RS.RunSession(w)  # both saw no workdir
  holder, refused = (a, b) if first == "A" else (b, a)
  if first == "A":
    a.__enter__()
  else:  # A's mkdir, then B's whole start, then A's lock
    real = a.lock.acquire

    def acquire():
      b.__enter__()
      real()

    monkeypatch.setattr(a.lock, "acquire", acquire)
  open(os.path.join(w, "config.json"), "w").write("{}") if first == "A" else None
  try:
    with pytest.raises(errors.CheckpointError, match="is in use by another trainer"):
      refused.__enter__()
    assert os.path.exists(os.path.join(w, runlock.LOCK)) and holder.lock.held
    assert first == "B" or os.path.exists(os.path.join(w, "config.json"))
  finally:
    holder.__exit__(None, None, None)
  assert not os.path.exists(os.path.join(w, runlock.LOCK))


def _stale_lock(w):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  lock = {"host": __import__("socket").gethostname(), "pid": int(dead.stdout), "pid_start": "1", "since": "earlier"}
  json.dump(lock, open(os.path.join(w, runlock.LOCK), "w"))


@pytest.mark.parametrize("late", ["A", "B"])
def test_two_trainers_taking_over_one_stale_lock_only_one_wins(tmp_path, monkeypatch, late):
  """Both judge the dead trainer's lock stale; the other takes it over completely before `late` acts
  on its judgement: `late` must not remove the fresh lock, and is refused."""
  w = str(tmp_path)
  _stale_lock(w)
  locks = {"A": runlock.WorkdirLock(w), "B": runlock.WorkdirLock(w)}
  slow, fast = locks[late], locks["B" if late == "A" else "A"]
  real = slow._stale
  replayed = []

  def stale(*args):
    verdict = real(*args)
    if verdict and not replayed:
      replayed.append(1)
      fast.acquire()  # the other trainer's whole takeover happens here
    return verdict

  monkeypatch.setattr(slow, "_stale", stale)
  with pytest.raises(errors.CheckpointError, match="is in use by another trainer"):
    slow.acquire()
  assert fast.held and not slow.held and replayed
  assert json.load(open(os.path.join(w, runlock.LOCK)))["token"] == fast._token
  assert sorted(os.listdir(w)) == [runlock.LOCK]  # no takeover leftovers
  fast.release()
  assert not os.path.exists(os.path.join(w, runlock.LOCK))


# ----------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("lr, msg", [(float("inf"), "opt.lr=inf must be a finite number"),
                                     (float("nan"), "opt.lr=nan must be a finite number")])  # fmt: skip
def test_bad_learning_rate_is_refused_before_training(tmp_path, data_dir, lr, msg):
  w = str(tmp_path / "w")
  with pytest.raises(errors.ConfigError) as e:
    train.train_and_evaluate(cfg_(data_dir, **{"opt.lr": lr}), w)
  assert str(e.value) == msg and not os.path.exists(w)


def test_warmup_longer_than_the_run_warns(data_dir, caplog):
  caplog.set_level("WARNING")
  config_check.validate(cfg_(data_dir, **{"opt.warmup_steps": 20}))
  assert "opt.warmup_steps=20 exceeds train.steps=8: the learning rate never reaches opt.lr" in caplog.text


def test_bad_steps_flags_are_one_line_and_write_nothing(run_copy, capsys):
  w = run_copy
  before = sorted(os.listdir(w))
  with pytest.raises(SystemExit) as ex:
    FL.main([f"--workdir={w}", "--steps=abc", *FAST_FLATNESS])
  assert ex.value.code == 2
  assert "--steps='abc': expected 'all' or comma-separated checkpoint steps" in one_line(capsys.readouterr().err)
  assert TJ.main([f"--workdir={w}", "--steps=999999", "--quiet"]) == 2
  line = one_line(capsys.readouterr().err)
  assert re.search(r"has no checkpoint at step\(s\) \[999999\] \(nearest: \[4, 6, 8\]; \d+ available\); nothing written", line)
  assert G.main([f"--workdir={w}", "--steps=abc"]) == 2
  assert "--steps='abc'" in one_line(capsys.readouterr().err)
  assert sorted(os.listdir(w)) == before and not os.path.exists(os.path.join(w, "analysis"))


def test_sweep_refused_for_a_bad_set_value_leaves_no_sweep_json(tmp_path, data_dir, capsys):
  out = str(tmp_path / "sw")
  spec = {
    "config": "configs/base.py:nano",
    "set": {"data.data_dir": data_dir, "model.max_len": 32, "data.seq_len": 32, "train.steps": -5},
    "axes": {"seed": [0]},
  }
  p = str(tmp_path / "sweep.json")
  json.dump(spec, open(p, "w"))
  assert SW.main([p, f"--out={out}"]) == 2
  assert "train.steps=-5 must be > 0" in one_line(capsys.readouterr().err)
  assert not os.path.exists(os.path.join(out, SW.SWEEP_JSON))


# ----------------------------------------------------------------------------------------------
# Ctrl-C in an analysis job


@pytest.mark.parametrize("job", ["flatness", "trajectories", "generate", "icl"])
def test_ctrl_c_in_an_analysis_job_is_one_line_exit_130(tmp_path, monkeypatch, capsys, job):
  def interrupted(*a, **k):
    raise KeyboardInterrupt

  w = str(tmp_path)
  if job == "flatness":
    monkeypatch.setattr(FL, "run", interrupted)
    main = lambda: FL.main([f"--workdir={w}"])  # noqa: E731
  elif job == "trajectories":
    monkeypatch.setattr(TJ, "extract", interrupted)
    main = lambda: TJ.main([f"--workdir={w}", "--quiet"])  # noqa: E731
  elif job == "icl":
    from analysis import icl

    monkeypatch.setattr(icl, "run", interrupted)  # the job's run(workdir, job), which main calls
    main = lambda: icl.main([f"--workdir={w}", f"--tasks={w}"])  # noqa: E731
  else:
    monkeypatch.setattr(G, "run", interrupted)
    main = lambda: G.main([f"--workdir={w}"])  # noqa: E731
  try:
    main()
    got = None
  except BaseException as e:  # noqa: BLE001 - a KeyboardInterrupt escaping is the failure this test looks for
    got = e
  assert isinstance(got, SystemExit) and got.code == 130, repr(got)
  assert one_line(capsys.readouterr().err).startswith(f"lmtrace {job}: interrupted (Ctrl-C)")


def test_a_step_quarantined_twice_gets_a_free_name(tmp_path):
  """Killed twice before sealing the same step (the kill -9 drill hit it): the second quarantine of resume/6
  cannot be moved onto the first, non-empty 6.unsealed, so it takes 6.unsealed.1."""
  from lib import ckpt as C

  first = tmp_path / "6.unsealed"
  first.mkdir()
  (first / "x").write_text("a")
  assert C._free_name(str(tmp_path / "7.unsealed")) == str(tmp_path / "7.unsealed")
  assert C._free_name(str(first)) == str(first) + ".1"
