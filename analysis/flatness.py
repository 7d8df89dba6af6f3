"""Hessian flatness over the checkpoints of a run (Liu et al. 2022): trace, top eigenvalues, density.

  python -m analysis.flatness --workdir=W [--steps=all|0,100,...] [--estimator=hutchinson,fisher,...]

Writes W/analysis/flatness.parquet, one row per (checkpoint, estimator, quantity): step, tokens seen,
loss on the fixed batches, estimate, its standard error, number of HVPs, batches, tokens and parameters
(of the filtered set; estimate / n_params is the mean curvature, though Liu et al. caution that
traces of different widths are not directly comparable), wall time,
validity (with the reason when an HVP produced NaN). Rerunning skips rows already computed with
the same settings (resumable); `analysis.load.load_flatness(W)` returns the table.

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
  power       λ_max (largest magnitude) by power iteration
  lanczos     top-k eigenvalues (eig_0..) and the smallest (eig_min) by Lanczos with full reorthogonalisation
  slq         spectral density by stochastic Lanczos quadrature (a JSON `density` column) and its trace
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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


def _settings(args) -> dict:
  keys = (
    "probes",
    "dist",
    "filter",
    "exclude",
    "blocks",
    "batches",
    "batch_size",
    "data_seed",
    "seed",
    "lanczos_steps",
    "topk",
    "slq_runs",
    "dtype",
    "matmul_precision",
    "target_rel_err",
  )
  return {k: getattr(args, k) for k in keys}


def _settings_key(settings: dict) -> str:
  return json.dumps(settings, sort_keys=True)


class Measurer:
  """What every checkpoint of a run shares: the model, its loss and logits functions, the HVP operator
  on the fixed batches and the jitted loss. Built once per run, so the estimators' jitted bodies (cached
  on the operator and the logits function) compile once, not once per checkpoint."""

  def __init__(self, workdir: str, batches: list[dict], args):
    self.batches = batches
    model, mcfg, _ = C.load_model(workdir)
    if args.dtype != mcfg.dtype:
      model = M.make(M.ModelConfig(**{**vars(mcfg), "dtype": args.dtype}))
    self.loss_fn = lambda p, b: M.mean_loss(model, p, b)  # noqa: E731
    self.logits_fn = lambda p, b: M.logits(model, p, b)  # noqa: E731
    self.loss_sum = jax.jit(lambda p, b: M.per_token_loss(model, p, b).sum())
    self.n_tokens = float(sum(H._num_tokens(b) for b in batches))
    self.matvec = H.make_hvp(self.loss_fn, batches)
    shapes, _ = M.abstract_params(model)
    leaves, keep = jax.tree.leaves(shapes), H.selected(shapes, args.filter or None, args.exclude or None)
    self.n_params = sum(math.prod(x.shape) for i, x in enumerate(leaves) if keep is None or keep[i])  # measured ones

  @functools.cached_property
  def ggn(self) -> H.HVPOperator:
    return H.make_ggn(self.logits_fn, self.batches)


def measure_checkpoint(workdir: str, step: int, estimators, args, batches, mesh, measurer: Measurer | None = None) -> list[dict]:
  """All requested estimators at one checkpoint -> rows."""
  ms = measurer or Measurer(workdir, batches, args)
  params = C.restore_params(workdir, step, mesh=mesh)
  rows = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES), jax.default_matmul_precision(args.matmul_precision):
    n_tok = ms.n_tokens
    loss = float(sum(float(ms.loss_sum(params, b)) for b in batches) / n_tok)
    key = jax.random.key(args.seed)
    for est in estimators:
      t0 = time.time()
      bar = tqdm(
        total=_budget(est, args),
        desc=f"  step {step} {est}",
        unit="hvp" if est != "fisher" else "sample",
        leave=False,
        disable=jax.process_index() != 0,
      )
      try:
        res = run_estimator(est, ms, params, key, args, progress=bar.update)
      except FloatingPointError as e:  # NaN in an HVP: the row is invalid, with the reason
        res = [dict(quantity="trace", estimate=float("nan"), stderr=float("nan"), n_hvps=0, valid=False, reason=str(e))]
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
            **{k: v for k, v in r.items() if k not in ("valid", "reason")},
          )
        )
  return rows


def _budget(est: str, args) -> int:
  """HVPs (Fisher: samples) an estimator will run, for its progress bar."""
  if est in ("hutchinson", "ggn", "hutchpp", "fisher"):
    return args.probes
  if est == "slq":
    return args.slq_runs * args.lanczos_steps
  return args.lanczos_steps


def run_estimator(est: str, ms: Measurer, params, key, args, progress=None) -> list[dict[str, Any]]:
  """One estimator -> rows {quantity, estimate, stderr, n_hvps, ...}. The adapter to analysis.hessian.
  `progress(n)` hears of finished probes (chunk by chunk for Hutchinson and Fisher, at the end otherwise)."""
  rows = _run_estimator(est, ms, params, key, args, progress)
  if progress is not None and est not in ("hutchinson", "ggn", "fisher"):
    progress(max(r["n_hvps"] for r in rows))
  return rows


def _run_estimator(est: str, ms: Measurer, params, key, args, progress) -> list[dict[str, Any]]:
  flt = dict(include=args.filter or None, exclude=args.exclude or None)
  matvec = ms.matvec
  if est in ("hutchinson", "ggn"):  # the same Hutchinson loop on the Hessian or the Gauss-Newton operator
    op, q = (matvec, "trace") if est == "hutchinson" else (ms.ggn, "ggn_trace")
    r = H.hutchinson_trace(
      op,
      params,
      key,
      args.probes,
      dist=args.dist,
      target_rel_err=args.target_rel_err or None,
      blocks=args.blocks,
      progress=progress,
      **flt,
    )
    blocks = [(f"{q}/{name}", e, se) for name, (e, se) in (r.blocks or {}).items()]
    return [
      dict(quantity=qq, estimate=float(e), stderr=float(se), n_hvps=int(r.n_matvecs))
      for qq, e, se in [(q, r.estimate, r.stderr), *blocks]
    ]
  if est == "hutchpp":
    r = H.hutchpp_trace(matvec, params, key, args.probes, dist=args.dist, **flt)
    return [dict(quantity="trace", estimate=float(r.estimate), stderr=float(r.stderr), n_hvps=int(r.n_matvecs))]
  if est == "fisher":
    r = H.fisher_trace(
      ms.logits_fn, params, ms.batches, key, args.probes, target_rel_err=args.target_rel_err or None, progress=progress, **flt
    )
    return [dict(quantity="fisher_trace", estimate=float(r.estimate), stderr=float(r.stderr), n_hvps=int(r.n_matvecs))]
  if est == "power":
    r = H.power_iteration(matvec, params, key, num_iters=args.lanczos_steps)
    return [
      dict(quantity="lambda_max", estimate=float(r.estimate), stderr=float(getattr(r, "stderr", np.nan)), n_hvps=int(r.n_matvecs))
    ]
  if est == "lanczos":
    r = H.top_eigenvalues(matvec, params, key, k=args.topk, num_steps=args.lanczos_steps)
    vals = np.asarray(r.eigenvalues)
    res = np.asarray(getattr(r, "residuals", np.full(len(vals), np.nan)))
    lo, lo_bound = r.extra["lambda_min"]
    return [
      dict(quantity=f"eig_{i}", estimate=float(v), stderr=float(e), n_hvps=int(r.n_matvecs))
      for i, (v, e) in enumerate(zip(vals, res))
    ] + [dict(quantity="eig_min", estimate=lo, stderr=lo_bound, n_hvps=int(r.n_matvecs))]
  if est == "slq":
    r = H.slq_density(matvec, params, key, num_runs=args.slq_runs, num_steps=args.lanczos_steps)
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


def default_mesh(spec: str = ""):
  """`--mesh=data,fsdp,tensor`; by default one device, or every device of a multi-process job."""
  if spec:
    try:
      sizes = [int(x) for x in spec.split(",")]
    except ValueError:
      sizes = []
    if len(sizes) != len(sharding.MESH_AXES):
      raise FlatnessError(
        f"--mesh={spec!r} needs {len(sharding.MESH_AXES)} integer sizes ({','.join(sharding.MESH_AXES)}), e.g. --mesh=2,2,2"
      )
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, sizes)))
  if jax.process_count() > 1:
    return sharding.make_mesh({"data": jax.device_count(), "fsdp": 1, "tensor": 1})
  return sharding.single_device_mesh()


def run(workdir: str, args) -> pd.DataFrame:
  """Measures every requested checkpoint not yet in the table; returns the whole table."""
  estimators = [e.strip() for e in args.estimator.split(",") if e.strip()]
  bad = [e for e in estimators if e not in ESTIMATORS]
  if bad:
    raise FlatnessError(f"unknown estimator(s) {bad}; valid: {', '.join(ESTIMATORS)}")
  C.read_config(workdir)  # a missing directory or a non-lmtrace one: one clear error
  available = C.available_steps(workdir)
  if not available:
    raise FlatnessError(f"{workdir} has no checkpoints (looked in {C.ANALYSIS_DIR}/ and {C.RESUME_DIR}/)")
  if args.steps in ("all", ""):
    todo = sorted(available)
  else:
    todo = [C.resolve_step(workdir, int(s)) for s in str(args.steps).split(",") if s.strip()]
  mesh = default_mesh(args.mesh)
  sharding.check_batch(mesh, args.batch_size, "--batch_size")  # before any batch is placed on the mesh
  batches, fp = fixed_batches(workdir, batches=args.batches, batch_size=args.batch_size, seed=args.data_seed, mesh=mesh)
  settings = _settings(args)
  key = _settings_key(settings)
  path = table_path(workdir)
  old = pd.read_parquet(path) if os.path.exists(path) else pd.DataFrame()
  done = set()
  if len(old):
    same = old[old["settings"] == key]
    done = set(zip(same["step"], same["estimator"]))
  pending = [(s, [e for e in estimators if (s, e) not in done]) for s in todo]
  pending = [(s, es) for s, es in pending if es]
  measurer = Measurer(workdir, batches, args)
  writer = jax.process_index() == 0  # every process computes (collectives); one writes the table
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("flatness: table read")  # nobody writes before all have read it
  for step, ests in tqdm(pending, desc=f"flatness {os.path.basename(os.path.abspath(workdir))}", unit="ckpt", disable=not writer):
    meta = C.read_meta(workdir, step)
    rows = measure_checkpoint(workdir, step, ests, args, batches, mesh, measurer)
    for r in rows:
      r.update(
        tokens_seen=meta.get("tokens_seen", np.nan),
        data_fingerprint=fp,
        settings=key,
        **{f"cfg_{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in settings.items()},
      )
    new = pd.DataFrame(rows)
    old = pd.concat([old, new], ignore_index=True) if len(old) else new
    if writer:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = path + ".tmp"
      old.to_parquet(tmp, index=False)
      os.replace(tmp, path)  # a kill leaves the previous complete table
  return old


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, action="append", help="run directory (repeatable)")
  ap.add_argument("--steps", default="all", help="'all' or comma-separated checkpoint steps")
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
  ap.add_argument("--lanczos_steps", type=int, default=30)
  ap.add_argument("--topk", type=int, default=5)
  ap.add_argument("--slq_runs", type=int, default=4)
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


def main(argv=None) -> None:
  args = parse_args(argv)
  sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  MX.quiet_logs()
  sharding.enable_compilation_cache()
  try:
    for w in args.workdir:
      df = run(w, args)
      ok = df[df["valid"]] if len(df) else df
      if jax.process_index() == 0:
        print(f"{w}: {len(df)} rows in {table_path(w)} ({len(df) - len(ok)} invalid)")
  except (FlatnessError, C.CheckpointError, ValueError) as e:
    print(f"lmtrace flatness: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
