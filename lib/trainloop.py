"""The trainer's step loop and its hooks, shared by a single run (train.py) and a seed-vectorised group
(train_group.py).

The loop owns only the cadence: one jitted step per iteration, metrics fetched from the device at log
steps only (one host sync per logged step), the hooks due at each step, checkpoint saves, and the stop
rule (`stop` reached, or `stop_requested(step)`: a signal or a lost lock, which ends the loop after a
resume checkpoint of that step). What a step, a row or a save means for the runs at hand (one run, or
k runs with a leading run axis) is the `Runs` object's business.

Hooks are callbacks on the loop's cadence (as levanter's `add_hook(fn, every=N)`): validation evals,
mixing-controller updates, in-training probes and the end-of-run test rows are hooks (trainer.py
registers them), and so is anything a user adds:

  loop = trainloop.Loop(total=1000, log_every=10)
  loop.add_hook(lambda info: info.write({"my/param_norm": norm(info.params)}), every=100)
  state, step = loop.run(runs, state, step, fresh=True)

Order at a step: train; the step's row (if it is logged); the due hooks, in the order added; the
checkpoint save. So a checkpoint holds every hook's effect on the state, and a resumed run fires its
hooks at exactly the steps an uninterrupted run does: a fresh run fires at its start step (0), a resumed
one continues after its checkpoint's step. A process killed between a step's hooks and that step's
checkpoint redoes the step on resume, and fires its hooks again (the metrics writer drops the first
pass's rows; stores such as the probe store skip steps they already hold).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Protocol

import jax


class Runs(Protocol):
  """What the loop drives: one run (train.py) or a group of runs (train_group.py)."""

  def train(self, state, step: int) -> tuple[Any, dict, Any]:
    """Draws the next batch and takes step `step` -> `step + 1`: (new state, device metrics, host batch)."""

  def log(self, step: int, fetched: list, batch_np, *, dt: float, n_steps: int) -> None:
    """Writes the row(s) of a logged step; `fetched` = [(step, host metrics), ...] since the last log."""

  def wants_save(self, step: int, last: bool) -> bool: ...

  def save(self, step: int, state, last: bool) -> None: ...


@dataclasses.dataclass
class StepInfo:
  """What a hook sees: the step just taken (the start step at a fresh start) and the state after it.

  A group's state has a leading run axis on every leaf. `cache` is shared by the hooks of one step (e.g.
  one validation eval serves both the eval row and the mixing controller)."""

  step: int
  total: int
  state: Any
  runs: Any
  cache: dict = dataclasses.field(default_factory=dict)

  @property
  def params(self):
    return self.state["params"]

  def write(self, rows) -> None:
    """Writes metrics at this step: one dict (every run gets it) or a list of dicts (one per run)."""
    self.runs.write(self.step, rows)


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(info: StepInfo)`, fired at steps divisible by `every` (0: never by cadence), at the run's last
  step (`at_total`, when this process trains it), and where `when(step)` is true. `updates_state`: fn
  returns the new train state (e.g. a mixing controller's update); otherwise its return value is ignored.
  `row_first`: the step's training row is written before fn runs (fn changes what the row reports, or
  writes rows that must follow it); the hook's time then is not counted as training time."""

  fn: Callable[[StepInfo], Any]
  every: int = 0
  at_total: bool = False
  when: Callable[[int], bool] | None = None
  row_first: bool = False
  updates_state: bool = False
  name: str = ""

  def fires(self, step: int, total: int, *, start: bool = False) -> bool:
    return bool(
      (self.every and step % self.every == 0)
      or (self.at_total and not start and step == total)
      or (self.when is not None and self.when(step))
    )


@contextlib.contextmanager
def timed(event: str):
  """Reports the block's wall time as the jax.monitoring event '/lmtrace/<event>' (free without a
  listener; bench/vectorised.py listens to it and to JAX's own compile-time events)."""
  t0 = time.perf_counter()
  try:
    yield
  finally:
    jax.monitoring.record_event_duration_secs(f"/lmtrace/{event}", time.perf_counter() - t0)


