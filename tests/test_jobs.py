"""analysis/jobs.py: a command line built from a frozen job dataclass, the Workdir opened once, and every
analysis job in that one shape with its earlier flags (fast: no training)."""

import dataclasses
import json
import os

import pytest

from analysis import downstream, flatness, generate, icl, jobs, trajectories
from lib import errors
from lib import model as M


@dataclasses.dataclass(frozen=True)
class Inner:
  alpha: float = jobs.option(0.5, "a float")
  tags: tuple[str, ...] = jobs.option(("a", "b"), "comma-separated")


@dataclasses.dataclass(frozen=True)
class Toy:
  path: str = jobs.option(help="required")
  inner: Inner = Inner()
  n: int = jobs.option(3, "an int")
  maybe: int | None = jobs.option(None, "an optional int")
  fast: bool = jobs.option(False, "off unless given")
  bars: bool = jobs.option(True, "on unless --no_bars")
  standardize: bool = jobs.option(True, "renamed off switch", flag="no_z")
  kinds: tuple[str, ...] = jobs.option(("x",), "renamed flag", flag="kind")
  names: tuple[str, ...] = jobs.option((), "repeated flag", flag="name", append=True)
  weights: tuple[float, ...] = jobs.option((1.0, -1.0), "floats")
  mode: str = jobs.option("a", "a choice", choices=("a", "b"))
  hidden: int = jobs.option(7, "not a flag", cli=False)


def test_a_job_round_trips_through_its_command_line():
  job, _ = jobs.parse(Toy, ["--workdir=w", "--path=p"])
  assert job == Toy(path="p")  # defaults survive the trip unchanged (tuples included)
  argv = ["--workdir=w", "--path=p", "--alpha=2", "--tags=c", "--n=4", "--maybe=5", "--fast", "--no_bars", "--no_z"]
  argv += ["--kind=y,z", "--name=r1", "--name=r2", "--weights=0.5,2", "--mode=b"]
  job, args = jobs.parse(Toy, argv)
  assert job == Toy("p", Inner(2.0, ("c",)), 4, 5, True, False, False, ("y", "z"), ("r1", "r2"), (0.5, 2.0), "b")
  assert args.workdir == ["w"] and not hasattr(args, "hidden")
  with pytest.raises(SystemExit):  # a required field is a required flag
    jobs.parse(Toy, ["--workdir=w"])
  with pytest.raises(SystemExit):
    jobs.parse(Toy, ["--workdir=w", "--path=p", "--mode=c"])
  with pytest.raises(errors.ConfigError, match=r"--weights='1,x': expected comma-separated float"):
    jobs.parse(Toy, ["--workdir=w", "--path=p", "--weights=1,x"])
  with pytest.raises(TypeError, match="immutable"):
    jobs.option([1])

  @dataclasses.dataclass(frozen=True)
  class Clash:
    inner: Inner = Inner()
    alpha: float = jobs.option(1.0)

  with pytest.raises(TypeError, match="two fields named 'alpha'"):  # one flag could not hold both
    jobs.parser(Clash, prog="clash")


def _flags(ap) -> set[str]:
  return {s for a in ap._actions for s in a.option_strings if s.startswith("--")} - {"--help"}


def test_every_job_keeps_its_earlier_flags():
  """The flags of the argparse parsers these CLIs had before they were built from their jobs."""
  old = {
    flatness: "workdir steps include_resume estimator probes dist filter exclude blocks target_rel_err batches batch_size "
    "data_seed seed lanczos_steps topk slq_runs power_iters power_tol dtype matmul_precision mesh coordinator "
    "num_processes process_id",
    downstream: "workdir steps tasks method pool seeds probe_epochs probe_batch probe_lr no_standardize ft_epochs ft_batch "
    "ft_lr ft_warmup weight_decay mesh no_progress",
    generate: "workdir steps num max_new method temperature top_k top_p prompt_len seed mix_with weights",
    icl: "workdir tasks k seed steps max_examples bigbench_compatible",
    trajectories: "workdir name steps sequences positions probe_seed batch_size prefetch mesh store metrics unit freq_docs "
    "ngram_n quiet",
  }
  for mod, names in old.items():
    ap = jobs.parser(mod.Job, prog=mod.__name__, workdirs="one" if mod in (generate, icl) else "each")
    if mod is flatness:
      flatness._multiprocess_flags(ap)
    have = _flags(ap)
    assert {f"--{n}" for n in names.split()} <= have, (mod.__name__, {f"--{n}" for n in names.split()} - have)
    assert dataclasses.is_dataclass(mod.Job) and mod.Job.__dataclass_params__.frozen


