"""One shape for every analysis job: a frozen settings dataclass, `run(workdir, job) -> DataFrame`, a
command line built from the dataclass, and a workdir opened once and passed as an object.

  @dataclasses.dataclass(frozen=True)
  class Job:
    steps: str = option("all", "'all' or comma-separated checkpoint steps")
    probes: int = option(32, "Hutchinson vectors per estimate")

  def run(workdir: Workdir | str, job: Job) -> pd.DataFrame:
    wd = Workdir.open(workdir)                                   # config, model config, steps: read once
    ...

  def main(argv=None) -> int:
    return jobs.main(Job, run, argv, prog="myjob", doc=__doc__)  # --workdir=W --steps=... --probes=...

Each field of the job is one flag (`--<name>`, or `flag=` in its metadata), typed by its annotation:
int, float, str, `int | None`, bool (`--x` when False by default, `--no_x` when True), tuples
(comma-separated, or `append=True` for a repeated flag); a nested dataclass contributes its own
fields. Experiments and notebooks construct the dataclass; nobody builds argv to call a job.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import types
import typing
from typing import Any, Callable, Sequence

from lib import ckpt as C
from lib import errors

TABLE_DIR = "analysis"  # W/analysis/: every job's tables and stores


# ----------------------------------------------------------------------------------------------
# The workdir, opened once


@dataclasses.dataclass(frozen=True, eq=False)
class Workdir:
  """A run directory read once: its path, run config (config.json), model config and the checkpoints
  listed when it was opened ({step: 'checkpoints' | 'resume'}). A job lists and parses nothing else per
  checkpoint; `reopen()` lists again (a trainer may still be writing)."""

  path: str
  config: dict
  model_config: Any  # lib.model.ModelConfig
  steps: dict[int, str]

  @classmethod
  def open(cls, path: Workdir | str | os.PathLike) -> Workdir:
    """The workdir at `path` (a Workdir is returned as is). A missing directory, a directory that is not
    an lmtrace workdir or a damaged config.json is one CheckpointError naming the problem."""
    if isinstance(path, Workdir):
      return path
    path = os.fspath(path)
    cfg = C.read_config(path)
    if not isinstance(cfg.get("model"), dict):
      raise errors.CheckpointError(f"{path}/config.json has no model section: not a run config of train.py or lib.hf_import")
    from lib import model as M

    try:
      mcfg = M.ModelConfig.from_config(cfg["model"])
    except (TypeError, ValueError) as e:
      raise errors.CheckpointError(f"{path}/config.json: its model section cannot be read ({e})") from None
    return cls(path, cfg, mcfg, C.available_steps(path))

  def reopen(self) -> Workdir:
    """The same workdir with its checkpoints listed again (the config is not reread)."""
    return dataclasses.replace(self, steps=C.available_steps(self.path))

  @property
  def name(self) -> str:
    return os.path.basename(os.path.abspath(self.path).rstrip("/"))

  @functools.cached_property
  def model(self):
    """The flax model of `model_config` (built once)."""
    from lib import model as M

    return M.make(self.model_config)

  # tables -------------------------------------------------------------------------------------

  @property
  def analysis_dir(self) -> str:
    """W/analysis/, where jobs write (it may not exist yet)."""
    return os.path.join(self.path, TABLE_DIR)

  def table(self, name: str) -> str:
    """W/analysis/<name>: where a job writes (or a loader reads) the table `name`."""
    return os.path.join(self.analysis_dir, name)

  @property
  def tables(self) -> dict[str, str]:
    """{name: path} of the parquet tables under W/analysis/ now."""
    d = self.analysis_dir
    names = sorted(f for f in os.listdir(d) if f.endswith(".parquet")) if os.path.isdir(d) else []
    return {f[: -len(".parquet")]: os.path.join(d, f) for f in names}

  # checkpoints --------------------------------------------------------------------------------

  def resolve(self, step) -> int:
    """A listed checkpoint step; 'latest' / None / -1: the last one. Anything else is
    `lib.ckpt.resolve_step`'s one-line CheckpointError (it lists again to name the nearest steps)."""
    if step is None or step in ("latest", "last", -1):
      if self.steps:
        return max(self.steps)
    elif int(step) in self.steps:
      return int(step)
    return C.resolve_step(self.path, step)

  def select(self, steps: str | int | Sequence[int] | None, flag: str = "--steps") -> list[int]:
    """'all' / '' / None: every listed checkpoint; '0,100' or [0, 100]: those steps (each must exist)."""
    if steps is None or (isinstance(steps, str) and steps.strip() in ("", "all")):
      return sorted(self.steps)
    if isinstance(steps, str):
      try:
        wanted = [int(s) for s in steps.split(",") if s.strip()]
      except ValueError:
        want = "expected 'all' or comma-separated checkpoint steps (e.g. 0,100,200)"
        raise errors.AnalysisError(f"{flag}={steps!r}: {want}") from None
    else:
      wanted = [int(steps)] if isinstance(steps, int) else [int(s) for s in steps]
    return [self.resolve(s) for s in wanted]

  def step_dir(self, step: int) -> str:
    """W/<checkpoints|resume>/<step> of a listed step (resolved first when not listed)."""
    step = self.resolve(step)
    sub = self.steps.get(step) or C.available_steps(self.path)[step]
    return os.path.join(os.path.abspath(self.path), sub, str(step))

  def restore(self, step=None, mesh=None):
    """Verified parameters of checkpoint `step` on `mesh` (`lib.ckpt.restore_params_at`: CheckpointError
    when damaged, unsealed or gone); no config read, no listing."""
    return C.restore_params_at(self.step_dir(step), self.model_config, mesh)

  def meta(self, step: int) -> dict:
    """The checkpoint's `meta` item ({} when it has none or the step is not listed)."""
    return C.read_meta_at(self.step_dir(step)) if step in self.steps else {}

  def require_causal(self, job: str) -> None:
    C.require_causal(self.path, self.model_config, job)


