"""lib/trainloop.py, the step loop shared by a single run and a seed-vectorised group: its cadence of
logs, evals, mixing evals and saves, and the stop on a request, against a hand-written trace."""

import numpy as np

from lib import trainloop


class FakeRuns:
  """State = the step count; records every call of the loop in order."""

  def __init__(self, save_at=(), mix_at=()):
    self.calls, self.save_at, self.mix_at = [], set(save_at), set(mix_at)

  def train(self, state, step):
    assert step == state
    self.calls.append(("train", state))
    return state + 1, {"train/loss": np.float32(state)}, {"batch": state}

  def log(self, step, fetched, batch_np, *, dt, n_steps):
    assert [s for s, _ in fetched] == list(range(step - n_steps + 1, step + 1)) and batch_np == {"batch": step - 1}
    self.calls.append(("log", step, n_steps))

  def evaluate(self, step, state, mix):
    self.calls.append(("eval", step, mix))
    return state

  def wants_save(self, step, last):
    return last or step in self.save_at

  def wants_mix(self, step):
    return step in self.mix_at

  def save(self, step, state, last):
    assert state == step
    if self.wants_save(step, last):
      self.calls.append(("save", step, last))


def run(runs, start=0, stop=7, total=7, stop_at=None):
  return trainloop.run(
    runs, start, start, stop=stop, total=total, log_every=3, eval_every=4, stop_requested=lambda s: s == stop_at
  )


def test_cadence_of_logs_evals_and_saves():
  r = FakeRuns(save_at={2}, mix_at={5})
  assert run(r) == (7, 7)
  want = [("train", 0), ("train", 1), ("log", 2, 2), ("save", 2, False), ("train", 2), ("log", 3, 1), ("train", 3)]
  want += [("log", 4, 1), ("eval", 4, False), ("train", 4), ("log", 5, 1), ("eval", 5, True), ("train", 5), ("log", 6, 1)]
  want += [("train", 6), ("log", 7, 1), ("eval", 7, False), ("save", 7, True)]  # the last step: row, eval, last save
  assert r.calls == want


def test_a_stop_request_ends_after_that_steps_row_and_last_save():
  r = FakeRuns()
  assert run(r, stop_at=2) == (2, 2)
  assert r.calls == [("train", 0), ("train", 1), ("log", 2, 2), ("save", 2, True)]


def test_a_finished_run_does_nothing():
  r = FakeRuns()
  assert run(r, start=7) == (7, 7) and r.calls == []
  r = FakeRuns()
  assert run(r, start=5, stop=6) == (6, 6)  # train.stop_at: stops at 6 of 7, no eval (not the total)
  assert r.calls == [("train", 5), ("log", 6, 1), ("save", 6, True)]
