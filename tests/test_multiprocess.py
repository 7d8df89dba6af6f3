"""Multi-host: 2 local processes x 4 CPU devices (gloo collectives) == 1 process x 8 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lib import ckpt as C

pytestmark = pytest.mark.slow  # two processes, each importing jax and compiling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
  "--config.model.d_model=32",
  "--config.model.n_heads=2",
  "--config.model.d_ff=64",
  "--config.data.seq_len=32",
  "--config.model.max_len=32",
  "--config.train.steps=3",
  "--config.train.batch_size=8",
  "--config.train.log_every=1",
  "--config.eval.every=3",
  "--config.eval.batch_size=8",
  "--config.eval.batches=1",
  "--config.log.tensorboard=False",
  "--config.data.source.n_train=2000",
  "--config.data.source.n_validation=100",
  "--config.data.source.n_test=20",
  "--config.mesh.data=4",
  "--config.mesh.fsdp=2",
]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _cmd(workdir, data_dir, extra=()):
  return [
    sys.executable,
    os.path.join(ROOT, "train.py"),
    f"--config={ROOT}/configs/base.py",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    *ARGS,
    *extra,
  ]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(x) for x in f]
  return [r["train/loss"] for r in rows if "train/loss" in r], [r["eval/loss"] for r in rows if "eval/loss" in r]


def test_two_processes_match_one(tmp_path):
  data_dir = str(tmp_path / "data")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  one = subprocess.run(
    _cmd(tmp_path / "one", data_dir),
    env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  env2 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [
    subprocess.Popen(
      _cmd(
        tmp_path / "two",
        data_dir,
        [
          f"--config.distributed.coordinator=localhost:{port}",
          "--config.distributed.num_processes=2",
          f"--config.distributed.process_id={i}",
        ],
      ),
      env=env2,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      cwd=ROOT,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "'data': 4, 'fsdp': 2" in outs[0][0]
  l1, e1 = _losses(tmp_path / "one")
  l2, e2 = _losses(tmp_path / "two")
  assert len(l1) == len(l2) == 3
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  np.testing.assert_allclose(e2, e1, rtol=1e-6)
  a, b = C.restore_params(str(tmp_path / "one"), 3), C.restore_params(str(tmp_path / "two"), 3)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
