"""Few-shot multiple-choice evaluation on BIG-Bench JSON tasks, per checkpoint (Xia et al. 2022).

  python -m analysis.icl --workdir=W --tasks=DIR [--k=2] [--seed=0] [--steps=all] [--max_examples=0]
  -> W/analysis/icl.parquet: one row per (step, task): accuracy (sum of option log-probs), accuracy_norm
     (per-token, length-normalised), random_baseline (mean 1/#choices), ppl_correct / ppl_incorrect (option
     perplexity exp(-Σ log p / Σ tokens) over correct / incorrect options), tokens of each, val_loss (the
     run's eval/loss at that step from metrics.jsonl, NaN when absent, e.g. imported series).

Tasks: `DIR/<name>/task.json` (the layout of the `bigbench` package's `benchmark_tasks/`; `extract_tasks`
copies them out of a downloaded copy) or a single task.json. Xia's filter keeps multiple-choice tasks with
< 1000 examples whose every example has exactly one correct target (target_scores value 1); a task given
explicitly that fails it is refused with one line naming the example, tasks found by scanning a directory
are skipped with the reason logged.

Prompts the BIG-Bench way (bigbench/api/json_task.py, reimplemented): each example's input becomes
example_input_prefix + input [+ choice_prefix + choice_prefix.join(a seeded permutation of the sorted
choices) when append_choices_to_input] + example_output_prefix (defaults "\\nQ: ", "\\nA: ", "\\n  choice: ",
True); a k-shot query prepends k other seeded examples, each formatted input + its correct target, joined
by few_shot_example_separator (default "\\n"); task_prefix goes in front. Each option is scored as
log p(option tokens | [BOS] + prompt tokens), the two tokenized separately with the model's tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import shutil
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lib import errors
from lib import model as M

log = logging.getLogger("lmtrace")
MAX_EXAMPLES = 1000  # Xia's filter: fewer than this many examples


@dataclasses.dataclass
class Task:
  name: str
  examples: list[dict]  # each: input, choices (sorted), correct (index into choices)
  task_prefix: str = ""
  input_prefix: str = "\nQ: "
  output_prefix: str = "\nA: "
  choice_prefix: str = "\n  choice: "
  append_choices: bool = True
  separator: str = "\n"


def load_task(path: str, name: str | None = None) -> Task:
  """A BIG-Bench task.json that passes Xia's filter; AnalysisError (one line) otherwise."""
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.AnalysisError(f"cannot read task {path}: {e}") from e
  name = name or d.get("name") or os.path.basename(os.path.dirname(os.path.abspath(path)))
  exs = d.get("examples") or []
  if not exs:
    raise errors.AnalysisError(f"task {path} has no examples")
  if len(exs) >= MAX_EXAMPLES:
    raise errors.AnalysisError(f"task {path} has {len(exs)} examples (Xia's filter keeps < {MAX_EXAMPLES})")
  out = []
  for i, ex in enumerate(exs):
    ts = ex.get("target_scores")
    if not isinstance(ts, dict) or len(ts) < 2:
      raise errors.AnalysisError(f"task {path} example {i} is not multiple choice (needs target_scores with >= 2 options)")
    correct = [k for k, v in ts.items() if float(v) == 1.0]
    if len(correct) != 1:
      raise errors.AnalysisError(f"task {path} example {i} has {len(correct)} correct targets (exactly one is required)")
    choices = sorted(ts)
    out.append({"input": str(ex["input"]), "choices": choices, "correct": choices.index(correct[0])})
  return Task(
    name,
    out,
    d.get("task_prefix", ""),
    d.get("example_input_prefix", "\nQ: "),
    d.get("example_output_prefix", "\nA: "),
    d.get("choice_prefix", "\n  choice: "),
    bool(d.get("append_choices_to_input", True)),
    d.get("few_shot_example_separator", "\n"),
  )


