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

Estimators (analysis/hessian.py):
  hutchinson  Hutchinson trace, Rademacher (or --dist=gaussian) probes; per-block traces with --blocks
  hutchpp     Hutch++ (lower variance at equal HVPs on decaying spectra)
  fisher      trace of the Fisher with labels sampled from the model (the paper's App. B.1 estimator;
              equals the Hessian trace at a minimum); the released code instead uses one Gaussian
              Hutchinson probe per batch with the true labels: use hutchinson --dist=gaussian
  ggn         Hutchinson trace of the generalised Gauss-Newton matrix (PSD, label-free; its trace is the
              Fisher trace, which `fisher` estimates by sampling labels; per-block with --blocks)
  power       lambda_absmax: the eigenvalue of largest MAGNITUDE by power iteration (it is the top
              eigenvalue only when that is positive and dominant; at init it is often negative), capped
              at --power_iters, stopping at relative change --power_tol; `converged` says which
  lanczos     top-k eigenvalues (eig_0..) and the smallest (eig_min) by Lanczos with full reorthogonalisation
  slq         spectral density by stochastic Lanczos quadrature (a JSON `density` column) and its trace
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import zlib
from typing import Any

import jax
import numpy as np
import pandas as pd
from flax import linen as nn
from tqdm import tqdm

from analysis import hessian as H
from lib import ckpt as C
from lib import errors, sharding
from lib import io as lib_io
from lib import metrics as MX
from lib import model as M

ESTIMATORS = ("hutchinson", "hutchpp", "fisher", "ggn", "power", "lanczos", "slq")


class FlatnessError(errors.AnalysisError):
  pass


