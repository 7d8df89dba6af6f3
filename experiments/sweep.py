"""A grid of runs as one object: axes -> deterministically named workdirs -> run / skip / resume -> analyses.

  python -m experiments.sweep SWEEP_FILE --out=DIR [--dry_run] [--emit=slurm|tpu]

A sweep file (.json, .toml, or .py defining `SWEEP = {...}`) is a dict:

  {"config": "configs/pcfg.py:nano",          # base run card (':arg' selects its preset)
   "set":  {"train.steps": 200},              # fixed overrides (any config key)
   "axes": {"preset": ["nano", "tiny"],       # swept: preset | seed | optimizer | lr | mixture | any key
            "lr": [1e-3, 3e-3], "seed": [0, 1, 2]},
   "analyses": [{"kind": "flatness", "args": ["--estimator=hutchinson", "--probes=8"]},
                {"kind": "trajectories", "args": ["--metrics"]}],
   "vectorise": true}                          # seeds of one point train as one vectorised group (or "auto", false)

Layout: DIR/sweep.json (the expanded sweep; a DIR holding another sweep is refused) and
DIR/runs/<axis=value,...>/seed_<s>/, an ordinary workdir per run (seed-only differences share the
group directory, which `train.py --config.train.seeds` also uses). A finished run is skipped, an
unfinished one resumed. Analyses run per run (flatness) or per group of seeds (trajectories, which
compares runs), through their CLI entry points, which skip what is already done.

Named runs. A grid that is not a product (Liu's width ladder plus two runs at the middle width; one
mixing method per run) lists its points under "runs", each crossed with the axes (usually "seed"):

  "runs": [{"name": "adamw_d8", "set": {"model.d_model": 8}, "labels": {"road": "size"}},
           {"name": "sgd_d16", "config": "configs/liu.py:nano", "set": {"opt.name": "sgd"}}]

"name" is the run's directory (DIR/runs/<name>[,axis=value...]/seed_<s>, "/" allowed), "config"
(optional) replaces the sweep's run card for that run, "set" adds overrides (it may set "seed" when a run
exists for one seed only), and "labels" are extra columns of load_sweep (never config keys).

Vectorising: "vectorise": true refuses a grid whose seeds cannot train as one program (one line naming
why); "auto" trains such groups seed after seed instead (the mixing controllers with host state), and
vectorises the rest; false never vectorises.

Stages (runs that read earlier runs' outputs: grid search's Dirichlet cover, DML's static runs, DoReMi's
reference run). A stage is an ordinary sweep in its own directory DIR/<stage>; a later stage's spec is
computed in Python from the earlier stages' results (`Sweep.workdir(name, seed)`, `load_sweep`) and
points at their workdirs by path (e.g. mixture.reference). `run_stages(out, [(name, make_spec), ...])`
builds and runs them in order; `make_spec(done)` receives {stage: Sweep} of the stages before it and
returns a spec, or None while its inputs are not finished (then `--emit` stops there and says so: launch
the printed arrays, then emit again). Each stage's DIR/<stage>/sweep.json records the computed values,
so a rerun with the same finished inputs skips everything, and changed inputs are refused as another
sweep. experiments/aioli.py is the worked example (4 stages); experiments/liu.py is one named-run sweep.

Python API (for experiment modules): `Sweep.from_dict(d, out, finished=None)` (`finished(workdir)`:
an extra condition for a run to count as done, e.g. its end-of-run test row), `.runs()` -> [Run],
`.groups()`, `.plan()`, `.run(dry_run=False)`, `.workdir(name, seed)`, `.emit("slurm"|"tpu")` -> text;
`run_stages(...)`; `analysis.load_sweep(out)` reads the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

import lib.errors as errors
from lib import config_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_JSON = "sweep.json"
RUNS = "runs"
# Friendly axis names -> config keys ("preset" and "seed" are handled specially).
ALIASES = {
  "optimizer": "opt.name",
  "lr": "opt.lr",
  "mixture": "mixture.method",
  "steps": "train.steps",
  "batch": "train.batch_size",
}
ANALYSES = ("flatness", "trajectories")
FIELDS = {"config", "set", "axes", "runs", "analyses", "vectorise", "name"}


class SweepError(errors.ConfigError):
  """A sweep file or directory that cannot be run as given (one line naming the problem)."""


@dataclasses.dataclass(frozen=True)
class Run:
  point: dict  # swept values of this run, axis name -> value (seed included)
  group: str  # DIR/runs/<name>: the seeds of one point share it
  workdir: str  # DIR/runs/<name>/seed_<s>
  seed: int
  out: str = ""  # the sweep directory

  @property
  def name(self) -> str:
    return os.path.relpath(self.workdir, self.out or os.path.dirname(os.path.dirname(self.group)))


def load_card(spec: str):
  """'configs/pcfg.py:nano' -> the locked ConfigDict of that run card."""
  path, _, arg = spec.partition(":")
  full = path if os.path.isabs(path) else os.path.join(ROOT, path)
  if not os.path.exists(full):
    raise SweepError(f"run card {path!r} does not exist")
  mod_spec = importlib.util.spec_from_file_location(f"_card_{abs(hash(full))}", full)
  mod = importlib.util.module_from_spec(mod_spec)
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  mod_spec.loader.exec_module(mod)
  try:
    return mod.get_config(arg) if arg else mod.get_config()
  except ValueError as e:
    raise SweepError(f"run card {spec!r}: {e}") from None


def set_key(cfg, key: str, value) -> None:
  """cfg['a.b.c'] = value on an ml_collections ConfigDict, refusing unknown keys with a suggestion."""
  try:
    config_check.set_keys(cfg, {key: value})
  except errors.ConfigError as e:
    raise SweepError(str(e)) from None


def _fmt(v) -> str:
  s = f"{v:g}" if isinstance(v, float) else str(v)
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


class Sweep:
  """An expanded grid of runs under `out`."""

  def __init__(self, spec: dict, out: str, finished=None):
    unknown = set(spec) - FIELDS
    if unknown:
      raise SweepError(f"unknown sweep field(s) {sorted(unknown)}; expected {', '.join(sorted(FIELDS))}")
    if "config" not in spec:
      raise SweepError("the sweep has no 'config' (the base run card, e.g. 'configs/pcfg.py:nano')")
    vec = spec.get("vectorise", True)
    if vec not in (True, False, "auto"):
      raise SweepError(f"vectorise={vec!r}: expected true, false or 'auto'")
    self.spec = {
      "name": spec.get("name", ""),
      "config": spec["config"],
      "set": dict(spec.get("set", {})),
      "axes": {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in spec.get("axes", {}).items()},
      "analyses": [a if isinstance(a, dict) else {"kind": a} for a in spec.get("analyses", [])],
      "vectorise": vec,
    }
    if "runs" in spec:
      self.spec["runs"] = [_named_run(e) for e in spec["runs"]]
      names = [e["name"] for e in self.spec["runs"]]
      dup = sorted({n for n in names if names.count(n) > 1})
      if dup:
        raise SweepError(f"run name(s) {dup} given twice in 'runs'")
      if not names:
        raise SweepError("'runs' is empty: nothing to run")
      if "name" in self.spec["axes"]:
        raise SweepError("'name' cannot be an axis of a sweep with named 'runs'")
    self._entries = {e["name"]: e for e in self.spec.get("runs", [])}
    self._finished = finished
    self.out = os.path.abspath(out)
    for a in self.spec["analyses"]:
      if a.get("kind") not in ANALYSES:
        raise SweepError(f"unknown analysis {a.get('kind')!r}; known: {', '.join(ANALYSES)}")
    for k, vals in self.spec["axes"].items():
      if not vals:
        raise SweepError(f"axis {k!r} has no values")
    self._runs = self._expand()

  @classmethod
  def from_dict(cls, spec: dict, out: str, finished=None) -> Sweep:
    return cls(spec, out, finished)

  @classmethod
  def from_file(cls, path: str, out: str) -> Sweep:
    if not os.path.exists(path):
      raise SweepError(f"sweep file {path!r} does not exist")
    try:
      if path.endswith(".json"):
        with open(path) as f:
          spec = json.load(f)
      elif path.endswith(".toml"):
        import tomllib

        with open(path, "rb") as f:
          spec = tomllib.load(f)
      elif path.endswith(".py"):
        ns: dict = {}
        exec(compile(open(path).read(), path, "exec"), ns)  # noqa: S102 - a sweep file is the user's own code
        spec = ns.get("SWEEP")
        if not isinstance(spec, dict):
          raise SweepError(f"{path} defines no SWEEP dict")
      else:
        raise SweepError(f"sweep file {path!r}: expected .json, .toml or .py")
    except (json.JSONDecodeError, ValueError) as e:
      if isinstance(e, SweepError):
        raise
      raise SweepError(f"sweep file {path!r} does not parse: {e}") from None
    return cls(spec, out)

  # -- expansion ------------------------------------------------------------------------------

  def card(self, point: dict) -> str:
    """The run card of one grid point ('path:arg')."""
    card = self._entries[point["name"]].get("config", self.spec["config"]) if "name" in point else self.spec["config"]
    return f"{card.partition(':')[0]}:{point['preset']}" if "preset" in point else card

  def overrides(self, point: dict) -> dict:
    """Config key -> value of one grid point on top of its run card (aliases resolved), seed included."""
    over = {ALIASES.get(k, k): v for k, v in self.spec["set"].items()}
    if "name" in point:
      over.update({ALIASES.get(k, k): v for k, v in self._entries[point["name"]].get("set", {}).items()})
    for k in self.spec["axes"]:
      if k != "preset":
        over[ALIASES.get(k, k)] = point[k]
    if "seed" in point:
      over["seed"] = point["seed"]
    return over

  def config(self, point: dict):
    """The (locked) config of one grid point, seed included."""
    cfg = load_card(self.card(point))
    cfg.unlock()
    for k, v in self.overrides(point).items():
      set_key(cfg, k, v)
    cfg.lock()
    return cfg

  def _expand(self) -> list[Run]:
    axes = self.spec["axes"]
    names = list(axes)
    runs, seen = [], {}
    entries = self.spec.get("runs") or [None]
    for entry in entries:
      for values in itertools.product(*(axes[k] for k in names)):
        point = dict(zip(names, values))
        if entry is not None:
          point = {"name": entry["name"], **entry.get("labels", {}), **point}
        cfg = self.config(point)  # validates every key
        if cfg.train.get("seeds"):
          raise SweepError("the sweep sets train.seeds; declare seeds as the 'seed' axis instead")
        label = ",".join(f"{k}={_fmt(v)}" for k, v in point.items() if k in axes and k != "seed")
        if entry is not None:
          label = ",".join(x for x in ("/".join(_fmt(c) for c in entry["name"].split("/")), label) if x)
        group = os.path.join(self.out, RUNS, label or "base")
        wd = os.path.join(group, f"seed_{cfg.seed}")
        if wd in seen:
          raise SweepError(f"two runs map to one workdir {os.path.relpath(wd, self.out)}: {seen[wd]} and {point}")
        seen[wd] = point
        runs.append(Run(point=dict(point, seed=cfg.seed), group=group, workdir=wd, seed=int(cfg.seed), out=self.out))
    if self.spec["vectorise"] is True:
      for g, rs in _group(runs).items():
        why = self.unvectorisable(rs)
        if why:
          raise SweepError(
            f"seeds {[r.seed for r in rs]} of {os.path.relpath(g, os.path.join(self.out, RUNS))} cannot be vectorised with "
            f'{why}; set "vectorise": "auto" (or false) to train them one after another'
          )
    return runs

  def unvectorisable(self, runs: Sequence[Run]) -> str | None:
    """Why these seeds of one grid point cannot train as one vectorised group, or None (one seed: None)."""
    if len(runs) < 2:
      return None
    from lib import multirun

    return multirun.unvectorisable(self.config(runs[0].point))

  def workdir(self, name: str, seed: int) -> str:
    """The workdir of the named run (or axis label) with this seed."""
    for r in self._runs:
      if r.seed == seed and (r.point.get("name") == name or os.path.relpath(r.group, os.path.join(self.out, RUNS)) == name):
        return r.workdir
    raise SweepError(f"sweep {self.out} has no run {name!r} with seed {seed}")

  def runs(self) -> list[Run]:
    return list(self._runs)

  def groups(self) -> dict[str, list[Run]]:
    return _group(self._runs)

  # -- state ----------------------------------------------------------------------------------

  def is_done(self, run: Run) -> bool:
    from lib import ckpt as C
    from lib import multirun

    if os.path.exists(os.path.join(run.workdir, multirun.DIVERGED)):
      return True
    if self._finished is not None:
      return bool(self._finished(run.workdir))
    steps = self.config(run.point).train.steps
    return os.path.isdir(run.workdir) and steps in C.available_steps(run.workdir)

  def _claim(self, write: bool = True) -> None:
    """Writes DIR/sweep.json, or checks that DIR holds this very sweep (only checks when not `write`)."""
    from lib import config_check

    for r in self._runs:  # a value the trainer would refuse is refused before DIR/sweep.json exists
      try:
        config_check.validate(self.config(r.point))
      except errors.ConfigError as e:
        raise SweepError(f"run {os.path.relpath(r.workdir, self.out)}: {e}") from None
    path = os.path.join(self.out, SWEEP_JSON)
    me = {"spec": self.spec, "runs": [{"workdir": os.path.relpath(r.workdir, self.out), "point": r.point} for r in self._runs]}
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      if old.get("spec") != me["spec"]:
        if _extends(old.get("spec", {}), me["spec"]):
          if write:  # a grown list of named runs: every old run unchanged, new ones appended
            _write_json(path, me)
          return
        diff = [k for k in me["spec"] if old.get("spec", {}).get(k) != me["spec"][k]]
        raise SweepError(f"{self.out} holds another sweep (its {', '.join(diff) or 'spec'} differ); use a new --out")
      return
    if os.path.isdir(self.out) and os.listdir(self.out):
      raise SweepError(f"{self.out} is not empty and holds no {SWEEP_JSON}; use a new --out")
    if not write:
      return
    os.makedirs(self.out, exist_ok=True)
    _write_json(path, me)

  # -- running --------------------------------------------------------------------------------

  def plan(self) -> list[tuple[str, list[Run]]]:
    """[(group, unfinished runs)] in order; each entry is one training job (several seeds = one vectorised run)."""
    out = []
    for g, rs in self.groups().items():
      todo = [r for r in rs if not self.is_done(r)]
      if not todo:
        continue
      if self.spec["vectorise"] and len(todo) > 1 and not self.unvectorisable(todo):
        out.append((g, todo))
      else:
        out += [(g, [r]) for r in todo]
    return out

  def run(self, dry_run: bool = False, log=print, jobs: int = 1) -> dict:
    """Trains every unfinished run, then the declared analyses; returns {'trained': [...], 'skipped': [...]}.
    `jobs` > 1: that many training jobs at once, each its own train.py process (for a multi-core machine)."""
    self._claim(write=not dry_run)  # a dry run writes nothing but refuses what the real run would
    plan = self.plan()
    todo = {r.workdir for _, rs in plan for r in rs}
    skipped = [r.name for r in self._runs if r.workdir not in todo]
    if jobs > 1 and not dry_run:
      self._train_parallel(plan, jobs, log)
    else:
      self._train_inline(plan, dry_run, log)
    for cmd in self.analysis_commands():
      log(f"sweep: {'would run' if dry_run else 'running'} {' '.join(cmd[2:])}")
      if not dry_run:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
          raise errors.AnalysisError(f"analysis failed: {' '.join(cmd[2:])}: {r.stderr.strip().splitlines()[-1:]}")
    if skipped:
      log(f"sweep: {len(skipped)} run(s) already finished")
    return {"trained": [r.name for _, rs in plan for r in rs], "skipped": skipped}

  def _train_inline(self, plan, dry_run: bool, log) -> None:
    """Trains the plan's jobs one after another in this process."""
    said = set()
    todo = {r.workdir for _, rs in plan for r in rs}
    for g, rs in plan:
      what = f"{os.path.relpath(g, self.out)} seeds {[r.seed for r in rs]}" + (" (vectorised)" if len(rs) > 1 else "")
      why = self.unvectorisable([r for r in self.groups()[g] if r.workdir in todo]) if self.spec["vectorise"] else None
      if why and g not in said:
        said.add(g)
        log(f"sweep: {os.path.relpath(g, self.out)}: seeds trained one after another ({why})")
      log(f"sweep: {'would train' if dry_run else 'training'} {what}")
      if dry_run:
        continue
      import train

      cfg = self.config(rs[0].point)
      if len(rs) > 1:
        cfg.unlock()
        cfg.train.seeds = ",".join(str(r.seed) for r in rs)
        cfg.lock()
        train.train_and_evaluate(cfg, g)
      else:
        train.train_and_evaluate(cfg, rs[0].workdir)

  def analysis_commands(self) -> list[list[str]]:
    cmds = []
    for a in self.spec["analyses"]:
      args = [str(x) for x in a.get("args", [])]
      if a["kind"] == "flatness":
        for r in self._runs:
          cmds.append([sys.executable, "-m", "analysis.flatness", f"--workdir={r.workdir}", *args])
      elif a["kind"] == "trajectories":
        for rs in self.groups().values():
          cmds.append([sys.executable, "-m", "analysis.trajectories", *[f"--workdir={r.workdir}" for r in rs], "--quiet", *args])
    return cmds

  # -- beyond one machine ---------------------------------------------------------------------

  def train_commands(self, per_seed: bool = False) -> list[str]:
    """One shell command per training job (a vectorised group, or each seed when `per_seed`)."""
    out = []
    for g, rs in self.groups().items():
      vectorised = not per_seed and self.spec["vectorise"] and len(rs) > 1 and not self.unvectorisable(rs)
      out += [_shell(["python", *argv]) for argv in self.job_argvs(g, rs, vectorised)]
    return out

  def job_argvs(self, g: str, rs: Sequence[Run], vectorised: bool) -> list[list[str]]:
    """train.py's argv (without the interpreter) for runs `rs` of group `g`: one vectorised job, or one per seed."""
    over = {k: v for k, v in self.overrides(rs[0].point).items() if k != "seed"}
    base = ["train.py", f"--config={self.card(rs[0].point)}", *[f"--config.{k}={v}" for k, v in over.items()]]
    if vectorised:
      return [[*base, f"--workdir={g}", f"--config.train.seeds={','.join(str(r.seed) for r in rs)}"]]
    return [[*base, f"--workdir={r.workdir}", f"--config.seed={r.seed}"] for r in rs]

  def _train_parallel(self, plan, jobs: int, log) -> None:
    """Trains the plan's jobs `jobs` at a time, each a train.py process (the commands --emit writes), its
    output in DIR/logs/. Runs are independent workdirs, so any order gives the same results."""
    from concurrent.futures import ThreadPoolExecutor

    logs = os.path.join(self.out, "logs")
    os.makedirs(logs, exist_ok=True)

    def one(item):
      g, rs = item
      (argv,) = self.job_argvs(g, rs, vectorised=len(rs) > 1)
      name = os.path.relpath(g if len(rs) > 1 else rs[0].workdir, self.out)
      path = os.path.join(logs, name.replace(os.sep, "_") + ".log")
      log(f"sweep: training {name} (log {os.path.relpath(path, self.out)})")
      with open(path, "w") as f:
        code = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
      return name, code, path

    with ThreadPoolExecutor(jobs) as ex:
      failed = [(n, p) for n, code, p in ex.map(one, plan) if code]
    if failed:
      name, path = failed[0]
      last = (open(path).read().strip().splitlines() or ["(no output)"])[-1]
      raise SweepError(f"{len(failed)} training job(s) failed; first {name}: {last} (log: {path})")

  def write_launch(self, kind: str, path: str = "", echo=print, then: str = "") -> str:
    """Claims DIR for this sweep (so the launched jobs' workdirs are recognised on the rerun that
    analyses them), writes the launch text to `path` (default DIR/launch_slurm.sh | launch_tpu.txt),
    echoes it, and returns the path."""
    text = self.emit(kind, then)
    self._claim()
    path = path or os.path.join(self.out, "launch_slurm.sh" if kind == "slurm" else "launch_tpu.txt")
    with open(path, "w") as f:
      f.write(text)
    echo(text, end="")
    return path

  def emit(self, kind: str, then: str = "") -> str:
    """Launch text for a cluster scheduler: 'slurm' (a job-array script) or 'tpu' (per-host command lines).
    `then`: the command to run once the jobs are done (default: this sweep's own rerun, which analyses)."""
    then = then or f"python -m experiments.sweep SWEEP_FILE --out={self.out}  (skips training, runs analyses)"
    if kind == "slurm":
      cmds = self.train_commands()
      lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=lmtrace-sweep --array=0-{len(cmds) - 1} --output={self.out}/slurm-%A_%a.out",
        "#SBATCH --nodes=1 --gpus-per-node=1  # edit for your cluster; each task is one run or one vectorised group",
        f"# written by: python -m experiments.sweep ... --emit=slurm (sweep dir {self.out})",
        "set -euo pipefail",
        f"cd {ROOT}",
        "CMDS=(",
        *[f"  {json.dumps(c)}" for c in cmds],
        ")",
        'eval "${CMDS[$SLURM_ARRAY_TASK_ID]}"',
        f"# after the array finishes: {then}",
      ]
      return "\n".join(lines) + "\n"
    if kind == "tpu":
      lines = [
        "# One ordinary multi-host JAX job per run: run each line on EVERY host of the slice, e.g.",
        "#   gcloud compute tpus tpu-vm ssh $TPU --worker=all --command='cd REPO && <line>'",
      ]
      lines += [f"{c} --config.distributed.coordinator=auto" for c in self.train_commands(per_seed=True)]
      return "\n".join(lines) + "\n"
    raise SweepError(f"--emit={kind!r}: expected slurm or tpu")


