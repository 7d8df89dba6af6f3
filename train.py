"""lmtrace trainer: mesh -> data -> init and shard -> resume -> loop (eval, checkpoints) -> final eval.

  python train.py --config=configs/pcfg.py --workdir=runs/pcfg [--config.opt.lr=1e-3 ...]

The workdir is the run's identity: rerunning the same command resumes bit-for-bit from the newest
readable full checkpoint (resume order: workdir checkpoint > fresh init). A workdir holding a run of
another model, data or seed is refused rather than overwritten.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from data import adversarial, mlm_exact, sources
from data import pipeline as dp
from lib import ckpt as C
from lib import config_check, errors, mixture, multirun, optim, preempt, sharding, steps, trainloop
from lib import metrics as MX
from lib import model as M
from lib import session as RS

log = logging.getLogger("lmtrace")
IDENTITY_SECTIONS = ("model", "data", "seed")  # must match to resume in an existing workdir
INFORMATIONAL_KEYS = ("preset", "num_threads", "data_dir")  # may differ on resume


TrainingDiverged = errors.TrainingDiverged  # re-exported


def check_workdir(workdir: str, cfg_dict: dict) -> None:
  """Refuses to resume a run whose model, data or seed differ from this config's."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  old = C.read_json(path, "the run's config as trained")
  if not isinstance(old, dict):
    raise C.CheckpointError(f"{path} (the run's config as trained) is damaged: a {type(old).__name__}, not a JSON object")
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


def console(step: int, total: int, row: dict) -> None:
  if jax.process_index() == 0:
    print(MX.console_line(step, total, row), flush=True)


def test_eval(p_eval, params, groups, cfg, mesh, writer, step) -> dict:
  """Per-group TEST-split loss and perplexity at the end of a run (controllers only ever see the
  validation split; the test split is what is reported, as in the Aioli paper). test/avg_ppl is the
  unweighted mean of the groups' perplexities. Empty (and nothing written) if `step` is None (the run
  stopped early), cfg.eval.test_at_end is off, or some group has no test split."""
  if step is None or not cfg.eval.test_at_end or not all("test" in g.splits for g in groups):
    return {}
  names = [g.name for g in groups]
  out = test_metrics(run_eval(p_eval, params, dp.held_out_batches(groups, "test", cfg, mesh), names), names)
  writer.write(step, out)
  return out


def test_metrics(em: dict, names) -> dict:
  """The test-split row from the eval metrics `em` of the test batches (also the seed-vectorised group's)."""
  out = {"test/" + k.removeprefix("eval/"): v for k, v in em.items()}
  ppl = [float(np.exp(out.get(f"test/{n}/loss", out["test/loss"]))) for n in names]
  out.update({f"test/{n}/ppl": v for n, v in zip(names, ppl)})
  out["test/ppl"], out["test/avg_ppl"] = float(np.exp(out["test/loss"])), float(np.mean(ppl))
  return out


def run_eval(p_eval, params, eval_sets, names, extra=None) -> dict:
  """Validation metrics over `eval_sets`; `extra(params) -> dict` adds more (e.g. Liu's exact MLM loss)."""
  total = None
  for batch in eval_sets:
    s = jax.tree.map(np.asarray, p_eval(params, batch))
    if total is None:
      total = s
    else:  # groups without exact log-probs (text) drop the optimum for the whole set
      total = {k: total[k] + s[k] for k in total.keys() & s.keys()}
  m = steps.finish_eval(total, names)
  if extra is not None:
    m.update(extra(params))
  return m


def check_finite(fetched, workdir: str, stop_on_nan: bool) -> None:
  for s_, m_ in fetched:
    if stop_on_nan and not np.isfinite(m_["train/loss"]):
      raise TrainingDiverged(
        f"non-finite training loss {m_['train/loss']} at step {s_}; the last good "
        f"checkpoints in {workdir} are intact ({sorted(C.available_steps(workdir))[-3:]})"
      )


def build_row(step: int, m: dict, batch_np: dict, mix, *, dt: float, n_steps: int, tokens: int, tokens_seen: int, fpt, peak):
  """The logged row at `step`: the step's metrics, data fingerprint, throughput and per-group fields."""
  row = dict(m)
  tps = n_steps * tokens / max(dt, 1e-9)
  row.update(
    {
      "data/fingerprint": fingerprint(batch_np),
      "perf/tokens_per_s": tps,
      "perf/step_time": dt / max(n_steps, 1),
      "perf/tokens_seen": tokens_seen,
      "perf/flops_per_token": fpt,
      "perf/mfu": tps * fpt / (peak * jax.device_count()) if peak else None,
    }
  )
  row.update(mix.row_fields(step, row))
  return row


