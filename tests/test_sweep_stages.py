"""experiments/sweep.py's named runs, vectorise='auto' and dependent stages, and the Liu / Aioli grids on
it (expansion, fallback, --dry_run and --emit text), with a fake trainer: fast, no training."""

import json
import os

import pytest

import train
from analysis import load_sweep
from experiments import aioli, liu
from experiments import sweep as SW


def _fake(calls):
  """Records (workdir, seeds) and writes a metrics row with the run's lr, so a finished run is visible."""

  def train_and_evaluate(cfg, workdir):
    seeds = [int(s) for s in str(cfg.train.seeds).split(",")] if cfg.train.get("seeds") else [cfg.seed]
    calls.append((workdir, seeds))
    for s in seeds:
      wd = os.path.join(workdir, f"seed_{s}") if cfg.train.get("seeds") else workdir
      os.makedirs(wd, exist_ok=True)
      with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": cfg.train.steps, "eval/loss": cfg.opt.lr * 100 + s, "test/avg_ppl": 1.0}) + "\n")

  return train_and_evaluate


def _done(wd):
  return os.path.exists(os.path.join(wd, "metrics.jsonl"))


BASE = {"config": "configs/base.py:nano", "set": {"train.steps": 4}}


def test_named_runs_labels_and_workdirs(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake(calls))
  spec = BASE | {
    "runs": [
      {"name": "road/a", "set": {"opt.lr": 0.01}, "labels": {"road": "size", "size": 8}},
      {"name": "b", "config": "configs/base.py:tiny", "set": {"opt.name": "sgd"}, "labels": {"road": "algorithm"}},
    ],
    "axes": {"seed": [0, 1]},
  }
  sw = SW.Sweep.from_dict(spec, str(tmp_path / "sw"), finished=_done)
  assert [r.name for r in sw.runs()] == ["runs/road/a/seed_0", "runs/road/a/seed_1", "runs/b/seed_0", "runs/b/seed_1"]
  cfg = sw.config(sw.runs()[3].point)
  assert (cfg.opt.name, cfg.seed, cfg.model.d_model) == ("sgd", 1, SW.load_card("configs/base.py:tiny").model.d_model)
  assert sw.config(sw.runs()[0].point).opt.lr == 0.01 and sw.workdir("b", 1) == sw.runs()[3].workdir
  assert sw.run() == {"trained": [r.name for r in sw.runs()], "skipped": []}
  assert [len(s) for _, s in calls] == [2, 2]  # each named run's seeds: one vectorised group
  df = load_sweep(str(tmp_path / "sw"), table="runs")
  assert list(df["name"]) == ["road/a", "road/a", "b", "b"] and list(df["road"]) == ["size", "size", "algorithm", "algorithm"]
  lr_b = SW.load_card("configs/base.py:tiny").opt.lr  # the card's own lr: run b does not set it
  assert list(df["seed"]) == [0, 1, 0, 1] and df["final/eval/loss"].tolist() == pytest.approx(
    [1.0, 2.0, lr_b * 100, lr_b * 100 + 1]
  )
  assert SW.Sweep.from_dict(spec, str(tmp_path / "sw"), finished=_done).run()["trained"] == []


@pytest.mark.parametrize(
  "runs, message",
  [
    ([{"name": "a"}, {"name": "a"}], r"run name\(s\) \['a'\] given twice"),
    ([], r"'runs' is empty"),
    ([{"set": {}}], r"needs a non-empty string 'name'"),
    ([{"name": "a", "labels": {"seed": 1}}], r"label\(s\) \['seed'\] are reserved"),
    ([{"name": "a", "sett": {}}], r"unknown field\(s\) \['sett'\]"),
    ([{"name": "a", "set": {"opt.lrr": 1}}], r"unknown config key 'opt.lrr'"),
  ],
)
def test_bad_named_runs(tmp_path, runs, message):
  with pytest.raises(SW.SweepError, match=message):
    SW.Sweep.from_dict(BASE | {"runs": runs}, str(tmp_path))


