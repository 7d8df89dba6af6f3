"""Hessian flatness over the checkpoints of a run (Liu et al. 2022): trace, top eigenvalues, density.

  python -m analysis.flatness --workdir=W [--steps=all|0,100,...] [--estimator=hutchinson,fisher,...]

Writes W/analysis/flatness.parquet, one row per (checkpoint, estimator, quantity): step, tokens seen,
loss on the fixed batches, estimate, its standard error, number of HVPs, batches, tokens and parameters
(of the filtered set; estimate / n_params is the mean curvature, though Liu et al. caution that
traces of different widths are not directly comparable), wall time, `converged` (power iteration and
Lanczos; empty for trace estimators), validity with the reason: an HVP that produced NaN, or a
checkpoint that could not be read (its rows are written invalid, the job goes on to the next one, and
a rerun retries it). Rerunning skips rows already computed with the same settings (resumable; the
settings key is every field of `Settings`); `analysis.load.load_flatness(W)` returns the table.

`--steps=all` measures the analysis checkpoints (`checkpoints/`) only: the trainer rotates `resume/`
ones away mid-job. `--include_resume` adds them; explicit `--steps=...` may name either kind.

Every checkpoint is measured on the *same* tokens: `--batches` batches of the run's validation split,
documents chosen by `--data_seed` and recorded (token fingerprint in every row). Dropout is off and
the model runs in float32 unless `--dtype` says otherwise, with true-fp32 matmuls (`--matmul_precision`:
JAX's own default is TF32 on recent GPUs and bf16 passes on TPUs). The model, loss and HVP operator are built
once per run, so the estimators compile once and every further checkpoint costs only its HVPs.
`--mesh` shards the measurement; a multi-process job (`--coordinator`, as in train.py) runs the same
command in every process, and process 0 writes the table.

Estimators (traces, eigenvalues, spectral density) live in the registry `ESTIMATORS` below, the math
in analysis/hessian.py; `--help` lists each with its description. Adding one is one
`register(Estimator(...))` entry: its function (Measurer, params, key, settings, progress) -> rows, the
quantity an invalid row stands in for, its HVP budget, whether it reports progress itself, and a line
of description. A new knob is one `Settings` field (its flag follows from the field).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import textwrap
import time
import zlib
from typing import Any, Callable

import jax
import numpy as np
import pandas as pd
from flax import linen as nn
from tqdm import tqdm

from analysis import hessian as H
from analysis.jobs import Workdir, option
from lib import ckpt as C
from lib import errors, sharding
from lib import io as lib_io
from lib import model as M

TABLE = "flatness.parquet"


class FlatnessError(errors.AnalysisError):
  pass


def fixed_batches(
  workdir: Workdir | str, *, batches: int, batch_size: int, seed: int, split: str = "validation", mesh=None
) -> tuple[list[dict], int]:
  """The run's held-out batches, documents chosen by `seed`; returns (batches on `mesh`, fingerprint)."""
  import ml_collections as mlc

  from data import pipeline as dp
  from data import sources

  wd = Workdir.open(workdir)
  cfg = wd.config
  groups = sources.make_groups(mlc.ConfigDict(cfg["data"]))
  src = sources.select_split(groups[0], split)
  order = np.random.default_rng(seed).permutation(len(src))
  shuffled = sources.ListSource([src[int(i)] for i in order[: min(len(src), batches * batch_size * 8)]])
  out = dp.eval_batches(
    shuffled,
    batch_size=batch_size,
    seq_len=cfg["data"]["seq_len"],
    num_batches=batches,
    objective=cfg["data"]["objective"],
    vocab_size=wd.model_config.vocab_size,
    seed=seed,
  )
  out = [{k: v for k, v in b.items() if k in ("inputs", "targets", "mask", "segment_ids", "positions")} for b in out]
  fp = zlib.crc32(b"".join(b["inputs"].tobytes() + b["mask"].tobytes() for b in out))
  mesh = mesh or sharding.single_device_mesh()
  # Every process built the same global batches; each places only the rows its devices hold.
  place = lambda x: jax.make_array_from_callback(
    x.shape,
    sharding.batch_sharding(mesh, x.ndim),  # noqa: E731
    lambda idx: x[idx],
  )
  return [{k: place(v) for k, v in b.items()} for b in out], fp


