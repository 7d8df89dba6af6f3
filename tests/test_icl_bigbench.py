"""BIG-Bench task files as they really are (issue 25): a corpus of malformed and edge-case task.json files
(tests/fixtures/bigbench/corpus) where each file loads correctly or is refused in one line naming it, scans
that skip bad files with one line each, BIG-Bench's semantics (graded target_scores, composite tasks
`parent:sub`, duplicates, BOM, --max_examples sampling), and --bigbench_compatible prompts, option order,
draws and grades equal to those BIG-Bench's own JsonTask produced (tests/fixtures/bigbench/bigbench_reference.json,
made by tests/fixtures/make_bigbench_reference.py)."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from analysis import icl
from lib import errors
from lib import hf_import as H
from lib.tokenizer import HFTokenizer

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
CORPUS = os.path.join(FIX, "bigbench", "corpus")
REFERENCE = os.path.join(FIX, "bigbench", "bigbench_reference.json")
TINY = os.path.join(FIX, "bigbench", "tiny_animals")
PYTHIA0 = os.path.join(FIX, "hf", "pythia", "step0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every task.json of the corpus: the tasks it loads as (name -> distinct examples), or what its one-line
# refusal says.
LOADS = {
  "ok_basic": {"ok_basic": 6},
  "ok_bom": {"ok_bom": 6},  # UTF-8 BOM
  "ok_utf16": {"ok_utf16": 6},  # UTF-16 with BOM (BIG-Bench's loader decodes bytes the same way)
  "ok_crlf": {"ok_crlf": 6},
  "ok_graded": {"ok_graded": 5},
  "ok_duplicates": {"ok_duplicates": 7},  # 9 examples, 2 exact duplicates
  "ok_target_field": {"ok_target_field": 6},
  "ok_custom_prefixes": {"ok_custom_prefixes": 6},
  "ok_no_append": {"ok_no_append": 6},
  "ok_negative_scores": {"ok_negative_scores": 6},
  "ok_float_scores": {"ok_float_scores": 6},
  "ok_bool_scores": {"ok_bool_scores": 6},
  "ok_unicode": {"ok_unicode": 4},
  "ok_no_name": {"ok_no_name": 6},  # no name: the folder's
  "ok_extra_fields": {"ok_extra_fields": 6},
  "ok_many_options": {"ok_many_options": 6},
  "ok_absolute_normalization": {"ok_absolute_normalization": 6},
  "composite": {"composite:sub_a": 4, "composite:sub_b": 4},
  "composite/sub_a": {"sub_a": 4},
  "composite/sub_b": {"sub_b": 4},
  "composite_partial/sub_ok": {"sub_ok": 6},
  "dup_name": {"ok_basic": 4},  # loads alone; a scan keeps one task per name
  "bad_composite_empty_examples/sub": {"sub": 6},
}
REFUSED = {
  "bad_examples_strings": "example 0 is a string, not an object",
  "bad_no_input": "example 3 has no input",
  "bad_null_score": "example 2: target_scores['b'] is null, not a number",
  "bad_string_score": "target_scores['a'] is a string, not a number",
  "bad_nan_score": "target_scores['a'] is nan, not a finite number",
  "bad_top_list": "the top level is a list, not an object",
  "bad_top_string": "the top level is a string, not an object",
  "bad_top_null": "the top level is null, not an object",
  "bad_empty_file": "is empty",
  "bad_whitespace_file": "is empty",
  "bad_truncated": "is not valid JSON (Unterminated string",
  "bad_trailing_comma": "is not valid JSON",
  "bad_latin1": "is not UTF-8 text",
  "bad_examples_object": "examples is an object, not a list",
  "bad_examples_null": "examples is null, not a list",
  "bad_empty_examples": "has no examples",
  "bad_composite_empty_examples": "has no examples",  # an `examples` key, even empty, is not a composite task
  "bad_generative": "is not multiple choice",
  "bad_one_option": "is not multiple choice",
  "bad_target_scores_list": "is not multiple choice",
  "bad_all_zero": "example 2 has 0 correct targets",
  "bad_tie_top": "example 0 has 2 correct targets",
  "bad_input_number": "input is a number, not a string",
  "bad_prefix_type": "example_input_prefix is a number, not a string",
  "bad_name_number": "name is a number, not a task name",
  "bad_target_type": "target is a number",
  "bad_append_string": "append_choices_to_input is a string, not true or false",
  "bad_no_examples_no_subtasks": "has neither examples nor subtasks",
  "composite_partial": "target_scores['a'] is null",  # strict: its bad subtask refuses it, naming the subtask
  "composite_partial/sub_bad": "target_scores['a'] is null",
  "bad_dangling_link": "cannot read task",
  "bad_dir_named_task_json": "cannot read task",
}


def _case_files():
  out = {}
  for root, dirs, files in os.walk(CORPUS):
    for name in dirs + files:
      if name == "task.json":
        out[os.path.relpath(root, CORPUS)] = os.path.join(root, name)
  return out


def _one_line(e: Exception, path: str) -> str:
  msg = str(e)
  assert "\n" not in msg and path in msg, msg
  return msg


def test_corpus_every_file_loads_or_is_refused_in_one_line():
  files = _case_files()
  assert sorted(files) == sorted({**LOADS, **REFUSED}), "classify every corpus file here"
  for case, path in files.items():
    if case in LOADS:
      tasks = icl.load_tasks(path)
      assert {t.name: len(t.examples) for t in tasks} == LOADS[case], case
    else:
      with pytest.raises(errors.AnalysisError) as e:
        icl.load_tasks(path)
      assert REFUSED[case] in _one_line(e.value, path if case != "composite_partial" else "sub_bad"), case


def test_too_many_examples_and_deep_nesting_are_one_line(tmp_path):
  exs = [{"input": f"q{i}", "target_scores": {"a": 1, "b": 0}} for i in range(1000)]
  (tmp_path / "big").mkdir()
  (tmp_path / "big" / "task.json").write_text(json.dumps({"name": "big", "examples": exs}))
  with pytest.raises(errors.AnalysisError, match="has 1000 examples"):
    icl.load_task(str(tmp_path / "big" / "task.json"))
  (tmp_path / "deep").mkdir()
  (tmp_path / "deep" / "task.json").write_text("[" * 100_000 + "]" * 100_000)
  with pytest.raises(errors.AnalysisError, match="nested too deeply") as e:
    icl.load_task(str(tmp_path / "deep" / "task.json"))
  _one_line(e.value, str(tmp_path / "deep" / "task.json"))


def test_scan_skips_each_bad_file_with_one_line(caplog):
  with caplog.at_level(logging.WARNING, logger="lmtrace"):
    tasks = icl.find_tasks(CORPUS)
  kept = {n for case, names in LOADS.items() if "/" not in case and case != "dup_name" for n in names}
  kept |= {"composite_partial:sub_ok"}  # a scan keeps the good subtask of a composite task with a bad one
  assert sorted(t.name for t in tasks) == sorted(kept)
  bad = [c for c in REFUSED if c != "composite_partial"]
  bad = [os.path.join(CORPUS, c, "task.json") for c in bad]
  bad.append(os.path.join(CORPUS, "ok_basic", "task.json"))  # its name is taken by dup_name (sorted first)
  assert len(tasks.skipped) == len(bad)
  assert all("\n" not in line for line in tasks.skipped)
  for path in bad:
    assert sum(path in line for line in tasks.skipped) == 1, path
  logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped: ")]
  assert sorted(logged) == sorted(f"skipped: {s}" for s in tasks.skipped)
  # BIG-Bench's layout is DIR/<task>/task.json: the corpus below tests/fixtures/bigbench is not a task there
  assert [t.name for t in icl.find_tasks(os.path.dirname(CORPUS))] == ["tiny_animals"]


def _shots(prompt):
  """(input, answer) of each shot of a default-format prompt, and the query's input."""
  *shots, query = prompt.split("\n\nQ: ")
  shots = [s.removeprefix("\nQ: ") for s in shots]
  return [(s.split("\n")[0], s.rsplit("\nA: ", 1)[1]) for s in shots], query.removeprefix("\nQ: ").split("\n")[0]