@dataclasses.dataclass
class SingleRun:
  """One run as the shared loop's `Runs` (lib/trainloop.py): its step, rows, evals and checkpoints."""

  mix: mixture.MixtureRunner
  p_train: Any
  p_eval: Any
  eval_sets: list
  names: list
  mlm_eval: Any
  ckpt: C.Checkpointer
  writer: MX.Writer
  hook: Any
  mesh: Any
  batch: int
  seq_len: int
  total: int
  step0: int
  tokens0: int
  fpt: float
  peak: float | None
  workdir: str
  stop_on_nan: bool
  last_m: dict = dataclasses.field(default_factory=dict)

  def tokens_seen(self, step: int) -> int:
    return self.tokens0 + (step - self.step0) * self.batch * self.seq_len

  def train(self, state, step: int):
    batch_np = self.mix.next_batch()
    batch = sharding.global_batch_from_local(self.mesh, batch_np, self.batch)
    state, m = self.p_train(state, self.mix.step_inputs(batch, step))  # DoGE val batch / DoReMi reference
    return state, m, batch_np

  def log(self, step: int, fetched: list, batch_np, *, dt: float, n_steps: int) -> None:
    check_finite(fetched, self.workdir, self.stop_on_nan)
    row = build_row(
      step, fetched[-1][1], batch_np, self.mix, dt=dt, n_steps=n_steps, tokens=self.batch * self.seq_len,
      tokens_seen=self.tokens_seen(step), fpt=self.fpt, peak=self.peak,
    )  # fmt: skip
    self.writer.write(step, row)
    self.last_m.update(row)
    console(step, self.total, row)

  def eval_metrics(self, step: int, params) -> dict:
    m = run_eval(self.p_eval, params, self.eval_sets, self.names, extra=self.mlm_eval)
    self.writer.write(step, m)
    return m

  def evaluate(self, step: int, state, mix: bool):
    em = self.eval_metrics(step, state["params"])
    self.last_m.update(em)
    console(step, self.total, em)
    return self.mix.observe(step, em, state) if mix else state

  def wants_save(self, step: int, last: bool) -> bool:
    return any(self.ckpt.wants(step, last))

  def wants_mix(self, step: int) -> bool:
    return self.mix.wants_eval(step)

  def save(self, step: int, state, last: bool = False) -> None:
    if self.wants_save(step, last):
      meta = {"step": step, "tokens_seen": self.tokens_seen(step), "data_step": step, "time": time.time()}
      meta.update(mixture_p=self.mix.proportions(step).tolist(), group_names=self.names)
      self.ckpt.save(step, state, meta, last=last)
    if self.hook is not None:
      self.hook.maybe_record(step, state["params"], self.tokens_seen(step))


def train_and_evaluate(cfg, workdir: str) -> dict:
  """Trains (or resumes) the run described by `cfg` in `workdir`; returns the final metrics.

  The whole config is validated before anything is written; the run then holds the workdir's lock,
  saves a resume checkpoint and stops on SIGTERM/SIGINT (raising preempt.Preempted), and a start
  that fails before its first checkpoint leaves no workdir behind (lib/session.py).
  With `train.seeds` set, trains those seeds as one vectorised group (train_group.py) in
  `workdir/seed_<s>` and returns {seed: final metrics}.
  """
  d = cfg.distributed
  sharding.initialize_distributed(d.coordinator, d.num_processes, d.process_id, timeout_s=d.get("timeout_s", 300))
  config_check.validate(cfg)
  if seeds := multirun.parse_seeds(cfg.train.get("seeds", "")):
    import train_group

    return train_group.train_group(
      cfg, workdir, seeds=seeds, state_shardings=state_shardings, check_workdir=check_workdir, test_metrics=test_metrics
    )
  with RS.RunSession(workdir) as run:
    return _train_and_evaluate(cfg, workdir, run)


def claim_workdir(workdir: str, cfg_dict: dict) -> dict | None:
  """Refuses a workdir of another run; writes config.json into a new one. Returns the old config (None: new)."""
  check_workdir(workdir, cfg_dict)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    return C.read_config(workdir)
  if jax.process_index() == 0:
    C.save_json(path, cfg_dict)
  return None


