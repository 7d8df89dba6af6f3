"""BIG-Bench task files (the `task.json` schema of Srivastava et al. 2022): reading, checking, finding,
and the two ways of drawing k-shot prompts from them. Used by analysis/icl.py.

Reading follows BIG-Bench's own loader: the file is decoded from bytes, so a UTF-8 BOM (and UTF-16/32
with a BOM) is accepted; duplicate examples (identical after JSON serialisation) are dropped, keeping the
first; a task.json without an `examples` key is a composite task whose subtasks are the task.json files
one directory below it, named `parent:sub` (parent and sub are the files' `name`, else their folder's).
The correct option of an example is the top-scoring entry of `target_scores` (graded scores such as
{"mirror": 2, "flute": 1, "crown": 0} mean `mirror`). Xia et al. (2022)'s filter is applied on top:
multiple choice (>= 2 options), fewer than 1000 distinct examples, exactly one top-scoring option.
Anything else is refused with one line naming the file and the problem.

Prompt draws:
* lmtrace (default): one generator seeded `seed` permutes every example's choices in file order, then
  draws k shots per query among the examples with another input (all examples are queries, in file
  order; --max_examples keeps a seeded sample of them).
* BIG-Bench (`bigbench=True`): the draw order of BIG-Bench's `JsonTask` (bigbench/api/json_task.py,
  reimplemented): each example's sorted choices are permuted by a fresh generator seeded `seed` (so all
  examples with n options share one permutation); a second generator, seeded `seed` too, draws the
  queries (a sample of max_examples, or a permutation of all when k > 0; all in file order when k = 0 and
  no cap applies), then per query k shots among the examples that differ from it, then one answer per
  shot among its targets (the example's `target` field when it has one, else its top option).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import shutil

import numpy as np

from lib import errors

log = logging.getLogger("lmtrace")
MAX_EXAMPLES = 1000  # Xia's filter: fewer than this many examples
TASK_FILE = "task.json"
_STRING_FIELDS = {
  "task_prefix": "",
  "example_input_prefix": "\nQ: ",
  "example_output_prefix": "\nA: ",
  "choice_prefix": "\n  choice: ",
  "few_shot_example_separator": "\n",
}


@dataclasses.dataclass
class Task:
  """A checked multiple-choice task. Each example is a dict with
  input        the question text;
  choices      the options, sorted (lmtrace's scoring order);
  correct      index of the top-scoring option in `choices`;
  order        the options in the file's order (BIG-Bench's scoring order);
  scores       option -> target score (BIG-Bench's multiple_choice_grade is the chosen option's score);
  answers      the texts a shot may show as its answer (BIG-Bench: `target` if given, else the top option);
  ident        what BIG-Bench compares to keep a query's equals out of its shots (as ordered dicts: two
               examples that differ only in the order of their keys are different examples)."""

  name: str
  examples: list[dict]
  task_prefix: str = ""
  input_prefix: str = "\nQ: "
  output_prefix: str = "\nA: "
  choice_prefix: str = "\n  choice: "
  append_choices: bool = True
  separator: str = "\n"
  path: str = ""
  n_siblings: int = 1  # subtasks of the same composite task (BIG-Bench splits max_examples among them)
  absolute_normalization: bool = False
  n_duplicates: int = 0


class Tasks(list):
  """find_tasks' answer: the tasks, plus `skipped`, one line per file left out and why."""

  def __init__(self, tasks=(), skipped=()):
    super().__init__(tasks)
    self.skipped = list(skipped)


def _kind(v) -> str:
  for cls, word in ((bool, "a boolean"), (dict, "an object"), (list, "a list"), (str, "a string"), ((int, float), "a number")):
    if isinstance(v, cls):
      return word
  return "null" if v is None else type(v).__name__