def test_graded_target_scores_mean_the_top_option():
  t = icl.load_task(os.path.join(CORPUS, "ok_graded", "task.json"))
  top = {ex["input"]: ex["choices"][ex["correct"]] for ex in t.examples}
  assert list(top.values()) == ["mirror", "flute", "crown", "ice", "apple"]
  for bigbench in (False, True):
    for prompt, options, correct in icl.build_prompts(t, k=2, seed=3, bigbench=bigbench):
      shots, query = _shots(prompt)
      assert options[correct] == top[query]
      assert all(answer == top[q] for q, answer in shots)


def test_subtasks_are_parent_colon_sub_and_extract_keeps_them(tmp_path):
  tasks = icl.find_tasks(os.path.join(CORPUS, "composite"))
  assert [t.name for t in tasks] == ["composite:sub_a", "composite:sub_b"]
  assert all(t.n_siblings == 2 for t in tasks)
  with pytest.raises(errors.AnalysisError, match="composite task"):
    icl.load_task(os.path.join(CORPUS, "composite", "task.json"))
  # a downloaded bigbench package: a composite task, a plain one, a programmatic one (no task.json)
  bt = tmp_path / "bigbench" / "bigbench" / "benchmark_tasks"
  shutil.copytree(os.path.join(CORPUS, "composite"), bt / "composite")
  shutil.copytree(os.path.join(CORPUS, "ok_basic"), bt / "ok_basic")
  (bt / "programmatic").mkdir()
  (bt / "programmatic" / "task.py").write_text("# a programmatic task\n")
  out = tmp_path / "tasks"
  assert icl.extract_tasks(str(tmp_path / "bigbench"), str(out)) == 4
  assert sorted(t.name for t in icl.find_tasks(str(out))) == ["composite:sub_a", "composite:sub_b", "ok_basic"]
  assert (
    icl.task_budget(tasks[0], 5) == 2 and icl.task_budget(icl.load_task(os.path.join(CORPUS, "ok_basic", "task.json")), 5) == 5
  )
  with pytest.raises(errors.AnalysisError, match=r"max_examples \(1\) must be >= the number of subtasks of composite \(2\)"):
    icl.task_budget(tasks[0], 1)


