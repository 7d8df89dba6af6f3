"""Few-shot multiple choice: BIG-Bench prompt format, Xia's filter, oracle 100%, length normalisation,
option log-likelihoods equal transformers' (golden), the job and its loader, bad task files."""

import json
import os

import numpy as np
import pytest

from analysis import icl
from lib import errors
from lib import hf_import as H
from lib.tokenizer import HFTokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
TASK = os.path.join(FIX, "bigbench", "tiny_animals", "task.json")
PYTHIA = [os.path.join(FIX, "hf", "pythia", f"step{s}") for s in (0, 100, 200)]


def _task(tmp_path, examples, **kw):
  d = tmp_path / "t"
  d.mkdir(exist_ok=True)
  (d / "task.json").write_text(json.dumps({"name": "t", "examples": examples, **kw}))
  return str(d / "task.json")


def test_bigbench_prompt_format(tmp_path):
  exs = [{"input": f"q{i}", "target_scores": {"a": int(i % 2 == 0), "b": int(i % 2 == 1)}} for i in range(4)]
  t = icl.load_task(_task(tmp_path, exs, task_prefix="P:"))
  prompts = icl.build_prompts(t, k=2, seed=0)
  assert len(prompts) == 4
  p, options, correct = prompts[1]
  assert options == ["a", "b"] and correct == 1
  assert (
    p.startswith("P:\nQ: q")
    and p.endswith("\nQ: q1\n  choice: a\n  choice: b\nA: ")
    or p.endswith("\nQ: q1\n  choice: b\n  choice: a\nA: ")
  )
  shots = p[len("P:") :].split("\n\nQ: ")
  assert len(shots) == 3  # two shots + the query, separated by "\n"
  assert "q1" not in "".join(shots[:2])
  # no appended choices when the task says so
  t2 = icl.load_task(_task(tmp_path, exs, append_choices_to_input=False))
  assert icl.build_prompts(t2, k=0)[2][0] == "\nQ: q2\nA: "


def test_oracle_scores_100_percent_and_baseline():
  t = icl.load_task(TASK)
  tok = HFTokenizer(PYTHIA[0])
  qs = icl.build_queries(t, tok, k=2)
  truth = {}
  for q in qs:
    for j, o in enumerate(q.options):
      truth[(id(q.contexts[j]), tuple(o))] = 0.0 if j == q.correct else -5.0

  def oracle(ctx, opts):
    return np.asarray([truth[(id(c), tuple(o))] for c, o in zip(ctx, opts)]), np.asarray([len(o) for o in opts])

  r = icl.evaluate(qs, oracle)
  assert r["accuracy"] == 1.0 and r["accuracy_norm"] == 1.0
  assert r["random_baseline"] == pytest.approx(1 / 3)
  assert r["ppl_correct"] == pytest.approx(1.0)


def test_length_normalisation():
  # option 0: 1 token, log p -2 (sum wins); option 1: 4 tokens, log p -4 (per token -1 wins)
  q = icl.Query("t", 0, "", [np.array([0])] * 2, [np.array([5]), np.array([6, 7, 8, 9])], correct=1)

  def score(ctx, opts):
    return np.array([-2.0, -4.0]), np.array([1, 4])

  r = icl.evaluate([q], score)
  assert r["accuracy"] == 0.0 and r["accuracy_norm"] == 1.0
  assert r["ppl_correct"] == pytest.approx(np.exp(1.0)) and r["ppl_incorrect"] == pytest.approx(np.exp(2.0))


def test_option_logprobs_equal_transformers():
  ref = json.load(open(os.path.join(FIX, "hf", "icl_expected.json")))
  params, cfg, _ = H.load_params(PYTHIA[2])
  qs = icl.build_queries(icl.load_task(TASK), HFTokenizer(PYTHIA[2]), k=ref["k"], seed=ref["seed"], max_len=cfg.max_len)
  r = icl.evaluate(qs, icl.model_scorer(cfg, params))
  np.testing.assert_allclose(r["option_logprob"], ref["option_logprob"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_correct", [0, 2])
def test_task_with_zero_or_two_correct_targets_is_one_line(tmp_path, capsys, n_correct):
  exs = [{"input": "x", "target_scores": {"a": 1, "b": 0, "c": 0}} for _ in range(3)]
  exs.append({"input": "y", "target_scores": {"a": int(n_correct >= 1), "b": int(n_correct >= 2), "c": 0}})
  path = _task(tmp_path, exs)
  with pytest.raises(errors.AnalysisError, match=f"example 3 has {n_correct} correct targets"):
    icl.load_task(path)
  w = str(tmp_path / "w")
  H.import_series([PYTHIA[0]], w)
  assert icl.main([f"--workdir={w}", f"--tasks={path}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "correct targets" in err[0]
  assert not os.path.exists(os.path.join(w, "analysis", "icl.parquet"))
  # scanning a directory skips it (Xia's filter) and says so when nothing is left
  with pytest.raises(errors.AnalysisError, match="no task under"):
    icl.find_tasks(str(tmp_path / "t"))


def test_prompt_longer_than_max_len(tmp_path):
  # distinct inputs: identical examples are one example (duplicates are dropped, as BIG-Bench does)
  exs = [{"input": "the cat " * 40 + f"{i}", "target_scores": {"garden": 1, "king": 0}} for i in range(3)]
  with pytest.raises(errors.AnalysisError, match="longer than the model's max_len 128"):
    icl.build_queries(icl.load_task(_task(tmp_path, exs)), HFTokenizer(PYTHIA[0]), k=2, max_len=128)


def test_job_and_loader(tmp_path):
  import analysis

  w = str(tmp_path / "pythia")
  H.import_series(PYTHIA, w)
  assert icl.main([f"--workdir={w}", f"--tasks={os.path.dirname(os.path.dirname(TASK))}"]) == 0
  df = analysis.load_icl(w)
  assert sorted(df.step) == [0, 100, 200] and set(df.task) == {"tiny_animals"}
  np.testing.assert_allclose(df.random_baseline, 1 / 3)
  assert df.accuracy.between(0, 1).all() and (df.ppl_correct > 1).all()
  fig = icl.plot_accuracy_vs_ppl(df, x="step")
  assert fig is not None
