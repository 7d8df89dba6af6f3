"""Few-shot multiple-choice evaluation on BIG-Bench JSON tasks, per checkpoint (Xia et al. 2022).

  python -m analysis.icl --workdir=W --tasks=DIR [--k=2] [--seed=0] [--steps=all] [--max_examples=0]
                         [--bigbench_compatible]
  -> W/analysis/icl.parquet: one row per (step, task): accuracy (sum of option log-probs), accuracy_norm
     (per-token, length-normalised), mc_grade (BIG-Bench's multiple_choice_grade: the mean target score of
     the chosen option, = accuracy for 0/1 scores), random_baseline (mean 1/#choices), ppl_correct /
     ppl_incorrect (option perplexity exp(-Σ log p / Σ tokens) over correct / incorrect options), tokens of
     each, val_loss (the run's eval/loss at that step from metrics.jsonl, NaN when absent, e.g. imported
     series), mode ("lmtrace" or "bigbench": which prompts and scoring made the row), k, seed.

Tasks: `DIR/<name>/task.json` (the layout of the `bigbench` package's `benchmark_tasks/`; `extract_tasks`
copies them out of a downloaded copy, composite tasks' `<name>/<sub>/task.json` included) or a single
task.json. How files are read and checked (BOM, duplicates, graded target_scores, subtasks `parent:sub`,
Xia's filter: multiple choice, < 1000 examples, one top-scoring option) is analysis/bigbench_tasks.py's
doc. A task given explicitly that fails is refused with one line; a directory scan skips each bad file
with one line and goes on.

Prompts the BIG-Bench way: each example's input becomes example_input_prefix + input [+ choice_prefix +
choice_prefix.join(a seeded permutation of the sorted choices) when append_choices_to_input] +
example_output_prefix (defaults "\\nQ: ", "\\nA: ", "\\n  choice: ", True); a k-shot query prepends k other
seeded examples, each formatted input + its answer, joined by few_shot_example_separator (default "\\n");
task_prefix goes in front. Each option is scored as log p(option tokens | context), prompt and option
tokenized separately with the model's tokenizer. --max_examples caps the queries per task (a composite
task's cap is split evenly among its subtasks, as BIG-Bench does). Two modes, named in the `mode` column:
* lmtrace (default, seed 0): lmtrace's own draws (the numbers of earlier runs stay comparable); context =
  [BOS] + prompt tokens, as lmtrace's own models are trained on BOS-framed sequences; --max_examples scores
  a seeded sample of the queries.
* --bigbench_compatible (seed 42, BIG-Bench's default, unless given): prompts, shots, option shuffles,
  option order, query order and the --max_examples sample equal those of BIG-Bench's JsonTask for the same
  seed; context = prompt tokens without BOS, as BIG-Bench's Hugging Face scorer does; argmax ties are
  broken by BIG-Bench's hash of the normalised log-probabilities. Use it to compare with published
  BIG-Bench numbers of models whose tokenizer adds no BOS (GPT-2, Pythia imports).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from analysis.bigbench_tasks import (  # noqa: F401 - load_task, extract_tasks and build_prompts are re-exported
  MAX_EXAMPLES,
  Task,
  build_prompts,
  draw,
  extract_tasks,
  find_tasks,
  load_task,
  load_tasks,
)
from analysis.jobs import Workdir, option
from lib import errors
from lib import model as M

log = logging.getLogger("lmtrace")
TABLE = "icl.parquet"
MODES = {False: "lmtrace", True: "bigbench"}  # the table's `mode` column, by bigbench_compatible


@dataclasses.dataclass
class Query:
  task: str
  example: int
  prompt: str
  contexts: list[np.ndarray]  # per option: [BOS] + prompt ids, or prompt ids alone (BIG-Bench mode)
  options: list[np.ndarray]  # per option: its token ids
  correct: int
  scores: list[float] | None = None  # per option: its target score (for mc_grade)


def build_queries(
  t: Task, tok, k: int = 2, seed: int = 0, max_len: int | None = None, max_examples: int = 0, bigbench: bool = False
) -> list[Query]:
  """Tokenized k-shot queries of a task (see bigbench_tasks.draw for which queries, in which order)."""
  qs = []
  for i, prompt, options in draw(t, k, seed, max_examples, bigbench):
    ids = tok.encode(prompt)
    ctx = np.asarray(ids if bigbench else np.concatenate([[tok.bos_id], ids]), np.int32)
    if len(ctx) == 0:
      raise errors.AnalysisError(f"task {t.name} example {i}: the prompt tokenizes to nothing (BIG-Bench mode adds no BOS)")
    opts = [tok.encode(o) for o in options]
    for o, text in zip(opts, options):
      if len(o) == 0:
        raise errors.AnalysisError(f"task {t.name} example {i}: option {text!r} tokenizes to nothing")
      if max_len is not None and len(ctx) + len(o) > max_len:
        raise errors.AnalysisError(
          f"task {t.name} example {i}: prompt + option is {len(ctx) + len(o)} tokens, longer than the model's max_len {max_len}"
        )
    ex = t.examples[i]
    correct = options.index(ex["choices"][ex["correct"]])
    qs.append(Query(t.name, i, prompt, [ctx] * len(opts), opts, correct, [ex["scores"][o] for o in options]))
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


def bigbench_argmax(logprobs: np.ndarray, absolute_normalization: bool = False) -> int:
  """BIG-Bench's choice among options: the highest log-probability, a tie broken by a hash of the scores
  (sha256 of the float64 log-probabilities, normalised over the options unless the task says
  absolute_normalization), so that tied options are not always resolved to the first."""
  lp = np.asarray(logprobs, np.float64)
  if not absolute_normalization:
    lp = lp - logsumexp(lp)
  top = np.flatnonzero(lp == np.max(lp))
  return int(top[int(hashlib.sha256(lp.tobytes()).hexdigest(), 16) % len(top)])


def evaluate(queries: Sequence[Query], score: Callable, bigbench: bool = False, absolute_normalization: bool = False) -> dict:
  """Accuracy (sum and length-normalised), BIG-Bench's grade, random baseline and option perplexities of one
  task. bigbench=True breaks argmax ties as BIG-Bench does (bigbench_argmax), else the first option wins."""
  ctx = [c for q in queries for c in q.contexts]
  opt = [o for q in queries for o in q.options]
  lp, n = score(ctx, opt)
  acc, acc_n, base, grade = [], [], [], []
  lp_c = lp_i = n_c = n_i = 0.0
  i = 0
  per_option = []
  for q in queries:
    m = len(q.options)
    s, t = lp[i : i + m], n[i : i + m]
    i += m
    chosen = bigbench_argmax(s, absolute_normalization) if bigbench else int(np.argmax(s))
    acc.append(chosen == q.correct)
    grade.append(q.scores[chosen] if q.scores is not None else float(chosen == q.correct))
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
    "mc_grade": float(np.mean(grade)),
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


def task_budget(t: Task, max_examples: int) -> int:
  """--max_examples for one task: BIG-Bench splits it evenly among a composite task's subtasks."""
  if not max_examples or t.n_siblings == 1:
    return max_examples
  per = max_examples // t.n_siblings
  if per < 1:
    parent = t.name.split(":")[0]
    raise errors.AnalysisError(f"max_examples ({max_examples}) must be >= the number of subtasks of {parent} ({t.n_siblings})")
  return per


