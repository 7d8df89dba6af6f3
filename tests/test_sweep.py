"""Sweeps (experiments/sweep.py) and load_sweep: a 2x2 nano grid runs, reruns do nothing, an interrupted
sweep resumes, launch scripts name every job, bad sweep files are one clear line each."""

import json
import os

import pandas as pd
import pytest

import train
from analysis import load_sweep
from experiments import sweep as SW
from lib import ckpt as C


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def spec(data_dir, **extra):
  s = {
    "config": "configs/base.py:nano",
    "set": {
      "data.data_dir": data_dir,
      "model.max_len": 32,
      "data.seq_len": 32,
      "data.source.n_train": 2000,
      "data.source.n_validation": 200,
      "data.source.n_test": 50,
      "train.steps": 6,
      "train.batch_size": 8,
      "train.log_every": 3,
      "eval.every": 6,
      "eval.batches": 1,
      "eval.batch_size": 8,
      "ckpt.schedule": "pythia:every=4",
      "ckpt.resume_every": 3,
      "log.tensorboard": False,
    },
    "axes": {"lr": [1e-3, 3e-3], "seed": [0, 1]},
  }
  s.update(extra)
  return s


@pytest.mark.slow
def test_grid_runs_once_and_loads_labelled(tmp_path, data_dir, monkeypatch):
  out = str(tmp_path / "sw")
  sw = SW.Sweep.from_dict(spec(data_dir), out)
  names = [r.name for r in sw.runs()]
  assert names == ["runs/lr=0.001/seed_0", "runs/lr=0.001/seed_1", "runs/lr=0.003/seed_0", "runs/lr=0.003/seed_1"]
  assert [len(rs) for _, rs in sw.plan()] == [2, 2]  # seeds of a point train as one vectorised group
  calls = []
  real = train.train_and_evaluate

  def interrupted(cfg, workdir):
    calls.append(workdir)
    if len(calls) == 2:  # the second group is killed after 3 of its 6 steps
      cfg.unlock()
      cfg.train.stop_at = 3
      real(cfg, workdir)
      raise KeyboardInterrupt
    return real(cfg, workdir)

  monkeypatch.setattr(train, "train_and_evaluate", interrupted)
  with pytest.raises(KeyboardInterrupt):
    sw.run()
  monkeypatch.setattr(train, "train_and_evaluate", real)
  assert max(C.available_steps(os.path.join(out, "runs/lr=0.003/seed_1"))) == 3
  again = SW.Sweep.from_dict(spec(data_dir), out).run()
  assert again["skipped"] == names[:2] and again["trained"] == names[2:]
  assert SW.Sweep.from_dict(spec(data_dir), out).run() == {"trained": [], "skipped": names}  # nothing left to do
  df = load_sweep(out, table="runs")
  assert len(df) == 4 and sorted(zip(df["lr"], df["seed"])) == [(1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)]
  for _, row in df.iterrows():
    cfg = C.read_config(row["workdir"])
    assert (cfg["opt"]["lr"], cfg["seed"]) == (row["lr"], row["seed"])
    assert row["final/step"] == 6 and row["final/eval/loss"] > 0 and not row["diverged"]
  assert df.groupby("lr")["final/eval/loss"].nunique().tolist() == [2, 2]  # seeds really differ
  full = load_sweep(out)  # no analysis tables yet: one row per run
  assert len(full) == 4 and full["table"].isna().all()
  # an analysis table in one run: its rows carry that run's axes and final metrics, the others stay one row each
  w = df.set_index("run").loc["runs/lr=0.003/seed_1", "workdir"]
  os.makedirs(os.path.join(w, "analysis"))
  pd.DataFrame({"step": [0, 6], "trace": [1.0, 2.0], "seed": [9, 9]}).to_parquet(os.path.join(w, "analysis", "flatness.parquet"))
  full = load_sweep(out)
  t = full[full["table"] == "flatness"]
  assert len(full) == 5 and len(t) == 2 and (t["lr"] == 3e-3).all() and (t["seed"] == 1).all()
  assert t["flatness/seed"].tolist() == [9, 9] and t["trace"].tolist() == [1.0, 2.0] and (t["final/step"] == 6).all()
  assert load_sweep(out, table="flatness")["trace"].tolist() == [1.0, 2.0]


