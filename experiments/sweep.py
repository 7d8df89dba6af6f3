"""A grid of runs as one object: axes -> deterministically named workdirs -> run / skip / resume -> analyses.

  python -m experiments.sweep SWEEP_FILE --out=DIR [--dry_run] [--emit=slurm|tpu]

A sweep file (.json, .toml, or .py defining `SWEEP = {...}`) is a dict:

  {"config": "configs/pcfg.py:nano",          # base run card (':arg' selects its preset)
   "set":  {"train.steps": 200},              # fixed overrides (any config key)
   "axes": {"preset": ["nano", "tiny"],       # swept: preset | seed | optimizer | lr | mixture | any key
            "lr": [1e-3, 3e-3], "seed": [0, 1, 2]},
   "analyses": [{"kind": "flatness", "args": ["--estimator=hutchinson", "--probes=8"]},
                {"kind": "trajectories", "args": ["--metrics"]}],
   "vectorise": true}                          # seeds of one point train as one vectorised group

Layout: DIR/sweep.json (the expanded sweep; a DIR holding another sweep is refused) and
DIR/runs/<axis=value,...>/seed_<s>/, an ordinary workdir per run (seed-only differences share the
group directory, which `train.py --config.train.seeds` also uses). A finished run is skipped, an
unfinished one resumed. Analyses run per run (flatness) or per group of seeds (trajectories, which
compares runs), through their CLI entry points, which skip what is already done.

Python API (for experiment modules): `Sweep.from_dict(d, out)`, `.runs()` -> [Run], `.groups()`,
`.run(dry_run=False)`, `.emit("slurm"|"tpu")` -> text; `analysis.load_sweep(out)` reads the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Sequence

import lib.errors as errors

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


class SweepError(errors.ConfigError):
  """A sweep file or directory that cannot be run as given (one line naming the problem)."""


@dataclasses.dataclass(frozen=True)
class Run:
  point: dict  # swept values of this run, axis name -> value (seed included)
  group: str  # DIR/runs/<name>: the seeds of one point share it
  workdir: str  # DIR/runs/<name>/seed_<s>
  seed: int

  @property
  def name(self) -> str:
    return os.path.relpath(self.workdir, os.path.dirname(os.path.dirname(self.group)))


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


def _keys(cfg, prefix="") -> list[str]:
  out = []
  for k, v in cfg.items():
    if hasattr(v, "items") and not isinstance(v, dict):
      out += _keys(v, f"{prefix}{k}.")
    out.append(f"{prefix}{k}")
  return out


def set_key(cfg, key: str, value) -> None:
  """cfg['a.b.c'] = value on an ml_collections ConfigDict, refusing unknown keys with a suggestion."""
  node = cfg
  *path, last = key.split(".")
  try:
    for p in path:
      node = node[p]
    if last not in node:
      raise KeyError(last)
    node[last] = value
  except (KeyError, AttributeError):
    near = difflib.get_close_matches(key, _keys(cfg), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise SweepError(f"unknown config key {key!r}{hint}; keys are listed in configs/base.py") from None
  except (TypeError, ValueError) as e:
    raise SweepError(f"config key {key!r} cannot take {value!r}: {e}") from None


def _fmt(v) -> str:
  s = f"{v:g}" if isinstance(v, float) else str(v)
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


class Sweep:
  """An expanded grid of runs under `out`."""

  def __init__(self, spec: dict, out: str):
    unknown = set(spec) - {"config", "set", "axes", "analyses", "vectorise", "name"}
    if unknown:
      raise SweepError(f"unknown sweep field(s) {sorted(unknown)}; expected config, set, axes, analyses, vectorise, name")
    if "config" not in spec:
      raise SweepError("the sweep has no 'config' (the base run card, e.g. 'configs/pcfg.py:nano')")
    self.spec = {
      "name": spec.get("name", ""),
      "config": spec["config"],
      "set": dict(spec.get("set", {})),
      "axes": {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in spec.get("axes", {}).items()},
      "analyses": [a if isinstance(a, dict) else {"kind": a} for a in spec.get("analyses", [])],
      "vectorise": bool(spec.get("vectorise", True)),
    }
    self.out = os.path.abspath(out)
    for a in self.spec["analyses"]:
      if a.get("kind") not in ANALYSES:
        raise SweepError(f"unknown analysis {a.get('kind')!r}; known: {', '.join(ANALYSES)}")
    for k, vals in self.spec["axes"].items():
      if not vals:
        raise SweepError(f"axis {k!r} has no values")
    self._runs = self._expand()

  @classmethod
  def from_dict(cls, spec: dict, out: str) -> Sweep:
    return cls(spec, out)

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

  def config(self, point: dict):
    """The (locked) config of one grid point, seed included."""
    card = self.spec["config"]
    if "preset" in point:
      card = f"{card.partition(':')[0]}:{point['preset']}"
    cfg = load_card(card)
    cfg.unlock()
    for k, v in self.spec["set"].items():
      set_key(cfg, ALIASES.get(k, k), v)
    for k, v in point.items():
      if k != "preset":
        set_key(cfg, ALIASES.get(k, k), v)
    cfg.lock()
    return cfg

  def _expand(self) -> list[Run]:
    axes = self.spec["axes"]
    names = list(axes)
    runs, seen = [], {}
    for values in itertools.product(*(axes[k] for k in names)):
      point = dict(zip(names, values))
      cfg = self.config(point)  # validates every key
      if cfg.train.get("seeds"):
        raise SweepError("the sweep sets train.seeds; declare seeds as the 'seed' axis instead")
      label = ",".join(f"{k}={_fmt(v)}" for k, v in point.items() if k != "seed") or "base"
      group = os.path.join(self.out, RUNS, label)
      wd = os.path.join(group, f"seed_{cfg.seed}")
      if wd in seen:
        raise SweepError(f"two runs map to one workdir {os.path.relpath(wd, self.out)}: {seen[wd]} and {point}")
      seen[wd] = point
      runs.append(Run(point=dict(point, seed=cfg.seed), group=group, workdir=wd, seed=int(cfg.seed)))
    if self.spec["vectorise"]:
      from lib import multirun

      for g, rs in _group(runs).items():
        if len(rs) > 1:
          why = multirun.unvectorisable(self.config(rs[0].point))
          if why:
            raise SweepError(
              f"seeds {[r.seed for r in rs]} of {os.path.basename(g)} cannot be vectorised with {why}; "
              'set "vectorise": false to train them one after another'
            )
    return runs

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
    steps = self.config(run.point).train.steps
    return os.path.isdir(run.workdir) and steps in C.available_steps(run.workdir)

  def _claim(self) -> None:
    """Writes DIR/sweep.json, or checks that DIR holds this very sweep."""
    path = os.path.join(self.out, SWEEP_JSON)
    me = {"spec": self.spec, "runs": [{"workdir": os.path.relpath(r.workdir, self.out), "point": r.point} for r in self._runs]}
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      if old.get("spec") != me["spec"]:
        diff = [k for k in me["spec"] if old.get("spec", {}).get(k) != me["spec"][k]]
        raise SweepError(f"{self.out} holds another sweep (its {', '.join(diff) or 'spec'} differ); use a new --out")
      return
    if os.path.isdir(self.out) and os.listdir(self.out):
      raise SweepError(f"{self.out} is not empty and holds no {SWEEP_JSON}; use a new --out")
    os.makedirs(self.out, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(me, f, indent=1, default=str)
    os.replace(tmp, path)

  # -- running --------------------------------------------------------------------------------

  def plan(self) -> list[tuple[str, list[Run]]]:
    """[(group, unfinished runs)] in order; each entry is one training job (several seeds = one vectorised run)."""
    out = []
    for g, rs in self.groups().items():
      todo = [r for r in rs if not self.is_done(r)]
      if not todo:
        continue
      if self.spec["vectorise"] and len(todo) > 1:
        out.append((g, todo))
      else:
        out += [(g, [r]) for r in todo]
    return out

  def run(self, dry_run: bool = False, log=print) -> dict:
    """Trains every unfinished run, then the declared analyses; returns {'trained': [...], 'skipped': [...]}."""
    if not dry_run:
      self._claim()
    plan = self.plan()
    todo = {r.workdir for _, rs in plan for r in rs}
    skipped = [r.name for r in self._runs if r.workdir not in todo]
    for g, rs in plan:
      what = f"{os.path.relpath(g, self.out)} seeds {[r.seed for r in rs]}" + (" (vectorised)" if len(rs) > 1 else "")
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
    for cmd in self.analysis_commands():
      log(f"sweep: {'would run' if dry_run else 'running'} {' '.join(cmd[2:])}")
      if not dry_run:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
          raise errors.AnalysisError(f"analysis failed: {' '.join(cmd[2:])}: {r.stderr.strip().splitlines()[-1:]}")
    if skipped:
      log(f"sweep: {len(skipped)} run(s) already finished")
    return {"trained": [r.name for _, rs in plan for r in rs], "skipped": skipped}

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
    card = self.spec["config"]
    out = []
    for g, rs in self.groups().items():
      point = {k: v for k, v in rs[0].point.items() if k not in ("seed", "preset")}
      c = card if "preset" not in rs[0].point else f"{card.partition(':')[0]}:{rs[0].point['preset']}"
      over = [f"--config.{ALIASES.get(k, k)}={v}" for k, v in {**self.spec["set"], **point}.items()]
      base = ["python", "train.py", f"--config={c}", *over]
      if per_seed or not self.spec["vectorise"] or len(rs) == 1:
        out += [" ".join([*base, f"--workdir={r.workdir}", f"--config.seed={r.seed}"]) for r in rs]
      else:
        out.append(" ".join([*base, f"--workdir={g}", f"--config.train.seeds={','.join(str(r.seed) for r in rs)}"]))
    return out

  def emit(self, kind: str) -> str:
    """Launch text for a cluster scheduler: 'slurm' (a job-array script) or 'tpu' (per-host command lines)."""
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
        f"# after the array finishes: python -m experiments.sweep SWEEP_FILE --out={self.out}  (skips training, runs analyses)",
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
  a = p.parse_args(argv)
  from lib import metrics as MX

  MX.quiet_logs()
  try:
    sw = Sweep.from_file(a.sweep_file, a.out)
    if a.emit:
      text = sw.emit(a.emit)
      os.makedirs(sw.out, exist_ok=True)
      path = os.path.join(sw.out, "launch_slurm.sh" if a.emit == "slurm" else "launch_tpu.txt")
      with open(path, "w") as f:
        f.write(text)
      print(text, end="")
      print(f"# written to {path}", file=sys.stderr)
      return 0
    print(f"sweep: {len(sw.runs())} runs in {len(sw.groups())} group(s) under {sw.out}")
    sw.run(dry_run=a.dry_run)
  except errors.LmtraceError as e:
    print(f"lmtrace sweep: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