class Loop:
  """The step loop and its hooks; `add_hook` in the order they should fire, then `run`."""

  def __init__(self, *, total: int, log_every: int, stop: int | None = None, stop_requested=None):
    self.total, self.log_every = int(total), int(log_every)
    self.stop = self.total if stop is None else int(stop)
    self.stop_requested = stop_requested or (lambda step: False)
    self.hooks: list[Hook] = []

  def add_hook(self, fn, every: int = 0, **kw) -> Hook:
    """Adds `Hook(fn, every, **kw)` after the hooks already added; returns it."""
    hook = fn if isinstance(fn, Hook) else Hook(fn, every, **kw)
    self.hooks.append(hook)
    return hook

  def fire(self, hooks, runs, state, step: int):
    """Calls `hooks` at `step` in order; the state a hook `updates_state` returns is the next ones' state."""
    info = StepInfo(step, self.total, state, runs)
    for h in hooks:
      with timed(f"hook/{h.name or getattr(h.fn, '__name__', 'hook')}"):
        new = h.fn(info)
      if h.updates_state:
        info.state = new
    return info.state

  def run(self, runs: Runs, state, step: int, *, fresh: bool = False):
    """Steps `state` from `step` to `stop` (or to the step at which `stop_requested(step)` is true);
    returns (state, step reached). `fresh`: the run starts here (not from a checkpoint), so the hooks
    due at `step` fire and `step` is saved first."""
    if fresh:
      state = self.fire([h for h in self.hooks if h.fires(step, self.total, start=True)], runs, state, step)
      with timed("save"):
        runs.save(step, state, False)
    pending = []
    t_last, step_last = time.time(), step
    while step < self.stop:
      with timed("train"):
        state, m, batch_np = runs.train(state, step)
      step += 1
      pending.append((step, m))
      if jax.process_count() > 1:
        # stop_requested's cross-process allgather must not run while this step's program is still in flight:
        # with CPU (gloo) collectives two programs in flight interleave their collectives differently in each
        # process and deadlock (seen under srun: one process in the step's all-reduce, the other in the
        # allgather). On GPU/TPU the allgather's host read waits for the step anyway, so this costs nothing.
        jax.block_until_ready(m)
      at_end = step == self.stop or self.stop_requested(step)  # a signal stops here, with a resume checkpoint
      due = [h for h in self.hooks if h.fires(step, self.total)]
      row_first = any(h.row_first for h in due)
      if step % self.log_every == 0 or row_first or at_end or runs.wants_save(step, at_end):
        with timed("log"):
          runs.log(step, jax.device_get(pending), batch_np, dt=time.time() - t_last, n_steps=step - step_last)
        pending = []
        t_last, step_last = time.time(), step
      if due:
        state = self.fire(due, runs, state, step)
        if row_first:
          t_last = time.time()
      with timed("save"):
        runs.save(step, state, at_end)
      if at_end:
        break
    return state, step


def eval_hook(runs, eval_every: int) -> Hook:
  """The classic cadence as one hook: `runs.evaluate(step, state, mix)` every `eval_every` steps and at
  the last step, and where `runs.wants_mix(step)` (then with mix=True: the controller observes it)."""
  return Hook(
    lambda info: runs.evaluate(info.step, info.state, runs.wants_mix(info.step)),
    every=eval_every,
    at_total=bool(eval_every),
    when=runs.wants_mix,
    row_first=True,
    updates_state=True,
    name="eval",
  )


def run(runs, state, step: int, *, stop: int, total: int, log_every: int, eval_every: int, stop_requested, hooks=()):
  """`Loop.run` for `Runs` with `evaluate(step, state, mix) -> state` and `wants_mix(step)` (`eval_hook`),
  then `hooks`."""
  loop = Loop(total=total, log_every=log_every, stop=stop, stop_requested=stop_requested)
  loop.add_hook(eval_hook(runs, eval_every))
  for h in hooks:
    loop.add_hook(h)
  return loop.run(runs, state, step)