# ----------------------------------------------------------------------------------------------
# A command line from a frozen dataclass


def option(
  default=dataclasses.MISSING, help: str = "", *, flag: str | None = None, choices=None, append: bool = False, cli: bool = True
):
  """A job field with its command-line help; `flag` renames the flag (e.g. field `estimators`, flag
  `--estimator`), `append` makes a tuple field a repeated flag, `cli=False` keeps it off the command line;
  no default: a required field and flag."""
  meta = dict(help=help, flag=flag, choices=choices, append=append, cli=cli)
  if isinstance(default, (list, dict, set)):
    raise TypeError("job fields are immutable: use a tuple default")
  return dataclasses.field(default=default, metadata=meta)


def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _unwrap(tp):
  """The type inside `X | None` (a flag's value type; None stays the default)."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1:
      return args[0]
  return tp


def _fields(cls):
  """(field, annotation, flag name) of every command-line field, nested dataclasses' fields flattened."""
  hints = _hints(cls)
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    if dataclasses.is_dataclass(tp):
      yield from _fields(tp)
    elif f.metadata.get("cli", True):
      yield f, tp, f.metadata.get("flag") or f.name


def _split(text: str, item, flag: str) -> tuple:
  try:
    return tuple(item(s.strip()) for s in str(text).split(",") if s.strip())
  except ValueError:
    raise errors.ConfigError(f"--{flag}={text!r}: expected comma-separated {item.__name__} values") from None


def add_arguments(ap: argparse.ArgumentParser, cls) -> None:
  """One flag per field of the dataclass `cls` (nested dataclasses flattened; their field names must differ)."""
  seen: set[str] = set()
  for f, tp, flag in _fields(cls):
    if f.name in seen:
      raise TypeError(f"{cls.__name__}: two fields named {f.name!r} (a nested dataclass's and another): one flag each")
    seen.add(f.name)
    help_ = f.metadata.get("help", "")
    help_ = (help_() if callable(help_) else help_).replace("%", "%%")  # a callable: e.g. a registry's names
    default = f.default
    required = default is dataclasses.MISSING
    default = None if required else default
    base = _unwrap(tp)
    dest = f.name
    if base is bool:
      if default:  # on by default: the flag turns it off
        name = flag if flag.startswith("no_") else f"no_{flag}"
        ap.add_argument(f"--{name}", dest=dest, action="store_false", help=help_)
      else:
        ap.add_argument(f"--{flag}", dest=dest, action="store_true", help=help_)
    elif typing.get_origin(base) is tuple:
      if f.metadata.get("append"):  # --x=a --x=b
        ap.add_argument(f"--{flag}", dest=dest, metavar=flag.upper(), action="append", default=None, help=help_)
      else:  # --x=a,b (kept a string here; from_args converts, so a bad item is one line, not a usage error)
        ap.add_argument(f"--{flag}", dest=dest, metavar=flag.upper(), default=",".join(map(str, default)), help=help_)
    else:
      kind = base if base in (int, float, str) else str
      more = f" (default: {default})" if default not in (None, "") and "default" not in help_ else ""
      ap.add_argument(
        f"--{flag}",
        dest=dest,
        metavar=None if f.metadata.get("choices") else flag.upper(),
        type=kind,
        default=default,
        required=required,
        choices=f.metadata.get("choices"),
        help=(help_ + more) or None,
      )


