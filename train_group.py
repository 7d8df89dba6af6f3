"""A seed-vectorised group as the loop's `Runs` (lib/trainloop.py, the loop train.py uses too); the setup
and the hooks a single run has too are trainer.py's, the run-axis pieces lib/multirun.py's. train.py
dispatches here when `train.seeds` is set. Lives beside train.py because it needs data/ (lib/ may not).

  python train.py --config=configs/pcfg.py:nano --workdir=runs/g --config.train.seeds=0-4

The group holds its directory's lock and every member workdir's (multirun.GroupSession), and stops on
SIGTERM/SIGINT at a step boundary with a resume checkpoint of every live run, like a single run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import trainer
from lib import ckpt as C
from lib import errors, sharding, steps
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


def train_group(cfg, workdir: str, *, seeds, hooks=()) -> dict:
  """Trains (or resumes) the runs `seeds` of `cfg` as one vectorised program; returns {seed: final metrics}.

  `hooks`: more `lib.trainloop.Hook`s, fired after the trainer's own; they see the stacked state (a
  leading run axis on every leaf) and write one row for every run or a list of rows, one per run.
  """
  why = unvectorisable(cfg)
  if why:
    raise errors.ConfigError(f"train.seeds={cfg.train.seeds!r} cannot be vectorised with {why}")
  mode = run_mode(cfg.train.get("seeds_mode", "auto"))
  if cfg.train.batch_size % cfg.train.grad_accum:
    raise errors.ConfigError(
      f"train.batch_size={cfg.train.batch_size} is not divisible by train.grad_accum={cfg.train.grad_accum}"
    )
  su = trainer.Setup.build(cfg)
  # One ordinary workdir per run, each with its own seed in config.json (checked before anything is written).
  wds = run_workdirs(workdir, seeds)
  base_dict = dict(su.cfg_dict, train=dict(su.cfg_dict["train"], seeds=""))
  configs = [dict(base_dict, seed=s) for s in seeds]
  for wd, d in zip(wds, configs):
    trainer.check_workdir(wd, d)
  with GroupSession(workdir, wds) as run:
    for wd, d in zip(wds, configs):
      trainer.claim_workdir(wd, d)
    if jax.process_index() == 0:
      C.save_json(os.path.join(workdir, GROUP), {"seeds": list(seeds), "workdirs": [os.path.basename(w) for w in wds]})
    return _train(su, workdir, run, seeds=seeds, mode=mode, hooks=hooks)


@dataclasses.dataclass
class GroupRuns:
  """k runs with a leading run axis as the loop's `Runs`: one step, k rows, k evals, k checkpoints."""

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

  def tokens_seen(self, step: int) -> int:
    return step * self.batch * self.seq_len

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

  def _show(self, step: int, row: dict, live) -> None:
    if jax.process_index() == 0:
      tail = f"  [seed {self.seeds[live[0]]}; {len(live)}/{len(self.seeds)} runs]"
      print(MX.console_line(step, self.total, row) + tail, flush=True)

  def log(self, step: int, fetched: list, batch_np, *, dt: float, n_steps: int) -> None:
    self._check(fetched)
    R = len(self.seeds)
    tps = n_steps * self.batch * self.seq_len * R / max(dt, 1e-9)
    perf = {
      "perf/tokens_per_s": tps / R,
      "perf/group_tokens_per_s": tps,
      "perf/step_time": dt / max(n_steps, 1),
      "perf/tokens_seen": self.tokens_seen(step),
      "perf/flops_per_token": self.fpt,
    }
    self.write(step, [self._row(fetched[-1][1], i, perf) for i in range(R)], show=True)

  def eval_runs(self, params, batches=None) -> list[dict]:
    """Every run's eval metrics over `batches` (None: the validation sets), one jitted call (over the run
    axis) per batch."""
    total_ = None
    for batch in self.eval_sets if batches is None else batches:
      s_ = jax.tree.map(np.asarray, self.p_eval(params, batch))
      total_ = s_ if total_ is None else {k: total_[k] + s_[k] for k in total_.keys() & s_.keys()}
    return [steps.finish_eval(jax.tree.map(lambda x: x[i], total_), self.names) for i in range(len(self.seeds))]

  def write(self, step: int, rows, show: bool = False) -> None:
    """Writes `rows` (one dict for every run, or one per run) for the live runs; a diverged run writes none."""
    live = np.flatnonzero(self.alive)
    for i in live:
      row = rows if isinstance(rows, dict) else rows[i]
      self.writers[i].write(step, row)
      self.last_m[i].update(row)
    if show and len(live):
      self._show(step, rows if isinstance(rows, dict) else rows[live[0]], live)

  def wants_save(self, step: int, last: bool) -> bool:
    return any(self.ckpts[0].wants(step, last))

  def save(self, step: int, state, last: bool = False) -> None:
    if not self.wants_save(step, last):
      return
    tokens = self.tokens_seen(step)
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