def test_dry_run_and_launch_scripts(tmp_path, data_dir, capsys):
  out = str(tmp_path / "dry")
  assert (
    SW.main(
      [_write(tmp_path, spec(data_dir, analyses=[{"kind": "flatness", "args": ["--probes=2"]}])), f"--out={out}", "--dry_run"]
    )
    == 0
  )
  text = capsys.readouterr().out
  assert text.count("would train") == 2 and text.count("analysis.flatness") == 4
  assert not os.path.exists(out)  # a dry run writes nothing
  sw = SW.Sweep.from_dict(spec(data_dir), out)
  slurm = sw.emit("slurm")
  assert "--array=0-1" in slurm and slurm.count("--config.train.seeds=0,1") == 2 and "--config.opt.lr=0.003" in slurm
  tpu = sw.emit("tpu").splitlines()
  assert sum("--config.distributed.coordinator=auto" in x for x in tpu) == 4
  assert any("--workdir=" + os.path.join(out, "runs/lr=0.003/seed_1") in x and "--config.seed=1" in x for x in tpu)


def _write(tmp_path, s):
  p = str(tmp_path / "sweep.json")
  with open(p, "w") as f:
    json.dump(s, f)
  return p


@pytest.mark.parametrize(
  "change, message",
  [
    ({"axes": {"opt.lrr": [1, 2]}}, r"unknown config key 'opt.lrr' \(did you mean 'opt.lr'\?\)"),
    ({"axes": {"lr": [0.001, 0.0010000000001]}}, r"two runs map to one workdir runs/lr=0.001/seed_0"),
    ({"axes": {"seed": [0, 1], "probes.enabled": [True]}}, r"cannot be vectorised with probes.enabled=True"),
    ({"analyses": ["hessians"]}, r"unknown analysis 'hessians'"),
  ],
)
def test_bad_sweep_is_one_clear_line(tmp_path, data_dir, capsys, change, message):
  import re

  out = str(tmp_path / "bad")
  assert SW.main([_write(tmp_path, spec(data_dir, **change)), f"--out={out}"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and re.search(message, err), err
  assert not os.path.exists(out)


def test_dir_holding_another_sweep_is_refused(tmp_path, data_dir, capsys):
  out = str(tmp_path / "sw")
  SW.Sweep.from_dict(spec(data_dir, axes={"lr": [1e-3]}), out)._claim()
  assert SW.main([_write(tmp_path, spec(data_dir)), f"--out={out}"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "holds another sweep (its axes differ)" in err


@pytest.mark.slow
def test_parallel_jobs_train_what_one_process_trains(tmp_path, data_dir):
  """--jobs=2 trains each job as its own train.py process, two at a time: the same runs, the same metrics to
  the last digit as training them one after another in this process; a rerun trains nothing."""
  s = spec(data_dir, axes={"lr": [1e-3, 3e-3], "seed": [0]})
  inline = SW.Sweep.from_dict(s, str(tmp_path / "inline"))
  inline.run()
  par = SW.Sweep.from_dict(s, str(tmp_path / "par"))
  said = []
  assert par.run(jobs=2, log=said.append)["trained"] == [r.name for r in par.runs()]
  assert sum("training" in x for x in said) == 2 and os.listdir(os.path.join(par.out, "logs"))

  def rows(r):
    with open(os.path.join(r.workdir, "metrics.jsonl")) as f:
      return [{k: v for k, v in json.loads(x).items() if k != "time" and not k.startswith("perf/")} for x in f]

  for a, b in zip(inline.runs(), par.runs()):
    assert rows(b) == rows(a) and any("eval/loss" in x for x in rows(a))
  assert par.run(jobs=2)["trained"] == []
