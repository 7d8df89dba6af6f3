"""Fault drills: kill -9, damaged checkpoints, a changed config, two writers, SIGTERM, bad input.

Each drill injects the fault into the tiny bigram run card (tests/helpers.py) and checks the exact
outcome: parameters bit-identical to an uninterrupted run, one metrics row per step, damage detected
and the previous checkpoint used, refusals that touch nothing, one-line errors that write nothing.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import train
from lib import ckpt as C
from lib import config_check, errors, integrity, preempt, runlock
from tests.helpers import tiny_cfg

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
# The same run as CLI overrides (tiny_cfg + MESH + steps), for trainers in their own processes.
CLI_FLAGS = [
  "--config.model.d_model=32",
  "--config.model.n_layers=2",
  "--config.model.n_heads=2",
  "--config.model.d_ff=64",
  "--config.model.max_len=32",
  "--config.data.seq_len=32",
  "--config.data.source.n_train=2000",
  "--config.data.source.n_validation=200",
  "--config.data.source.n_test=50",
  "--config.train.batch_size=8",
  "--config.train.log_every=1",
  "--config.eval.every=6",
  "--config.eval.batches=1",
  "--config.eval.batch_size=8",
  "--config.ckpt.schedule=pythia:every=4",
  "--config.ckpt.resume_every=3",
  "--config.log.tensorboard=False",
  "--config.mesh.data=2",
  "--config.mesh.fsdp=2",
  "--config.mesh.tensor=2",
  f"--config.train.steps={STEPS}",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def cfg_(data_dir, **over):
  return tiny_cfg(data_dir, **{**MESH, "train.steps": STEPS, **over})


def argv(workdir, data_dir, *extra):
  return [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    f"--config={ROOT}/configs/base.py",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    *CLI_FLAGS,
    *extra,
  ]


ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def run_cli(args, timeout=300):
  return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def start_until_step(args, step):
  """A trainer in its own process, returned once it has printed the console line of `step`."""
  p = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  for line in p.stdout:
    if line.startswith("step") and int(line.split()[1].split("/")[0]) >= step:
      return p
  p.wait()
  raise AssertionError(f"trainer ended before step {step}: rc={p.returncode} {p.stderr.read()[-2000:]}")


def metrics(w):
  with open(os.path.join(w, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def assert_same_params(w_a, w_b, step):
  a, b = C.restore_params(w_a, step), C.restore_params(w_b, step)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_one_row_per_step(w_ref, w):
  """metrics.jsonl holds exactly the reference's (step, kind) rows, each once, with equal losses."""
  # a step has one train row, maybe one eval row, and the last step one test-split row (eval.test_at_end)
  key = lambda r: (r["step"], "eval/loss" in r, any(k.startswith("test/") for k in r))  # noqa: E731
  ref, got = metrics(w_ref), metrics(w)
  assert sorted(map(key, got)) == sorted(map(key, ref))
  assert len(set(map(key, got))) == len(got)
  loss = lambda r: r.get("train/loss", r.get("eval/loss", r.get("test/avg_ppl")))  # noqa: E731
  want = {key(r): loss(r) for r in ref}
  assert all(loss(r) == want[key(r)] for r in got)


def tree_listing(w):
  return sorted(os.path.relpath(os.path.join(r, f), w) for r, _, fs in os.walk(w) for f in fs)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
  """The reference: STEPS steps uninterrupted, in this process."""
  w = str(tmp_path_factory.mktemp("straight"))
  train.train_and_evaluate(cfg_(data_dir), w)
  return w


def test_checkpoints_are_sealed_and_verify(straight):
  steps = C.available_steps(straight)
  assert {0, 1, 2, 4, 8, 16, 28, 30} <= set(steps)
  for s, sub in steps.items():
    assert integrity.verify(os.path.join(straight, sub, str(s))) == "ok"
  assert not os.path.exists(os.path.join(straight, runlock.LOCK))  # released at the end


def test_kill9_at_random_points_resumes_bit_identical(straight, tmp_path, data_dir):
  w = str(tmp_path / "killed")
  points = sorted(random.Random(10).sample(range(2, STEPS - 1), 5))
  done = 0
  for k in points:
    p = start_until_step(argv(w, data_dir), max(k, done + 1))
    p.kill()  # SIGKILL: no handler, no cleanup, maybe mid-save
    p.wait()
    done = max(C.available_steps(w), default=0)
  r = run_cli(argv(w, data_dir))
  assert r.returncode == 0, r.stderr[-3000:]
  for s in (8, 16, 24, STEPS):
    assert_same_params(straight, w, s)
  assert_one_row_per_step(straight, w)
  hist = [json.loads(line) for line in open(os.path.join(w, config_check.RESUME_HISTORY))]
  assert len(hist) >= 5 and all(h["changed"] == {} for h in hist)


