"""Test setup: 8 fake CPU devices, forced before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Identical programs (the same tiny model in several tests and subprocesses) compile once per run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join("/tmp", f"lmtrace-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402

assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
  """A one-node SLURM cluster (munged, slurmctld, slurmd) for the tests marked `slurm`; skipped where
  the packages are absent or not root (failed instead with LMTRACE_REQUIRE_SLURM=1, as CI sets once it has
  installed them). Stopped by pid at the end of the session."""
  from tests import slurm_cluster as SC

  why = SC.missing()
  if why and os.environ.get("LMTRACE_REQUIRE_SLURM") == "1":  # CI installed SLURM: a skip would hide a failure
    pytest.fail(f"LMTRACE_REQUIRE_SLURM=1 but {why}")
  if why:
    pytest.skip(why)
  with SC.SlurmCluster(str(tmp_path_factory.mktemp("slurm"))) as c:
    yield c