def fixed_batches(
  workdir: str, *, batches: int, batch_size: int, seed: int, split: str = "validation", mesh=None
) -> tuple[list[dict], int]:
  """The run's held-out batches, documents chosen by `seed`; returns (batches on `mesh`, fingerprint)."""
  import ml_collections as mlc

  from data import pipeline as dp
  from data import sources

  _, mcfg, cfg = C.load_model(workdir)
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
    vocab_size=mcfg.vocab_size,
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
PRIMARY = {  # the quantity an invalid row stands in for, per estimator
  "hutchinson": "trace",
  "hutchpp": "trace",
  "fisher": "fisher_trace",
  "ggn": "ggn_trace",
  "power": "lambda_absmax",
  "lanczos": "eig_0",
  "slq": "trace",
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a measurement's numbers depend on. Every field goes into the rows' resume key (and a
  `cfg_<field>` column): rows computed under other settings are not reused."""

  probes: int = 32  # Hutchinson probes / Fisher samples / Hutch++ HVP budget
  dist: str = "rademacher"  # probe distribution: rademacher | gaussian
  filter: str = ""  # regex of '/'-joined parameter paths to include ('' = all)
  exclude: str = ""  # regex of parameter paths to exclude
  blocks: bool = False  # also per-block traces
  batches: int = 4  # fixed evaluation batches
  batch_size: int = 16  # rows per batch
  data_seed: int = 0  # selects the evaluation documents
  seed: int = 0  # probe seed
  lanczos_steps: int = 30  # Lanczos steps (lanczos, slq)
  topk: int = 5  # Ritz values reported by lanczos
  slq_runs: int = 4  # SLQ start vectors
  power_iters: int = 100  # power iteration's cap
  power_tol: float = 1e-5  # power iteration stops at relative change ≤ this
  dtype: str = "float32"  # model dtype for the measurement
  matmul_precision: str = "highest"  # float32 matmul precision: highest | high | default
  target_rel_err: float = 0.0  # stop probing once stderr/|trace| < this (0 = off)

  @property
  def selection(self) -> H.ParamSelection:
    return H.ParamSelection(self.filter or None, self.exclude or None)

  def key(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Job:
  """What to measure where: the estimators and checkpoints of one workdir, under `settings`."""

  settings: Settings = Settings()
  estimators: tuple[str, ...] = ("hutchinson",)
  steps: str = "all"  # 'all' or comma-separated steps
  include_resume: bool = False  # 'all' also takes resume/ checkpoints
  mesh: str = ""  # data,fsdp,tensor sizes ('' = one device; every device of a multi-process job)


class Measurer:
  """What every checkpoint of a run shares: the model, its loss and logits functions, the HVP operator
  on the fixed batches and the jitted loss. Built once per run, so the estimators' jitted bodies (cached
  on the operator and the logits function) compile once, not once per checkpoint."""

  def __init__(self, workdir: str, batches: list[dict], settings: Settings):
    self.batches = batches
    model, mcfg, _ = C.load_model(workdir)
    if settings.dtype != mcfg.dtype:
      model = M.make(M.ModelConfig(**{**vars(mcfg), "dtype": settings.dtype}))
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
  workdir: str, step: int, estimators, st: Settings, batches, mesh, measurer: Measurer | None = None
) -> list[dict]:
  """All requested estimators at one checkpoint -> rows. An unreadable checkpoint raises CheckpointError."""
  ms = measurer or Measurer(workdir, batches, st)
  params = C.restore_params(workdir, step, mesh=mesh)
  rows = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES), jax.default_matmul_precision(st.matmul_precision):
    n_tok = ms.n_tokens
    loss = float(sum(float(ms.loss_sum(params, b)) for b in batches) / n_tok)
    key = jax.random.key(st.seed)
    for est in estimators:
      t0 = time.time()
      bar = tqdm(
        total=_budget(est, st),
        desc=f"  step {step} {est}",
        unit="hvp" if est != "fisher" else "sample",
        leave=False,
        disable=True if jax.process_index() != 0 else None,  # None: off when stderr is not a terminal
      )
      try:
        res = run_estimator(est, ms, params, key, st, progress=bar.update)
      except FloatingPointError as e:  # NaN in an HVP: the row is invalid, with the reason
        res = [dict(quantity=PRIMARY[est], estimate=float("nan"), stderr=float("nan"), n_hvps=0, valid=False, reason=str(e))]
      wall = time.time() - t0
      bar.close()
      for r in res:
        est_val = r.get("estimate", float("nan"))
        valid = r.get("valid", bool(np.isfinite(est_val)))
        rows.append(
          dict(
            step=step,
            estimator=est,
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


def _budget(est: str, st: Settings) -> int:
  """HVPs (Fisher: samples) an estimator will run, for its progress bar."""
  if est in ("hutchinson", "ggn", "hutchpp", "fisher"):
    return st.probes
  if est == "slq":
    return st.slq_runs * st.lanczos_steps
  if est == "power":
    return st.power_iters
  return st.lanczos_steps


def run_estimator(est: str, ms: Measurer, params, key, st: Settings, progress=None) -> list[dict[str, Any]]:
  """One estimator -> rows {quantity, estimate, stderr, n_hvps, ...}. The adapter to analysis.hessian.
  `progress(n)` hears of finished probes (chunk by chunk for Hutchinson and Fisher, at the end otherwise)."""
  rows = _run_estimator(est, ms, params, key, st, progress)
  if progress is not None and est not in ("hutchinson", "ggn", "fisher"):
    progress(max(r["n_hvps"] for r in rows))
  return rows


def _run_estimator(est: str, ms: Measurer, params, key, st: Settings, progress) -> list[dict[str, Any]]:
  flt = dict(select=st.selection)
  matvec = ms.matvec
  if est in ("hutchinson", "ggn"):  # the same Hutchinson loop on the Hessian or the Gauss-Newton operator
    op, q = (matvec, "trace") if est == "hutchinson" else (ms.ggn, "ggn_trace")
    r = H.hutchinson_trace(
      op,
      params,
      key,
      st.probes,
      dist=st.dist,
      target_rel_err=st.target_rel_err or None,
      blocks=st.blocks,
      progress=progress,
      **flt,
    )
    blocks = [(f"{q}/{name}", e, se) for name, (e, se) in (r.blocks or {}).items()]
    return [
      dict(quantity=qq, estimate=float(e), stderr=float(se), n_hvps=int(r.n_matvecs))
      for qq, e, se in [(q, r.estimate, r.stderr), *blocks]
    ]
  if est == "hutchpp":
    r = H.hutchpp_trace(matvec, params, key, st.probes, dist=st.dist, **flt)
    return [dict(quantity="trace", estimate=float(r.estimate), stderr=float(r.stderr), n_hvps=int(r.n_matvecs))]
  if est == "fisher":
    r = H.fisher_trace(
      ms.logits_fn, params, ms.batches, key, st.probes, target_rel_err=st.target_rel_err or None, progress=progress, **flt
    )
    return [dict(quantity="fisher_trace", estimate=float(r.estimate), stderr=float(r.stderr), n_hvps=int(r.n_matvecs))]
  if est == "power":  # the largest-magnitude eigenvalue, named for what it is
    r = H.power_iteration(matvec, params, key, num_iters=st.power_iters, tol=st.power_tol, **flt)
    return [
      dict(
        quantity="lambda_absmax",
        estimate=float(r.estimate),
        stderr=float(r.stderr),
        n_hvps=int(r.n_matvecs),
        converged=bool(r.extra["converged"]),
      )
    ]
  if est == "lanczos":
    r = H.top_eigenvalues(matvec, params, key, k=st.topk, num_steps=st.lanczos_steps, **flt)
    vals, res, conv = np.asarray(r.eigenvalues), np.asarray(r.residuals), np.asarray(r.extra["converged"])
    lo, lo_bound = r.extra["lambda_min"]
    return [
      dict(quantity=f"eig_{i}", estimate=float(v), stderr=float(e), n_hvps=int(r.n_matvecs), converged=bool(c))
      for i, (v, e, c) in enumerate(zip(vals, res, conv))
    ] + [
      dict(quantity="eig_min", estimate=lo, stderr=lo_bound, n_hvps=int(r.n_matvecs), converged=bool(lo_bound < 1e-3 * abs(lo)))
    ]
  if est == "slq":
    r = H.slq_density(matvec, params, key, num_runs=st.slq_runs, num_steps=st.lanczos_steps, **flt)
    grid, dens = np.asarray(r.grid), np.asarray(r.density)
    # the SLQ trace (n · Σ w θ per run) with its stderr across runs; the smoothed density rides along as JSON
    return [
      dict(
        quantity="trace",
        estimate=float(r.estimate),
        stderr=float(r.stderr),
        n_hvps=int(r.n_matvecs),
        density=json.dumps({"grid": grid.tolist(), "density": dens.tolist()}),
      )
    ]
  raise FlatnessError(f"unknown estimator {est!r}; valid: {', '.join(ESTIMATORS)}")


def table_path(workdir: str) -> str:
  return os.path.join(workdir, "analysis", "flatness.parquet")


def _todo(workdir: str, job: Job) -> list[int]:
  available = C.available_steps(workdir)
  if job.steps not in ("all", ""):
    try:
      wanted = [int(s) for s in str(job.steps).split(",") if s.strip()]
    except ValueError:
      raise FlatnessError(f"--steps={job.steps!r}: expected 'all' or comma-separated checkpoint steps (e.g. 0,100,200)") from None
    return [C.resolve_step(workdir, s) for s in wanted]
  steps = sorted(s for s, sub in available.items() if job.include_resume or sub == C.ANALYSIS_DIR)
  if not steps:
    where = f"{C.ANALYSIS_DIR}/ or {C.RESUME_DIR}/" if job.include_resume else f"{C.ANALYSIS_DIR}/"
    more = f"; {len(available)} resume checkpoint(s) exist: add --include_resume" if available and not job.include_resume else ""
    raise FlatnessError(f"{workdir} has no checkpoints (looked in {where}){more}")
  return steps


def _invalid_rows(step: int, estimators, reason: str) -> list[dict]:
  return [
    dict(step=step, estimator=e, quantity=PRIMARY[e], estimate=np.nan, stderr=np.nan, n_hvps=0, valid=False, reason=reason)
    for e in estimators
  ]


def _write(df: pd.DataFrame, path: str) -> None:
  lib_io.atomic_parquet(df, path)  # a kill leaves the previous complete table


def run(workdir: str, job: Job) -> pd.DataFrame:
  """Measures every requested checkpoint not yet in the table; returns the whole table. A checkpoint that
  cannot be read gives invalid rows (reason 'unreadable checkpoint: ...') and the job goes on."""
  bad = [e for e in job.estimators if e not in ESTIMATORS]
  if bad:
    raise FlatnessError(f"unknown estimator(s) {bad}; valid: {', '.join(ESTIMATORS)}")
  st = job.settings
  C.read_config(workdir)  # a missing directory or a non-lmtrace one: one clear error
  todo = _todo(workdir, job)
  if jax.process_index() == 0:  # before measuring anything: a read-only workdir is one line, not a lost hour
    lib_io.check_writable(os.path.dirname(table_path(workdir)), "flatness cannot write its table: ")
  mesh = sharding.mesh_from_flag(job.mesh)
  sharding.check_batch(mesh, st.batch_size, "--batch_size")  # before any batch is placed on the mesh
  batches, fp = fixed_batches(workdir, batches=st.batches, batch_size=st.batch_size, seed=st.data_seed, mesh=mesh)
  key = st.key()
  path = table_path(workdir)
  old = pd.read_parquet(path) if os.path.exists(path) else pd.DataFrame()
  done = set()
  if len(old):
    same = old[(old["settings"] == key) & ~old["reason"].fillna("").str.startswith(UNREADABLE)]
    done = set(zip(same["step"], same["estimator"]))
  pending = [(s, [e for e in job.estimators if (s, e) not in done]) for s in todo]
  pending = [(s, es) for s, es in pending if es]
  measurer = Measurer(workdir, batches, st)
  writer = jax.process_index() == 0  # every process computes (collectives); one writes the table
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("flatness: table read")  # nobody writes before all have read it
  cfg_cols = {f"cfg_{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in dataclasses.asdict(st).items()}
  for step, ests in tqdm(
    pending, desc=f"flatness {os.path.basename(os.path.abspath(workdir))}", unit="ckpt", disable=None if writer else True
  ):
    try:
      meta = C.read_meta(workdir, step)  # damaged meta (not JSON): the checkpoint is skipped like damaged params
      rows = measure_checkpoint(workdir, step, ests, st, batches, mesh, measurer)
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


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, action="append", help="run directory (repeatable)")
  ap.add_argument("--steps", default="all", help="'all' (analysis checkpoints) or comma-separated checkpoint steps")
  ap.add_argument("--include_resume", action="store_true", help="--steps=all also measures resume/ checkpoints")
  ap.add_argument("--estimator", default="hutchinson", help=f"comma-separated: {', '.join(ESTIMATORS)}")
  ap.add_argument("--probes", type=int, default=32, help="probes (Hutchinson/Fisher samples) or HVP budget (Hutch++)")
  ap.add_argument("--dist", default="rademacher", choices=("rademacher", "gaussian"))
  ap.add_argument("--filter", default="", help="regex on '/'-joined parameter paths to include")
  ap.add_argument("--exclude", default="", help="regex of parameter paths to exclude")
  ap.add_argument("--blocks", action="store_true", help="also per-block traces (embeddings, each layer's attn/mlp, head)")
  ap.add_argument("--target_rel_err", type=float, default=0.0, help="stop probing once stderr/|trace| < this")
  ap.add_argument("--batches", type=int, default=4, help="fixed evaluation batches")
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--data_seed", type=int, default=0, help="selects the evaluation documents (recorded)")
  ap.add_argument("--seed", type=int, default=0, help="probe seed")
  ap.add_argument("--lanczos_steps", type=int, default=30, help="Lanczos steps (lanczos, slq)")
  ap.add_argument("--topk", type=int, default=5)
  ap.add_argument("--slq_runs", type=int, default=4)
  ap.add_argument("--power_iters", type=int, default=100, help="power iteration's iteration cap")
  ap.add_argument("--power_tol", type=float, default=1e-5, help="power iteration stops at relative change ≤ this")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument(
    "--matmul_precision",
    default="highest",
    choices=("highest", "high", "default"),
    help="float32 matmuls: 'highest' = true fp32 (default); 'default' lets GPUs use TF32 and TPUs bf16 "
    "passes (faster, ~1e-3 relative error per HVP)",
  )
  ap.add_argument("--mesh", default="", help="data,fsdp,tensor sizes (default: one device; all devices of a multi-process job)")
  ap.add_argument(
    "--coordinator",
    default="",
    help="multi-process: 'auto' (TPU pods, SLURM) or host:port, as "
    "--config.distributed.coordinator in train.py; run the same command in every process",
  )
  ap.add_argument("--num_processes", type=int, default=0, help="multi-process: total processes (with host:port)")
  ap.add_argument("--process_id", type=int, default=-1, help="multi-process: this process's id (with host:port)")
  return ap.parse_args(argv)


def job_from_args(args: argparse.Namespace) -> Job:
  """The typed job of parsed flags (the library functions never see the Namespace)."""
  settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
  estimators = tuple(e.strip() for e in args.estimator.split(",") if e.strip())
  return Job(settings, estimators, str(args.steps), args.include_resume, args.mesh)


def main(argv=None) -> None:
  args = parse_args(argv)
  sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  MX.quiet_logs()
  sharding.enable_compilation_cache()
  kept = "the table keeps every checkpoint measured so far: rerun the same command to measure the rest"
  with errors.one_line_interrupt("lmtrace flatness", kept):
    try:
      job = job_from_args(args)
      for w in args.workdir:
        df = run(w, job)
        ok = df[df["valid"]] if len(df) else df
        if jax.process_index() == 0:
          print(f"{w}: {len(df)} rows in {table_path(w)} ({len(df) - len(ok)} invalid)")
    except errors.LmtraceError as e:  # bad input or state: one line; anything else is a bug and keeps its traceback
      print(f"lmtrace flatness: error: {e}", file=sys.stderr)
      sys.exit(2)


if __name__ == "__main__":
  main()
