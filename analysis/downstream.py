"""Downstream transfer of a run's checkpoints (Liu et al. 2022): linear probes and fine-tuning.

  python -m analysis.downstream --workdir=W [--steps=all|0,250] [--tasks=task_A,task_C]
      [--method=probe,finetune,lookup] [--pool=concat|mean] [--seeds=5]

Writes W/analysis/downstream.parquet, one row per (checkpoint, task, method, pool, seed): accuracy on
the task's test part, the mean and standard error over seeds, the checkpoint's eval loss / excess loss
(from metrics.jsonl, NaN when not logged at that step), validity (a damaged checkpoint gives invalid
rows with the reason) and the settings. Rerunning skips rows already computed with the same settings.
`analysis.load_downstream(W)` returns the table.

Tasks are the TFDS splits the data build wrote (data/tfds_builders.py): PCFG `task_A`, `task_B`,
`task_C` (the released code's definition: root child of the sentence / best non-terminal of the first
4 / 2 tokens) and `task_span8` (the paper's definition of task C: most probable non-terminal of the
span [0, 8)); HMM `task_state6`, `task_state10`. Each split is cut by index into train (first 70%),
adversarial (next 10%, for the adversarial objective, data/adversarial.py) and test (last 20%).

Methods (the registry METHODS: adding one is one Method entry):
  probe     frozen model; features = the final-layer states of the word positions concatenated
            (Liu's BertPoolerC; padding positions are 0) or mean-pooled (--pool=mean, BertPoolerCM);
            a linear head trained with AdamW; all seeds in one jitted program (vmap over seeds).
  finetune  the whole model plus the head, AdamW with linear warmup then linear decay (paper: lr 1e-4,
            10 epochs); seeds vmapped too.
  lookup    Liu's lookup-table baseline: features = the exact masked-token conditionals of every
            position from the grammar / HMM (the optimal-loss representation), through the same probe
            code (step -1; no checkpoint).
Legend: N examples, L row length, D width, F features, C classes, S seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from tqdm import tqdm

from analysis.jobs import Workdir, option
from data import vocab
from lib import errors, sharding
from lib import model as M
from lib.io import atomic_parquet

POOLS = ("concat", "mean")
DEFINITION = {
  "task_A": "code",
  "task_B": "code",
  "task_C": "code",
  "task_span8": "paper",
  "task_state6": "hmm",
  "task_state10": "hmm",
}
PARTS = {"train": (0.0, 0.7), "adversarial": (0.7, 0.8), "test": (0.8, 1.0)}


class DownstreamError(errors.AnalysisError):
  pass


# ----------------------------------------------------------------------------------------------
# Task data


def _groups(cfg: dict):
  import ml_collections as mlc

  from data import sources

  return sources.make_groups(mlc.ConfigDict(cfg["data"]))


def available_tasks(workdir: Workdir | str) -> list[str]:
  g = _groups(Workdir.open(workdir).config)[0]
  return sorted(k for k in g.splits if k.startswith("task_"))


def load_task(workdir: Workdir | str, task: str, part: str, cfg: dict | None = None) -> dict[str, np.ndarray]:
  """{tokens [N, L] framed and 0-padded, label [N]} of one part (train/adversarial/test) of a task split."""
  cfg = cfg or Workdir.open(workdir).config
  workdir = workdir.path if isinstance(workdir, Workdir) else workdir
  g = _groups(cfg)[0]
  tasks = sorted(k for k in g.splits if k.startswith("task_"))
  if not tasks:
    raise DownstreamError(
      f"{workdir}: its data ({cfg['data'].get('source', {}).get('kind', '?')}) has no downstream task splits "
      "(only PCFG and HMM languages have them)"
    )
  if task not in g.splits:
    raise DownstreamError(f"unknown task {task!r} for {workdir}; it has {tasks}")
  src = g.splits[task]
  n = len(src)
  lo, hi = (int(round(f * n)) for f in PARTS[part])
  exs = [src[i] for i in range(lo, hi)]
  if not exs:
    raise DownstreamError(f"task {task} of {workdir} has no {part} examples ({n} in all)")
  L = max(len(e["tokens"]) for e in exs) if part != "test" else None
  return _pad(exs, L)


def _pad(exs, L=None) -> dict[str, np.ndarray]:
  L = L or max(len(e["tokens"]) for e in exs)
  tok = np.zeros((len(exs), L), np.int32)
  for i, e in enumerate(exs):
    t = np.asarray(e["tokens"], np.int32)[:L]
    tok[i, : len(t)] = t
  return {"tokens": tok, "label": np.array([int(e["label"]) for e in exs], np.int32)}


def task_data(workdir: Workdir | str, task: str, cfg: dict | None = None) -> tuple[dict, dict, int]:
  """(train, test, n_classes) with a common row length."""
  tr, te = load_task(workdir, task, "train", cfg), load_task(workdir, task, "test", cfg)
  L = max(tr["tokens"].shape[1], te["tokens"].shape[1])
  for d in (tr, te):
    d["tokens"] = np.pad(d["tokens"], ((0, 0), (0, L - d["tokens"].shape[1])))
  n_classes = int(max(tr["label"].max(), te["label"].max())) + 1
  return tr, te, n_classes


def model_batch(tokens_NxL) -> dict:
  """Model inputs for framed, 0-padded sentences: positions and one segment per sentence (pads 0)."""
  tok = jnp.asarray(tokens_NxL)
  seg = (tok != vocab.PAD).astype(jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(tok.shape[1], dtype=jnp.int32), tok.shape)
  return {"inputs": tok, "positions": pos, "segment_ids": seg}


def pool_features(h_NxLxD, tokens_NxL, pool: str):
  """Word positions 1..L-2 of the final states: concatenated (F = (L-2)·D, 0 off words) or mean-pooled."""
  word_NxL = (tokens_NxL >= vocab.N_SPECIAL).astype(h_NxLxD.dtype)
  h = h_NxLxD * word_NxL[..., None]
  if pool == "mean":
    return h.sum(1) / jnp.maximum(word_NxL.sum(1, keepdims=True), 1.0)
  return h[:, 1:-1].reshape(h.shape[0], -1)


def extract_features(model, params, tokens_NxL: np.ndarray, pool: str, batch_size: int = 256) -> np.ndarray:
  """[N, F] float32 probe features of a frozen model."""
  fn = jax.jit(lambda p, t: pool_features(M.hidden(model, p, model_batch(t)), jnp.asarray(t), pool).astype(jnp.float32))
  out = []
  for i in range(0, len(tokens_NxL), batch_size):
    chunk = tokens_NxL[i : i + batch_size]
    pad = batch_size - len(chunk) if len(tokens_NxL) > batch_size else 0
    x = np.asarray(fn(params, np.pad(chunk, ((0, pad), (0, 0)))))
    out.append(x[: len(chunk)])
  return np.concatenate(out)


def lookup_features(lang, tokens_NxL: np.ndarray, pool: str = "concat") -> np.ndarray:
  """Liu's lookup table: the exact conditionals p(w_i | w_{-i}) of every word position, [N, F]."""
  from data import mlm_exact

  sents = [vocab.unframe(t) for t in tokens_NxL]
  conds = mlm_exact.masked_conditionals(lang, [np.asarray(s, np.int64) for s in sents])
  W, P = lang.n_terminals, tokens_NxL.shape[1] - 2
  out = np.zeros((len(sents), P, W), np.float32)
  for i, c in enumerate(conds):
    out[i, : len(c)] = c[:P]
  if pool == "mean":
    n = np.array([max(len(s), 1) for s in sents], np.float32)[:, None]
    return out.sum(1) / n
  return out.reshape(len(sents), -1)