def test_vectorise_auto_falls_back_per_group(tmp_path, monkeypatch):
  """Seeds of a static mixture train as one group; a controller with host state is trained seed by seed."""
  calls, logs = [], []
  monkeypatch.setattr(train, "train_and_evaluate", _fake(calls))
  out = str(tmp_path / "a")
  st = aioli.stages("nano", aioli.settings("nano"), [0, 1], out)
  spec = st[0][1]({})
  with pytest.raises(SW.SweepError, match=r"cannot be vectorised with mixture.method='aioli'.*\"auto\""):
    SW.Sweep.from_dict(spec | {"vectorise": True, "set": spec["set"] | {"eval.test_at_end": False}}, out)
  sw = SW.Sweep.from_dict(spec | {"set": spec["set"] | {"eval.test_at_end": False}}, os.path.join(out, "base"), finished=_done)
  sw.run(log=logs.append)
  by_dir = {os.path.relpath(w, os.path.join(out, "base", "runs")): s for w, s in calls}
  assert by_dir["bigram2/stratified"] == [0, 1] and by_dir["bigram2/onehot_easy"] == [0, 1]
  assert by_dir["bigram2/aioli/seed_0"] == [0] and by_dir["bigram2/aioli/seed_1"] == [1]
  assert by_dir["bigram2/doge_proxy/seed_1"] == [1] and len(calls) == 3 + 4
  assert sum("seeds trained one after another (mixture.method='aioli'" in m for m in logs) == 1
  slurm = sw.emit("slurm")
  assert "--array=0-6" in slurm and slurm.count("--config.train.seeds=0,1") == 3  # stratified + 2 one-hot groups
  assert (
    "--config=experiments/aioli.py:nano,bigram2" in slurm and "--config.mixture.proportions=easy=1.000000,hard=0.000000" in slurm
  )
  # with the end-of-run test split on (the experiment's own setting; the group writes those rows too), the same plan:
  # static mixtures as one group each, controllers with host state seed by seed
  sw = SW.Sweep.from_dict(spec, os.path.join(out, "base2"))
  assert spec["set"].get("eval.test_at_end", True) and sw.config(sw.runs()[0].point).eval.test_at_end
  assert sorted(len(rs) for _, rs in sw.plan()) == [1] * 4 + [2] * 3 and sw.emit("slurm").count("--config.train.seeds=0,1") == 3
  assert sw.unvectorisable(sw.groups()[sw.runs()[0].group]) is None  # stratified


def test_dependent_stages(tmp_path, monkeypatch):
  """Stage b's runs read stage a's outputs; it is built only when a is finished; independent c is not held."""
  calls, logs = [], []
  monkeypatch.setattr(train, "train_and_evaluate", _fake(calls))
  out = str(tmp_path / "st")

  def stage_b(done):
    loss = json.loads(open(os.path.join(done["a"].workdir("x", 0), "metrics.jsonl")).readline())["eval/loss"]
    return BASE | {"runs": [{"name": "y", "set": {"opt.lr": loss / 1000}}]}

  stages = [
    ("a", lambda done: BASE | {"runs": [{"name": "x", "set": {"opt.lr": 0.02}}]}),
    ("c", lambda done: BASE | {"axes": {"lr": [0.5]}}, ()),
    ("b", stage_b),
  ]
  done = SW.run_stages(out, stages, dry_run=True, log=logs.append, finished=_done)
  assert list(done) == ["a", "c"] and not calls and not os.path.exists(out)
  assert any("stage 'b' waits for stage(s) ['a', 'c']" in m for m in logs)
  done = SW.run_stages(out, stages, emit="slurm", log=logs.append, finished=_done)
  assert (
    "launch_a_slurm.sh" in os.listdir(out) and "launch_c_slurm.sh" in os.listdir(out) and list(done["_emitted"]) == ["a", "c"]
  )
  done = SW.run_stages(out, stages, log=logs.append, finished=_done)
  assert [os.path.relpath(w, out) for w, _ in calls] == ["a/runs/x/seed_0", "c/runs/lr=0.5/seed_0", "b/runs/y/seed_0"]
  assert done["b"].config(done["b"].runs()[0].point).opt.lr == pytest.approx(0.002)  # 0.02 * 100 / 1000
  assert load_sweep(os.path.join(out, "b"), table="runs")["name"].tolist() == ["y"]
  n = len(calls)
  SW.run_stages(out, stages, log=logs.append, finished=_done)
  assert len(calls) == n  # everything finished: nothing trains again
  assert SW.run_stages(out, stages, emit="tpu", log=logs.append, finished=_done)["_emitted"] == {}  # nothing to launch