def find_tasks(path: str) -> list[Task]:
  """One task.json (strict) or every */task.json under a directory that passes the filter."""
  if os.path.isfile(path):
    return [load_task(path)]
  files = sorted(glob.glob(os.path.join(path, "**", "task.json"), recursive=True))
  if not files:
    raise errors.AnalysisError(f"no task.json under {path}")
  tasks = []
  for f in files:
    try:
      tasks.append(load_task(f))
    except errors.AnalysisError as e:
      log.info("skipping %s", e)
  if not tasks:
    raise errors.AnalysisError(
      f"no task under {path} passes the filter (multiple choice, < {MAX_EXAMPLES} examples, one correct target)"
    )
  return tasks


def extract_tasks(bigbench_root: str, out_dir: str) -> int:
  """Copies benchmark_tasks/*/task.json of a downloaded `bigbench` package into out_dir/<name>/task.json."""
  files = glob.glob(os.path.join(bigbench_root, "**", "benchmark_tasks", "*", "task.json"), recursive=True)
  for f in files:
    dst = os.path.join(out_dir, os.path.basename(os.path.dirname(f)))
    os.makedirs(dst, exist_ok=True)
    shutil.copy(f, os.path.join(dst, "task.json"))
  return len(files)


def _format_input(t: Task, ex: dict, rng: np.random.RandomState) -> str:
  s = ex["input"]
  if t.append_choices:
    s = s + t.choice_prefix + t.choice_prefix.join(rng.permutation(ex["choices"]).tolist())
  return t.input_prefix + s + t.output_prefix


@dataclasses.dataclass
class Query:
  task: str
  example: int
  prompt: str
  contexts: list[np.ndarray]  # per option: [BOS] + prompt ids (the same for every option)
  options: list[np.ndarray]  # per option: its token ids
  correct: int


def build_prompts(t: Task, k: int = 2, seed: int = 0) -> list[tuple[str, list[str], int]]:
  """(prompt text, options, correct index) per example, k-shot."""
  if len(t.examples) < k + 1:
    raise errors.AnalysisError(f"task {t.name} has {len(t.examples)} examples: too few for {k} shots")
  rng = np.random.RandomState(seed)
  formatted = [_format_input(t, ex, rng) for ex in t.examples]
  out = []
  for i, ex in enumerate(t.examples):
    others = [j for j in range(len(t.examples)) if j != i]
    shots = rng.choice(others, k, replace=False) if k else []
    ctx = [formatted[j] + t.examples[j]["choices"][t.examples[j]["correct"]] for j in shots]
    prompt = t.task_prefix + t.separator.join(ctx + [formatted[i]])
    out.append((prompt, ex["choices"], ex["correct"]))
  return out


def build_queries(t: Task, tok, k: int = 2, seed: int = 0, max_len: int | None = None) -> list[Query]:
  qs = []
  for i, (prompt, options, correct) in enumerate(build_prompts(t, k, seed)):
    ctx = np.concatenate([[tok.bos_id], tok.encode(prompt)]).astype(np.int32)
    opts = [tok.encode(o) for o in options]
    for o, text in zip(opts, options):
      if len(o) == 0:
        raise errors.AnalysisError(f"task {t.name} example {i}: option {text!r} tokenizes to nothing")
      if max_len is not None and len(ctx) + len(o) > max_len:
        raise errors.AnalysisError(
          f"task {t.name} example {i}: prompt + option is {len(ctx) + len(o)} tokens, longer than the model's max_len {max_len}"
        )
    qs.append(Query(t.name, i, prompt, [ctx] * len(opts), opts, correct))
  return qs


# ----------------------------------------------------------------------------------------------
# Scoring


