"""A seed-vectorised group as the trainer's `Runs` (lib/trainloop.py, the loop train.py uses too);
lib/multirun.py has the run-axis pieces; train.py dispatches here when `train.seeds` is set. Lives beside
train.py because it needs data/ (lib/ may not).

  python train.py --config=configs/pcfg.py:nano --workdir=runs/g --config.train.seeds=0-4

The group holds its directory's lock and every member workdir's (multirun.GroupSession), and stops on
SIGTERM/SIGINT at a step boundary with a resume checkpoint of every live run, like a single run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from data import pipeline as dp
from data import sources
from lib import ckpt as C
from lib import errors, mixture, optim, sharding, steps, trainloop
from lib import metrics as MX
from lib import model as M
from lib.multirun import (
  DIVERGED,
  GROUP,
  GroupSession,
  finite_runs,
  group_eval_step,
  group_train_step,
  run_mode,
  run_workdirs,
  stack,
  stacked_sharding,
  take,
  unvectorisable,
)

log = logging.getLogger("lmtrace")


def train_group(cfg, workdir: str, *, seeds, state_shardings, check_workdir, test_metrics) -> dict:
  """Trains (or resumes) the runs `seeds` of `cfg` as one vectorised program; returns {seed: final metrics}.

  `state_shardings(model, tx, mesh)`, `check_workdir(workdir, cfg_dict)` and `test_metrics(em, names)` (the
  end-of-run test-split row) are the trainer's own (train.py).
  """
  why = unvectorisable(cfg)
  if why:
    raise errors.ConfigError(f"train.seeds={cfg.train.seeds!r} cannot be vectorised with {why}")
  mode = run_mode(cfg.train.get("seeds_mode", "auto"))
  mesh = sharding.make_mesh(cfg.mesh)
  sharding.check_batch(mesh, cfg.train.batch_size, "train.batch_size")
  sharding.check_batch(mesh, cfg.eval.batch_size, "eval.batch_size")
  if cfg.train.batch_size % cfg.train.grad_accum:
    raise errors.ConfigError(
      f"train.batch_size={cfg.train.batch_size} is not divisible by train.grad_accum={cfg.train.grad_accum}"
    )
  groups = sources.make_groups(cfg.data)
  mcfg = M.ModelConfig.for_run(cfg, groups[0].vocab_size)
  # One ordinary workdir per run, each with its own seed in config.json (checked before anything is written).
  wds = run_workdirs(workdir, seeds)
  base_dict = json.loads(cfg.to_json_best_effort())
  base_dict["model"] = dict(vars(mcfg), preset=cfg.model.get("preset", ""))
  base_dict["train"]["seeds"] = ""
  configs = [dict(base_dict, seed=s) for s in seeds]
  for wd, d in zip(wds, configs):
    check_workdir(wd, d)
  with GroupSession(workdir, wds) as run:
    if jax.process_index() == 0:
      for wd, d in zip(wds, configs):
        if not os.path.exists(os.path.join(wd, "config.json")):
          C.save_json(os.path.join(wd, "config.json"), d)
      C.save_json(os.path.join(workdir, GROUP), {"seeds": list(seeds), "workdirs": [os.path.basename(w) for w in wds]})
    return _train(
      cfg, workdir, run, seeds=seeds, mode=mode, mesh=mesh, groups=groups, mcfg=mcfg, state_shardings=state_shardings,
      test_metrics=test_metrics,
    )  # fmt: skip


def _pipelines(cfg, groups, seeds, mesh, shared_data: bool) -> list:
  """One pipeline (shared data order) or one per run; the training split is decoded once for all of them."""
  lo, hi = sharding.local_rows(mesh, cfg.train.batch_size)
  train_srcs = [sources.select_split(g, "train") for g in groups]
  pipes = []
  for s in seeds[:1] if shared_data else seeds:
    pipes.append(
      dp.Pipeline(
        pipes[0].sources if pipes else train_srcs,  # RaggedSource after the first: every run's order reads one cache
        seed=cfg.data.seed if shared_data else s,
        global_batch=cfg.train.batch_size,
        seq_len=cfg.data.seq_len,
        rows=(lo, hi),
        docs_per_row=cfg.data.docs_per_row if cfg.data.packing else 1,
        objective=cfg.data.objective,
        vocab_size=groups[0].vocab_size,
        group_names=[g.name for g in groups],
        cache_tokens=cfg.data.cache_tokens,
      )
    )
  return pipes


@dataclasses.dataclass
class GroupRuns:
  """k runs with a leading run axis as the shared loop's `Runs`: one step, k rows, k evals, k checkpoints."""

  seeds: list
  wds: list
  workdir: str
  its: list  # one batch iterator (shared data order) or one per run
  shared_data: bool
  p_train: Any
  p_eval: Any
  p_take: Any
  eval_sets: list
  names: list
  ckpts: list
  writers: list
  alive: np.ndarray
  p_static: Any  # the static mixture proportions (several groups) or None
  mesh: Any
  batch: int
  seq_len: int
  total: int
  fpt: float
  stop_on_nan: bool
  last_m: list = dataclasses.field(default_factory=list)

  def train(self, state, step: int):
    batches_np = [next(it) for it in self.its]
    glob = [sharding.global_batch_from_local(self.mesh, b, self.batch) for b in batches_np]
    state, m = self.p_train(state, glob[0] if self.shared_data else tuple(glob))
    return state, m, batches_np

  def _check(self, fetched) -> None:
    """Marks runs whose loss turned non-finite as diverged (diverged.json); they write nothing more."""
    for s_, m_ in fetched:
      bad = self.alive & ~finite_runs(m_["train/loss"])
      for i in np.flatnonzero(bad):
        msg = (
          f"run seed={self.seeds[i]} diverged: non-finite training loss {m_['train/loss'][i]} at step {s_}; its last "
          f"checkpoints in {self.wds[i]} are intact, the other runs go on"
        )
        print(f"lmtrace: {msg}", flush=True)
        log.warning(msg)
        if jax.process_index() == 0:
          C.save_json(os.path.join(self.wds[i], DIVERGED), {"step": int(s_), "loss": float(m_["train/loss"][i])})
      if self.stop_on_nan:
        self.alive &= ~bad
    if not self.alive.any():
      raise errors.TrainingDiverged(f"every run of group {self.workdir} diverged (see each run's {DIVERGED})")

  def _row(self, m_: dict, i: int, perf: dict) -> dict:
    row = {k: v[i] for k, v in m_.items()}
    row.update(perf)
    if self.p_static is not None:
      row.pop("train/group_tokens", None)
      gl = row.pop("train/group_loss")
      for gi, n in enumerate(self.names):
        row[f"train/{n}/loss"] = float(gl[gi])
        row[f"mixture/p/{n}"] = float(self.p_static[gi])
    return row

  def log(self, step: int, fetched: list, batch_np, *, dt: float, n_steps: int) -> None:
    self._check(fetched)
    R = len(self.seeds)
    tps = n_steps * self.batch * self.seq_len * R / max(dt, 1e-9)
    perf = {
      "perf/tokens_per_s": tps / R,
      "perf/group_tokens_per_s": tps,
      "perf/step_time": dt / max(n_steps, 1),
      "perf/tokens_seen": step * self.batch * self.seq_len,
      "perf/flops_per_token": self.fpt,
    }
    live = np.flatnonzero(self.alive)
    for i in live:
      row = self._row(fetched[-1][1], i, perf)
      self.writers[i].write(step, row)
      self.last_m[i].update(row)
      if i == live[0] and jax.process_index() == 0:
        print(MX.console_line(step, self.total, row) + f"  [seed {self.seeds[i]}; {len(live)}/{R} runs]", flush=True)

  def _eval(self, params, eval_sets) -> list[dict]:
    """Every run's eval metrics over `eval_sets`, in one jitted call (over the run axis) per batch."""
    total_ = None
    for batch in eval_sets:
      s_ = jax.tree.map(np.asarray, self.p_eval(params, batch))
      total_ = s_ if total_ is None else {k: total_[k] + s_[k] for k in total_.keys() & s_.keys()}
    return [steps.finish_eval(jax.tree.map(lambda x: x[i], total_), self.names) for i in range(len(self.seeds))]

  def eval_all(self, step: int, params) -> list[dict]:
    """Every run's validation metrics in one jitted call per eval batch; written for the live runs."""
    out = self._eval(params, self.eval_sets)
    for i in np.flatnonzero(self.alive):
      self.writers[i].write(step, out[i])
    return out

  def test_eval(self, step: int, params, test_sets: list, test_metrics) -> None:
    """Each live run's end-of-run test-split row (train.test_eval's keys: test/<group>/ppl, test/avg_ppl, ...)
    from the group's eval program over the run axis; a diverged run writes none."""
    ems = self._eval(params, test_sets)
    for i in np.flatnonzero(self.alive):
      row = test_metrics(ems[i], self.names)
      self.writers[i].write(step, row)
      self.last_m[i].update(row)

  def evaluate(self, step: int, state, mix: bool):
    ems = self.eval_all(step, state["params"])
    for i in np.flatnonzero(self.alive):
      self.last_m[i].update(ems[i])
    return state

  def wants_save(self, step: int, last: bool) -> bool:
    return any(self.ckpts[0].wants(step, last))

  def wants_mix(self, step: int) -> bool:
    return False

  def save(self, step: int, state, last: bool = False) -> None:
    if not self.wants_save(step, last):
      return
    tokens = step * self.batch * self.seq_len
    meta = {"step": step, "tokens_seen": tokens, "data_step": step, "time": time.time(), "group_names": self.names}
    if self.p_static is not None:
      meta["mixture_p"] = self.p_static.tolist()
    for i in np.flatnonzero(self.alive):
      self.ckpts[i].save(step, self.p_take(state, i), meta, last=last)


