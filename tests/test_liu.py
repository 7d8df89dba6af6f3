"""experiments/liu.py: the nano grid end to end, rerun skips, bad input."""

import os

import pandas as pd
import pytest

from experiments import liu


def test_grid_layout():
  runs = liu.grid("quick")
  sizes = sorted(r.size for r in runs if r.road == "size")
  assert len(sizes) >= 6 and len(set(sizes)) == len(sizes)
  assert {r.optimizer for r in runs} == {"adamw", "sgd", "adamw+adv"}
  sgd = next(r for r in runs if r.optimizer == "sgd").config()
  assert sgd.opt.name == "sgd" and sgd.opt.schedule == "constant"
  assert next(r for r in runs if r.optimizer == "adamw+adv").config().adversarial.weight > 0


def test_bad_input(tmp_path, capsys):
  from experiments.sweep import SweepError

  with pytest.raises(SweepError, match="empty"):
    liu.train_grid([], str(tmp_path), "nano")
  assert liu.main(["--out", str(tmp_path / "x"), "--scale=huge"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "unknown scale 'huge'" in err[0]
  assert not os.path.exists(tmp_path / "x")


def test_plateau_and_matched_adversary():
  # excess stops improving (by > 0.005) at step 300: 0.30 -> 0.1 -> 0.052 -> 0.050 -> 0.049 -> 0.0495
  assert liu.plateau_step([100, 200, 300, 400, 500, 600], [0.3, 0.1, 0.052, 0.05, 0.049, 0.0495]) == 300
  assert liu.plateau_step([1, 2], [0.5, 0.2]) == 2  # still improving at the end: the last step
  final = pd.DataFrame(
    dict(
      run=["adamw_d64", "adv_a", "adv_b", "adv_c"],
      road=["size", "algorithm", "algorithm", "algorithm"],
      size=[64] * 4,
      optimizer=["adamw", "adamw+adv", "adamw+adv", "adamw+adv"],
      adv_weight=[0.0, 0.1, 0.3, 1.0],
      excess_loss=[0.040, 0.043, 0.049, 0.090],
    )
  )
  assert liu.choose_adversarial(final)["run"] == "adv_b"  # the largest weight within 0.01 of AdamW
  assert liu.choose_adversarial(final.assign(excess_loss=[0.04, 0.2, 0.1, 0.3]))["run"] == "adv_b"  # else the closest


def test_bootstrap_corr():
  c = liu.bootstrap_corr([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1])
  assert c["spearman"] == pytest.approx(-1.0) and c["pearson"] == pytest.approx(-1.0)
  assert c["spearman_ci95"][1] <= -0.99
  assert liu.bootstrap_corr([1, 2], [2, 1])["n"] == 2


@pytest.mark.slow
def test_nano_end_to_end(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("LMTRACE_DATA_DIR", str(tmp_path / "tfds"))
  out = str(tmp_path / "liu")
  assert liu.main(["--out", out, "--scale=nano"]) == 0
  df = pd.read_parquet(os.path.join(out, "liu.parquet"))
  for col in (
    "run",
    "road",
    "size",
    "optimizer",
    "step",
    "loss",
    "excess_loss",
    "trH_hutchinson",
    "trH_hutchinson_se",
    "trH_fisher",
  ):
    assert col in df, col
  assert {"acc_task_A", "acc_se_task_A"} <= set(df.columns)
  assert set(df["road"]) == {"size", "convergence", "algorithm", "baseline"}
  assert df.loc[df["road"] == "convergence", "step"].nunique() >= 3  # Tr(H) and accuracy along the SGD run
  models = df[df["road"] != "baseline"]
  assert models["trH_hutchinson"].notna().all() and models["acc_task_A"].notna().all()
  conv = models[models["road"] == "convergence"]
  assert (conv["excess_loss"] > 0).all()  # the SGD run evaluates at every checkpoint
  final = models[models["step"] == models.groupby("run")["step"].transform("max")]
  assert (final["excess_loss"] > 0).all()
  assert df["trH_hutchinson_enlarged"].notna().any()
  md = open(os.path.join(out, "liu.md")).read()
  assert "Directions" in md and "19.8" in md and "## Protocol" in md
  proto = pd.read_csv(os.path.join(out, "protocol.csv")).set_index("invariant")
  assert set(proto["ok"]) <= {"✓", "✗"} and "SGD run: past its plateau" in proto.index
  from tests.test_experiments import _same_schema_as_published

  _same_schema_as_published(out, "liu", ("report.md", "protocol.csv"))  # liu.csv: per-task columns differ by language
  assert os.path.exists(os.path.join(out, "liu_trace_vs_accuracy.png"))
  capsys.readouterr()
  assert liu.main(["--out", out, "--scale=nano"]) == 0  # rerun: every run skipped, tables unchanged
  rerun = capsys.readouterr().out
  assert f"liu: sweep: {len(liu.grid('nano'))} run(s) already finished" in rerun and "training" not in rerun
  assert len(pd.read_parquet(os.path.join(out, "liu.parquet"))) == len(df)


def test_same_loss_ladder_keeps_the_longest_run_within_tolerance():
  d = pd.DataFrame(dict(size=[32, 48, 64, 96], excess_loss=[0.0366, 0.0320, 0.0313, 0.0253]))
  assert list(liu.same_loss_ladder(d)["size"]) == [48, 64, 96]  # 32 is 0.011 above 96: left out
  d = pd.DataFrame(dict(size=[16, 32, 64], excess_loss=[0.30, 0.05, 0.045]))
  assert list(liu.same_loss_ladder(d)["size"]) == [32, 64]
  assert list(liu.same_loss_ladder(d, tol=1.0)["size"]) == [16, 32, 64]
