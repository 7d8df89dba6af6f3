"""A throwaway one-node SLURM cluster for the `slurm` tests: munged, slurmctld and slurmd on this machine.

Everything (munge key and socket, slurm.conf, state, spool, logs, pid files) lives in one temporary
directory; the ports are picked free, so it does not touch a system SLURM or munge. The daemons run as
root (slurmd must, to start jobs); they are stopped at the end by the pids they wrote. Needs Debian's
`slurm-wlm` and `munge` packages (`.ci/run` installs them with apt when it can).

  with SlurmCluster(tmpdir) as c:      # or the session fixture `slurm_cluster` in tests/conftest.py
    subprocess.run(["srun", "-n", "2", "hostname"], env=c.env())
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "scontrol", "sinfo")


def missing() -> str:
  """'' when a cluster can be started here, else the reason (one line, for pytest.skip)."""
  absent = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
  if absent:
    return f"SLURM/munge not installed ({', '.join(absent)} missing): apt-get install -y slurm-wlm munge"
  if os.geteuid() != 0:
    return "a one-node SLURM cluster needs root (slurmd starts jobs as their user)"
  return ""


def _exe(name: str) -> str:
  return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(n: int) -> list[int]:
  socks = [socket.socket() for _ in range(n)]
  try:
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


class SlurmCluster:
  def __init__(self, root: str, cpus: int | None = None):
    self.root = os.path.abspath(root)
    self.cpus = cpus or os.cpu_count() or 1
    self.host = socket.gethostname().split(".")[0]
    self.conf = os.path.join(self.root, "slurm.conf")
    self.sock = os.path.join(self.root, "munge", "munge.sock")
    self.pidfiles = [os.path.join(self.root, f) for f in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid")]

  def env(self, **extra) -> dict:
    """The environment for sbatch/srun/scancel against this cluster (plus `extra`)."""
    return dict(os.environ, SLURM_CONF=self.conf, **extra)

  def _write_conf(self) -> None:
    ctld, d = _free_ports(2)
    r = self.root
    lines = [
      "ClusterName=lmtrace-test",
      f"SlurmctldHost={self.host}",
      "AuthType=auth/munge",
      "CredType=cred/munge",
      f"AuthInfo=socket={self.sock}",
      "ProctrackType=proctrack/linuxproc",
      "TaskPlugin=task/none",
      "SelectType=select/cons_tres",
      "SelectTypeParameters=CR_CPU",
      "SlurmUser=root",
      "SlurmdUser=root",
      f"SlurmctldPort={ctld}",
      f"SlurmdPort={d}",
      f"StateSaveLocation={r}/state",
      f"SlurmdSpoolDir={r}/spool",
      f"SlurmctldPidFile={r}/slurmctld.pid",
      f"SlurmdPidFile={r}/slurmd.pid",
      f"SlurmctldLogFile={r}/slurmctld.log",
      f"SlurmdLogFile={r}/slurmd.log",
      "ReturnToService=2",
      "MpiDefault=none",
      "JobRequeue=1",
      "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` (there is no accounting database)
      "KillWait=60",  # scancel: time between SIGTERM and SIGKILL (a preempted trainer saves in between)
      "JobCompType=jobcomp/none",
      "AccountingStorageType=accounting_storage/none",
      f"NodeName={self.host} CPUs={self.cpus} State=UNKNOWN",
      "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
    ]
    with open(self.conf, "w") as f:
      f.write("\n".join(lines) + "\n")

  def start(self, timeout_s: float = 30.0) -> "SlurmCluster":
    for d in ("munge", "state", "spool"):
      os.makedirs(os.path.join(self.root, d), exist_ok=True)
    os.chmod(self.root, 0o755)  # munge's socket must be reachable (execute permission on its directories)
    m = os.path.join(self.root, "munge")
    os.chmod(m, 0o755)
    key = os.path.join(m, "munge.key")
    with open(key, "wb") as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    self._write_conf()
    subprocess.run(
      [
        _exe("munged"), "--force", f"--socket={self.sock}", f"--key-file={key}", f"--log-file={m}/munged.log",
        f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
      ],
      check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    for daemon in ("slurmctld", "slurmd"):
      subprocess.run([_exe(daemon), "-f", self.conf], check=True, capture_output=True, timeout=30, env=self.env())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env())
      if r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc"):
        return self
      time.sleep(0.3)
    self.stop()
    raise RuntimeError(f"the test SLURM node did not come up in {timeout_s}s; see the logs in {self.root}")

  def stop(self) -> None:
    """Stops slurmd, slurmctld and munged by the pids in their pid files (waits up to 10 s each)."""
    for path in self.pidfiles:
      try:
        pid = int(open(path).read().split()[0])
      except (OSError, ValueError, IndexError):
        continue
      try:
        os.kill(pid, signal.SIGTERM)
      except ProcessLookupError:
        continue
      for _ in range(100):
        try:
          os.kill(pid, 0)
        except ProcessLookupError:
          break
        time.sleep(0.1)

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  # -- jobs --------------------------------------------------------------------------------------
  def sbatch(self, script: str, *args: str, env: dict | None = None) -> str:
    """Submits `script` (a path); returns the job id."""
    r = subprocess.run(["sbatch", "--parsable", *args, script], capture_output=True, text=True, env=env or self.env(), timeout=60)
    if r.returncode:
      raise RuntimeError(f"sbatch failed: {r.stderr.strip()}")
    return r.stdout.strip().split(";")[0]

  def requeue(self, job_id: str) -> None:
    """`scontrol requeue` (what a cluster does to a preempted job), made eligible at once: Slurm holds a
    requeued job for about two minutes before it may start again (measured here: 130 s)."""
    before = int(self.job(job_id).get("Restarts", "0") or 0)
    subprocess.run(["scontrol", "requeue", job_id], env=self.env(), check=True, capture_output=True, timeout=60)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=self.env(), check=True, capture_output=True)
    # the job's state may still read as the old run's end for a moment: wait until Slurm counts the restart, so
    # that a wait() right after this sees the requeued run and not the previous one
    deadline = time.monotonic() + 60
    while int(self.job(job_id).get("Restarts", "0") or 0) <= before and time.monotonic() < deadline:
      time.sleep(0.5)

  def job(self, job_id: str) -> dict:
    """`scontrol show job` as a dict of its Key=Value fields (array jobs: the first record)."""
    r = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=self.env(), timeout=60)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout.splitlines()[0])) if r.returncode == 0 and r.stdout.strip() else {}

  def states(self, job_id: str) -> list[str]:
    """JobState of every task of a job (one per array element)."""
    r = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=self.env(), timeout=60)
    return re.findall(r"JobState=(\S+)", r.stdout)

  def wait(self, job_id: str, timeout_s: float = 900.0) -> list[str]:
    """Waits until no task of the job is pending/running; returns their final states."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      s = self.states(job_id)
      if s and not any(x in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED") for x in s):
        return s
      time.sleep(1.0)
    raise TimeoutError(f"job {job_id} still running after {timeout_s}s: {self.states(job_id)}")
