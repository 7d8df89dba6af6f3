"""lmtrace trainer: mesh -> data -> init and shard -> resume -> loop (eval, checkpoints) -> final eval.

  python train.py --config=configs/pcfg.py --workdir=runs/pcfg [--config.opt.lr=1e-3 ...]

The workdir is the run's identity: rerunning the same command resumes bit-for-bit from the newest
readable full checkpoint (resume order: workdir checkpoint > fresh init). A workdir holding a run of
another model, data or seed is refused rather than overwritten.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from data import pipeline as dp
from data import sources
from lib import ckpt as C
from lib import errors, mixture, optim, schedules, sharding, steps
from lib import metrics as MX
from lib import model as M

log = logging.getLogger("lmtrace")
IDENTITY_SECTIONS = ("model", "data", "seed")  # must match to resume in an existing workdir
INFORMATIONAL_KEYS = ("preset", "num_threads", "data_dir")  # may differ on resume


TrainingDiverged = errors.TrainingDiverged  # re-exported


def check_workdir(workdir: str, cfg_dict: dict) -> None:
  """Refuses to resume a run whose model, data or seed differ from this config's."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  diffs = []
  for sec in IDENTITY_SECTIONS:
    a, b = old.get(sec), cfg_dict.get(sec)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += [
        f"{sec}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in INFORMATIONAL_KEYS
      ]
    elif a != b:
      diffs.append(f"{sec}: {a!r} -> {b!r}")
  if diffs:
    raise C.CheckpointError(
      f"workdir {workdir} holds a run with a different {', '.join(sorted({d.split('.')[0].split(':')[0] for d in diffs}))} "
      f"({'; '.join(diffs[:6])}). Use a new --workdir, or delete {workdir} to start over."
    )


def state_shardings(model, tx, mesh):
  """Abstract train state and its shardings (optimizer moments follow their parameters)."""
  params_sh = M.param_shardings(model, mesh)
  shapes, _ = M.abstract_params(model)
  opt_shapes = jax.eval_shape(tx.init, shapes)
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(
    tx, lambda o, p, s: s if o.shape == p.shape else repl, opt_shapes, shapes, params_sh, transform_non_params=lambda _: repl
  )
  state_sh = {"params": params_sh, "opt_state": opt_sh, "step": repl, "rng": repl}
  return state_sh


def fingerprint(batch_np: dict) -> int:
  """CRC32 of this host's batch at the logged step (lets a test prove resumed runs see the same data)."""
  import zlib

  return zlib.crc32(b"".join(np.ascontiguousarray(batch_np[k]).tobytes() for k in sorted(batch_np)))


def run_eval(p_eval, params, eval_sets, names) -> dict:
  total = None
  for batch in eval_sets:
    s = jax.tree.map(np.asarray, p_eval(params, batch))
    if total is None:
      total = s
    else:  # groups without exact log-probs (text) drop the optimum for the whole set
      total = {k: total[k] + s[k] for k in total.keys() & s.keys()}
  return steps.finish_eval(total, names)