def test_flatness_flags_give_the_same_job_as_constructing_it():
  argv = ["--workdir=x", "--estimator=power,lanczos", "--filter=layer_0", "--power_iters=7", "--blocks", "--steps=0,8"]
  job = flatness.job_from_args(flatness.parse_args(argv))
  st = flatness.Settings(filter="layer_0", power_iters=7, blocks=True)
  assert job == flatness.Job(st, ("power", "lanczos"), "0,8")
  assert jobs.from_args(downstream.Job, downstream.parse_args(["--workdir=x", "--tasks=all"])).tasks == ("all",)


def _workdir(tmp_path, cfg: dict | None = None):
  w = tmp_path / "run"
  w.mkdir()
  cfg = {"model": dataclasses.asdict(M.ModelConfig()), "data": {"seq_len": 8}} if cfg is None else cfg
  (w / "config.json").write_text(json.dumps(cfg))
  return str(w)


def test_workdir_is_opened_once_with_clear_errors(tmp_path):
  with pytest.raises(errors.CheckpointError, match="does not exist"):
    jobs.Workdir.open(tmp_path / "nowhere")
  with pytest.raises(errors.CheckpointError, match="no config.json: not an lmtrace workdir"):
    jobs.Workdir.open(tmp_path)
  w = _workdir(tmp_path)
  wd = jobs.Workdir.open(w)
  assert jobs.Workdir.open(wd) is wd  # an open workdir passes through
  assert wd.name == "run" and wd.config["data"]["seq_len"] == 8 and wd.model_config == M.ModelConfig() and wd.steps == {}
  assert wd.table("flatness.parquet") == os.path.join(w, "analysis", "flatness.parquet") and wd.tables == {}
  os.makedirs(os.path.join(w, "analysis"))
  open(wd.table("icl.parquet"), "w").close()
  assert wd.tables == {"icl": wd.table("icl.parquet")}
  assert wd.select("all") == [] and wd.meta(3) == {}
  with pytest.raises(errors.AnalysisError, match=r"--steps='abc': expected 'all' or comma-separated"):
    wd.select("abc")
  with pytest.raises(errors.CheckpointError, match="has no finished checkpoints"):
    wd.select("4")
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"data": {}}))
  with pytest.raises(errors.CheckpointError, match="has no model section"):
    jobs.Workdir.open(bad)


def test_main_is_one_line_errors_and_exit_codes(tmp_path, capsys, monkeypatch):
  w = _workdir(tmp_path)
  assert icl.main([f"--workdir={w}", f"--tasks={tmp_path}", "--steps=x"]) == 2  # the job's own prefix
  assert capsys.readouterr().err.startswith("error: ")
  with pytest.raises(SystemExit) as e:  # flatness and downstream exit(2), as before
    flatness.main([f"--workdir={w}", "--estimator=nope"])
  assert e.value.code == 2 and capsys.readouterr().err.strip() == (
    f"lmtrace flatness: error: unknown estimator(s) ['nope']; valid: {', '.join(flatness.ESTIMATORS)}"
  )
  seen = []
  monkeypatch.setattr(trajectories, "run", lambda ws, job: seen.append((ws, job)) or __import__("pandas").DataFrame())
  monkeypatch.setattr(trajectories, "_report", lambda *a: None)
  assert trajectories.main([f"--workdir={w}", f"--workdir={w}", "--name=a", "--name=b", "--quiet"]) == 0
  assert seen == [((w, w), trajectories.Job(names=("a", "b"), quiet=True))]  # 'joint': one call with every workdir
  assert trajectories.main([f"--workdir={w}", "--prefetch=0"]) == 2
  assert "--prefetch >= 1" in capsys.readouterr().err


def test_a_flatness_estimator_is_one_registry_entry(monkeypatch):
  """Registering is all it takes: the CLI lists it, run() accepts it, invalid rows and progress know it."""
  monkeypatch.setattr(flatness, "ESTIMATORS", dict(flatness.ESTIMATORS))  # registered for this test only
  calls = []

  def const(ms, params, key, st, progress):
    calls.append(st.topk)
    return [dict(quantity="const", estimate=float(st.topk), stderr=0.0, n_hvps=2)]

  est = flatness.register(flatness.Estimator("const", const, "const", lambda st: 2, doc="a constant, for tests"))
  assert flatness.ESTIMATORS["const"] is est
  with pytest.raises(flatness.FlatnessError, match="already registered"):
    flatness.register(est)
  ticks = []
  rows = flatness.run_estimator("const", None, None, None, flatness.Settings(topk=3), progress=ticks.append)
  assert rows[0]["estimate"] == 3.0 and ticks == [2] and calls == [3]  # not streaming: the bar is filled at the end
  assert flatness._invalid_rows(5, ["const"], "why")[0]["quantity"] == "const"
  ap = jobs.parser(flatness.Job, prog="flatness")
  flatness._multiprocess_flags(ap)
  assert "const" in ap.format_help() and "a constant, for tests" in ap.format_help()
  with pytest.raises(flatness.FlatnessError, match="unknown estimator 'nope'"):
    flatness.run_estimator("nope", None, None, None, flatness.Settings())