def resume(ckpt, target, workdir: str, old_cfg: dict | None, cfg_dict: dict):
  """(state, meta) of the newest intact checkpoint, or None; changed settings are logged and recorded in the
  workdir's resume history (a change the saved state cannot take is refused by restore_latest)."""
  changed = config_check.resume_differences(old_cfg, cfg_dict) if old_cfg else {}
  restored = ckpt.restore_latest(target, mismatch_hint=config_check.summary(changed))
  if restored is None:
    return None
  step = int(restored[0]["step"])
  log.info("resumed from step %d in %s", step, workdir)
  if changed:
    log.warning("resuming with changed settings (see %s): %s", config_check.RESUME_HISTORY, config_check.summary(changed))
  if jax.process_index() == 0:
    config_check.record_resume(workdir, step, changed)
  return restored


def start_from(state, spec: str, cfg_dict: dict, tx, state_sh, mesh):
  """`train.init_from`: the parameters of another run's checkpoint ('DIR' = its latest, 'DIR:STEP'), with a
  fresh optimizer state at step 0 — e.g. SGD continued from a converged AdamW model. The source's model must
  equal this run's (refused in one line before anything is restored)."""
  src, _, step = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
  if not os.path.isfile(os.path.join(src, "config.json")):
    raise errors.ConfigError(f"train.init_from={spec!r}: {src} is not a run directory (no config.json)")
  theirs = {k: v for k, v in C.read_config(src)["model"].items() if k not in INFORMATIONAL_KEYS}
  mine = {k: v for k, v in cfg_dict["model"].items() if k not in INFORMATIONAL_KEYS}
  diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
  if diff:
    raise errors.ConfigError(f"train.init_from={spec!r}: its model differs from this run's in {diff}")
  params = jax.device_put(C.restore_params(src, int(step) if step else None, mesh), state_sh["params"])
  log.info("parameters from %s (step %s); optimizer state fresh", src, step or "latest")
  opt_state = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params)
  return {**state, "params": params, "opt_state": opt_state}


def _train_and_evaluate(cfg, workdir: str, run: RS.RunSession) -> dict:
  mesh = sharding.make_mesh(cfg.mesh)
  B, L, total = cfg.train.batch_size, cfg.data.seq_len, cfg.train.steps
  sharding.check_batch(mesh, B, "train.batch_size")
  sharding.check_batch(mesh, cfg.eval.batch_size, "eval.batch_size")

  # Data: groups of random-access sources; the batch at step s is a pure function of (seed, s, p).
  groups = sources.make_groups(cfg.data)
  names = [g.name for g in groups]
  vocab_size = groups[0].vocab_size
  mcfg = M.ModelConfig.for_run(cfg, vocab_size)
  model = M.make(mcfg)
  mlm_eval = mlm_exact.from_config(cfg, groups, model, mesh)  # Liu's exact masked-LM excess loss (None for CLM)
  adv_loss = adversarial.from_config(cfg, groups, model)  # Liu's adversarial objective (None = off)
  cfg_dict = json.loads(cfg.to_json_best_effort())
  cfg_dict["model"] = dict(vars(mcfg), preset=cfg.model.get("preset", ""))
  old_cfg = claim_workdir(workdir, cfg_dict)
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
  eval_sets = dp.held_out_batches(groups, "validation", cfg, mesh)

  # Model, optimizer, mixture controller, sharded state.
  tx, sched = optim.make_optimizer(cfg.opt, total)
  controller = mixture.make(cfg.mixture, names, seed=cfg.seed)
  state_sh = state_shardings(model, tx, mesh)
  mix0 = controller.init()
  state_sh["mixture"] = jax.tree.map(lambda _: sharding.replicated(mesh), mix0)
  mix = mixture.MixtureRunner(controller, pipe, total=total, num_threads=cfg.data.num_threads, sharding=state_sh["mixture"])
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

  ckpt = run.closing(C.Checkpointer.from_config(workdir, cfg.ckpt, total))
  rules = nn.logical_axis_rules(sharding.RULES)
  with jax.set_mesh(mesh), rules:
    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(cfg.seed))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh)
    restored = resume(ckpt, target, workdir, old_cfg, cfg_dict)
    if restored is not None:
      state, meta = restored
    else:
      state = jax.jit(init_state, out_shardings=state_sh)(jax.random.PRNGKey(cfg.seed))
      if cfg.train.init_from:
        state = start_from(state, cfg.train.init_from, cfg_dict, tx, state_sh, mesh)
      meta = {}
    step = int(state["step"])
    writer = run.closing(MX.Writer(workdir, cfg.log.tensorboard, keep_upto=step if restored is not None else -1))
    mix.load(state["mixture"])
    mix.prepare(eval_sets=eval_sets, mesh=mesh, params_like=state["params"])  # DoGE's val batches, DoReMi's reference
    hook = None
    if cfg.probes.enabled:
      from analysis import probes

      hook = probes.ProbeHook(workdir, cfg, model, mesh, total)

    p_train = jax.jit(
      mix.train_step(model=model, tx=tx, schedule=sched, grad_accum=cfg.train.grad_accum, extra_loss=adv_loss),
      out_shardings=(state_sh, None),
      donate_argnums=(0,),
    )
    p_eval = jax.jit(functools.partial(steps.eval_step, model=model, num_groups=len(groups)))

    runs = SingleRun(
      mix=mix, p_train=p_train, p_eval=p_eval, eval_sets=eval_sets, names=names, mlm_eval=mlm_eval, ckpt=ckpt, writer=writer,
      hook=hook, mesh=mesh, batch=B, seq_len=L, total=total, step0=step, tokens0=int(meta.get("tokens_seen", step * B * L)),
      fpt=M.flops_per_token(mcfg, L, n_params), peak=MX.peak_flops_per_device(cfg.log.peak_flops), workdir=workdir,
      stop_on_nan=cfg.train.stop_on_nan,
    )  # fmt: skip
    if restored is None:
      runs.save(0, state)
      state = mix.first_eval(state, functools.partial(runs.eval_metrics, params=state["params"]), log_eval=bool(cfg.eval.every))
    mix.start(step)
    first_step = step
    print(
      f"lmtrace: {n_params:,} params, mesh {dict(mesh.shape)}, {len(groups)} group(s) {names}, "
      f"steps {step}->{total}, workdir {os.path.abspath(workdir)}",
      flush=True,
    )
    stop = min(total, cfg.train.stop_at or total)
    try:
      state, step = trainloop.run(
        runs, state, step, stop=stop, total=total, log_every=cfg.train.log_every, eval_every=cfg.eval.every,
        stop_requested=run.stop_requested,
      )  # fmt: skip
      last_m = runs.last_m
      # once, when this process took the run to its end (a rerun of a finished run writes no second row)
      last_m.update(test_eval(p_eval, state["params"], groups, cfg, mesh, writer, step if step == total > first_step else None))
    finally:
      ckpt.wait()
      ckpt.close()
      writer.close()
  if step < stop:  # left the loop early: stopped by a signal
    raise run.guard.preempted(step, workdir)
  last_m["step"] = step
  return last_m


