"""The cluster paths on a real one-node SLURM cluster (tests/slurm_cluster.py): a sweep's `--emit=slurm`
array submitted with sbatch; a 2-process `srun` training with `distributed.coordinator=auto` equal to the
1-process run; `scancel --signal=TERM` stopping both processes at one step, then the requeued job
resuming bit-identically after refusing a live lock of another host and taking over a stale one."""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train
from analysis import load_sweep
from data import sources
from experiments import sweep as SW
from lib import ckpt as C
from lib import runlock
from tests.helpers import tiny_cfg
from tests.test_sweep import spec

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30  # enough steps (~0.1 s each once compiled) that a scancel issued at step 1 lands mid-run
# tiny_cfg's run card, spelled as CLI overrides of configs/base.py:nano (the same config), on a (4, 2) mesh
CARD = {
  "model.max_len": 32, "data.seq_len": 32, "data.source.n_train": 2000, "data.source.n_validation": 200,
  "data.source.n_test": 50, "train.steps": STEPS, "train.batch_size": 8, "train.log_every": 1, "eval.every": 15,
  "eval.batches": 1, "eval.batch_size": 8, "ckpt.schedule": "pythia:every=4", "ckpt.resume_every": 1000,
  "log.tensorboard": False, "mesh.data": 4, "mesh.fsdp": 2,
}  # fmt: skip


def job_env(cluster, devices: int = 8) -> dict:
  """The submitting environment jobs inherit: this venv's python first on PATH, `devices` fake CPU devices."""
  path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
  return cluster.env(PATH=path, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def train_cmd(workdir, data_dir) -> str:
  over = [f"--config.{k}={v}" for k, v in {**CARD, "data.data_dir": data_dir}.items()]
  args = ["python", "train.py", "--config=configs/base.py:nano", f"--workdir={workdir}", *over]
  return shlex.join(args + ["--config.distributed.coordinator=auto"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The nano language, built once here (concurrent array tasks would otherwise race to build it)."""
  d = str(tmp_path_factory.mktemp("tfds"))
  sources.make_groups(tiny_cfg(d, **CARD).data)
  return d


def test_emitted_sweep_array_runs_under_sbatch(slurm_cluster, tmp_path, data_dir):
  out = str(tmp_path / "sw")
  sw = SW.Sweep.from_dict(spec(data_dir), out)
  script = sw.write_launch("slurm", echo=lambda *a, **k: None)
  # the script asks for one GPU per node (edit for your cluster); on this CPU-only cluster: --gpus-per-node=0
  job = slurm_cluster.sbatch(script, "--gpus-per-node=0", env=job_env(slurm_cluster))
  states = slurm_cluster.wait(job)
  logs = {f: open(os.path.join(out, f)).read()[-2000:] for f in os.listdir(out) if f.startswith("slurm-")}
  assert states == ["COMPLETED", "COMPLETED"], logs
  df = load_sweep(out, table="runs")
  assert len(df) == 4 and sorted(zip(df["lr"], df["seed"])) == [(1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)]
  assert (df["final/step"] == 6).all() and (df["final/eval/loss"] > 0).all()
  assert SW.Sweep.from_dict(spec(data_dir), out).run() == {"trained": [], "skipped": [r.name for r in sw.runs()]}


def _stop_lines(text: str) -> list[int]:
  return [int(s) for s in re.findall(r"stopped by SIGTERM after step (\d+); a resume checkpoint of step \1 is in", text)]


def _wait_for_step(workdir, step: int, job: str, cluster, timeout_s=600.0) -> None:
  path, deadline = os.path.join(workdir, "metrics.jsonl"), time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if os.path.exists(path) and any(json.loads(x).get("step", -1) >= step for x in open(path) if x.strip()):
      return
    assert cluster.states(job) == ["RUNNING"] or cluster.states(job) == ["PENDING"], cluster.states(job)
    time.sleep(0.5)
  raise TimeoutError(f"step {step} not reached in {workdir}")


def _losses(workdir):
  return [json.loads(x)["train/loss"] for x in open(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in x]


def _params(workdir, step):
  return jax.tree.leaves(C.restore_params(str(workdir), step))


def test_srun_two_processes_match_one_and_scancel_requeue_resumes_identically(slurm_cluster, tmp_path, data_dir):
  one = tmp_path / "one"
  train.train_and_evaluate(tiny_cfg(data_dir, **CARD), str(one))  # the 1-process reference (8 devices, this process)
  # (b) srun -n 2: each task 4 CPU devices; jax.distributed.initialize() finds SLURM's environment
  two = tmp_path / "two"
  env = job_env(slurm_cluster, devices=4)
  r = subprocess.run(
    ["srun", "-n", "2", "bash", "-c", train_cmd(two, data_dir)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("mesh {'data': 4, 'fsdp': 2, 'tensor': 1}") == 2  # both processes, one 8-device mesh
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
  # equal up to the reduction order (atol: a leaf whose exact gradient is ~0 holds Adam-normalised rounding noise, ~1e-6)
  for x, y in zip(_params(one, STEPS), _params(two, STEPS), strict=True):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=2e-5)

  # (c) the same run as a batch job; scancel --signal=TERM reaches both tasks of the srun step
  pre = tmp_path / "pre"
  script = tmp_path / "job.sh"
  out = tmp_path / "job.out"
  script.write_text(f"#!/bin/bash\ncd {ROOT}\nsrun -n 2 bash -c {shlex.quote(train_cmd(pre, data_dir))}\n")
  job = slurm_cluster.sbatch(str(script), "-n", "2", f"--output={out}", env=env)
  _wait_for_step(pre, 1, job, slurm_cluster)
  subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True, timeout=60)
  assert slurm_cluster.wait(job) == ["FAILED"]
  text = out.read_text()
  stops = _stop_lines(text)
  assert len(stops) == 2 and stops[0] == stops[1] and 1 <= stops[0] < STEPS, text[-3000:]  # both processes, one step
  n = stops[0]
  saved = C.available_steps(str(pre), need_full=True)  # step n may be a resume or a (full-state) schedule checkpoint
  assert max(saved) == n and os.listdir(pre / "resume") in ([], [str(n)])
  assert not os.path.exists(pre / runlock.LOCK)

  # (d) a node "dead-node-7" holds the workdir's lock: refused while its heartbeat is fresh, taken over once stale
  lock = pre / runlock.LOCK
  lock.write_text(json.dumps({"host": "dead-node-7", "pid": 4242, "pid_start": "1", "since": "earlier", "processes": 2}))
  slurm_cluster.requeue(job)
  assert slurm_cluster.wait(job) == ["FAILED"]
  text = out.read_text()
  assert text.count("is in use by another trainer (pid 4242 on dead-node-7") == 1, text[-3000:]  # process 0's message
  assert text.count("process 0 could not lock") == 1 and max(C.available_steps(str(pre))) == n  # process 1 refuses too
  old = time.time() - runlock.STALE_S - 60
  os.utime(lock, (old, old))
  slurm_cluster.requeue(job)
  assert slurm_cluster.wait(job) == ["COMPLETED"], out.read_text()[-3000:]
  text = out.read_text()
  assert "taking over the stale lock" in text and "dead-node-7" in text and not lock.exists()
  for x, y in zip(_params(two, STEPS), _params(pre, STEPS), strict=True):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # bit-identical to the uninterrupted 2-process run
  rows = [json.loads(x) for x in open(pre / "metrics.jsonl")]
  assert sorted(r["step"] for r in rows if "train/loss" in r) == list(range(1, STEPS + 1))  # one row per step
