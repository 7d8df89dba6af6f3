"""Multi-host flatness: the CLI in 2 local processes x 4 CPU devices (gloo) == 1 process x 8 devices, on a
run trained on one device."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from analysis import flatness as F
from tests.test_multiprocess import _free_port
from tests.test_train import cli

pytestmark = pytest.mark.slow  # two processes, each importing jax and compiling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
  "--steps=8",
  "--estimator=hutchinson,fisher,power",
  "--probes=4",
  "--lanczos_steps=4",
  "--power_iters=4",
  "--blocks",
  "--batches=2",
  "--batch_size=8",
  "--seed=3",
]


def _cli(workdir, extra=()):
  return [sys.executable, "-m", "analysis.flatness", f"--workdir={workdir}", *FLAGS, *extra]


def _rows(workdir):
  df = pd.read_parquet(F.table_path(workdir))
  return df.sort_values(["estimator", "quantity"]).reset_index(drop=True)


def test_two_processes_match_one(tmp_path):
  w = str(tmp_path / "w")  # trained on ONE device; read on 8 (one process) and on 2 x 4 (two processes)
  r = cli(w, str(tmp_path / "data"), "--config.train.steps=8", "--config.ckpt.resume_every=8", "--config.eval.every=0", devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  one_dir = str(tmp_path / "one")
  two_dir = str(tmp_path / "two")
  for d in (one_dir, two_dir):
    shutil.copytree(w, d)
  one = subprocess.run(
    _cli(one_dir, ["--mesh=2,2,2"]),
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
    env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
  )
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  env2 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [
    subprocess.Popen(
      _cli(two_dir, ["--mesh=2,2,2", f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}"]),
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
  assert "rows in" in outs[0][0] and "rows in" not in outs[1][0]  # one process reports (and writes)
  a, b = _rows(one_dir), _rows(two_dir)
  assert len(a) == len(b) > 5 and set(a.estimator) == {"hutchinson", "fisher", "power"}
  assert a["valid"].all() and b["valid"].all()
  assert list(a.quantity) == list(b.quantity)
  np.testing.assert_allclose(b["estimate"], a["estimate"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)
  assert (a["data_fingerprint"] == b["data_fingerprint"]).all()