def _train(su: trainer.Setup, workdir: str, run, *, seeds, mode: str, hooks=()) -> dict:
  cfg, mesh, names = su.cfg, su.mesh, su.names
  B, L, total, R = cfg.train.batch_size, cfg.data.seq_len, cfg.train.steps, len(seeds)
  wds = run_workdirs(workdir, seeds)
  shared_data = cfg.data.seed >= 0
  p_static = su.controller.proportions(su.controller.init(), 0) if len(names) > 1 else None
  pipes = [su.pipeline(cfg.data.seed)] if shared_data else []
  for s in [] if shared_data else seeds:  # every run's order reads the first pipeline's decoded split
    pipes.append(su.pipeline(s, pipes[0].sources if pipes else None))
  group_sh = jax.tree.map(stacked_sharding, su.state_sh)
  n_params = M.param_count(su.model)

  ckpts = [run.closing(C.Checkpointer.from_config(wd, cfg.ckpt, total)) for wd in wds]
  alive = np.array([not os.path.exists(os.path.join(wd, DIVERGED)) for wd in wds])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    p_init = jax.jit(su.init_state, out_shardings=su.state_sh)  # exactly a single run's init for seed s
    target = su.restore_target()
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
    kw = dict(model=su.model, tx=su.tx, schedule=su.sched, grad_accum=cfg.train.grad_accum, num_groups=len(names))
    runs = GroupRuns(
      seeds=list(seeds), wds=wds, workdir=workdir, its=[], shared_data=shared_data, names=names, ckpts=ckpts,
      writers=writers, alive=alive,
      p_train=jax.jit(
        functools.partial(group_train_step, shared_batch=shared_data, mode=mode, **kw),
        out_shardings=(group_sh, None),
        donate_argnums=(0,),
      ),
      p_eval=jax.jit(functools.partial(group_eval_step, mode=mode, model=su.model, num_groups=len(names))),
      p_take=jax.jit(take, out_shardings=su.state_sh), p_static=p_static, eval_sets=su.held_out("validation"),
      mesh=mesh, batch=B, seq_len=L, total=total, fpt=M.flops_per_token(su.mcfg, L, n_params),
      stop_on_nan=cfg.train.stop_on_nan, last_m=[{} for _ in seeds],
    )  # fmt: skip
    p_fn = (lambda s: p_static) if len(names) > 1 else None
    runs.its = [p.iterator(step, total, p_fn, num_threads=cfg.data.num_threads) for p in pipes]
    print(
      f"lmtrace: {R} runs (seeds {list(seeds)}) in one program ({mode}), {n_params:,} params each, mesh {dict(mesh.shape)}, "
      f"steps {step}->{total}, group {os.path.abspath(workdir)}",
      flush=True,
    )
    loop = su.loop(run.stop_requested, [*trainer.standard_hooks(su), *hooks])
    with trainer.timed("loop"):
      state, step = loop.run(runs, state, step, fresh=step0 is None)
    with trainer.timed("ckpt_close"):
      for ck in ckpts:
        ck.wait()
  if step < loop.stop:  # left the loop early: stopped by a signal, with a resume checkpoint of every live run
    raise run.guard.preempted(step, workdir)
  return {s: dict(runs.last_m[i], step=step, diverged=not bool(alive[i])) for i, s in enumerate(seeds)}
