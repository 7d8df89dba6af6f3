"""The training loop of a seed-vectorised group (lib/multirun.py has the run-axis pieces; train.py
dispatches here when `train.seeds` is set). Lives beside train.py because it needs data/ (lib/ may not).

  python train.py --config=configs/pcfg.py:nano --workdir=runs/g --config.train.seeds=0-4
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from data import pipeline as dp
from data import sources
from lib import ckpt as C
from lib import errors, mixture, optim, schedules, sharding, steps
from lib import metrics as MX
from lib import model as M
from lib.multirun import (
  DIVERGED,
  GROUP,
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


def train_group(cfg, workdir: str, *, seeds, state_shardings, check_workdir) -> dict:
  """Trains (or resumes) the runs `seeds` of `cfg` as one vectorised program; returns {seed: final metrics}.

  `state_shardings(model, tx, mesh)` and `check_workdir(workdir, cfg_dict)` are the trainer's own (train.py).
  """
  why = unvectorisable(cfg)
  if why:
    raise errors.ConfigError(f"train.seeds={cfg.train.seeds!r} cannot be vectorised with {why}")
  mode = run_mode(cfg.train.get("seeds_mode", "auto"))
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(cfg.mesh)
  B, L, total = cfg.train.batch_size, cfg.data.seq_len, cfg.train.steps
  R = len(seeds)
  sharding.check_batch(mesh, B, "train.batch_size")
  sharding.check_batch(mesh, cfg.eval.batch_size, "eval.batch_size")
  if B % cfg.train.grad_accum:
    raise errors.ConfigError(f"train.batch_size={B} is not divisible by train.grad_accum={cfg.train.grad_accum}")

  groups = sources.make_groups(cfg.data)
  names = [g.name for g in groups]
  vocab_size = groups[0].vocab_size
  mcfg = M.ModelConfig.from_config(cfg.model)
  if mcfg.vocab_size == -1:
    mcfg = M.ModelConfig(**{**vars(mcfg), "vocab_size": vocab_size})
  elif mcfg.vocab_size < vocab_size:
    raise errors.ConfigError(f"model.vocab_size={mcfg.vocab_size} is smaller than the data's vocabulary ({vocab_size})")
  if L > mcfg.max_len:
    raise errors.ConfigError(f"data.seq_len={L} exceeds model.max_len={mcfg.max_len}")
  model = M.make(mcfg)

  # One ordinary workdir per run, each with its own seed in config.json.
  wds = run_workdirs(workdir, seeds)
  base_dict = json.loads(cfg.to_json_best_effort())
  base_dict["model"] = dict(vars(mcfg), preset=cfg.model.get("preset", ""))
  base_dict["train"]["seeds"] = ""
  for s, wd in zip(seeds, wds):
    d = dict(base_dict, seed=s)
    check_workdir(wd, d)
    os.makedirs(wd, exist_ok=True)
    if jax.process_index() == 0 and not os.path.exists(os.path.join(wd, "config.json")):
      C.save_json(os.path.join(wd, "config.json"), d)
  if jax.process_index() == 0:
    C.save_json(os.path.join(workdir, GROUP), {"seeds": list(seeds), "workdirs": [os.path.basename(w) for w in wds]})

  shared_data = cfg.data.seed >= 0
  lo, hi = sharding.local_rows(mesh, B)
  controller = mixture.make(cfg.mixture, names)
  mix0 = controller.init()
  p_static = controller.proportions(mix0, 0) if len(groups) > 1 else None
  pipes = [
    dp.Pipeline(
      [sources.select_split(g, "train") for g in groups],
      seed=cfg.data.seed if shared_data else s,
      global_batch=B,
      seq_len=L,
      rows=(lo, hi),
      docs_per_row=cfg.data.docs_per_row if cfg.data.packing else 1,
      objective=cfg.data.objective,
      vocab_size=vocab_size,
      group_names=names,
      cache_tokens=cfg.data.cache_tokens,
    )
    for s in (seeds[:1] if shared_data else seeds)
  ]
  elo, ehi = sharding.local_rows(mesh, cfg.eval.batch_size)
  eval_sets = []
  for gi, g in enumerate(groups):
    for b in dp.eval_batches(
      sources.select_split(g, "validation"),
      batch_size=cfg.eval.batch_size,
      seq_len=L,
      num_batches=cfg.eval.batches,
      rows=(elo, ehi),
      objective=cfg.data.objective,
      vocab_size=vocab_size,
      max_docs_per_row=None if cfg.data.packing else 1,
    ):
      if len(groups) > 1:
        b["group"] = np.full(b["inputs"].shape[0], gi, np.int32)
      eval_sets.append(sharding.global_batch_from_local(mesh, b, cfg.eval.batch_size))

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

  analysis_steps = schedules.analysis_steps(schedules.parse_schedules(cfg.ckpt.schedule), total)
  ckpts = [
    C.Checkpointer(
      wd,
      analysis_steps=analysis_steps,
      resume_every=cfg.ckpt.resume_every,
      keep_resume=cfg.ckpt.keep_resume,
      params_only=cfg.ckpt.params_only,
      async_=cfg.ckpt.async_save,
    )
    for wd in wds
  ]
  writers = [MX.Writer(wd, cfg.log.tensorboard) for wd in wds]
  alive = np.array([not os.path.exists(os.path.join(wd, DIVERGED)) for wd in wds])
  rules = nn.logical_axis_rules(sharding.RULES)
  try:
    with jax.set_mesh(mesh), rules:
      p_init = jax.jit(init_state, out_shardings=state_sh)
      p_stack = jax.jit(lambda *xs: stack(xs), out_shardings=group_sh)
      p_take = jax.jit(take, out_shardings=state_sh)
      abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0))
      target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh)
      restored = [ck.restore_latest(target) if a else None for ck, a in zip(ckpts, alive)]
      got = {int(r[0]["step"]) for r, a in zip(restored, alive) if a and r is not None}
      resumed = bool(got) and all(r is not None for r, a in zip(restored, alive) if a)
      if len(got) > 1:
        raise errors.CheckpointError(
          f"the runs of group {workdir} resume from different steps {sorted(got)}; resume them one by one with train.py "
          "--workdir=<run> --config.seed=<s>, or delete the group"
        )
      singles = [
        r[0] if (resumed and r is not None) else p_init(jax.random.PRNGKey(s)) for s, r in zip(seeds, restored, strict=True)
      ]
      step = next(iter(got)) if resumed else 0
      # a diverged run keeps a placeholder slot (its fresh init) so the program's shape stays fixed
      singles = [dict(x, step=jnp.asarray(step, jnp.int32)) for x in singles]
      state = p_stack(*singles)
      del singles, restored
      if resumed:
        log.info("resumed group of %d runs from step %d in %s", R, step, workdir)
      tokens_seen = step * B * L

      kw = dict(model=model, tx=tx, schedule=sched, grad_accum=cfg.train.grad_accum, num_groups=len(groups))
      p_train = jax.jit(
        functools.partial(group_train_step, shared_batch=shared_data, mode=mode, **kw),
        out_shardings=(group_sh, None),
        donate_argnums=(0,),
      )
      p_eval = jax.jit(functools.partial(group_eval_step, mode=mode, model=model, num_groups=len(groups)))
      fpt = M.flops_per_token(mcfg, L, n_params)

      def save(step_, last=False):
        a, r = ckpts[0].wants(step_, last)
        if not (a or r):
          return
        meta = {"step": step_, "tokens_seen": tokens_seen, "data_step": step_, "time": time.time(), "group_names": names}
        if p_static is not None:
          meta["mixture_p"] = p_static.tolist()
        for i in np.flatnonzero(alive):
          ckpts[i].save(step_, p_take(state, i), meta, last=last)

      def evaluate(step_) -> list[dict]:
        total_ = None
        for batch in eval_sets:
          s_ = jax.tree.map(np.asarray, p_eval(state["params"], batch))
          total_ = s_ if total_ is None else {k: total_[k] + s_[k] for k in total_.keys() & s_.keys()}
        out = [steps.finish_eval(jax.tree.map(lambda x: x[i], total_), names) for i in range(R)]
        for i in np.flatnonzero(alive):
          writers[i].write(step_, out[i])
        return out

      last_m = [{} for _ in range(R)]
      if not resumed:
        save(0)
        if cfg.eval.every:
          evaluate(0)
      p_fn = (lambda s: p_static) if len(groups) > 1 else None
      its = [p.iterator(step, total, p_fn, num_threads=cfg.data.num_threads) for p in pipes]
      pending = []
      t_last, step_last = time.time(), step
      print(
        f"lmtrace: {R} runs (seeds {list(seeds)}) in one program ({mode}), {n_params:,} params each, mesh {dict(mesh.shape)}, "
        f"steps {step}->{total}, group {os.path.abspath(workdir)}",
        flush=True,
      )
      stop = min(total, cfg.train.stop_at or total)
      while step < stop:
        batches_np = [next(it) for it in its]
        glob = [sharding.global_batch_from_local(mesh, b, B) for b in batches_np]
        state, m = p_train(state, glob[0] if shared_data else tuple(glob))
        step += 1
        tokens_seen += B * L
        pending.append((step, m))
        do_eval = bool(cfg.eval.every) and (step % cfg.eval.every == 0 or step == total)
        a, r = ckpts[0].wants(step, step == stop)
        if step % cfg.train.log_every == 0 or do_eval or a or r or step == stop:
          fetched = jax.device_get(pending)
          for s_, m_ in fetched:
            bad = alive & ~finite_runs(m_["train/loss"])
            for i in np.flatnonzero(bad):
              msg = (
                f"run seed={seeds[i]} diverged: non-finite training loss {m_['train/loss'][i]} at step {s_}; its last "
                f"checkpoints in {wds[i]} are intact, the other runs go on"
              )
              print(f"lmtrace: {msg}", flush=True)
              log.warning(msg)
              if jax.process_index() == 0:
                C.save_json(os.path.join(wds[i], DIVERGED), {"step": int(s_), "loss": float(m_["train/loss"][i])})
            if cfg.train.stop_on_nan:
              alive &= ~bad
          if not alive.any():
            raise errors.TrainingDiverged(f"every run of group {workdir} diverged (see each run's {DIVERGED})")
          dt = time.time() - t_last
          s_, m_ = fetched[-1]
          tps = (step - step_last) * B * L * R / max(dt, 1e-9)
          rows = {}
          for i in np.flatnonzero(alive):
            row = {k: v[i] for k, v in m_.items()}
            row.update(
              {
                "perf/tokens_per_s": tps / R,
                "perf/group_tokens_per_s": tps,
                "perf/step_time": dt / max(step - step_last, 1),
                "perf/tokens_seen": tokens_seen,
                "perf/flops_per_token": fpt,
              }
            )
            if len(groups) > 1:
              row.pop("train/group_tokens", None)
              gl = row.pop("train/group_loss")
              for gi, n in enumerate(names):
                row[f"train/{n}/loss"] = float(gl[gi])
                row[f"mixture/p/{n}"] = float(p_static[gi])
            writers[i].write(step, row)
            last_m[i].update(row)
            rows.setdefault(i, row)
          if jax.process_index() == 0:
            i0 = min(rows)
            print(MX.console_line(step, total, rows[i0]) + f"  [seed {seeds[i0]}; {int(alive.sum())}/{R} runs]", flush=True)
          pending = []
          t_last, step_last = time.time(), step
        if do_eval:
          ems = evaluate(step)
          for i in np.flatnonzero(alive):
            last_m[i].update(ems[i])
          t_last = time.time()
        save(step, last=step == stop)
  finally:
    for ck in ckpts:
      ck.wait()
      ck.close()
    for w in writers:
      w.close()
  out = {}
  for i, s in enumerate(seeds):
    last_m[i]["step"] = step
    last_m[i]["diverged"] = not bool(alive[i])
    out[s] = last_m[i]
  return out