def _one_line(msg: str) -> str:
  """A flag-parsing message (config_flags embeds the loader's traceback) as its first line plus the
  final 'SomeError: reason' line, without the traceback."""
  lines = [ln.strip() for ln in msg.replace("\\n", "\n").splitlines() if ln.strip()]
  if not lines:
    return msg
  last = lines[-1]
  for ln in reversed(lines):
    head, sep, rest = ln.partition(": ")
    if sep and (head.endswith("Error") or head.endswith("Exception")) and head.replace(".", "").isidentifier():
      last = rest
      break
  first = lines[0].rstrip(":")
  return first if last == lines[0] else f"{first}: {last}"


def main(argv=None) -> None:
  """CLI entry: parses flags itself so a bad override is one clear line, not a traceback."""
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "run card, e.g. configs/pcfg.py or configs/pcfg.py:small")
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics.jsonl, config.json)")
  argv = sys.argv if argv is None else argv
  try:
    flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:  # OSError: the card failed to load
    msg = _one_line(str(e))
    print(
      f"lmtrace: error in the command line: {msg}\n(config keys are listed with comments in configs/base.py; "
      "overrides look like --config.opt.lr=1e-3)",
      file=sys.stderr,
    )
    sys.exit(2)
  if not flags.FLAGS.config or not flags.FLAGS.workdir:
    print("usage: python train.py --config=configs/pcfg.py --workdir=DIR [--config.section.key=value ...]", file=sys.stderr)
    sys.exit(2)
  try:
    cfg = flags.FLAGS.config
    cfg.get("seed")  # a lazy proxy: raises here if the card failed to load
  except OSError as e:  # config_flags defers a missing or unloadable run card to the first access
    print(
      f"lmtrace: error: cannot load --config={flags.FLAGS['config'].serialize().partition('=')[2]}: {_one_line(str(e))}",
      file=sys.stderr,
    )
    sys.exit(2)
  MX.quiet_logs()
  sharding.enable_compilation_cache()  # a resumed or repeated run skips recompiling
  try:
    train_and_evaluate(cfg, flags.FLAGS.workdir)
  except errors.LmtraceError as e:  # bad input or state: one line; anything else is a bug and keeps its traceback
    print(f"lmtrace: error: {e}", file=sys.stderr)
    sys.exit(3 if isinstance(e, preempt.Preempted) else 2)


if __name__ == "__main__":
  main()