def _shell(args: list[str]) -> str:
  return " ".join(shlex.quote(str(a)) for a in args)


def _named_run(e) -> dict:
  if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"].strip("/"):
    raise SweepError(f"each entry of 'runs' needs a non-empty string 'name', got {e!r}")
  unknown = set(e) - {"name", "config", "set", "labels"}
  if unknown:
    raise SweepError(f"run {e['name']!r}: unknown field(s) {sorted(unknown)}; expected name, config, set, labels")
  clash = sorted(set(e.get("labels", {})) & {"name", "seed", "run", "workdir", "preset"})
  if clash:
    raise SweepError(f"run {e['name']!r}: label(s) {clash} are reserved column names")
  out = {"name": e["name"], "set": dict(e.get("set", {})), "labels": dict(e.get("labels", {}))}
  return out | ({"config": e["config"]} if "config" in e else {})


def run_stages(
  out: str, stages, dry_run=False, emit: str | None = None, log=print, finished=None, then: str = "", jobs: int = 1
) -> dict:
  """Dependent sweeps, in order: `stages` = [(name, make_spec[, needs])], `make_spec(done)` -> spec or None.

  Stage `name` lives in out/<name>; `done` = {earlier stage name: its Sweep}. A stage is built only when
  every stage it needs (default: all earlier ones; `needs=()` for an independent stage) is finished;
  otherwise, on a dry run or with `emit`, it and the later stages are reported as waiting.
  Returns {stage name: Sweep} of the stages built; with `emit`
  also writes out/launch_<stage>_<kind> files and returns their texts under '_emitted'.
  """
  done: dict = {}
  emitted = {}
  for name, make_spec, *needs in stages:
    needs = list(done) if not needs else list(needs[0])
    if any(not done[n].is_done(r) for n in needs for r in done[n].runs()):
      log(f"sweep: stage {name!r} waits for stage(s) {needs} to finish (launch them, then run this again)")
      break
    spec = make_spec(done)
    if spec is None:
      log(f"sweep: stage {name!r} cannot be built yet: its inputs are not finished")
      break
    sw = Sweep.from_dict({"name": name, **spec}, os.path.join(out, name), finished=finished)
    done[name] = sw
    if emit and not sw.plan():
      log(f"sweep: stage {name!r}: every run finished, nothing to launch")
    elif emit:
      emitted[name] = sw.emit(emit, then)
      path = os.path.join(out, f"launch_{name}_{'slurm.sh' if emit == 'slurm' else 'tpu.txt'}")
      sw.write_launch(emit, path, echo=lambda *a, **k: None, then=then)
      log(f"sweep: stage {name!r}: {len(sw.plan())} job(s) to launch, written to {path}")
    else:
      sw.run(dry_run=dry_run, log=log, jobs=jobs)
  if emit:
    done["_emitted"] = emitted
  return done