# ----------------------------------------------------------------------------------------------
# Linear probe (a linear classifier on frozen features; not a Hutchinson vector, not a token probe set):
# seeds vmapped in one jitted program


def _schedule(lr: float, total: int, warmup: int):
  if warmup <= 0:
    return optax.linear_schedule(lr, 0.0, max(total, 1))
  return optax.join_schedules(
    [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, 0.0, max(total - warmup, 1))], [warmup]
  )


@functools.partial(jax.jit, static_argnames=("n_classes", "epochs", "batch", "lr", "wd"))
def _train_linear_heads(X_NxF, y_N, keys_S, *, n_classes: int, epochs: int, batch: int, lr: float, wd: float):
  N, F = X_NxF.shape
  spe = max(N // batch, 1)
  tx = optax.adamw(lr, weight_decay=wd)

  def one(key):
    k_init, k_perm = jax.random.split(key)
    head = {"w": jax.random.normal(k_init, (F, n_classes)) / math.sqrt(F), "b": jnp.zeros(n_classes)}
    opt = tx.init(head)

    def loss(h, xb, yb):
      lg = xb @ h["w"] + h["b"]
      return optax.softmax_cross_entropy_with_integer_labels(lg, yb).mean()

    def step(carry, t):
      h, o = carry
      perm = jax.random.permutation(jax.random.fold_in(k_perm, t // spe), N)
      idx = jax.lax.dynamic_slice(perm, ((t % spe) * batch,), (batch,))
      g = jax.grad(loss)(h, X_NxF[idx], y_N[idx])
      u, o = tx.update(g, o, h)
      return (optax.apply_updates(h, u), o), None

    (head, _), _ = jax.lax.scan(step, (head, opt), jnp.arange(epochs * spe))
    return head

  return jax.vmap(one)(keys_S)


def linear_probe_accuracy(
  X_train, y_train, X_test, y_test, n_classes: int, seeds, *, epochs=50, batch=64, lr=1e-3, wd=0.01, standardize=True
):
  """([S] test accuracy, [S] train accuracy) of linear heads trained with AdamW, one per seed.

  standardize: z-score every feature with the train part's mean and std (constant features -> 0), so
  one optimizer setting suits model states and the lookup table's probabilities alike.
  """
  batch = int(min(batch, len(X_train)))
  if standardize:
    mu, sd = X_train.mean(0), X_train.std(0)
    sd = np.where(sd > 1e-8, sd, np.inf)
    X_train, X_test = (X_train - mu) / sd, (X_test - mu) / sd
  keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
  heads = _train_linear_heads(
    jnp.asarray(X_train, jnp.float32), jnp.asarray(y_train), keys, n_classes=n_classes, epochs=epochs, batch=batch, lr=lr, wd=wd
  )

  def acc(X, y):
    lg = jnp.einsum("nf,sfc->snc", jnp.asarray(X, jnp.float32), heads["w"]) + heads["b"][:, None]
    return np.asarray((lg.argmax(-1) == jnp.asarray(y)[None]).mean(1))

  return acc(X_test, y_test), acc(X_train, y_train)


probe_accuracy = linear_probe_accuracy  # the name of earlier releases


# ----------------------------------------------------------------------------------------------
# Fine-tuning: model + head, seeds vmapped


def finetune_accuracy(
  model, params, train, test, n_classes: int, seeds, *, pool="concat", epochs=10, batch=32, lr=1e-4, warmup=200, wd=0.01
):
  """[S] test accuracy after fine-tuning the whole model plus a linear head (AdamW, warmup + linear decay)."""
  tok_tr, y_tr = jnp.asarray(train["tokens"]), jnp.asarray(train["label"])
  N, L = tok_tr.shape
  batch = int(min(batch, N))
  spe = max(N // batch, 1)
  total = epochs * spe
  tx = optax.adamw(_schedule(lr, total, min(warmup, total // 10)), weight_decay=wd)
  F = model.cfg.d_model * ((L - 2) if pool == "concat" else 1)

  def logits(p, tok):
    return pool_features(M.hidden(model, p["model"], model_batch(tok)), tok, pool) @ p["w"] + p["b"]

  def one(key):
    k_init, k_perm = jax.random.split(key)
    p = {"model": params, "w": jax.random.normal(k_init, (F, n_classes)) / math.sqrt(F), "b": jnp.zeros(n_classes)}
    opt = tx.init(p)

    def step(carry, t):
      p, o = carry
      perm = jax.random.permutation(jax.random.fold_in(k_perm, t // spe), N)
      idx = jax.lax.dynamic_slice(perm, ((t % spe) * batch,), (batch,))
      g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(logits(q, tok_tr[idx]), y_tr[idx]).mean())(p)
      u, o = tx.update(g, o, p)
      return (optax.apply_updates(p, u), o), None

    (p, _), _ = jax.lax.scan(step, (p, opt), jnp.arange(total))
    return (logits(p, jnp.asarray(test["tokens"])).argmax(-1) == jnp.asarray(test["label"])).mean()

  keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
  return np.asarray(jax.jit(jax.vmap(one))(keys))


# ----------------------------------------------------------------------------------------------
# The job


TABLE = "downstream.parquet"
SETTINGS = (
  "probe_epochs",
  "probe_batch",
  "probe_lr",
  "standardize",
  "ft_epochs",
  "ft_batch",
  "ft_lr",
  "ft_warmup",
  "weight_decay",
)


@dataclasses.dataclass(frozen=True)
class Job:
  """Which checkpoints, tasks and methods of a workdir to measure, and how. The fields in SETTINGS are the
  rows' resume key (and `cfg_<field>` columns); `probe_*` are the linear probe's training settings."""

  steps: str = option("all", "'all' or comma-separated checkpoint steps")
  tasks: tuple[str, ...] = option((), "comma-separated task splits (default: every task_* split)")
  methods: tuple[str, ...] = option(("probe",), lambda: f"comma-separated: {', '.join(METHODS)}", flag="method")
  pool: str = option("concat", "concat (BertPoolerC) | mean (BertPoolerCM)")
  seeds: int = option(5, "seeds per (checkpoint, task, method): head init and data order")
  probe_epochs: int = option(50, "linear probe: epochs")
  probe_batch: int = option(64, "linear probe: batch size")
  probe_lr: float = option(1e-3, "linear probe: AdamW learning rate")
  standardize: bool = option(True, "probe raw features (no z-scoring)", flag="no_standardize")
  ft_epochs: int = option(10, "fine-tuning epochs (paper: 10)")
  ft_batch: int = option(32, "fine-tuning batch size")
  ft_lr: float = option(1e-4, "fine-tuning peak lr (paper: 1e-4)")
  ft_warmup: int = option(200, "fine-tuning warmup steps (paper: 200; capped at 10% of steps)")
  weight_decay: float = option(0.01, "AdamW weight decay (linear probe and fine-tuning)")
  mesh: str = option("", "data,fsdp,tensor sizes (default: one device)")
  progress: bool = option(True, "no progress bars", flag="no_progress")


def table_path(workdir: Workdir | str) -> str:
  return os.path.join(workdir.path if isinstance(workdir, Workdir) else workdir, "analysis", TABLE)


def _settings(job: Job) -> dict:
  return {k: getattr(job, k) for k in SETTINGS}


def _settings_key(s: dict) -> str:
  return hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:10]


def eval_metrics_at(workdir: Workdir | str) -> dict[int, dict]:
  """{step: {loss, excess_loss}} from metrics.jsonl eval rows (the MLM exact loss when logged)."""
  out: dict[int, dict] = {}
  path = os.path.join(workdir.path if isinstance(workdir, Workdir) else workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if "eval/loss" in r or "eval/mlm_loss" in r:
        d = out.setdefault(int(r["step"]), {})
        d["loss"] = r.get("eval/mlm_loss", r.get("eval/loss", d.get("loss", np.nan)))
        d["excess_loss"] = r.get("eval/excess_loss", d.get("excess_loss", np.nan))
  return out


def _language(cfg: dict):
  from data import mlm_exact, sources

  spec = next(iter(mlm_exact.group_specs(cfg["data"]).values()))
  if spec.get("kind") not in ("pcfg", "hmm"):
    raise DownstreamError("the lookup-table baseline needs a PCFG or HMM language")
  return sources.language(spec)


def _rows(base: dict, accs, seeds, extra=None) -> list[dict]:
  accs = np.asarray(accs, np.float64)
  mean = float(np.mean(accs)) if len(accs) else np.nan
  se = float(np.std(accs, ddof=1) / np.sqrt(len(accs))) if len(accs) > 1 else np.nan
  return [dict(base, seed=int(s), accuracy=float(a), acc_mean=mean, acc_se=se, **(extra or {})) for s, a in zip(seeds, accs)]


def _plan(wd: Workdir, job: Job) -> tuple[list[str], list[str], list[int]]:
  """(methods, tasks, checkpoint steps) the job asks for, each checked against the workdir (one clear error)."""
  methods = list(job.methods)
  bad = [m for m in methods if m not in METHODS]
  if bad:
    raise DownstreamError(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")
  if job.pool not in POOLS:
    raise DownstreamError(f"--pool must be one of {POOLS}, got {job.pool!r}")
  if job.seeds < 1:
    raise DownstreamError(f"--seeds must be >= 1, got {job.seeds}")
  have = available_tasks(wd)
  tasks = [t for t in job.tasks if t != "all"] or have
  if not have:
    load_task(wd, "task_A", "train", wd.config)  # raises the clear "no task splits" error
  for t in tasks:
    if t not in have:
      raise DownstreamError(f"unknown task {t!r} for {wd.path}; it has {have}")
  if any(METHODS[m].needs_checkpoint for m in methods) and not wd.steps:
    raise DownstreamError(f"{wd.path} has no checkpoints")
  return methods, tasks, wd.select(job.steps)


# ----------------------------------------------------------------------------------------------
# The methods: a registry, each (model, params, (train, test, n_classes), job, seeds) -> (accuracy per seed,
# mean train accuracy or NaN); model and params are None for a method that reads no checkpoint.


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  fn: Callable[..., tuple]
  needs_checkpoint: bool = True  # False: computed once per task (step -1), from the language alone


def _linear_probe(model, params, data, job, seeds, wd=None):
  (tr, te, n_classes), kw = data, _linear_probe_kw(job)
  Xtr, Xte = (extract_features(model, params, d["tokens"], job.pool) for d in (tr, te))
  acc, tr_acc = linear_probe_accuracy(Xtr, tr["label"], Xte, te["label"], n_classes, seeds, **kw)
  return acc, float(np.mean(tr_acc))


def _finetune(model, params, data, job, seeds, wd=None):
  tr, te, n_classes = data
  acc = finetune_accuracy(
    model, params, tr, te, n_classes, seeds, pool=job.pool, epochs=job.ft_epochs, batch=job.ft_batch, lr=job.ft_lr,
    warmup=job.ft_warmup, wd=job.weight_decay,
  )  # fmt: skip
  return acc, np.nan


def _lookup(model, params, data, job, seeds, wd=None):
  (tr, te, n_classes), lang = data, _language(wd.config)
  Xtr, Xte = (lookup_features(lang, d["tokens"], job.pool) for d in (tr, te))
  acc, tr_acc = linear_probe_accuracy(Xtr, tr["label"], Xte, te["label"], n_classes, seeds, **_linear_probe_kw(job))
  return acc, float(np.mean(tr_acc))


METHODS: dict[str, Method] = {
  m.name: m
  for m in (Method("probe", _linear_probe), Method("finetune", _finetune), Method("lookup", _lookup, needs_checkpoint=False))
}


def _accuracies(method: str, step: int, task_data_, *, wd: Workdir, job: Job, seeds, mesh, cache: dict) -> tuple:
  """(test accuracy per seed, mean train accuracy or NaN) of one (checkpoint, task, method); `cache` keeps the
  last checkpoint's params between calls."""
  m = METHODS[method]
  if not m.needs_checkpoint:
    return m.fn(None, None, task_data_, job, seeds, wd=wd)
  if cache.get("step") != step:
    cache["params"], cache["step"] = None, None  # drop the previous checkpoint before restoring the next
    cache["params"], cache["step"] = wd.restore(step, mesh=mesh), step
  return m.fn(wd.model, cache["params"], task_data_, job, seeds, wd=wd)


def run(workdir: Workdir | str, job: Job | argparse.Namespace) -> pd.DataFrame:
  """Measures every requested (checkpoint, task, method, pool) not yet in the table; returns the table.
  (A Namespace of `parse_args` is accepted too, as by earlier releases.)"""
  if isinstance(job, argparse.Namespace):
    from analysis import jobs

    job = jobs.from_args(Job, job)
  wd = Workdir.open(workdir)
  methods, tasks, steps = _plan(wd, job)
  settings = _settings(job)
  key = _settings_key(settings)
  seeds = list(range(job.seeds))
  path = table_path(wd)
  old = pd.read_parquet(path) if os.path.exists(path) else pd.DataFrame()
  done = set()
  if len(old):
    same = old[old["settings"] == key]
    done = set(zip(same["step"], same["task"], same["method"], same["pool"]))
  todo = [(-1, t, m) for t in tasks for m in methods if not METHODS[m].needs_checkpoint]
  todo += [(s, t, m) for s in steps for t in tasks for m in methods if METHODS[m].needs_checkpoint]
  todo = [x for x in todo if (x[0], x[1], x[2], job.pool) not in done]
  evm = eval_metrics_at(wd)
  data = {t: task_data(wd, t, wd.config) for t in tasks}
  mesh = sharding.mesh_from_flag(job.mesh)
  cache: dict = {}
  for step, task, method in tqdm(todo, desc=f"downstream {wd.name}", unit="job", disable=None if job.progress else True):
    t0 = time.time()
    tr, te, n_classes = data[task]
    base = dict(
      run=wd.name,
      step=int(step),
      task=task,
      definition=DEFINITION.get(task, "?"),
      method=method,
      pool=job.pool,
      n_train=len(tr["label"]),
      n_test=len(te["label"]),
      n_classes=n_classes,
      loss=evm.get(step, {}).get("loss", np.nan),
      excess_loss=evm.get(step, {}).get("excess_loss", np.nan),
      settings=key,
      valid=True,
      reason="",
    )
    try:
      acc, tr_acc = _accuracies(method, step, data[task], wd=wd, job=job, seeds=seeds, mesh=mesh, cache=cache)
      rows = _rows(base, acc, seeds, {"train_accuracy": tr_acc})
    except errors.CheckpointError as e:  # damaged checkpoint: invalid rows, go on
      rows = _rows(dict(base, valid=False, reason=str(e)[:300]), [np.nan] * len(seeds), seeds, {"train_accuracy": np.nan})
    for r in rows:
      r["wall_time"] = time.time() - t0
      r.update({f"cfg_{k}": v for k, v in settings.items()})
    new = pd.DataFrame(rows)
    old = pd.concat([old, new], ignore_index=True) if len(old) else new
    if jax.process_index() == 0:
      atomic_parquet(old, path)  # a kill leaves the previous complete table
  return old


def _linear_probe_kw(job: Job) -> dict:
  return dict(epochs=job.probe_epochs, batch=job.probe_batch, lr=job.probe_lr, wd=job.weight_decay, standardize=job.standardize)


def load_downstream(workdirs, valid_only: bool = False) -> pd.DataFrame:
  """The downstream tables of one or more workdirs, concatenated (empty DataFrame when none)."""
  ws = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  dfs = []
  for w in ws:
    p = table_path(w)
    if os.path.exists(p):
      df = pd.read_parquet(p)
      df.insert(0, "workdir", w)
      dfs.append(df)
  df = pd.concat(dfs, ignore_index=True) if dfs else pd.DataFrame()
  return df[df["valid"]] if valid_only and len(df) else df


def parse_args(argv=None) -> argparse.Namespace:
  """The parsed command line (one flag per Job field); `run` takes it as it takes a Job."""
  from analysis import jobs

  return jobs.parser(Job, prog="python -m analysis.downstream", doc=__doc__).parse_args(argv)


def _setup(args) -> None:
  from lib import metrics as MX

  MX.quiet_logs()
  sharding.enable_compilation_cache()


def _report(w, df, args) -> None:
  print(f"{w}: {len(df)} rows in {table_path(w)} ({int((~df['valid']).sum()) if len(df) else 0} invalid)")


def main(argv=None) -> int:
  from analysis import jobs

  rc = jobs.main(
    Job, run, argv, prog="downstream", doc=__doc__, setup=_setup, report=_report,
    kept="the table keeps every checkpoint finished so far", catch=(errors.LmtraceError, ValueError),
  )  # fmt: skip
  if rc:
    sys.exit(rc)
  return rc


if __name__ == "__main__":
  main()
