"""Trainer: resume bit-for-bit in a fresh process, cross-mesh restore, configs smoke-run, bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import train
from lib import ckpt as C
from lib import model as M
from lib import sharding
from tests.helpers import tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def cli(workdir, data_dir, *extra, devices=8):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  args = [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    f"--config={ROOT}/configs/base.py",
    f"--workdir={workdir}",
    "--config.model.d_model=32",
    "--config.model.n_layers=2",
    "--config.model.n_heads=2",
    "--config.model.d_ff=64",
    "--config.model.max_len=32",
    "--config.data.seq_len=32",
    f"--config.data.data_dir={data_dir}",
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
    *extra,
  ]
  return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
  """12 steps straight on a (2,2,2) mesh."""
  w = str(tmp_path_factory.mktemp("straight"))
  cfg = tiny_cfg(data_dir, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "model.d_model": 32, "model.n_heads": 2})
  train.train_and_evaluate(cfg, w)
  return w, cfg


def test_run_writes_metrics_checkpoints_and_config(straight):
  w, cfg = straight
  rows = metrics(w)
  assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 13))
  ev = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in ev] == [0, 6, 12]
  assert all(abs(r["eval/excess_loss"] - (r["eval/loss"] - r["eval/optimal_loss"])) < 1e-9 for r in ev)
  assert ev[-1]["eval/loss"] < ev[0]["eval/loss"]
  steps = C.available_steps(w)
  assert {0, 1, 2, 4, 8, 12} <= set(steps)  # pythia schedule incl. the initialisation
  assert steps[0] == "checkpoints"
  assert json.load(open(os.path.join(w, "config.json")))["model"]["d_model"] == 32


@pytest.mark.slow
def test_resume_in_fresh_process_is_bit_for_bit(straight, tmp_path, data_dir):
  w_straight, _ = straight
  w = str(tmp_path / "resumed")
  cfg = tiny_cfg(data_dir, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.stop_at": 5})
  train.train_and_evaluate(cfg, w)
  assert max(C.available_steps(w)) == 5
  r = cli(w, data_dir, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.train.steps=12")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "steps 5->12" in r.stdout
  a = C.restore_params(w_straight, 12)
  b = C.restore_params(w, 12)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  fp = lambda wd: {r["step"]: r["data/fingerprint"] for r in metrics(wd) if "data/fingerprint" in r}  # noqa: E731
  fa, fb = fp(w_straight), fp(w)
  assert len(fb) == 12 and all(fa[s] == fb[s] for s in range(1, 13))


def test_restore_params_across_meshes(straight):
  w, _ = straight
  one = C.restore_params(w, 8)  # trained on 8 devices, read on 1
  assert len(jax.tree.leaves(one)[0].sharding.device_set) == 1
  for shape in ((8, 1, 1), (1, 2, 4)):
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    many = C.restore_params(w, 8, mesh=mesh)
    for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_trained_on_one_device_read_on_eight(tmp_path, data_dir):
  w = str(tmp_path / "one")
  r = cli(w, data_dir, "--config.train.steps=2", devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  a = C.restore_params(w, 2)
  b = C.restore_params(w, 2, mesh=sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  assert len(jax.tree.leaves(b)[0].sharding.device_set) == 8
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_half_written_checkpoint_is_skipped(straight, tmp_path, data_dir, caplog):
  w = str(tmp_path / "corrupt")
  shutil.copytree(straight[0], w)
  # damage the newest full-state checkpoint (step 12): resume must fall back to the previous one
  latest = os.path.join(w, C.available_steps(w)[12], "12", "params")
  for root, _, files in os.walk(latest):
    for f in files:
      if f != "_METADATA" and not f.startswith("_"):
        open(os.path.join(root, f), "wb").close()
  # and leave an orbax temporary (a save interrupted mid-write) that must be ignored
  os.makedirs(os.path.join(w, "resume", "13.orbax-checkpoint-tmp-1"))
  cfg = tiny_cfg(data_dir, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  caplog.set_level("WARNING")
  out = train.train_and_evaluate(cfg, w)
  assert "skipping unreadable checkpoint" in caplog.text
  assert out["step"] == 12


def test_refuses_workdir_of_a_different_model(straight, tmp_path, data_dir):
  w = str(tmp_path / "other")
  shutil.copytree(straight[0], w)
  cfg = tiny_cfg(data_dir, **{"model.d_model": 64})
  with pytest.raises(C.CheckpointError, match=r"different model.*d_model: 32 -> 64"):
    train.train_and_evaluate(cfg, w)


def test_resume_accepts_a_model_field_added_later_and_memory_settings(tmp_path):
  """A workdir written before a model field existed resumes under the field's default (which keeps the
  old model); remat and chunking may change on resume (memory, not the function); other fields may not."""
  import trainer

  model = dict(vars(M.preset("nano")))
  old = {"model": {k: v for k, v in model.items() if k not in ("loss_chunk", "attn_chunk")}, "data": {}, "seed": 0}
  with open(tmp_path / "config.json", "w") as f:
    json.dump(old, f)
  trainer.check_workdir(str(tmp_path), {"model": model, "data": {}, "seed": 0})
  faster = model | {"remat": True, "loss_chunk": 256, "attn_chunk": 128}
  trainer.check_workdir(str(tmp_path), {"model": faster, "data": {}, "seed": 0})
  with pytest.raises(C.CheckpointError, match=r"different model.*n_layers"):
    trainer.check_workdir(str(tmp_path), {"model": model | {"n_layers": 3}, "data": {}, "seed": 0})
  # the same rule for train.init_from (a run started from the parameters of one written before the field)
  assert trainer.model_changes(old["model"], faster) == []
  assert trainer.model_changes(old["model"], model | {"d_ff": 8}) == ["d_ff"]


def test_mesh_that_does_not_divide(tmp_path, data_dir):
  with pytest.raises(sharding.ShardingError, match="train.batch_size=12 is not divisible"):
    train.train_and_evaluate(tiny_cfg(data_dir, **{"train.batch_size": 12}), str(tmp_path / "a"))
  with pytest.raises(sharding.ShardingError, match="do not divide"):
    train.train_and_evaluate(tiny_cfg(data_dir, **{"mesh.data": -1, "mesh.tensor": 3}), str(tmp_path / "b"))


@pytest.mark.slow
def test_nan_stops_with_step_and_keeps_checkpoints(tmp_path, data_dir):
  w = str(tmp_path / "nan")
  cfg = tiny_cfg(
    data_dir, **{"opt.name": "sgd", "opt.lr": 1e12, "opt.grad_clip": 0.0, "opt.warmup_steps": 0, "opt.momentum": 0.0}
  )
  with pytest.raises(train.TrainingDiverged, match=r"at step \d+"):
    train.train_and_evaluate(cfg, w)
  steps = C.available_steps(w)
  assert 0 in steps
  C.restore_params(w, max(steps))  # the last checkpoint left behind is readable
  for s in steps:
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(C.restore_params(w, s)))


def test_unknown_config_key_is_a_clear_error(tmp_path, data_dir):
  r = cli(str(tmp_path / "k"), data_dir, "--config.opt.lrr=1")
  assert r.returncode != 0
  assert "lrr" in r.stderr


def test_init_from_another_run(straight, tmp_path, data_dir):
  """train.init_from: SGD continued from a trained run starts from its parameters (step 0 of the new run is
  the source's step 8, on another mesh), with a fresh optimizer; a model that differs is one line."""
  src, _ = straight
  w = str(tmp_path / "sgd")
  cfg = tiny_cfg(
    data_dir, **{"model.d_model": 32, "model.n_heads": 2, "train.init_from": f"{src}:8", "opt.name": "sgd", "train.steps": 4}
  )
  train.train_and_evaluate(cfg, w)
  got, want = C.restore_params(w, 0), C.restore_params(src, 8)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(C.restore_params(w, 4)), jax.tree.leaves(want)))
  bad = tiny_cfg(data_dir, **{"model.d_model": 64, "train.init_from": src})
  with pytest.raises(train.errors.ConfigError, match=r"init_from.*differs.*d_model"):
    train.train_and_evaluate(bad, str(tmp_path / "bad"))
  with pytest.raises(train.errors.ConfigError, match="not a run directory"):
    train.train_and_evaluate(tiny_cfg(data_dir, **{"train.init_from": str(tmp_path / "nope")}), str(tmp_path / "bad2"))