def test_duplicates_dropped_and_never_a_shot_of_their_twin():
  t = icl.load_task(os.path.join(CORPUS, "ok_duplicates", "task.json"))
  assert len(t.examples) == 7 and t.n_duplicates == 2
  inputs = [ex["input"] for ex in t.examples]
  assert inputs.count("the bird flew over the") == 2  # equal objects with their keys in another order: two examples
  assert inputs.count("the cat sat on the") == 2  # target score 1 and 1.0: two examples, but equal ones
  for seed in range(5):
    for prompt, _, _ in icl.build_prompts(t, k=3, seed=seed):  # lmtrace: never a shot with the query's question
      shots, query = _shots(prompt)
      assert query not in [q for q, _ in shots], (seed, prompt)
    for prompt, _, _ in icl.build_prompts(t, k=3, seed=seed, bigbench=True):  # BIG-Bench: never an equal example
      shots, query = _shots(prompt)
      assert query == "the bird flew over the" or query not in [q for q, _ in shots], (seed, prompt)


def test_bom_utf16_and_bool_scores_equal_the_plain_file():
  ref = icl.load_task(os.path.join(CORPUS, "ok_basic", "task.json")).examples
  for case in ("ok_bom", "ok_utf16", "ok_crlf", "ok_bool_scores", "ok_float_scores"):
    exs = icl.load_task(os.path.join(CORPUS, case, "task.json")).examples
    assert [(e["input"], e["choices"], e["correct"]) for e in exs] == [(e["input"], e["choices"], e["correct"]) for e in ref]


def test_max_examples_is_a_seeded_sample(tmp_path):
  exs = [{"input": f"question {i}", "target_scores": {"a": int(i % 2 == 0), "b": int(i % 2 == 1)}} for i in range(20)]
  (tmp_path / "t").mkdir()
  (tmp_path / "t" / "task.json").write_text(json.dumps({"name": "t", "examples": exs}))
  t = icl.load_task(str(tmp_path / "t" / "task.json"))
  full = icl.build_prompts(t, k=2, seed=0)
  part = icl.build_prompts(t, k=2, seed=0, max_examples=5)
  assert len(part) == 5 and part != full[:5]
  assert all(p in full for p in part)  # the same prompts as in the full run, for a sample of the queries
  assert part == icl.build_prompts(t, k=2, seed=0, max_examples=5)
  assert icl.build_prompts(t, k=2, seed=1, max_examples=5) != part
  assert len(icl.build_prompts(t, k=2, seed=0, max_examples=50)) == 20


class _Bytes:
  """A reversible tokenizer (UTF-8 bytes + 1) so a scorer can see the text BIG-Bench's model saw."""

  bos_id = 0

  def encode(self, s):
    return np.frombuffer(s.encode("utf-8"), np.uint8).astype(np.int32) + 1

  @staticmethod
  def decode(ids):
    return (np.asarray(ids) - 1).astype(np.uint8).tobytes().decode("utf-8")


def _fake_logprob(prompt, option):  # tests/fixtures/make_bigbench_reference.py's stand-in model
  return -float((len(prompt) + len(option)) % 3)