def train_and_evaluate(cfg, workdir: str) -> dict:
  """Trains (or resumes) the run described by `cfg` in `workdir`; returns the final metrics."""
  d = cfg.distributed
  sharding.initialize_distributed(d.coordinator, d.num_processes, d.process_id)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(cfg.mesh)
  B, L, total = cfg.train.batch_size, cfg.data.seq_len, cfg.train.steps
  sharding.check_batch(mesh, B, "train.batch_size")
  sharding.check_batch(mesh, cfg.eval.batch_size, "eval.batch_size")
  if B % cfg.train.grad_accum:
    raise ValueError(f"train.batch_size={B} is not divisible by train.grad_accum={cfg.train.grad_accum}")

  # Data: groups of random-access sources; the batch at step s is a pure function of (seed, s, p).
  groups = sources.make_groups(cfg.data)
  names = [g.name for g in groups]
  vocab_size = groups[0].vocab_size
  mcfg = M.ModelConfig.from_config(cfg.model)
  if mcfg.vocab_size == -1:
    mcfg = M.ModelConfig(**{**vars(mcfg), "vocab_size": vocab_size})
  elif mcfg.vocab_size < vocab_size:
    raise ValueError(f"model.vocab_size={mcfg.vocab_size} is smaller than the data's vocabulary ({vocab_size})")
  if L > mcfg.max_len:
    raise ValueError(f"data.seq_len={L} exceeds model.max_len={mcfg.max_len}")
  model = M.make(mcfg)
  from data import mlm_exact  # noqa: PLC0415
  from lib import adversarial  # noqa: PLC0415

  mlm_eval = mlm_exact.from_config(cfg, groups, model, mesh)  # Liu's exact masked-LM excess loss (None for CLM)
  adv_loss = adversarial.from_config(cfg, groups, model)  # Liu's adversarial objective (None = off)
  cfg_dict = json.loads(cfg.to_json_best_effort())
  cfg_dict["model"] = dict(vars(mcfg), preset=cfg.model.get("preset", ""))
  check_workdir(workdir, cfg_dict)
  if jax.process_index() == 0 and not os.path.exists(os.path.join(workdir, "config.json")):
    C.save_json(os.path.join(workdir, "config.json"), cfg_dict)
  lo, hi = sharding.local_rows(mesh, B)
  data_seed = cfg.data.seed if cfg.data.seed >= 0 else cfg.seed
  pipe = dp.Pipeline(
    [sources.select_split(g, "train") for g in groups],
    seed=data_seed,
    global_batch=B,
    seq_len=L,
    rows=(lo, hi),
    docs_per_row=cfg.data.docs_per_row if cfg.data.packing else 1,
    objective=cfg.data.objective,
    vocab_size=vocab_size,
    group_names=names,
    cache_tokens=cfg.data.cache_tokens,
  )
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

  # Model, optimizer, mixture controller, sharded state.
  tx, sched = optim.make_optimizer(cfg.opt, total)
  controller = mixture.make(cfg.mixture, names)
  state_sh = state_shardings(model, tx, mesh)
  mix0 = controller.init()
  state_sh["mixture"] = jax.tree.map(lambda _: sharding.replicated(mesh), mix0)
  n_params = M.param_count(model)

  def init_state(key):
    params = nn.unbox(model.init(key, *(M.dummy_batch(mcfg, 1, 8)[k] for k in ("inputs", "positions", "segment_ids")))["params"])
    return {
      "params": params,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1),
      "mixture": jax.tree.map(jnp.asarray, mix0),
    }

  analysis_steps = schedules.analysis_steps(schedules.parse_schedules(cfg.ckpt.schedule), total)
  ckpt = C.Checkpointer(
    workdir,
    analysis_steps=analysis_steps,
    resume_every=cfg.ckpt.resume_every,
    keep_resume=cfg.ckpt.keep_resume,
    params_only=cfg.ckpt.params_only,
    async_=cfg.ckpt.async_save,
  )
  writer = MX.Writer(workdir, cfg.log.tensorboard)
  rules = nn.logical_axis_rules(sharding.RULES)
  with jax.set_mesh(mesh), rules:
    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(cfg.seed))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh)
    restored = ckpt.restore_latest(target)
    if restored is not None:
      state, meta = restored
      log.info("resumed from step %d in %s", int(state["step"]), workdir)
    else:
      state = jax.jit(init_state, out_shardings=state_sh)(jax.random.PRNGKey(cfg.seed))
      meta = {}
    step = int(state["step"])
    mix_state = jax.tree.map(np.asarray, state["mixture"])
    hook = None
    if cfg.probes.enabled:
      from analysis import trajectories

      hook = trajectories.ProbeHook(workdir, cfg, model, mesh, total)

    p_train = jax.jit(
      functools.partial(
        steps.train_step,
        model=model,
        tx=tx,
        schedule=sched,
        grad_accum=cfg.train.grad_accum,
        num_groups=len(groups),
        extra_loss=adv_loss,
      ),
      out_shardings=(state_sh, None),
      donate_argnums=(0,),
    )
    p_eval = jax.jit(functools.partial(steps.eval_step, model=model, num_groups=len(groups)))
    fpt = M.flops_per_token(mcfg, L, n_params)
    peak = MX.peak_flops_per_device(cfg.log.peak_flops)
    tokens_seen = int(meta.get("tokens_seen", step * B * L))

    def save(step_, last=False):
      a, r = ckpt.wants(step_, last)
      if a or r:
        ckpt.save(
          step_,
          state,
          {
            "step": step_,
            "tokens_seen": tokens_seen,
            "data_step": step_,
            "time": time.time(),
            "mixture_p": controller.proportions(mix_state, step_).tolist(),
            "group_names": names,
          },
          last=last,
        )
      if hook is not None:
        hook.maybe_record(step_, state["params"], tokens_seen)

    def evaluate(step_):
      m = run_eval(p_eval, state["params"], eval_sets, names)
      if mlm_eval is not None:
        m.update(mlm_eval(state["params"]))
      writer.write(step_, m)
      return m

    if restored is None:
      save(0)
      if cfg.eval.every:
        evaluate(0)

    def observe_groups(step_, em):
      """Per-group validation losses -> the mixture controller; returns its new state."""
      obs = {"eval/group_loss": np.array([em.get(f"eval/{n}/loss", em["eval/loss"]) for n in names])}
      return controller.update(mix_state, step_, obs)

    if restored is None and len(groups) > 1 and controller.wants_eval(mix_state, 0):
      # e.g. Aioli's first round needs ℓ⁰ at the initialisation (a resumed run saved it already)
      mix_state = observe_groups(0, evaluate(0))
      state = dict(state, mixture=jax.device_put(jax.tree.map(jnp.asarray, mix_state), state_sh["mixture"]))
    p_fn = lambda s: controller.proportions(mix_state, s)  # noqa: E731
    it = pipe.iterator(step, total, p_fn if len(groups) > 1 else None, num_threads=cfg.data.num_threads)
    pending, last_m = [], {}
    t_last, step_last = time.time(), step
    print(
      f"lmtrace: {n_params:,} params, mesh {dict(mesh.shape)}, {len(groups)} group(s) {names}, "
      f"steps {step}->{total}, workdir {os.path.abspath(workdir)}",
      flush=True,
    )
    stop = min(total, cfg.train.stop_at or total)
    try:
      while step < stop:
        batch_np = next(it)
        batch = sharding.global_batch_from_local(mesh, batch_np, B)
        state, m = p_train(state, batch)
        step += 1
        tokens_seen += B * L
        pending.append((step, m))
        do_eval = bool(cfg.eval.every) and (step % cfg.eval.every == 0 or step == total)
        do_mix = controller.wants_eval(mix_state, step)
        a, r = ckpt.wants(step, step == stop)
        if step % cfg.train.log_every == 0 or do_eval or do_mix or a or r or step == stop:
          fetched = jax.device_get(pending)
          for s_, m_ in fetched:
            if cfg.train.stop_on_nan and not np.isfinite(m_["train/loss"]):
              raise TrainingDiverged(
                f"non-finite training loss {m_['train/loss']} at step {s_}; the last good "
                f"checkpoints in {workdir} are intact ({sorted(C.available_steps(workdir))[-3:]})"
              )
          dt = time.time() - t_last
          s_, m_ = fetched[-1]
          row = dict(m_)
          tps = (step - step_last) * B * L / max(dt, 1e-9)
          row.update(
            {
              "data/fingerprint": fingerprint(batch_np),
              "perf/tokens_per_s": tps,
              "perf/step_time": dt / max(step - step_last, 1),
              "perf/tokens_seen": tokens_seen,
              "perf/flops_per_token": fpt,
              "perf/mfu": tps * fpt / (peak * jax.device_count()) if peak else None,
            }
          )
          if len(groups) > 1:
            p = controller.proportions(mix_state, step - 1)
            counts = np.bincount(pipe.group_of_rows(step - 1, p), minlength=len(groups))
            for gi, n in enumerate(names):
              row[f"mixture/p/{n}"] = float(p[gi])
              row[f"data/rows/{n}"] = int(counts[gi])
            row.pop("train/group_tokens", None)
            gl = row.pop("train/group_loss")
            for gi, n in enumerate(names):
              row[f"train/{n}/loss"] = float(gl[gi])
          writer.write(step, row)
          last_m.update(row)
          if jax.process_index() == 0:
            print(MX.console_line(step, total, row), flush=True)
          pending = []
          t_last, step_last = time.time(), step
        if do_eval or do_mix:
          em = evaluate(step)
          last_m.update(em)
          if jax.process_index() == 0:
            print(MX.console_line(step, total, em), flush=True)
          if do_mix:
            mix_state = observe_groups(step, em)
            state = dict(state, mixture=jax.device_put(jax.tree.map(jnp.asarray, mix_state), state_sh["mixture"]))
            it = pipe.iterator(step, total, p_fn, num_threads=cfg.data.num_threads)
          t_last = time.time()
        save(step, last=step == stop)
    finally:
      ckpt.wait()
      ckpt.close()
      writer.close()
  last_m["step"] = step
  return last_m


def main(argv=None) -> None:
  """CLI entry: parses flags itself so a bad override is one clear line, not a traceback."""
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "run card, e.g. configs/pcfg.py or configs/pcfg.py:small")
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl, config.json)")
  argv = sys.argv if argv is None else argv
  try:
    flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    msg = str(e).replace("\\n", " ")
    print(
      f"lmtrace: error in the command line: {msg}\n(config keys are listed with comments in configs/base.py; "
      "overrides look like --config.opt.lr=1e-3)",
      file=sys.stderr,
    )
    sys.exit(2)
  if not flags.FLAGS.config or not flags.FLAGS.workdir:
    print("usage: python train.py --config=configs/pcfg.py --workdir=DIR [--config.section.key=value ...]", file=sys.stderr)
    sys.exit(2)
  MX.quiet_logs()
  sharding.enable_compilation_cache()  # a resumed or repeated run skips recompiling
  try:
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ValueError, C.CheckpointError, TrainingDiverged, sharding.ShardingError, dp.DataError) as e:
    print(f"lmtrace: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