@pytest.mark.parametrize("damage", ["bitflip", "garbage", "truncate"])
def test_damaged_newest_checkpoint_is_detected_and_the_previous_used(straight, tmp_path, data_dir, damage, caplog):
  w = str(tmp_path / "w")
  shutil.copytree(straight, w)
  newest = max(C.available_steps(w, need_full=True))
  sub = C.available_steps(w)[newest]
  d = os.path.join(w, sub, str(newest))
  f = max((os.path.join(r, x) for r, _, xs in os.walk(os.path.join(d, "params")) for x in xs), key=os.path.getsize)
  data = bytearray(open(f, "rb").read())
  if damage == "bitflip":
    data[len(data) // 2] ^= 0x04
  elif damage == "garbage":
    data[100:164] = os.urandom(64)
  else:
    data = data[: len(data) // 3]
  open(f, "wb").write(bytes(data))
  with pytest.raises(errors.CheckpointError, match="damaged"):
    C.restore_params(w, newest)
  caplog.set_level("WARNING")
  out = train.train_and_evaluate(cfg_(data_dir), w)
  assert "skipping unreadable checkpoint" in caplog.text and "damaged" in caplog.text
  assert out["step"] == STEPS and os.path.isdir(d + ".unreadable")
  assert_same_params(straight, w, STEPS)
  assert_one_row_per_step(straight, w)


def test_damaged_analysis_checkpoint_raises_for_analysis_jobs(straight, tmp_path):
  w = str(tmp_path / "w")
  shutil.copytree(straight, w)
  d = os.path.join(w, C.ANALYSIS_DIR, "8", "params")
  f = max((os.path.join(r, x) for r, _, xs in os.walk(d) for x in xs), key=os.path.getsize)
  with open(f, "r+b") as fh:
    fh.seek(os.path.getsize(f) // 2)
    b = fh.read(1)
    fh.seek(-1, 1)
    fh.write(bytes([b[0] ^ 1]))
  with pytest.raises(errors.CheckpointError, match=r"8 is damaged: params/.* fails its checksum"):
    C.restore_params(w, 8)
  assert_same_params(straight, w, 4)  # the others still read


def test_legacy_checkpoint_without_manifest_still_loads(straight, tmp_path, caplog):
  w = str(tmp_path / "w")
  shutil.copytree(straight, w)
  d = os.path.join(w, C.ANALYSIS_DIR, "4")
  os.remove(os.path.join(d, integrity.MANIFEST))
  meta = os.path.join(d, "meta", "metadata")
  m = json.load(open(meta))
  m.pop("integrity")
  json.dump(m, open(meta, "w"))
  caplog.set_level("INFO")
  assert 4 in C.available_steps(w)
  assert_same_params(straight, w, 4)
  assert "predates integrity manifests" in caplog.text


def test_unsealed_checkpoint_is_not_listed(straight, tmp_path):
  """Committed by Orbax but not sealed yet (a trainer still writing it, or killed in between)."""
  w = str(tmp_path / "w")
  shutil.copytree(straight, w)
  os.remove(os.path.join(w, C.ANALYSIS_DIR, "16", integrity.MANIFEST))
  shutil.copytree(os.path.join(w, C.ANALYSIS_DIR, "4"), os.path.join(w, C.ANALYSIS_DIR, "5.orbax-checkpoint-tmp-9"))
  steps = C.available_steps(w)
  assert 16 not in steps and 5 not in steps and 8 in steps


def test_changed_optimizer_on_resume_is_refused_and_nothing_touched(straight, tmp_path, data_dir):
  w = str(tmp_path / "w")
  shutil.copytree(straight, w)
  before = {p: os.path.getmtime(os.path.join(w, p)) for p in tree_listing(w)}
  with pytest.raises(errors.ConfigError) as e:
    train.train_and_evaluate(cfg_(data_dir, **{"opt.name": "sgd"}), w)
  msg = str(e.value)
  assert "\n" not in msg and "opt.name: 'adamw' -> 'sgd'" in msg and "Nothing was changed" in msg
  with pytest.raises(errors.ConfigError, match="opt.grad_clip: 1.0 -> 0.0"):
    train.train_and_evaluate(cfg_(data_dir, **{"opt.grad_clip": 0.0}), w)
  assert {p: os.path.getmtime(os.path.join(w, p)) for p in tree_listing(w)} == before
  for s, sub in C.available_steps(w).items():
    assert integrity.verify(os.path.join(w, sub, str(s))) == "ok"


def test_changed_lr_on_resume_is_recorded(straight, tmp_path, data_dir):
  w = str(tmp_path / "w")
  shutil.copytree(straight, w)
  train.train_and_evaluate(cfg_(data_dir, **{"eval.every": 5, "ckpt.keep_resume": 3}), w)  # nothing left to train
  (h,) = [json.loads(line) for line in open(os.path.join(w, config_check.RESUME_HISTORY))]
  assert h["step"] == STEPS and h["changed"] == {"eval.every": [6, 5], "ckpt.keep_resume": [2, 3]}
  assert config_check.resume_differences({"opt": {"lr": 3e-3}}, {"opt": {"lr": 1e-3}}) == {"opt.lr": [3e-3, 1e-3]}


def test_second_trainer_refused_then_sigterm_saves_and_resumes_identically(straight, tmp_path, data_dir):
  w = str(tmp_path / "w")
  p = start_until_step(argv(w, data_dir), 4)
  p.send_signal(signal.SIGSTOP)  # hold it mid-run: the lock's holder is alive
  try:
    with pytest.raises(errors.CheckpointError, match=rf"in use by another trainer \(pid {p.pid} on"):
      train.train_and_evaluate(cfg_(data_dir), w)
    p.send_signal(signal.SIGTERM)
  finally:
    p.send_signal(signal.SIGCONT)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 3, err[-3000:]
  line = err.strip().splitlines()[-1]
  m = __import__("re").search(r"stopped by SIGTERM after step (\d+); a resume checkpoint of step \1 is in", line)
  assert m, err[-3000:]
  stopped = int(m.group(1))
  assert stopped < STEPS and max(C.available_steps(w, need_full=True)) == stopped
  assert not os.path.exists(os.path.join(w, runlock.LOCK))
  out = train.train_and_evaluate(cfg_(data_dir), w)
  assert out["step"] == STEPS
  assert_same_params(straight, w, STEPS)
  assert_one_row_per_step(straight, w)


def test_stale_lock_of_a_dead_trainer_is_taken_over(straight, tmp_path, data_dir, caplog):
  w = str(tmp_path / "w")
  shutil.copytree(straight, w)
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  lock = {"host": __import__("socket").gethostname(), "pid": int(dead.stdout), "pid_start": "1", "since": "earlier"}
  json.dump(lock, open(os.path.join(w, runlock.LOCK), "w"))
  caplog.set_level("WARNING")
  assert train.train_and_evaluate(cfg_(data_dir), w)["step"] == STEPS
  assert "stale lock" in caplog.text


BAD = [
  ("train.steps", -5, "train.steps=-5 must be > 0"),
  ("train.steps", 0, "train.steps=0 must be > 0"),
  ("data.objective", "foo", "data.objective='foo' is not one of"),
  ("mixture.rows", "random", "mixture.rows='random' is not one of ('exact', 'sampled')"),
  ("train.batch_size", 0, "train.batch_size=0 must be > 0"),
  ("train.log_every", 0, "train.log_every=0 must be > 0"),
  ("model.d_ff", 0, "model.d_ff=0 must be > 0"),
  ("ckpt.schedule", "interval:every=0", "every=0 must be > 0"),
  ("ckpt.schedule", "explicit:steps=a/b", "steps='a/b' is not integers"),
]


@pytest.mark.parametrize("key,value,msg", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, data_dir, key, value, msg):
  w = str(tmp_path / "w")
  with pytest.raises(errors.ConfigError, match=__import__("re").escape(msg)) as e:
    train.train_and_evaluate(cfg_(data_dir, **{key: value}), w)
  assert "\n" not in str(e.value)
  assert not os.path.exists(w)


def test_workdir_that_is_a_file(tmp_path, data_dir):
  w = tmp_path / "file"
  w.write_text("x")
  with pytest.raises(errors.ConfigError, match="is a file, not a directory"):
    train.train_and_evaluate(cfg_(data_dir), str(w))
  assert w.read_text() == "x"


def test_failed_start_leaves_no_workdir(tmp_path, data_dir):
  w = str(tmp_path / "w")
  with pytest.raises(errors.ConfigError, match="vocab_size=4 is smaller"):  # found only once the data is built
    train.train_and_evaluate(cfg_(data_dir, **{"model.vocab_size": 4}), w)
  assert not os.path.exists(w)


CLI_BAD = [
  (["--config.train.steps=-5"], "train.steps=-5 must be > 0"),
  (["--config=configs/nope.py"], "nope.py"),
  (["--config=configs/base.py:no-such-preset"], "no-such-preset"),
  (
    [
      "--config.distributed.coordinator=127.0.0.1:9",
      "--config.distributed.num_processes=2",
      "--config.distributed.process_id=1",
      "--config.distributed.timeout_s=2",
    ],
    "could not join the job at coordinator",
  ),
]


@pytest.mark.parametrize("extra,msg", CLI_BAD, ids=["steps", "missing-card", "preset", "coordinator"])
def test_bad_input_on_the_command_line_is_one_line(tmp_path, data_dir, extra, msg):
  w = str(tmp_path / "w")
  r = run_cli(argv(w, data_dir, *extra), timeout=120)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("lmtrace")]
  assert len(lines) == 1 and msg in lines[0], r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert not os.path.exists(w)


def test_preempted_is_an_lmtrace_error():
  assert issubclass(preempt.Preempted, errors.LmtraceError)