def _fake_score(contexts, options):
  lp = [_fake_logprob(_Bytes.decode(c), _Bytes.decode(o)) for c, o in zip(contexts, options)]
  return np.asarray(lp), np.asarray([len(o) for o in options])


def test_bigbench_compatible_equals_bigbench_reference():
  ref = json.load(open(REFERENCE))
  assert ref["bigbench_version"] == "0.0.1" and len(ref["runs"]) == 66
  for run in ref["runs"]:
    tasks = {t.name: t for t in icl.load_tasks(os.path.join(CORPUS, run["file"]))}
    t = tasks[run["task"]]
    budget = icl.task_budget(t, run["max_examples"])
    got = icl.build_prompts(t, k=run["shots"], seed=run["seed"], max_examples=budget, bigbench=True)
    what = f"{run['task']} k={run['shots']} max_examples={run['max_examples']} seed={run['seed']}"
    assert [p for p, _, _ in got] == run["prompts"], what
    assert [o for _, o, _ in got] == run["options"], what
    qs = icl.build_queries(t, _Bytes(), k=run["shots"], seed=run["seed"], max_examples=budget, bigbench=True)
    r = icl.evaluate(qs, _fake_score, bigbench=True, absolute_normalization=t.absolute_normalization)
    assert r["mc_grade"] == pytest.approx(run["multiple_choice_grade"], abs=1e-12), what
  # lmtrace's own draw is not BIG-Bench's: the mode matters
  t = icl.load_task(os.path.join(CORPUS, "ok_basic", "task.json"))
  assert icl.build_prompts(t, k=1, seed=42) != icl.build_prompts(t, k=1, seed=42, bigbench=True)


def test_bigbench_mode_scores_without_bos():
  tok = HFTokenizer(PYTHIA0)
  t = icl.load_task(os.path.join(TINY, "task.json"))
  for q in icl.build_queries(t, tok, k=1, seed=42, bigbench=True):
    np.testing.assert_array_equal(q.contexts[0], tok.encode(q.prompt))
  for q in icl.build_queries(t, tok, k=1, seed=42):
    assert q.contexts[0][0] == tok.bos_id and len(q.contexts[0]) == 1 + len(tok.encode(q.prompt))


@pytest.fixture(scope="module")
def pythia_workdir(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("icl") / "pythia")
  H.import_series([PYTHIA0], w)
  return w


@pytest.mark.parametrize(
  "case", ["bad_examples_strings", "bad_no_input", "bad_null_score", "bad_top_list", "bad_top_string", "bad_latin1"]
)
def test_cli_refuses_a_bad_file_in_one_line(pythia_workdir, capsys, case):
  path = os.path.join(CORPUS, case, "task.json")
  assert icl.main([f"--workdir={pythia_workdir}", f"--tasks={path}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and path in err[0] and REFUSED[case] in err[0]


def test_cli_bad_file_and_bad_steps_exit_nonzero_without_traceback(pythia_workdir):
  path = os.path.join(CORPUS, "bad_examples_strings", "task.json")
  p = subprocess.run(
    [sys.executable, "-m", "analysis.icl", f"--workdir={pythia_workdir}", f"--tasks={path}"],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert p.returncode == 2 and "Traceback" not in p.stderr
  assert (
    p.stderr.strip().splitlines()[-1] == f"error: task {path} example 0 is a string, not an object with input and target_scores"
  )
  p = subprocess.run(
    [sys.executable, "-m", "analysis.icl", f"--workdir={pythia_workdir}", f"--tasks={TINY}", "--steps=abc"],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert p.returncode == 2 and "Traceback" not in p.stderr and "--steps=abc" in p.stderr


def test_job_table_says_which_mode_made_each_row(pythia_workdir, capsys):
  import analysis

  assert icl.main([f"--workdir={pythia_workdir}", f"--tasks={TINY}", "--bigbench_compatible", "--max_examples=4", "--k=1"]) == 0
  df = analysis.load_icl(pythia_workdir)
  assert list(df["mode"]) == ["bigbench"] and list(df.seed) == [42] and list(df.n_examples) == [4]
  assert df.mc_grade.between(0, 1).all()
  assert icl.main([f"--workdir={pythia_workdir}", f"--tasks={TINY}", "--max_examples=4"]) == 0
  df = analysis.load_icl(pythia_workdir)
  assert list(df["mode"]) == ["lmtrace"] and list(df.seed) == [0] and list(df.n_examples) == [4]
  assert "bigbench" not in capsys.readouterr().err
