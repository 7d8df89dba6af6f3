"""lmtrace trainer: mesh -> data -> init and shard -> resume -> loop (hooks, checkpoints) -> final eval.

  python train.py --config=configs/pcfg.py --workdir=runs/pcfg [--config.opt.lr=1e-3 ...]

The workdir is the run's identity: rerunning the same command resumes bit-for-bit from the newest
readable full checkpoint (resume order: workdir checkpoint > fresh init). A workdir holding a run of
another model, data or seed is refused rather than overwritten. What a single run shares with a
seed-vectorised group (train_group.py) — setup, evals, the hooks on the step loop — is in trainer.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import linen as nn

import trainer
from data import adversarial, mlm_exact
from lib import ckpt as C
from lib import config_check, errors, mixture, multirun, preempt, sharding, steps
from lib import metrics as MX
from lib import model as M
from lib import session as RS

log = logging.getLogger("lmtrace")
TrainingDiverged = errors.TrainingDiverged  # re-exported
run_eval = trainer.run_eval  # re-exported (experiments use it)


def fingerprint(batch_np: dict) -> int:
  """CRC32 of this host's batch at the logged step (lets a test prove resumed runs see the same data)."""
  import zlib

  return zlib.crc32(b"".join(np.ascontiguousarray(batch_np[k]).tobytes() for k in sorted(batch_np)))


def console(step: int, total: int, row: dict) -> None:
  if jax.process_index() == 0:
    print(MX.console_line(step, total, row), flush=True)


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
  """One run as the loop's `Runs` (lib/trainloop.py): its step, rows, evals and checkpoints."""

  mix: mixture.MixtureRunner
  p_train: Any
  p_eval: Any
  eval_sets: list
  names: list
  mlm_eval: Any
  ckpt: C.Checkpointer
  writer: MX.Writer
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

  def eval_runs(self, params, batches=None) -> list[dict]:
    """[metrics] over `batches` (None: the validation sets, with the run's extra eval, e.g. Liu's MLM loss)."""
    if batches is None:
      return [trainer.run_eval(self.p_eval, params, self.eval_sets, self.names, extra=self.mlm_eval)]
    return [trainer.run_eval(self.p_eval, params, batches, self.names)]

  def write(self, step: int, rows, show: bool = False) -> None:
    row = rows if isinstance(rows, dict) else rows[0]
    self.writer.write(step, row)
    self.last_m.update(row)
    if show:
      console(step, self.total, row)

  def wants_save(self, step: int, last: bool) -> bool:
    return any(self.ckpt.wants(step, last))

  def save(self, step: int, state, last: bool = False) -> None:
    if self.wants_save(step, last):
      meta = {"step": step, "tokens_seen": self.tokens_seen(step), "data_step": step, "time": time.time()}
      meta.update(mixture_p=self.mix.proportions(step).tolist(), group_names=self.names)
      self.ckpt.save(step, state, meta, last=last)


def train_and_evaluate(cfg, workdir: str, hooks=()) -> dict:
  """Trains (or resumes) the run described by `cfg` in `workdir`; returns the final metrics.

  `hooks`: more `lib.trainloop.Hook`s, fired after the trainer's own (trainer.standard_hooks).
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

    return train_group.train_group(cfg, workdir, seeds=seeds, hooks=hooks)
  with RS.RunSession(workdir) as run:
    return _train_and_evaluate(cfg, workdir, run, hooks)


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
  diff = trainer.model_changes(C.read_config(src)["model"], cfg_dict["model"])
  if diff:
    raise errors.ConfigError(f"train.init_from={spec!r}: its model differs from this run's in {diff}")
  params = jax.device_put(C.restore_params(src, int(step) if step else None, mesh), state_sh["params"])
  log.info("parameters from %s (step %s); optimizer state fresh", src, step or "latest")
  opt_state = jax.jit(tx.init, out_shardings=state_sh["opt_state"])(params)
  return {**state, "params": params, "opt_state": opt_state}


def _train_and_evaluate(cfg, workdir: str, run: RS.RunSession, hooks=()) -> dict:
  su = trainer.Setup.build(cfg, mixture_seed=cfg.seed)  # mesh, data groups, model, optimizer, controller, shardings
  mesh, names, model, total = su.mesh, su.names, su.model, cfg.train.steps
  B, L = cfg.train.batch_size, cfg.data.seq_len
  mlm_eval = mlm_exact.from_config(cfg, su.groups, model, mesh)  # Liu's exact masked-LM excess loss (None for CLM)
  adv_loss = adversarial.from_config(cfg, su.groups, model)  # Liu's adversarial objective (None = off)
  old_cfg = trainer.claim_workdir(workdir, su.cfg_dict)
  pipe = su.pipeline(cfg.data.seed if cfg.data.seed >= 0 else cfg.seed)
  eval_sets = su.held_out("validation")
  mix = mixture.MixtureRunner(su.controller, pipe, total=total, num_threads=cfg.data.num_threads, sharding=su.state_sh["mixture"])
  n_params = M.param_count(model)

  ckpt = run.closing(C.Checkpointer.from_config(workdir, cfg.ckpt, total))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    restored = resume(ckpt, su.restore_target(), workdir, old_cfg, su.cfg_dict)
    if restored is not None:
      state, meta = restored
    else:
      state = jax.jit(su.init_state, out_shardings=su.state_sh)(jax.random.PRNGKey(cfg.seed))
      if cfg.train.init_from:
        state = start_from(state, cfg.train.init_from, su.cfg_dict, su.tx, su.state_sh, mesh)
      meta = {}
    step = int(state["step"])
    writer = run.closing(MX.Writer(workdir, cfg.log.tensorboard, keep_upto=step if restored is not None else -1))
    mix.load(state["mixture"])
    mix.prepare(eval_sets=eval_sets, mesh=mesh, params_like=state["params"])  # DoGE's val batches, DoReMi's reference
    loop = su.loop(run.stop_requested, [*trainer.standard_hooks(su, mix=mix, workdir=workdir), *hooks])

    p_train = jax.jit(
      mix.train_step(model=model, tx=su.tx, schedule=su.sched, grad_accum=cfg.train.grad_accum, extra_loss=adv_loss),
      out_shardings=(su.state_sh, None),
      donate_argnums=(0,),
    )
    p_eval = jax.jit(functools.partial(steps.eval_step, model=model, num_groups=len(names)))

    runs = SingleRun(
      mix=mix, p_train=p_train, p_eval=p_eval, eval_sets=eval_sets, names=names, mlm_eval=mlm_eval, ckpt=ckpt, writer=writer,
      mesh=mesh, batch=B, seq_len=L, total=total, step0=step, tokens0=int(meta.get("tokens_seen", step * B * L)),
      fpt=M.flops_per_token(su.mcfg, L, n_params), peak=MX.peak_flops_per_device(cfg.log.peak_flops), workdir=workdir,
      stop_on_nan=cfg.train.stop_on_nan,
    )  # fmt: skip
    mix.start(step)
    print(
      f"lmtrace: {n_params:,} params, mesh {dict(mesh.shape)}, {len(names)} group(s) {names}, "
      f"steps {step}->{total}, workdir {os.path.abspath(workdir)}",
      flush=True,
    )
    try:
      with trainer.timed("loop"):
        state, step = loop.run(runs, state, step, fresh=restored is None)
      last_m = runs.last_m
    finally:
      with trainer.timed("ckpt_close"):
        ckpt.wait()
        ckpt.close()
      writer.close()
  if step < loop.stop:  # left the loop early: stopped by a signal
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