def _group(runs: Sequence[Run]) -> dict[str, list[Run]]:
  out: dict[str, list[Run]] = {}
  for r in runs:
    out.setdefault(r.group, []).append(r)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
  p.add_argument("sweep_file")
  p.add_argument("--out", required=True, help="sweep directory (DIR/sweep.json, DIR/runs/...)")
  p.add_argument("--dry_run", action="store_true", help="print what would be trained and analysed")
  p.add_argument("--emit", choices=("slurm", "tpu"), help="write launch commands for a scheduler instead of running")
  p.add_argument("--jobs", type=int, default=1, help="training jobs at once, each its own process (default 1: in this one)")
  a = p.parse_args(argv)
  from lib import metrics as MX

  MX.quiet_logs()
  try:
    sw = Sweep.from_file(a.sweep_file, a.out)
    if a.emit:
      print(f"# written to {sw.write_launch(a.emit)}", file=sys.stderr)
      return 0
    print(f"sweep: {len(sw.runs())} runs in {len(sw.groups())} group(s) under {sw.out}")
    sw.run(dry_run=a.dry_run, jobs=a.jobs)
  except errors.LmtraceError as e:
    print(f"lmtrace sweep: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(tmp, path)


def _extends(old: dict, new: dict) -> bool:
  """A sweep may grow: the same spec except that its list of named runs gained entries, the old ones unchanged
  (e.g. a wider model added to a size ladder). Anything else is another sweep."""
  rest = {k for k in set(old) | set(new) if k != "runs"}
  if any(json.dumps(old.get(k), default=str) != json.dumps(new.get(k), default=str) for k in rest):
    return False
  o, n = old.get("runs") or [], new.get("runs") or []
  norm = [json.dumps(x, sort_keys=True, default=str) for x in n]
  return bool(o) and len(n) > len(o) and all(json.dumps(x, sort_keys=True, default=str) in norm for x in o)
