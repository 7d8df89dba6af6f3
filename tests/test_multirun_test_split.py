"""The seed-vectorised group's end-of-run TEST-split rows (train_group.py): on a two-group static mixture
(the Aioli experiment's static runs) each run's test/<group>/ppl, test/avg_ppl, ... equal the same seed
trained alone, and a rerun of the finished group writes no second row. (tests/test_multirun.py checks the
same rows on one data group: after a stop and resume, and none for a diverged run.)"""

import json
import os

import numpy as np
import pytest

import train
from experiments import aioli

pytestmark = pytest.mark.slow  # trains a seed group and each seed alone

SEEDS = (0, 1)


def cfg(data_dir, seed=0, **over):
  """Aioli's nano bigram2 setting (16 steps) with static, unequal proportions; `over` = {"section.key": value}."""
  c = aioli.run_config(
    "nano", aioli.settings("nano")["bigram2"], seed, data_dir, method="static", proportions="easy=0.7,hard=0.3"
  )
  c.eval.every = 8
  c.update_from_flattened_dict(over)
  return c


def trows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in r.items() if k != "time"} for r in map(json.loads, f) if any(k.startswith("test/") for k in r)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def group(tmp_path_factory, data_dir):
  w = str(tmp_path_factory.mktemp("group"))
  out = train.train_and_evaluate(cfg(data_dir, **{"train.seeds": "0,1"}), w)
  return w, out


@pytest.fixture(scope="module")
def singles(tmp_path_factory, data_dir):
  ws = {}
  for s in SEEDS:
    ws[s] = str(tmp_path_factory.mktemp(f"single{s}"))
    train.train_and_evaluate(cfg(data_dir, seed=s), ws[s])
  return ws


def test_group_test_rows_equal_each_seed_alone(group, singles):
  w, out = group
  for s, ws in singles.items():
    (a,), (b,) = trows(ws), trows(os.path.join(w, f"seed_{s}"))  # exactly one row each
    keys = {"test/easy/ppl", "test/hard/ppl", "test/avg_ppl", "test/ppl", "test/loss", "test/easy/loss", "test/hard/loss"}
    assert keys <= set(a) and set(a) == set(b) and a["step"] == b["step"] == 16
    for k in sorted(set(a) - {"step"}):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=f"seed {s} {k}")
    assert a["test/avg_ppl"] == pytest.approx((a["test/easy/ppl"] + a["test/hard/ppl"]) / 2)
    assert out[s]["test/avg_ppl"] == b["test/avg_ppl"]  # the group's return value carries the row, like a single run's
  # the two seeds are different runs (so equality above is per seed, not trivial)
  assert trows(os.path.join(w, "seed_0"))[0]["test/avg_ppl"] != trows(os.path.join(w, "seed_1"))[0]["test/avg_ppl"]


def test_rerun_of_a_finished_group_writes_no_second_row(group, data_dir):
  w, _ = group
  again = train.train_and_evaluate(cfg(data_dir, **{"train.seeds": "0,1"}), w)
  assert all(again[s]["step"] == 16 and "test/avg_ppl" not in again[s] for s in SEEDS)
  assert [len(trows(os.path.join(w, f"seed_{s}"))) for s in SEEDS] == [1, 1]