def read_json(path: str):
  """The parsed file, decoded from bytes as BIG-Bench's loader does (UTF-8 with or without BOM, UTF-16/32)."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise errors.AnalysisError(f"cannot read task {path}: {e.strerror or e}") from e
  try:
    return json.loads(raw, object_pairs_hook=collections.OrderedDict)  # BIG-Bench compares examples order-sensitively
  except UnicodeDecodeError as e:
    raise errors.AnalysisError(f"task {path} is not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r})") from e
  except RecursionError as e:
    raise errors.AnalysisError(f"task {path} is nested too deeply to read") from e
  except ValueError as e:
    what = "is empty" if not raw.strip() else f"is not valid JSON ({e})"
    raise errors.AnalysisError(f"task {path} {what}") from e


def _score(v, where: str) -> float:
  """A target score: a finite number (true/false count as 1/0, as in BIG-Bench's max/min)."""
  if not isinstance(v, (int, float)):
    raise errors.AnalysisError(f"{where} is {_kind(v)}, not a number")
  if not math.isfinite(v):
    raise errors.AnalysisError(f"{where} is {v}, not a finite number")
  return float(v)


def _answers(ex: dict, top: str, where: str) -> list[str]:
  if "target" not in ex:
    return [top]
  t = ex["target"]
  ts = [t] if isinstance(t, str) else t
  if not isinstance(ts, list) or not ts or not all(isinstance(s, str) for s in ts):
    raise errors.AnalysisError(f"{where}: target is {_kind(t)}; BIG-Bench wants a string or a non-empty list of strings")
  return list(ts)


def check_example(ex, i: int, path: str) -> dict:
  """One raw example as lmtrace uses it (see Task); AnalysisError naming the example otherwise."""
  where = f"task {path} example {i}"
  if not isinstance(ex, dict):
    raise errors.AnalysisError(f"{where} is {_kind(ex)}, not an object with input and target_scores")
  if "input" not in ex:
    raise errors.AnalysisError(f"{where} has no input")
  if not isinstance(ex["input"], str):
    raise errors.AnalysisError(f"{where}: input is {_kind(ex['input'])}, not a string")
  ts = ex.get("target_scores")
  if not isinstance(ts, dict) or len(ts) < 2:
    raise errors.AnalysisError(f"{where} is not multiple choice (needs target_scores with >= 2 options)")
  scores = {k: _score(v, f"{where}: target_scores[{k!r}]") for k, v in ts.items()}
  top = max(scores.values())
  correct = [k for k, v in scores.items() if v == top] if top > min(scores.values()) else []
  if len(correct) != 1:
    raise errors.AnalysisError(f"{where} has {len(correct)} correct targets (exactly one is required)")
  answers = _answers(ex, correct[0], where)
  choices = sorted(scores)
  order = list(scores)
  ident = collections.OrderedDict(ex)  # what BIG-Bench's formatted example holds, keys in its order
  ident["target"], ident["choice"] = answers, order
  return {
    "input": ex["input"],
    "choices": choices,
    "correct": choices.index(correct[0]),
    "order": order,
    "scores": scores,
    "answers": answers,
    "ident": ident,
  }


def _fields(d: dict, path: str) -> dict:
  out = {}
  for key, default in _STRING_FIELDS.items():
    v = d.get(key, default)
    if not isinstance(v, str):
      raise errors.AnalysisError(f"task {path}: {key} is {_kind(v)}, not a string")
    out[key] = v
  for key in ("append_choices_to_input", "absolute_normalization"):
    if not isinstance(d.get(key, False), bool):
      raise errors.AnalysisError(f"task {path}: {key} is {_kind(d[key])}, not true or false")
  return out


def _name(d: dict, path: str) -> str:
  name = d.get("name")
  if name is None:
    return os.path.basename(os.path.dirname(os.path.abspath(path)))
  if not isinstance(name, str) or not name.strip():
    raise errors.AnalysisError(f"task {path}: name is {_kind(name) if not isinstance(name, str) else 'empty'}, not a task name")
  return name


def _distinct(exs: list) -> tuple[list, int]:
  """BIG-Bench's de-duplication: drop an example whose JSON serialisation was seen before (first kept)."""
  seen, out = set(), []
  for ex in exs:
    s = json.dumps(ex)
    if s not in seen:
      seen.add(s)
      out.append(ex)
  return out, len(exs) - len(out)


def parse_task(d, path: str, name: str | None = None) -> Task:
  """A parsed task.json with examples -> Task; AnalysisError (one line) when it fails a check."""
  if not isinstance(d, dict):
    raise errors.AnalysisError(f"task {path}: the top level is {_kind(d)}, not an object")
  name = name or _name(d, path)
  exs = d.get("examples")
  if not isinstance(exs, list):
    raise errors.AnalysisError(f"task {path}: examples is {_kind(exs)}, not a list")
  if not exs:
    raise errors.AnalysisError(f"task {path} has no examples")
  f = _fields(d, path)
  checked = [check_example(ex, i, path) for i, ex in enumerate(exs)]
  distinct, n_dup = _distinct(exs)
  if n_dup:
    keep = {id(ex) for ex in distinct}
    checked = [c for c, ex in zip(checked, exs) if id(ex) in keep]
    log.info("task %s: %d duplicate examples of %d dropped (as BIG-Bench does)", name, n_dup, len(exs))
  if len(checked) >= MAX_EXAMPLES:
    raise errors.AnalysisError(f"task {path} has {len(checked)} examples (Xia's filter keeps < {MAX_EXAMPLES})")
  return Task(
    name,
    checked,
    f["task_prefix"],
    f["example_input_prefix"],
    f["example_output_prefix"],
    f["choice_prefix"],
    d.get("append_choices_to_input", True),
    f["few_shot_example_separator"],
    path=path,
    absolute_normalization=d.get("absolute_normalization", False),
    n_duplicates=n_dup,
  )


def load_task(path: str, name: str | None = None) -> Task:
  """A BIG-Bench task.json with examples that passes Xia's filter; AnalysisError (one line) otherwise."""
  d = read_json(path)
  if isinstance(d, dict) and "examples" not in d and _subtask_files(path):
    raise errors.AnalysisError(f"task {path} is a composite task (subtasks in its subfolders): load it with load_tasks")
  return parse_task(d, path, name)


def _subtask_files(path: str) -> list[str]:
  """BIG-Bench's subtasks of a task.json: the task.json one folder below it, sorted."""
  base = os.path.dirname(path)
  subs = [os.path.join(base, s, TASK_FILE) for s in sorted(os.listdir(base or "."))]
  return [s for s in subs if os.path.lexists(s)]


def load_tasks(path: str, skipped: list | None = None) -> list[Task]:
  """A task.json as BIG-Bench loads it: itself, or, without an `examples` key, its subtasks `parent:sub`.
  A bad subtask is refused (one line) or, when `skipped` is a list, appended to it and left out."""
  d = read_json(path)
  if not isinstance(d, dict) or "examples" in d:
    return [parse_task(d, path)]
  subs = _subtask_files(path)
  if not subs:
    raise errors.AnalysisError(f"task {path} has neither examples nor subtasks (folders with a {TASK_FILE})")
  parent = _name(d, path)
  out = []
  for s in subs:
    try:
      sd = read_json(s)
      sub = _name(sd, s) if isinstance(sd, dict) else ""
      t = parse_task(sd, s, f"{parent}:{sub}")
    except errors.AnalysisError as e:
      if skipped is None:
        raise
      skipped.append(str(e))
      log.warning("skipped: %s", e)
      continue
    t.n_siblings = len(subs)
    out.append(t)
  return out


def _task_files(path: str) -> list[str]:
  """BIG-Bench's layout: DIR/task.json (DIR is one task) or DIR/<task>/task.json."""
  if not os.path.exists(path):
    raise errors.AnalysisError(f"{path} does not exist")
  if os.path.lexists(os.path.join(path, TASK_FILE)):
    return [os.path.join(path, TASK_FILE)]
  files = [os.path.join(path, d, TASK_FILE) for d in sorted(os.listdir(path))]
  files = [f for f in files if os.path.lexists(f)]  # a dangling link or a folder named task.json is reported
  if not files:
    raise errors.AnalysisError(f"no task under {path}: BIG-Bench's layout is DIR/<task>/{TASK_FILE}")
  return files


def find_tasks(path: str) -> Tasks:
  """One task.json (strict: a bad file is an AnalysisError) or every task of a directory in BIG-Bench's
  layout that passes the filter; a bad file there is skipped with one line (logged, and in `.skipped`)."""
  if os.path.isfile(path):
    return Tasks(load_tasks(path))
  skipped: list[str] = []
  tasks: dict[str, Task] = {}
  for f in _task_files(path):
    try:
      found = load_tasks(f, skipped)
    except errors.AnalysisError as e:
      skipped.append(str(e))
      log.warning("skipped: %s", e)
      continue
    for t in found:
      if t.name in tasks:
        msg = f"task {t.path}: its name {t.name!r} is taken by {tasks[t.name].path}"
        skipped.append(msg)
        log.warning("skipped: %s", msg)
      else:
        tasks[t.name] = t
  if not tasks:
    raise errors.AnalysisError(
      f"no task under {path} passes the filter (multiple choice, < {MAX_EXAMPLES} examples, one correct target); "
      f"{len(skipped)} skipped"
    )
  if skipped:
    log.warning("%d task files under %s skipped, %d tasks kept", len(skipped), path, len(tasks))
  return Tasks(tasks.values(), skipped)


def extract_tasks(bigbench_root: str, out_dir: str) -> int:
  """Copies benchmark_tasks/<task>/task.json of a downloaded `bigbench` package, and the subtask files
  benchmark_tasks/<task>/<sub>/task.json of composite tasks, to out_dir/<task>[/<sub>]/task.json.
  Returns the number of files copied."""
  n = 0
  for root, dirs, files in os.walk(bigbench_root):
    dirs.sort()
    rel = os.path.relpath(root, bigbench_root).split(os.sep)
    if "benchmark_tasks" not in rel or TASK_FILE not in files:
      continue
    below = rel[rel.index("benchmark_tasks") + 1 :]
    if len(below) in (1, 2):  # a task, or a subtask of a composite one
      dst = os.path.join(out_dir, *below)
      os.makedirs(dst, exist_ok=True)
      shutil.copy(os.path.join(root, TASK_FILE), os.path.join(dst, TASK_FILE))
      n += 1
  return n


# ----------------------------------------------------------------------------------------------
# Prompts


def format_input(t: Task, ex: dict, rng: np.random.RandomState) -> str:
  """input_prefix + input [+ choice_prefix + choice_prefix.join(a permutation of the sorted choices)] + output_prefix."""
  s = ex["input"]
  if t.append_choices:
    s = s + t.choice_prefix + t.choice_prefix.join(rng.permutation(ex["choices"]).tolist())
  return t.input_prefix + s + t.output_prefix


def _too_few(t: Task, k: int) -> None:
  if len(t.examples) < k + 1:
    raise errors.AnalysisError(f"task {t.name} has {len(t.examples)} examples: too few for {k} shots")


def _equals(t: Task) -> list[set[int]]:
  """Per example, the examples equal to it as BIG-Bench compares its formatted examples (itself included):
  never one of its shots."""
  by_input: dict[str, list[int]] = {}
  for j, ex in enumerate(t.examples):
    by_input.setdefault(ex["input"], []).append(j)
  return [{j for j in by_input[ex["input"]] if t.examples[j]["ident"] == ex["ident"]} for ex in t.examples]


def _others(t: Task, i: int, equals: list[set[int]], k: int) -> list[int]:
  valid = [j for j in range(len(t.examples)) if j not in equals[i]]
  if len(valid) < k:
    raise errors.AnalysisError(f"task {t.name} example {i}: only {len(valid)} other distinct examples, too few for {k} shots")
  return valid


def lmtrace_draw(t: Task, k: int, seed: int) -> list[tuple[int, str]]:
  """(example index, prompt) for every example in file order, lmtrace's draw (see the module doc)."""
  _too_few(t, k)
  rng = np.random.RandomState(seed)
  formatted = [format_input(t, ex, rng) for ex in t.examples]
  by_input: dict[str, set[int]] = {}
  for j, ex in enumerate(t.examples):
    by_input.setdefault(ex["input"], set()).add(j)
  equals = [by_input[ex["input"]] for ex in t.examples]  # never a shot with the query's own question
  out = []
  for i in range(len(t.examples)):
    shots = rng.choice(_others(t, i, equals, k), k, replace=False) if k else []
    ctx = [formatted[j] + _top(t.examples[j]) for j in shots]
    out.append((i, t.task_prefix + t.separator.join(ctx + [formatted[i]])))
  return out


def sample_queries(n: int, max_examples: int, seed: int) -> list[int]:
  """lmtrace's --max_examples: a seeded sample of that many example indices (in file order), all when 0."""
  if not max_examples or max_examples >= n:
    return list(range(n))
  return sorted(np.random.RandomState(seed).choice(n, max_examples, replace=False).tolist())


def bigbench_draw(t: Task, k: int, seed: int = 42, max_examples: int = 0) -> list[tuple[int, str]]:
  """(example index, prompt) per query in BIG-Bench's draw order for the same seed (see the module doc)."""
  _too_few(t, k)
  formatted = [format_input(t, ex, np.random.RandomState(seed)) for ex in t.examples]
  n = len(t.examples)
  n_queries = min(max_examples, n) if max_examples else n
  rng = np.random.RandomState(seed)
  if k == 0:
    order = rng.choice(n, n_queries, replace=False).tolist() if n_queries < n else range(n)
    return [(i, t.task_prefix + formatted[i]) for i in order]
  equals = _equals(t)
  out = []
  for i in rng.choice(n, n_queries, replace=False).tolist():
    valid = _others(t, i, equals, k)
    ctx = []
    for s in rng.choice(len(valid), k, replace=False).tolist():
      answers = t.examples[valid[s]]["answers"]
      ctx.append(formatted[valid[s]] + answers[rng.choice(len(answers))])
    out.append((i, t.task_prefix + t.separator.join(ctx + [formatted[i]])))
  return out


def draw(t: Task, k: int = 2, seed: int = 0, max_examples: int = 0, bigbench: bool = False) -> list[tuple[int, str, list[str]]]:
  """(example index, prompt, options) per query. lmtrace's draw: a seeded sample of max_examples queries (all
  when 0) in file order, options sorted. BIG-Bench's: its queries in its order, options in the file's order."""
  if bigbench:
    return [(i, p, t.examples[i]["order"]) for i, p in bigbench_draw(t, k, seed, max_examples)]
  drawn = lmtrace_draw(t, k, seed)
  return [(i, drawn[i][1], t.examples[i]["choices"]) for i in sample_queries(len(drawn), max_examples, seed)]


def build_prompts(
  t: Task, k: int = 2, seed: int = 0, max_examples: int = 0, bigbench: bool = False
) -> list[tuple[str, list[str], int]]:
  """(prompt text, options, index of the correct option) per query, k-shot (see `draw`)."""
  return [(p, opts, opts.index(_top(t.examples[i]))) for i, p, opts in draw(t, k, seed, max_examples, bigbench)]


def _top(ex: dict) -> str:
  return ex["choices"][ex["correct"]]