def model_scorer(cfg: M.ModelConfig, params, batch_rows: int = 32) -> Callable:
  """score(contexts, options) -> per option (sum log p(option | context), #tokens), batched and jitted."""
  model = M.make(cfg)
  fn = jax.jit(lambda p, b: -M.per_token_loss(model, p, b))

  def score(contexts: Sequence[np.ndarray], options: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    seqs = [np.concatenate([c, o]) for c, o in zip(contexts, options)]
    L = max(len(s) for s in seqs) - 1
    L = min(cfg.max_len, int(np.ceil(L / 16) * 16))  # few distinct shapes -> few compilations
    n = len(seqs)
    out = np.zeros(n)
    for a in range(0, n, batch_rows):
      rows = seqs[a : a + batch_rows]
      B = batch_rows
      inp = np.zeros((B, L), np.int32)
      tgt = np.zeros((B, L), np.int32)
      mask = np.zeros((B, L), np.int32)
      for r, (s, c) in enumerate(zip(rows, contexts[a : a + batch_rows])):
        inp[r, : len(s) - 1] = s[:-1]
        tgt[r, : len(s) - 1] = s[1:]
        mask[r, len(c) - 1 : len(s) - 1] = 1  # predicted option tokens
      b = {
        "inputs": jnp.asarray(inp),
        "targets": jnp.asarray(tgt),
        "mask": jnp.asarray(mask),
        "segment_ids": jnp.ones((B, L), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)),
      }
      lp = np.asarray(fn(params, b)).sum(1)
      out[a : a + len(rows)] = lp[: len(rows)]
    return out, np.asarray([len(o) for o in options])

  return score


def evaluate(queries: Sequence[Query], score: Callable) -> dict:
  """Accuracy (sum and length-normalised), random baseline and option perplexities of one task."""
  ctx = [c for q in queries for c in q.contexts]
  opt = [o for q in queries for o in q.options]
  lp, n = score(ctx, opt)
  acc, acc_n, base = [], [], []
  lp_c = lp_i = n_c = n_i = 0.0
  i = 0
  per_option = []
  for q in queries:
    m = len(q.options)
    s, t = lp[i : i + m], n[i : i + m]
    i += m
    acc.append(int(np.argmax(s)) == q.correct)
    acc_n.append(int(np.argmax(s / t)) == q.correct)
    base.append(1.0 / m)
    for j in range(m):
      per_option.append(float(s[j]))
      if j == q.correct:
        lp_c, n_c = lp_c + s[j], n_c + t[j]
      else:
        lp_i, n_i = lp_i + s[j], n_i + t[j]
  return {
    "accuracy": float(np.mean(acc)),
    "accuracy_norm": float(np.mean(acc_n)),
    "random_baseline": float(np.mean(base)),
    "n_examples": len(queries),
    "ppl_correct": float(np.exp(-lp_c / max(n_c, 1))),
    "ppl_incorrect": float(np.exp(-lp_i / max(n_i, 1))),
    "tokens_correct": int(n_c),
    "tokens_incorrect": int(n_i),
    "option_logprob": per_option,
  }


# ----------------------------------------------------------------------------------------------
# The job


def _tokenizer(run_cfg: dict):
  imp = run_cfg.get("import") or {}
  if imp.get("tokenizer"):
    from lib.tokenizer import HFTokenizer

    return HFTokenizer(imp["tokenizer"])
  src = dict(run_cfg["data"]["source"])
  if src.get("kind") == "text" and src.get("tokenizer") == "hf":
    from lib.tokenizer import HFTokenizer

    return HFTokenizer(src.get("tokenizer_model") or "")
  if src.get("kind") == "text":
    from data import text

    return _Framed(text.Tokenizer(src.get("tokenizer", "bytes"), src.get("tokenizer_model") or None))
  raise errors.AnalysisError("ICL needs a text tokenizer: an imported model (lib.hf_import) or a run on data.source.kind=text")


class _Framed:
  """lmtrace's own text tokenizers (bytes/sentencepiece) seen through the HFTokenizer interface."""

  def __init__(self, tk):
    from data import vocab

    self.tk, self.bos_id = tk, vocab.BOS

  def encode(self, s: str) -> np.ndarray:
    from data import vocab

    return self.tk.encode(s) + vocab.N_SPECIAL


