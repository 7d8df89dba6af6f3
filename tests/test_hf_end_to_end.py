"""The end-to-end check: import the committed tiny GPT-NeoX fixture as a 3-checkpoint series, run
trajectories + ICL + generation on it, and load all three tables."""

import os

import numpy as np
import pytest

import analysis
from analysis import generate, icl, trajectories
from lib import hf_import

pytestmark = pytest.mark.slow  # import + trajectories + ICL + generation, end to end

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def test_import_then_trajectories_icl_generation(tmp_path, monkeypatch):
  monkeypatch.setenv("LMTRACE_DATA_DIR", str(tmp_path / "tfds"))
  w = str(tmp_path / "pythia-tiny")
  srcs = ",".join(os.path.join(FIX, "hf", "pythia", f"step{s}") for s in (0, 100, 200))
  assert hf_import.main([f"--src={srcs}", f"--workdir={w}", f"--probe_text={FIX}/hf/corpus.txt"]) == 0
  assert trajectories.main([f"--workdir={w}", "--sequences=8"]) == 0
  assert icl.main([f"--workdir={w}", f"--tasks={FIX}/bigbench"]) == 0
  assert generate.main([f"--workdir={w}", "--num=4", "--max_new=16", "--prompt_len=4", "--top_p=0.9"]) == 0

  traj = analysis.load_trajectories(w)
  icl_df = analysis.load_icl(w)
  gen = analysis.load_generations(w)
  assert list(traj.step.values) == [0, 100, 200]
  assert sorted(set(icl_df.step)) == [0, 100, 200] and sorted(set(gen.step)) == [0, 100, 200]
  # the trained revisions fit the corpus better than the random init (probe loss falls)
  val = traj.val_loss.values[0]
  assert val[2] < val[0] and np.isfinite(val).all()
  assert gen.text.str.len().gt(0).any()
