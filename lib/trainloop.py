"""The trainer's step loop, shared by a single run (train.py) and a seed-vectorised group (train_group.py).

The loop owns only the cadence: one jitted step per iteration, metrics fetched from the device at log,
eval, mixing and checkpoint steps only (one host sync per logged step), eval / mixing-eval, checkpoint
saves, and the stop rule (`stop` reached, or `stop_requested(step)`: a signal or a lost lock, which ends
the loop after a resume checkpoint of that step). What a step, a row, an eval or a save means for the
runs at hand (one run, or k runs with a leading run axis) is the `Runs` object's business.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import jax


class Runs(Protocol):
  """What the loop drives: one run (train.py) or a group of runs (train_group.py)."""

  def train(self, state, step: int) -> tuple[Any, dict, Any]:
    """Draws the next batch and takes step `step` -> `step + 1`: (new state, device metrics, host batch)."""

  def log(self, step: int, fetched: list, batch_np, *, dt: float, n_steps: int) -> None:
    """Writes the row(s) of a logged step; `fetched` = [(step, host metrics), ...] since the last log."""

  def evaluate(self, step: int, state, mix: bool):
    """Held-out eval at `step` (`mix`: the mixture controller observes it); returns the state."""

  def wants_save(self, step: int, last: bool) -> bool: ...

  def wants_mix(self, step: int) -> bool: ...

  def save(self, step: int, state, last: bool) -> None: ...


def run(runs: Runs, state, step: int, *, stop: int, total: int, log_every: int, eval_every: int, stop_requested):
  """Steps `state` from `step` to `stop` (or to the step at which `stop_requested(step)` is true);
  returns (state, step reached)."""
  pending = []
  t_last, step_last = time.time(), step
  while step < stop:
    state, m, batch_np = runs.train(state, step)
    step += 1
    pending.append((step, m))
    if jax.process_count() > 1:
      # stop_requested's cross-process allgather must not run while this step's program is still in flight:
      # with CPU (gloo) collectives two programs in flight interleave their collectives differently in each
      # process and deadlock (seen under srun: one process in the step's all-reduce, the other in the
      # allgather). On GPU/TPU the allgather's host read waits for the step anyway, so this costs nothing.
      jax.block_until_ready(m)
    at_end = step == stop or stop_requested(step)  # a signal stops here, with a resume checkpoint
    do_eval = bool(eval_every) and (step % eval_every == 0 or step == total)
    do_mix = runs.wants_mix(step)
    if step % log_every == 0 or do_eval or do_mix or at_end or runs.wants_save(step, at_end):
      runs.log(step, jax.device_get(pending), batch_np, dt=time.time() - t_last, n_steps=step - step_last)
      pending = []
      t_last, step_last = time.time(), step
    if do_eval or do_mix:
      state = runs.evaluate(step, state, do_mix)
      t_last = time.time()
    runs.save(step, state, at_end)
    if at_end:
      break
  return state, step