def test_liu_grid_is_a_sweep(tmp_path, capsys):
  runs = liu.grid("quick")
  sw = SW.Sweep.from_dict(liu.sweep_spec(runs, "quick"), str(tmp_path / "liu"))
  for r, run in zip(runs, sw.runs()):  # the sweep builds exactly the configs of the grid's runs
    assert sw.config(run.point).to_dict() == r.config().to_dict()
    assert run.name == f"runs/{r.name}/seed_0" and run.point["road"] == r.road and run.point["size"] == r.size
  assert liu.main(["--out", str(tmp_path / "liu"), "--scale=quick", "--dry_run"]) == 0
  assert capsys.readouterr().out.count("would train") == len(runs) and not os.path.exists(tmp_path / "liu")
  assert liu.main(["--out", str(tmp_path / "liu"), "--scale=quick", "--emit=slurm"]) == 0
  text = capsys.readouterr().out
  assert f"--array=0-{len(runs) - 1}" in text and "'--config.ckpt.schedule=interval:every=75;explicit:steps=600'" in text
  assert "python -m experiments.liu --out=" in text and os.path.exists(tmp_path / "liu" / "launch_slurm.sh")
  assert liu.main(["--out", str(tmp_path / "liu"), "--scale=quick", "--emit=tpu"]) == 0
  tpu = [x for x in capsys.readouterr().out.splitlines() if x.startswith("python")]
  assert len(tpu) == len(runs) and all("--config.distributed.coordinator=auto" in x for x in tpu)


def test_aioli_emit_stops_at_unfinished_stages(tmp_path, capsys):
  out = str(tmp_path / "a")
  assert aioli.main(["--out", out, "--scale=nano", "--seeds=2", "--emit=slurm"]) == 0
  logs = capsys.readouterr().out
  assert sorted(f for f in os.listdir(out) if f.startswith("launch")) == ["launch_base_slurm.sh", "launch_cover_slurm.sh"]
  assert "stage 'fit' waits for stage(s) ['base', 'cover']" in logs
  cover = open(os.path.join(out, "launch_cover_slurm.sh")).read()
  assert "--array=0-7" in cover and "--config.seed=1" in cover  # 4 cover points x 2 seeds, one job each
  assert aioli.main(["--out", out, "--scale=nano", "--dry_run"]) == 2  # another sweep (1 seed) in the same dir
  assert "holds another sweep" in capsys.readouterr().err


def test_a_list_of_named_runs_may_grow_but_not_change(tmp_path, monkeypatch):
  """A width added to a finished ladder trains only the new run; a changed or removed run is another sweep."""
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake(calls))
  a, b = {"name": "a", "set": {"opt.lr": 0.01}}, {"name": "b", "set": {"opt.lr": 0.02}}
  out = str(tmp_path / "sw")
  assert SW.Sweep.from_dict(BASE | {"runs": [a]}, out, finished=_done).run()["trained"] == ["runs/a/seed_0"]
  grown = SW.Sweep.from_dict(BASE | {"runs": [b, a]}, out, finished=_done).run()
  assert grown == {"trained": ["runs/b/seed_0"], "skipped": ["runs/a/seed_0"]}
  assert [r["point"]["name"] for r in json.load(open(os.path.join(out, "sweep.json")))["runs"]] == ["b", "a"]
  for other in ([{"name": "a", "set": {"opt.lr": 0.5}}, b], [b]):
    with pytest.raises(SW.SweepError, match="holds another sweep"):
      SW.Sweep.from_dict(BASE | {"runs": other}, out, finished=_done).run()