def _resume_step(restored, alive, workdir: str) -> int | None:
  """The live runs' common newest checkpoint step; None: a fresh start (some live run has none)."""
  got = {int(r[0]["step"]) for r, a in zip(restored, alive) if a and r is not None}
  if len(got) > 1:
    raise errors.CheckpointError(
      f"the runs of group {workdir} resume from different steps {sorted(got)}; resume them one by one with train.py "
      "--workdir=<run> --config.seed=<s>, or delete the group"
    )
  resumed = bool(got) and all(r is not None for r, a in zip(restored, alive) if a)
  return next(iter(got)) if resumed else None


def _train(cfg, workdir: str, run, *, seeds, mode: str, mesh, groups, mcfg, state_shardings, test_metrics) -> dict:
  B, L, total, R = cfg.train.batch_size, cfg.data.seq_len, cfg.train.steps, len(seeds)
  names = [g.name for g in groups]
  model = M.make(mcfg)
  wds = run_workdirs(workdir, seeds)
  shared_data = cfg.data.seed >= 0
  controller = mixture.make(cfg.mixture, names)
  mix0 = controller.init()
  p_static = controller.proportions(mix0, 0) if len(groups) > 1 else None
  pipes = _pipelines(cfg, groups, seeds, mesh, shared_data)
  tx, sched = optim.make_optimizer(cfg.opt, total)
  state_sh = state_shardings(model, tx, mesh)
  state_sh["mixture"] = jax.tree.map(lambda _: sharding.replicated(mesh), mix0)
  group_sh = jax.tree.map(stacked_sharding, state_sh)
  n_params = M.param_count(model)

  def init_state(key):  # exactly train.py's init for seed s (key = PRNGKey(s))
    params = nn.unbox(model.init(key, *(M.dummy_batch(mcfg, 1, 8)[k] for k in ("inputs", "positions", "segment_ids")))["params"])
    return {
      "params": params,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.fold_in(key, 1),
      "mixture": jax.tree.map(jnp.asarray, mix0),
    }

  ckpts = [run.closing(C.Checkpointer.from_config(wd, cfg.ckpt, total)) for wd in wds]
  alive = np.array([not os.path.exists(os.path.join(wd, DIVERGED)) for wd in wds])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    p_init = jax.jit(init_state, out_shardings=state_sh)
    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh)
    restored = [ck.restore_latest(target) if a else None for ck, a in zip(ckpts, alive)]
    step0 = _resume_step(restored, alive, workdir)
    step = step0 or 0
    # a diverged run keeps a placeholder slot (its fresh init) so the program's shape stays fixed
    singles = [r[0] if (step0 is not None and r is not None) else p_init(jax.random.PRNGKey(s)) for s, r in zip(seeds, restored)]
    state = jax.jit(lambda *xs: stack(xs), out_shardings=group_sh)(*(dict(x, step=jnp.asarray(step, jnp.int32)) for x in singles))
    del singles, restored
    if step0 is not None:
      log.info("resumed group of %d runs from step %d in %s", R, step, workdir)
    # a live run drops rows an interrupted earlier pass logged after its checkpoint (each step once); a diverged run's stay
    keep = [(step if step0 is not None else -1) if a else None for a in alive]
    writers = [run.closing(MX.Writer(wd, cfg.log.tensorboard, keep_upto=k)) for wd, k in zip(wds, keep)]
    kw = dict(model=model, tx=tx, schedule=sched, grad_accum=cfg.train.grad_accum, num_groups=len(groups))
    runs = GroupRuns(
      seeds=list(seeds), wds=wds, workdir=workdir, its=[], shared_data=shared_data, names=names, ckpts=ckpts,
      writers=writers, alive=alive,
      p_train=jax.jit(
        functools.partial(group_train_step, shared_batch=shared_data, mode=mode, **kw),
        out_shardings=(group_sh, None),
        donate_argnums=(0,),
      ),
      p_eval=jax.jit(functools.partial(group_eval_step, mode=mode, model=model, num_groups=len(groups))),
      p_take=jax.jit(take, out_shardings=state_sh), p_static=p_static,
      eval_sets=dp.held_out_batches(groups, "validation", cfg, mesh),
      mesh=mesh, batch=B, seq_len=L, total=total, fpt=M.flops_per_token(mcfg, L, n_params),
      stop_on_nan=cfg.train.stop_on_nan, last_m=[{} for _ in seeds],
    )  # fmt: skip
    if step0 is None:
      runs.save(0, state)
      if cfg.eval.every:
        runs.eval_all(0, state["params"])
    p_fn = (lambda s: p_static) if len(groups) > 1 else None
    runs.its = [p.iterator(step, total, p_fn, num_threads=cfg.data.num_threads) for p in pipes]
    print(
      f"lmtrace: {R} runs (seeds {list(seeds)}) in one program ({mode}), {n_params:,} params each, mesh {dict(mesh.shape)}, "
      f"steps {step}->{total}, group {os.path.abspath(workdir)}",
      flush=True,
    )
    stop = min(total, cfg.train.stop_at or total)
    state, step = trainloop.run(
      runs, state, step, stop=stop, total=total, log_every=cfg.train.log_every, eval_every=cfg.eval.every,
      stop_requested=run.stop_requested,
    )  # fmt: skip
    # like train.test_eval: once, when this process took the group to its end (a rerun of a finished group writes no
    # second row), if every data group has a test split
    if step == total > (step0 or 0) and cfg.eval.test_at_end and all("test" in g.splits for g in groups):
      runs.test_eval(step, state["params"], dp.held_out_batches(groups, "test", cfg, mesh), test_metrics)
  if step < stop:  # left the loop early: stopped by a signal, with a resume checkpoint of every live run
    raise run.guard.preempted(step, workdir)
  return {s: dict(runs.last_m[i], step=step, diverged=not bool(alive[i])) for i, s in enumerate(seeds)}