def from_args(cls, args: argparse.Namespace):
  """The dataclass `cls` of parsed flags (nested dataclasses built from their own fields)."""
  hints = _hints(cls)
  kw = {}
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    if dataclasses.is_dataclass(tp):
      kw[f.name] = from_args(tp, args)
      continue
    if not f.metadata.get("cli", True) or not hasattr(args, f.name):
      continue
    v = getattr(args, f.name)
    base = _unwrap(tp)
    if typing.get_origin(base) is tuple:
      (item, *_) = typing.get_args(base) or (str,)
      flag = f.metadata.get("flag") or f.name
      if v is None:
        v = f.default
      elif isinstance(v, list):  # append
        v = tuple(item(x) for x in v)
      else:
        v = _split(v, item, flag)
    kw[f.name] = v
  return cls(**kw)


def parser(cls, *, prog: str, doc: str = "", workdirs: str = "each") -> argparse.ArgumentParser:
  """The ArgumentParser of job `cls`: --workdir (repeatable unless workdirs='one') and one flag per field."""
  ap = argparse.ArgumentParser(
    prog=prog, description=(doc or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  if workdirs == "one":
    ap.add_argument("--workdir", required=True, help="run directory")
  else:
    ap.add_argument("--workdir", required=True, action="append", help="run directory (repeatable)")
  add_arguments(ap, cls)
  return ap


def parse(cls, argv: Sequence[str] | None = None, *, workdirs: str = "each"):
  """(job, parsed Namespace) of a command line; for tests and scripts that hold flags, not a job."""
  args = parser(cls, prog=cls.__module__, workdirs=workdirs).parse_args(argv)
  return from_args(cls, args), args


def main(
  cls,
  run: Callable,
  argv: Sequence[str] | None = None,
  *,
  prog: str,
  doc: str = "",
  workdirs: str = "each",
  extra: Callable[[argparse.ArgumentParser], None] | None = None,
  setup: Callable[[argparse.Namespace], None] | None = None,
  report: Callable[[str, Any, argparse.Namespace], None] | None = None,
  kept: str = "",
  prefix: str | None = None,
  catch: tuple[type[BaseException], ...] = (errors.LmtraceError,),
) -> int:
  """`python -m analysis.<prog> --workdir=W [flags]`: builds the job from the flags and calls
  `run(W, job)` for each --workdir ('each'), once with the tuple of them ('joint') or with the one
  ('one'); `report(W, result, args)` prints. A project error (`catch`) is one line on stderr (`prefix`,
  default 'lmtrace <prog>: error: ') and exit code 2; Ctrl-C one line and 130; anything else, a bug,
  keeps its traceback. `extra` adds flags that are not job settings (e.g. multi-process ones), `setup`
  acts on them before the job runs."""
  ap = parser(cls, prog=f"python -m analysis.{prog}", doc=doc, workdirs=workdirs)
  if extra:
    extra(ap)
  args = ap.parse_args(argv)
  if setup:
    setup(args)
  prefix = f"lmtrace {prog}: error: " if prefix is None else prefix
  with errors.one_line_interrupt(f"lmtrace {prog}", kept):
    try:
      job = from_args(cls, args)
      targets = [args.workdir] if workdirs == "one" else [tuple(args.workdir)] if workdirs == "joint" else list(args.workdir)
      for w in targets:
        out = run(w, job)
        if report:
          report(w, out, args)
    except catch as e:
      print(f"{prefix}{e}", file=sys.stderr)
      return 2
  return 0