@dataclasses.dataclass(frozen=True)
class Job:
  """Few-shot multiple choice on the BIG-Bench tasks at `tasks`, at every requested checkpoint."""

  tasks: str = option(help="a task.json, a task folder, or a folder of <task>/task.json")  # required
  k: int = option(2, "shots")
  seed: int | None = option(None, "0 by default; 42 (BIG-Bench's) with --bigbench_compatible")
  steps: str = option("all", "'all' or comma-separated steps")
  max_examples: int = option(0, "queries per task, a seeded sample (0 = all)")
  bigbench_compatible: bool = option(
    False, "prompts, draws and scoring (no BOS) equal to BIG-Bench's json_task.py for the same seed"
  )
  mesh: str = option("", "data,fsdp,tensor sizes (default: one device)")


def run(workdir: Workdir | str, job: Job):
  """The table (see the module doc), also written to W/analysis/icl.parquet."""
  from lib import sharding

  return _run(Workdir.open(workdir), job, sharding.mesh_from_flag(job.mesh) if job.mesh else None)


def _run(wd: Workdir, job: Job, mesh):
  import pandas as pd

  from analysis.generate import write_parquet

  wanted = _steps(job.steps)  # a bad --steps is one line before any work
  bb = bool(job.bigbench_compatible)
  seed, k = (42 if bb else 0) if job.seed is None else job.seed, job.k
  cfg = wd.model_config
  wd.require_causal("few-shot scoring by log-likelihood")
  tok = _tokenizer(wd.config)
  tasks = find_tasks(job.tasks)
  queries = {t.name: (t, build_queries(t, tok, k, seed, cfg.max_len, task_budget(t, job.max_examples), bb)) for t in tasks}
  steps = wd.select(wanted)
  vl = _val_loss(wd.path)
  rows = []
  for st in steps:
    score = model_scorer(cfg, wd.restore(st, mesh))
    for name, (t, q) in queries.items():
      r = evaluate(q, score, bb, t.absolute_normalization)
      rows.append({"step": st, "task": name, "mode": MODES[bb], "k": k, "seed": seed, **r, "val_loss": vl.get(st, float("nan"))})
  df = pd.DataFrame(rows)
  os.makedirs(wd.analysis_dir, exist_ok=True)
  write_parquet(df, wd.table(TABLE))
  return df


def run_job(
  workdir: str,
  tasks_path: str,
  k: int = 2,
  seed: int | None = None,
  steps=None,
  max_examples: int = 0,
  mesh=None,
  bigbench_compatible: bool = False,
):
  """`run` with loose arguments (earlier releases' call): `steps` a list of ints or None (all), `mesh` a
  Mesh or None (one device)."""
  steps = "all" if not steps else ",".join(str(int(s)) for s in steps)
  return _run(Workdir.open(workdir), Job(tasks_path, k, seed, steps, max_examples, bool(bigbench_compatible)), mesh)


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


def _steps(arg: str) -> list[int] | None:
  if arg in ("all", ""):
    return None
  try:
    return [int(s) for s in arg.split(",")]
  except ValueError as e:
    raise errors.AnalysisError(f"--steps={arg}: not 'all' or a comma-separated list of integers") from e


def _report(w, df, args) -> None:
  cols = ["accuracy", "accuracy_norm", "mc_grade", "random_baseline"]
  print(df.drop(columns=["option_logprob"]).groupby(["mode", "step"])[cols].mean().to_string())


def main(argv: Sequence[str] | None = None) -> int:
  from analysis import jobs

  logging.basicConfig(level=logging.INFO, format="%(message)s")
  kept = "nothing written (the table is written at the end)"
  return jobs.main(Job, run, argv, prog="icl", doc=__doc__, workdirs="one", report=_report, kept=kept, prefix="error: ")


if __name__ == "__main__":
  sys.exit(main())