UNREADABLE = "unreadable checkpoint: "  # reason prefix of rows a rerun retries


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a measurement's numbers depend on. Every field goes into the rows' resume key (and a
  `cfg_<field>` column): rows computed under other settings are not reused. Each field is a flag of
  the command line (`--<field>`)."""

  # `probes` is the number of Hutchinson random vectors (Fisher: label samples; Hutch++: HVP budget); the
  # name stays because it is the flag, the `cfg_probes` column and part of every stored row's key.
  probes: int = option(32, "Hutchinson random vectors (Fisher: label samples; Hutch++: HVP budget)")
  dist: str = option("rademacher", "distribution of the Hutchinson vectors", choices=("rademacher", "gaussian"))
  filter: str = option("", "regex on '/'-joined parameter paths to include ('' = all)")
  exclude: str = option("", "regex of parameter paths to exclude")
  blocks: bool = option(False, "also per-block traces (embeddings, each layer's attn/mlp, head)")
  batches: int = option(4, "fixed evaluation batches")
  batch_size: int = option(16, "rows per batch")
  data_seed: int = option(0, "selects the evaluation documents (recorded)")
  seed: int = option(0, "seed of the random vectors")
  lanczos_steps: int = option(30, "Lanczos steps (lanczos, slq)")
  topk: int = option(5, "Ritz values reported by lanczos")
  slq_runs: int = option(4, "SLQ start vectors")
  power_iters: int = option(100, "power iteration's iteration cap")
  power_tol: float = option(1e-5, "power iteration stops at relative change ≤ this")
  dtype: str = option("float32", "model dtype for the measurement", choices=("float32", "bfloat16"))
  matmul_precision: str = option(
    "highest",
    "float32 matmuls: 'highest' = true fp32 (default); 'default' lets GPUs use TF32 and TPUs bf16 passes "
    "(faster, ~1e-3 relative error per HVP)",
    choices=("highest", "high", "default"),
  )
  target_rel_err: float = option(0.0, "stop Hutchinson and Fisher once stderr/|trace| < this (0 = off)")

  @property
  def selection(self) -> H.ParamSelection:
    return H.ParamSelection(self.filter or None, self.exclude or None)

  def key(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


# ----------------------------------------------------------------------------------------------
# The estimator registry


@dataclasses.dataclass(frozen=True)
class Estimator:
  """A flatness estimator, declared once.

  fn(ms, params, key, settings, progress) -> rows {quantity, estimate, stderr, n_hvps[, converged, ...]}
  primary: the quantity an invalid row (NaN, unreadable checkpoint) stands in for
  budget(settings): the HVPs (or samples) it runs, for its progress bar
  streams: `fn` calls progress(n) as it goes (else the bar is filled once, at the end)
  unit: what the bar counts ('hvp' or 'sample')
  """

  name: str
  fn: Callable[..., list[dict[str, Any]]]
  primary: str
  budget: Callable[[Settings], int]
  streams: bool = False
  unit: str = "hvp"
  doc: str = ""


ESTIMATORS: dict[str, Estimator] = {}  # name -> Estimator, in registration order


def register(est: Estimator) -> Estimator:
  """Adds `est` to ESTIMATORS (its name must be new); returns it."""
  if est.name in ESTIMATORS:
    raise FlatnessError(f"estimator {est.name!r} is already registered")
  ESTIMATORS[est.name] = est
  return est


def _trace_rows(q: str, r: H.Estimate) -> list[dict[str, Any]]:
  """The total and, with --blocks, one row per block (quantity '<q>/<block>')."""
  blocks = [(f"{q}/{name}", e, se) for name, (e, se) in (r.blocks or {}).items()]
  return [
    dict(quantity=qq, estimate=float(e), stderr=float(se), n_hvps=int(r.n_matvecs))
    for qq, e, se in [(q, r.estimate, r.stderr), *blocks]
  ]


def _hutchinson_on(op_of: Callable, q: str):
  """The Hutchinson loop on the operator `op_of(ms)` (the Hessian or the Gauss-Newton matrix)."""

  def fn(ms, params, key, st: Settings, progress):
    r = H.hutchinson_trace(
      op_of(ms),
      params,
      key,
      st.probes,  # the number of random vectors
      dist=st.dist,
      target_rel_err=st.target_rel_err or None,
      blocks=st.blocks,
      progress=progress,
      select=st.selection,
    )
    return _trace_rows(q, r)

  return fn


def _hutchpp(ms, params, key, st: Settings, progress):
  r = H.hutchpp_trace(ms.matvec, params, key, st.probes, dist=st.dist, select=st.selection)
  return [dict(quantity="trace", estimate=float(r.estimate), stderr=float(r.stderr), n_hvps=int(r.n_matvecs))]


def _fisher(ms, params, key, st: Settings, progress):
  r = H.fisher_trace(
    ms.logits_fn, params, ms.batches, key, st.probes, target_rel_err=st.target_rel_err or None, progress=progress,
    select=st.selection,
  )  # fmt: skip
  return [dict(quantity="fisher_trace", estimate=float(r.estimate), stderr=float(r.stderr), n_hvps=int(r.n_matvecs))]


def _power(ms, params, key, st: Settings, progress):
  r = H.power_iteration(ms.matvec, params, key, num_iters=st.power_iters, tol=st.power_tol, select=st.selection)
  return [
    dict(
      quantity="lambda_absmax",  # the largest-magnitude eigenvalue, named for what it is
      estimate=float(r.estimate),
      stderr=float(r.stderr),
      n_hvps=int(r.n_matvecs),
      converged=bool(r.extra["converged"]),
    )
  ]


def _lanczos(ms, params, key, st: Settings, progress):
  r = H.top_eigenvalues(ms.matvec, params, key, k=st.topk, num_steps=st.lanczos_steps, select=st.selection)
  vals, res, conv = np.asarray(r.eigenvalues), np.asarray(r.residuals), np.asarray(r.extra["converged"])
  lo, lo_bound = r.extra["lambda_min"]
  return [
    dict(quantity=f"eig_{i}", estimate=float(v), stderr=float(e), n_hvps=int(r.n_matvecs), converged=bool(c))
    for i, (v, e, c) in enumerate(zip(vals, res, conv))
  ] + [dict(quantity="eig_min", estimate=lo, stderr=lo_bound, n_hvps=int(r.n_matvecs), converged=bool(lo_bound < 1e-3 * abs(lo)))]


def _slq(ms, params, key, st: Settings, progress):
  r = H.slq_density(ms.matvec, params, key, num_runs=st.slq_runs, num_steps=st.lanczos_steps, select=st.selection)
  grid, dens = np.asarray(r.grid), np.asarray(r.density)
  # the SLQ trace (n · Σ w θ per run) with its stderr across runs; the smoothed density rides along as JSON
  density = json.dumps({"grid": grid.tolist(), "density": dens.tolist()})
  return [dict(quantity="trace", estimate=float(r.estimate), stderr=float(r.stderr), n_hvps=int(r.n_matvecs), density=density)]


def _n_vectors(st: Settings) -> int:
  return st.probes


for _e in (
  Estimator(
    "hutchinson",
    _hutchinson_on(lambda ms: ms.matvec, "trace"),
    "trace",
    _n_vectors,
    streams=True,
    doc="Hutchinson trace, Rademacher (or --dist=gaussian) vectors; per-block traces with --blocks",
  ),
  Estimator("hutchpp", _hutchpp, "trace", _n_vectors, doc="Hutch++ (lower variance at equal HVPs on decaying spectra)"),
  Estimator(
    "fisher",
    _fisher,
    "fisher_trace",
    _n_vectors,
    streams=True,
    unit="sample",
    doc="trace of the Fisher with labels sampled from the model (the paper's App. B.1 estimator; equals the Hessian "
    "trace at a minimum); the released code's one Gaussian vector per batch with true labels is hutchinson --dist=gaussian",
  ),
  Estimator(
    "ggn",
    _hutchinson_on(lambda ms: ms.ggn, "ggn_trace"),
    "ggn_trace",
    _n_vectors,
    streams=True,
    doc="Hutchinson trace of the generalised Gauss-Newton matrix (PSD, label-free; its trace is the Fisher trace; "
    "per-block with --blocks)",
  ),
  Estimator(
    "power",
    _power,
    "lambda_absmax",
    lambda st: st.power_iters,
    doc="lambda_absmax: the eigenvalue of largest MAGNITUDE by power iteration (the top eigenvalue only when that is "
    "positive and dominant), capped at --power_iters, stopping at --power_tol; `converged` says which",
  ),
  Estimator(
    "lanczos",
    _lanczos,
    "eig_0",
    lambda st: st.lanczos_steps,
    doc="top-k eigenvalues (eig_0..) and the smallest (eig_min) by Lanczos with full reorthogonalisation",
  ),
  Estimator(
    "slq",
    _slq,
    "trace",
    lambda st: st.slq_runs * st.lanczos_steps,
    doc="spectral density by stochastic Lanczos quadrature (a JSON `density` column) and its trace",
  ),
):
  register(_e)


def _estimator(name: str) -> Estimator:
  if name not in ESTIMATORS:
    raise FlatnessError(f"unknown estimator {name!r}; valid: {', '.join(ESTIMATORS)}")
  return ESTIMATORS[name]


# ----------------------------------------------------------------------------------------------
# The job


@dataclasses.dataclass(frozen=True)
class Job:
  """What to measure where: the estimators and checkpoints of one workdir, under `settings`."""

  settings: Settings = Settings()
  estimators: tuple[str, ...] = option(
    ("hutchinson",), lambda: f"comma-separated: {', '.join(ESTIMATORS)} (see the list below)", flag="estimator"
  )
  steps: str = option("all", "'all' (analysis checkpoints) or comma-separated checkpoint steps")
  include_resume: bool = option(False, "--steps=all also measures resume/ checkpoints")
  mesh: str = option("", "data,fsdp,tensor sizes (default: one device; all devices of a multi-process job)")


class Measurer:
  """What every checkpoint of a run shares: the model, its loss and logits functions, the HVP operator
  on the fixed batches and the jitted loss. Built once per run, so the estimators' jitted bodies (cached
  on the operator and the logits function) compile once, not once per checkpoint."""

  def __init__(self, workdir: Workdir | str, batches: list[dict], settings: Settings):
    wd = Workdir.open(workdir)
    self.batches = batches
    mcfg = wd.model_config
    model = wd.model if settings.dtype == mcfg.dtype else M.make(dataclasses.replace(mcfg, dtype=settings.dtype))
    self.loss_fn = lambda p, b: M.mean_loss(model, p, b)  # noqa: E731
    self.logits_fn = lambda p, b: M.logits(model, p, b)  # noqa: E731
    self.loss_sum = jax.jit(lambda p, b: M.per_token_loss(model, p, b).sum())
    self.n_tokens = float(sum(H._num_tokens(b) for b in batches))
    self.matvec = H.make_hvp(self.loss_fn, batches)
    shapes, _ = M.abstract_params(model)
    self.n_params = settings.selection.count(shapes)  # the measured ones

  @functools.cached_property
  def ggn(self) -> H.HVPOperator:
    return H.make_ggn(self.logits_fn, self.batches)


def measure_checkpoint(
  workdir: Workdir | str, step: int, estimators, st: Settings, batches, mesh, measurer: Measurer | None = None
) -> list[dict]:
  """All requested estimators at one checkpoint -> rows. An unreadable checkpoint raises CheckpointError."""
  wd = Workdir.open(workdir)
  ms = measurer or Measurer(wd, batches, st)
  params = wd.restore(step, mesh=mesh)
  rows = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES), jax.default_matmul_precision(st.matmul_precision):
    n_tok = ms.n_tokens
    loss = float(sum(float(ms.loss_sum(params, b)) for b in batches) / n_tok)
    key = jax.random.key(st.seed)
    for name in estimators:
      est = _estimator(name)
      t0 = time.time()
      bar = tqdm(
        total=est.budget(st),
        desc=f"  step {step} {name}",
        unit=est.unit,
        leave=False,
        disable=True if jax.process_index() != 0 else None,  # None: off when stderr is not a terminal
      )
      try:
        res = run_estimator(name, ms, params, key, st, progress=bar.update)
      except FloatingPointError as e:  # NaN in an HVP: the row is invalid, with the reason
        res = [dict(quantity=est.primary, estimate=float("nan"), stderr=float("nan"), n_hvps=0, valid=False, reason=str(e))]
      wall = time.time() - t0
      bar.close()
      for r in res:
        est_val = r.get("estimate", float("nan"))
        valid = r.get("valid", bool(np.isfinite(est_val)))
        rows.append(
          dict(
            step=step,
            estimator=name,
            loss=loss,
            n_batches=len(batches),
            n_tokens=n_tok,
            n_params=ms.n_params,
            wall_time=wall,
            valid=valid,
            reason=r.get("reason", "" if valid else "non-finite estimate"),
            converged=r.get("converged"),
            **{k: v for k, v in r.items() if k not in ("valid", "reason", "converged")},
          )
        )
  return rows


def run_estimator(name: str, ms: Measurer, params, key, st: Settings, progress=None) -> list[dict[str, Any]]:
  """One estimator -> rows {quantity, estimate, stderr, n_hvps, ...}. `progress(n)` hears of finished
  vectors (chunk by chunk for the streaming ones, at the end otherwise)."""
  est = _estimator(name)
  rows = est.fn(ms, params, key, st, progress)
  if progress is not None and not est.streams:
    progress(max(r["n_hvps"] for r in rows))
  return rows


def table_path(workdir: Workdir | str) -> str:
  return Workdir.table(workdir, TABLE) if isinstance(workdir, Workdir) else os.path.join(workdir, "analysis", TABLE)


def _todo(wd: Workdir, job: Job) -> list[int]:
  if job.steps not in ("all", ""):
    return wd.select(job.steps)
  available = wd.steps
  steps = sorted(s for s, sub in available.items() if job.include_resume or sub == C.ANALYSIS_DIR)
  if not steps:
    where = f"{C.ANALYSIS_DIR}/ or {C.RESUME_DIR}/" if job.include_resume else f"{C.ANALYSIS_DIR}/"
    more = f"; {len(available)} resume checkpoint(s) exist: add --include_resume" if available and not job.include_resume else ""
    raise FlatnessError(f"{wd.path} has no checkpoints (looked in {where}){more}")
  return steps


def _invalid_rows(step: int, estimators, reason: str) -> list[dict]:
  nan = dict(estimate=np.nan, stderr=np.nan, n_hvps=0, valid=False, reason=reason)
  return [dict(step=step, estimator=e, quantity=ESTIMATORS[e].primary, **nan) for e in estimators]


def _write(df: pd.DataFrame, path: str) -> None:
  lib_io.atomic_parquet(df, path)  # a kill leaves the previous complete table


def run(workdir: Workdir | str, job: Job) -> pd.DataFrame:
  """Measures every requested checkpoint not yet in the table; returns the whole table. A checkpoint that
  cannot be read gives invalid rows (reason 'unreadable checkpoint: ...') and the job goes on."""
  bad = [e for e in job.estimators if e not in ESTIMATORS]
  if bad:
    raise FlatnessError(f"unknown estimator(s) {bad}; valid: {', '.join(ESTIMATORS)}")
  st = job.settings
  wd = Workdir.open(workdir)  # a missing directory or a non-lmtrace one: one clear error
  todo = _todo(wd, job)
  path = table_path(wd)
  if jax.process_index() == 0:  # before measuring anything: a read-only workdir is one line, not a lost hour
    lib_io.check_writable(os.path.dirname(path), "flatness cannot write its table: ")
  mesh = sharding.mesh_from_flag(job.mesh)
  sharding.check_batch(mesh, st.batch_size, "--batch_size")  # before any batch is placed on the mesh
  batches, fp = fixed_batches(wd, batches=st.batches, batch_size=st.batch_size, seed=st.data_seed, mesh=mesh)
  key = st.key()
  old = pd.read_parquet(path) if os.path.exists(path) else pd.DataFrame()
  done = set()
  if len(old):
    same = old[(old["settings"] == key) & ~old["reason"].fillna("").str.startswith(UNREADABLE)]
    done = set(zip(same["step"], same["estimator"]))
  pending = [(s, [e for e in job.estimators if (s, e) not in done]) for s in todo]
  pending = [(s, es) for s, es in pending if es]
  measurer = Measurer(wd, batches, st)
  writer = jax.process_index() == 0  # every process computes (collectives); one writes the table
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("flatness: table read")  # nobody writes before all have read it
  cfg_cols = {f"cfg_{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in dataclasses.asdict(st).items()}
  for step, ests in tqdm(pending, desc=f"flatness {wd.name}", unit="ckpt", disable=None if writer else True):
    try:
      meta = wd.meta(step)  # damaged meta (not JSON): the checkpoint is skipped like damaged params
      rows = measure_checkpoint(wd, step, ests, st, batches, mesh, measurer)
    except C.CheckpointError as e:  # damaged or vanished: mark it, measure the others; a rerun retries it
      if writer:
        print(f"lmtrace flatness: skipping step {step}: {e}", file=sys.stderr)
      rows, meta = _invalid_rows(step, ests, UNREADABLE + str(e)), {}
    for r in rows:
      r.update(tokens_seen=meta.get("tokens_seen", np.nan), data_fingerprint=fp, settings=key, **cfg_cols)
    new = pd.DataFrame(rows)
    if len(old):  # earlier rows of these (step, estimator) pairs under these settings: failed reads, replaced
      stale = (old["settings"] == key) & pd.Series(list(zip(old["step"], old["estimator"])), index=old.index).isin(
        set(zip(new["step"], new["estimator"]))
      )
      old = old[~stale]
    old = pd.concat([old, new], ignore_index=True) if len(old) else new
    if "converged" in old:
      old["converged"] = old["converged"].astype("boolean")  # True/False for eigenvalue rows, empty otherwise
    if writer:
      _write(old, path)
  return old


# ----------------------------------------------------------------------------------------------
# The command line (built from Job and Settings)


def _multiprocess_flags(ap) -> None:
  ap.add_argument(
    "--coordinator",
    default="",
    help="multi-process: 'auto' (TPU pods, SLURM) or host:port, as "
    "--config.distributed.coordinator in train.py; run the same command in every process",
  )
  ap.add_argument("--num_processes", type=int, default=0, help="multi-process: total processes (with host:port)")
  ap.add_argument("--process_id", type=int, default=-1, help="multi-process: this process's id (with host:port)")
  wrap = lambda e: textwrap.fill(e.doc, 100, initial_indent=f"  {e.name:11s} ", subsequent_indent=" " * 14)  # noqa: E731
  ap.epilog = "estimators:\n" + "\n".join(wrap(e) for e in ESTIMATORS.values())


def _setup(args) -> None:
  from lib import metrics as MX

  sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  MX.quiet_logs()
  sharding.enable_compilation_cache()


def _report(w, df, args) -> None:
  ok = df[df["valid"]] if len(df) else df
  if jax.process_index() == 0:
    print(f"{w}: {len(df)} rows in {table_path(w)} ({len(df) - len(ok)} invalid)")


def parse_args(argv=None):
  """The parsed command line (flags of Job and Settings, plus the multi-process ones)."""
  from analysis import jobs

  ap = jobs.parser(Job, prog="python -m analysis.flatness", doc=__doc__)
  _multiprocess_flags(ap)
  return ap.parse_args(argv)


def job_from_args(args) -> Job:
  """The typed job of parsed flags (the library functions never see the Namespace)."""
  from analysis import jobs

  return jobs.from_args(Job, args)


def main(argv=None) -> int:
  from analysis import jobs

  kept = "the table keeps every checkpoint measured so far: rerun the same command to measure the rest"
  rc = jobs.main(Job, run, argv, prog="flatness", doc=__doc__, extra=_multiprocess_flags, setup=_setup, report=_report, kept=kept)
  if rc:
    sys.exit(rc)
  return rc


if __name__ == "__main__":
  main()