def _val_loss(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  out = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          r = json.loads(line)
        except ValueError:
          continue
        if "eval/loss" in r and "step" in r:
          out[int(r["step"])] = float(r["eval/loss"])
  return out


def run_job(workdir: str, tasks_path: str, k: int = 2, seed: int = 0, steps=None, max_examples: int = 0, mesh=None):
  import pandas as pd

  from analysis.generate import write_parquet
  from lib import ckpt

  _, cfg, run_cfg = ckpt.load_model(workdir)
  ckpt.require_causal(workdir, cfg, "few-shot scoring by log-likelihood")
  tok = _tokenizer(run_cfg)
  tasks = find_tasks(tasks_path)
  queries = {}
  for t in tasks:
    q = build_queries(t, tok, k, seed, cfg.max_len)
    queries[t.name] = q[:max_examples] if max_examples else q
  avail = ckpt.available_steps(workdir)
  steps = sorted(avail) if not steps else [ckpt.resolve_step(workdir, s) for s in steps]
  vl = _val_loss(workdir)
  rows = []
  for st in steps:
    score = model_scorer(cfg, ckpt.restore_params(workdir, st, mesh))
    for name, q in queries.items():
      r = evaluate(q, score)
      rows.append({"step": st, "task": name, "k": k, "seed": seed, **r, "val_loss": vl.get(st, float("nan"))})
  df = pd.DataFrame(rows)
  os.makedirs(os.path.join(workdir, "analysis"), exist_ok=True)
  write_parquet(df, os.path.join(workdir, "analysis", "icl.parquet"))
  return df


def load_icl(workdirs: str | Sequence[str]):
  """icl.parquet of one or several workdirs (column `run` = the workdir's basename)."""
  import pandas as pd

  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  out = []
  for w in workdirs:
    path = os.path.join(w, "analysis", "icl.parquet")
    if not os.path.exists(path):
      raise errors.AnalysisError(f"{path} does not exist: run python -m analysis.icl --workdir={w} --tasks=DIR")
    df = pd.read_parquet(path)
    df.insert(0, "run", os.path.basename(os.path.abspath(w).rstrip("/")))
    out.append(df)
  return pd.concat(out, ignore_index=True)


def plot_accuracy_vs_ppl(df, x: str = "val_ppl", ax=None):
  """Xia's figure: task-averaged accuracy (with the random baseline) against validation perplexity,
  one line per run. x='val_ppl' needs val_loss; otherwise e.g. x='step'."""
  import matplotlib.pyplot as plt

  df = df.copy()
  df["val_ppl"] = np.exp(df["val_loss"])
  if ax is None:
    _, ax = plt.subplots(figsize=(5, 3.5))
  for run, g in df.groupby("run"):
    m = g.groupby("step").agg(acc=("accuracy", "mean"), base=("random_baseline", "mean"), x=(x, "first")).sort_values("x")
    ax.plot(m["x"], m["acc"], marker="o", label=str(run))
    ax.plot(m["x"], m["base"], ls=":", color="grey")
  ax.set_xlabel(x)
  ax.set_ylabel("mean accuracy")
  if x == "val_ppl":
    ax.set_xscale("log")
    ax.invert_xaxis()
  ax.legend(fontsize=7)
  return ax.figure


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m analysis.icl", description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--tasks", required=True, help="a task.json or a directory of */task.json")
  ap.add_argument("--k", type=int, default=2, help="shots")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--steps", default="all")
  ap.add_argument("--max_examples", type=int, default=0, help="examples per task (0 = all)")
  a = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    steps = None if a.steps == "all" else [int(s) for s in a.steps.split(",")]
    df = run_job(a.workdir, a.tasks, a.k, a.seed, steps, a.max_examples)
  except errors.LmtraceError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(df.drop(columns=["option_logprob"]).groupby("step")[["accuracy", "accuracy_norm", "random_baseline"]].mean().to_string())
  return 0


if __name__ == "__main__":
  sys.exit(main())
