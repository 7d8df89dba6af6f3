"""notebooks/lmtrace_tour.ipynb runs from top to bottom at nano scale (nbclient, a fresh kernel), so it cannot rot."""

import datetime
import os

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat, nbclient and ipykernel (requirements.txt)")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "lmtrace_tour.ipynb")

pytestmark = pytest.mark.slow  # trains two nano seeds and runs three analysis jobs in a kernel (~1-2 min on 2 cores)


def _time(stamp: str) -> datetime.datetime:
  return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_tour_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("LMTRACE_TOUR_DIR", str(tmp_path / "tour"))
  monkeypatch.setenv("LMTRACE_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.setenv("XLA_FLAGS", "")  # the kernel sees one CPU device, as a user's notebook does
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  where = {"metadata": {"path": os.path.dirname(NOTEBOOK)}}  # the kernel starts in notebooks/, as Jupyter does
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources=where, record_timing=True)
  client.execute()
  for i, cell in enumerate(nb.cells):  # seconds per cell (shown with -s or on failure)
    t = cell.get("metadata", {}).get("execution", {})
    if "iopub.execute_input" in t and "shell.execute_reply" in t:
      dt = (_time(t["shell.execute_reply"]) - _time(t["iopub.execute_input"])).total_seconds()
      print(f"cell {i}: {dt:.1f} s")
  out = {}
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.get("output_type") == "error":
        pytest.fail(f"{o['ename']}: {o['evalue']}")
      out.setdefault("text", []).append(o.get("text", ""))
      if "image/png" in o.get("data", {}):
        out["images"] = out.get("images", 0) + 1
  text = "".join(out["text"])
  for name in ("metrics", "flatness", "surprisal", "index", "probes", "token_metrics", "downstream"):
    line = next(ln for ln in text.splitlines() if ln.startswith(f"{name} "))
    assert int(line.split()[1]) > 0, line  # every table loaded, none empty
  assert out.get("images", 0) >= 4  # loss curve, flatness, learning curves, AoA vs frequency
  assert os.path.exists(tmp_path / "tour" / "seed_0" / "analysis" / "token_metrics.parquet")
  assert os.path.exists(tmp_path / "tour" / "seed_0" / "analysis" / "flatness.parquet")
  assert os.path.exists(tmp_path / "tour" / "seed_0" / "analysis" / "downstream.parquet")
