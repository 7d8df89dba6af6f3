"""Chang, Tu & Bergen (TACL 2024) in one command: 5 seeds, log-spaced checkpoints, per-token curves,
n-gram predictors, regressions with likelihood-ratio tests, figures and a report.

  python -m experiments.chang --out=DIR [--scale=nano|quick|paper]

Steps: a sweep over `seed` (trained as ONE vectorised group, lib/multirun.py) with Chang's exponential
checkpoint schedule (save interval growing linearly, `ckpt.schedule=exponential:...`) -> offline probe
surprisals at every checkpoint (analysis.trajectories; 10 random positions per validation document,
never the first) -> every Chang metric (analysis.curves via write_token_metrics, in bits) -> n-gram
predictors joined per token -> sequential LRTs of each metric on unigram, 5-gram (residualised on the
unigram), log context length and context log-prob -> figures -> DIR/report.md beside the paper's findings
(Chang, Tu and Bergen, "Characterizing Learning Curves During Language Model Pre-Training", TACL 2024).

Outputs in DIR: runs/base/seed_<s>/ (ordinary workdirs), token_metrics.parquet (metrics + predictors),
regressions.csv (one row per metric x added block), effects.csv (signs of each predictor in the full
model), fig_*.png, report.md.

Scales (data: the default random PCFG language of configs/pcfg.py; `paper` is GPT-2 sized and for an
accelerator: see README):
  nano   nano model, 60 steps, 40 probe documents — what the tests run (seconds of training)
  quick  tiny model, 2000 steps, 300 probe documents (≤ 20 min on 2 idle CPU cores was the target)
  faithful  the paper's protocol on a CPU-sized model: 5 seeds, 4000 steps, 135 log-spaced checkpoints,
         600 probe documents (6000 tokens); every frequency effect with a bootstrap CI
  paper  opt-125m-sized model, 100k steps, 10k probe documents (accelerator)
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd

from analysis import stats
from analysis import token_table as TT
from experiments import cli
from experiments.sweep import Sweep
from lib import errors

SCALES = {
  "nano": dict(
    preset="nano", steps=60, batch=8, seq_len=32, n_train=1000, sequences=40, schedule="exponential:s0=1,s1=4", ngram_docs=1000
  ),
  "quick": dict(
    preset="tiny",
    steps=2000,
    batch=16,
    seq_len=64,
    n_train=50_000,
    sequences=300,
    schedule="exponential:s0=10,s1=60",
    ngram_docs=50_000,
  ),
  "faithful": dict(
    preset="tiny",
    steps=4000,
    batch=16,
    seq_len=64,
    n_train=100_000,
    sequences=600,
    schedule="exponential:s0=4,s1=100",
    ngram_docs=100_000,
  ),
  "paper": dict(
    preset="opt-125m",
    steps=100_000,
    batch=256,
    seq_len=128,
    n_train=2_000_000,
    sequences=10_000,
    schedule="exponential:s0=100,s1=2500",
    ngram_docs=2_000_000,
  ),
}
# diagnostic: the faithful protocol with each seed reading its own data order (the paper's runs may differ in
# data order as well as initialisation; the other scales share one order)
SCALES["faithful_data_order"] = dict(SCALES["faithful"], data_seed=-1)
SEEDS = [0, 1, 2, 3, 4]
BLOCKS = TT.CHANG_BLOCKS  # unigram, ngram (residualised on unigram), context_loglen, context_logprob


def sweep_spec(scale: str, data_dir: str = "") -> dict:
  s = SCALES[scale]
  small = scale == "nano"
  over = {
    "probes.enabled": False,  # the probe hook keeps host state per run; surprisals are extracted offline
    "train.steps": s["steps"],
    "train.batch_size": s["batch"],
    "train.log_every": max(1, s["steps"] // 10),
    "data.seq_len": s["seq_len"],
    "model.max_len": max(s["seq_len"], 32),
    "data.source.n_train": s["n_train"],
    "data.source.n_validation": max(100 if small else 1000, s["sequences"]),
    "data.source.n_test": 50 if small else 1000,
    "ckpt.schedule": s["schedule"],
    "ckpt.resume_every": max(s["steps"] // 4, 1),
    "ckpt.params_only": True,
    "eval.every": s["steps"],
    "eval.batches": 1 if small else 4,
    "eval.batch_size": 8 if small else 16,
    "log.tensorboard": False,
  }
  if "data_seed" in s:
    over["data.seed"] = s["data_seed"]
  if data_dir:
    over["data.data_dir"] = data_dir
  return {"name": f"chang-{scale}", "config": f"configs/chang.py:{s['preset']}", "set": over, "axes": {"seed": SEEDS}}


def train_and_extract(
  sw: Sweep, sequences: int, positions: int, unit: str = "bits", freq_docs: int = 100_000
) -> tuple[list[str], pd.DataFrame]:
  """Runs the sweep, extracts probe surprisals at every checkpoint, returns (workdirs, token metrics)."""
  from analysis import trajectories as TJ

  sw.run(log=lambda m: print(m, flush=True))
  wds = [r.workdir for r in sw.runs()]
  TJ.run(wds, TJ.Job(sequences=sequences, positions=positions, probe_seed=0, quiet=True))
  return wds, None if len(wds) < 2 else TJ.write_token_metrics(wds, unit=unit, freq_docs=freq_docs)[0]


def regressions(tm: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
  """(sequential LRT table, full-model effects table) from analysis.token_table.chang_regressions (predictors
  clipped at 5σ as Chang's code does; the n-gram block residualised on log-frequency)."""
  lrt = TT.chang_regressions(tm)
  eff = lrt[lrt.block != "intercept"].rename(columns={"block": "predictor"})[
    ["metric", "predictor", "coef", "coef_se", "coef_p", "nobs"]
  ]
  return lrt.rename(columns={"nobs": "n"}), eff.rename(columns={"coef_p": "p", "nobs": "n"}).reset_index(drop=True)


PAPER_CITATION = "Chang, Tu and Bergen, TACL 2024, arXiv:2308.15419"

# The paper's findings (its abstract and results) as signs of the frequency (unigram log-prob) effect on each metric.
PAPER_SIGNS = {
  "final_surprisal": (-1, "more frequent tokens reach lower final surprisal"),
  "var_steps": (-1, "... vary less within a run"),
  "var_runs": (-1, "... vary less across runs"),
  "aoa_gam": (-1, "... are acquired earlier"),
  "forgettability": (-1, "... are less forgettable"),
}


def _corr(x: np.ndarray, y: np.ndarray) -> float:
  return float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and np.std(x) > 0 and np.std(y) > 0 else float("nan")


def frequency_effects(tm: pd.DataFrame, eff: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
  """Each of the paper's five frequency effects with its uncertainty: Pearson r of the run-averaged metric
  with log frequency and its 95% CI from a bootstrap over token TYPES (a type's probe tokens share its
  frequency, so they are not independent draws), the r of every seed alone (metrics measured per run),
  and the unigram coefficient of the full regression with its 95% CI (±1.96 SE; this one treats tokens
  as independent). Verdict from the type-bootstrap CI of r: `reproduces` (excludes 0 on the paper's
  side), `opposite` (excludes 0 on the other side), `inconclusive` (contains 0)."""
  rows = []
  for m, (sign, claim) in PAPER_SIGNS.items():
    if m not in tm:
      continue
    d = tm[[m, "log_freq", "token"]].dropna()
    x, y, types = d["log_freq"].to_numpy(float), d[m].to_numpy(float), d["token"].to_numpy()
    r = _corr(x, y)
    lo, hi = stats.cluster_bootstrap(lambda i, x=x, y=y: _corr(x[i], y[i]), len(d), clusters=types, n_boot=n_boot)
    seed_r = []
    for c in sorted(c for c in tm.columns if c.startswith(f"{m}_r") and c[len(m) + 2 :].isdigit()):
      dd = tm[[c, "log_freq"]].dropna()
      seed_r.append(_corr(dd["log_freq"].to_numpy(float), dd[c].to_numpy(float)))
    e = eff[(eff.metric == m) & (eff.predictor == "unigram")] if len(eff) else pd.DataFrame()
    coef = float(e.coef.iloc[0]) if len(e) else float("nan")
    se = float(e.coef_se.iloc[0]) if len(e) and "coef_se" in e else float("nan")
    if not (np.isfinite(lo) and np.isfinite(hi)):
      verdict = "n/a"
    elif lo > 0 or hi < 0:
      verdict = "reproduces" if np.sign(r) == sign else "opposite"
    else:
      verdict = "inconclusive"
    rows.append(
      dict(
        metric=m,
        paper=claim,
        paper_sign=sign,
        r=r,
        r_lo=lo,
        r_hi=hi,
        seed_r_min=min(seed_r) if seed_r else float("nan"),
        seed_r_max=max(seed_r) if seed_r else float("nan"),
        n_seeds=len(seed_r),
        coef=coef,
        coef_lo=coef - 1.96 * se,
        coef_hi=coef + 1.96 * se,
        n_tokens=len(d),
        n_types=len(np.unique(types)),
        verdict=verdict,
      )
    )
  return pd.DataFrame(rows)


def _partial_coef(y: np.ndarray, x: np.ndarray, z: np.ndarray) -> float:
  """Coefficient of x in OLS y ~ 1 + x + z (z-scored x, so effects are per sd of log frequency)."""
  if len(y) < 4 or np.std(x) == 0:
    return float("nan")
  X = np.column_stack([np.ones_like(x), (x - x.mean()) / x.std(), z])
  return float(np.linalg.lstsq(X, y, rcond=None)[0][1])


def diagnostics(tm: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
  """Two checks of the variability effects, on the same runs: (1) the frequency effect on each variability
  metric holding the final surprisal fixed (frequent tokens are also the well-predicted ones, and the
  variability of a surprisal curve grows or shrinks with its level); (2) the variability relative to the
  level (metric / final surprisal, a coefficient of variation). CIs from the token-type bootstrap."""
  rows = []
  for m in ("var_steps", "var_runs"):
    if m not in tm or "final_surprisal" not in tm:
      continue
    d = tm[[m, "final_surprisal", "log_freq", "token"]].dropna()
    types = d["token"].to_numpy()
    y, f, x = (d[m].to_numpy(float), d["final_surprisal"].to_numpy(float), d["log_freq"].to_numpy(float))
    if m == "var_runs":
      y = np.sqrt(y)  # a standard deviation, like var_steps
    pc = _partial_coef(y, x, f)
    lo, hi = stats.cluster_bootstrap(
      lambda i, y=y, x=x, f=f: _partial_coef(y[i], x[i], f[i]), len(d), clusters=types, n_boot=n_boot
    )
    rows.append(dict(metric=m, check="frequency effect given final surprisal (coef per sd)", value=pc, ci_lo=lo, ci_hi=hi))
    rel = y / np.maximum(f, 1e-6)
    r = _corr(x, rel)
    lo, hi = stats.cluster_bootstrap(lambda i, x=x, rel=rel: _corr(x[i], rel[i]), len(d), clusters=types, n_boot=n_boot)
    rows.append(dict(metric=m, check="r(log freq, variability / final surprisal)", value=r, ci_lo=lo, ci_hi=hi))
  return pd.DataFrame(rows)


def protocol(wds: list[str], tm: pd.DataFrame, steps: list[int], scale: str) -> pd.DataFrame:
  """The paper's protocol as invariants measured from the runs (faithful targets; smaller scales fail some)."""
  from lib import ckpt as C

  cfgs = [C.read_config(w) for w in wds]
  finished = [w for w, c in zip(wds, cfgs) if max(C.available_steps(w)) == c["train"]["steps"]]
  diverged = [w for w in wds if os.path.exists(os.path.join(w, "diverged.json"))]
  per_doc = tm.groupby("doc").size()
  sched = {c["ckpt"]["schedule"] for c in cfgs}
  rows = [
    ("seeds trained to the end", "≥ 5 (paper: 5)", len(finished) - len(diverged), len(finished) - len(diverged) >= 5),
    ("checkpoints shared by every run", "≥ 100 (paper: 222)", len(steps), len(steps) >= 100),
    (
      "checkpoint schedule",
      "exponential: save interval grows linearly (paper: 100 → 25,000 steps)",
      "; ".join(sorted(sched)),
      all(x.startswith("exponential") for x in sched),
    ),
    (
      "probe positions per document",
      "≤ 10, never position 0",
      f"max {per_doc.max()}, min position {tm.position.min()}",
      bool(per_doc.max() <= 10 and tm.position.min() >= 1),
    ),
    ("unit", "bits", "bits", True),
    ("final surprisal / within-run window", "last 11 checkpoints", "last 11 checkpoints", len(steps) >= 11 * 4),
  ]
  return pd.DataFrame(rows, columns=["invariant", "target", "measured", "ok"]).assign(
    ok=lambda d: d.ok.map({True: "✓", False: "✗"})
  )


def figures(out: str, wds: list[str], tm: pd.DataFrame) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  from analysis import load as LD
  from analysis import plots

  paths = []
  fig = plots.aoa_vs_frequency(tm, x="log_freq", y="aoa_gam")
  paths.append(os.path.join(out, "fig_aoa_vs_frequency.png"))
  fig.savefig(paths[-1], dpi=120)
  da = LD.load_trajectories(wds, unit="bits")
  order = np.argsort(tm["log_freq"].to_numpy())
  toks = [int(order[-1]), int(order[len(order) // 2]), int(order[0])]  # a frequent, a median, a rare token
  fig = plots.learning_curves(da, tokens=toks)
  paths.append(os.path.join(out, "fig_learning_curves.png"))
  fig.savefig(paths[-1], dpi=120)
  if "final_surprisal_r0" in tm and "final_surprisal_r1" in tm:
    fig = plots.cross_run_scatter(tm, "final_surprisal")
    paths.append(os.path.join(out, "fig_crossrun_final_surprisal.png"))
    fig.savefig(paths[-1], dpi=120)
  return paths


def report(
  out: str,
  scale: str,
  tm: pd.DataFrame,
  lrt: pd.DataFrame,
  fx: pd.DataFrame,
  proto: pd.DataFrame,
  diag: pd.DataFrame,
  figs,
  n_ckpt: int,
) -> str:
  lines = [
    f"# Chang et al. (2024) learning curves — scale `{scale}`",
    "",
    f"Paper: {PAPER_CITATION}.",
    "",
    f"{len(SEEDS)} seeds trained as one vectorised group; {n_ckpt} checkpoints on the exponential schedule; "
    f"{len(tm)} probe tokens of {tm['token'].nunique()} types (≤ 10 random positions per validation document, never "
    "the first). Surprisal in bits. Data: a random PCFG language (configs/pcfg.py), not the paper's English corpus; "
    "the model and run are far smaller than GPT-2 × 1M steps.",
    "",
    "## Protocol",
    "",
    *cli.md_table(proto, ["invariant", "target", "measured", "ok"]),
    "",
    "## Frequency effects beside the paper",
    "",
    "r: Pearson correlation of the run-averaged metric with log10 frequency, 95% CI from 1000 bootstrap "
    "resamples of token types; per-seed r: the same correlation in each seed alone (cross-run variability "
    "exists only across seeds); coef: the unigram coefficient of the full regression (unigram, n-gram, "
    "context length, context log-prob) ± 1.96 SE. Verdict from the CI of r.",
    "",
    "| metric | paper | r [95% CI] | per-seed r | unigram coef [95% CI] | verdict |",
    "|---|---|---|---|---|---|",
  ]
  for _, f in fx.iterrows():
    seeds = f"{f.seed_r_min:+.2f} … {f.seed_r_max:+.2f}" if f.n_seeds else "–"
    lines.append(
      f"| {f.metric} | {f.paper} (sign {'−' if f.paper_sign < 0 else '+'}) | {f.r:+.3f} [{f.r_lo:+.3f}, {f.r_hi:+.3f}] | "
      f"{seeds} | {f.coef:+.3f} [{f.coef_lo:+.3f}, {f.coef_hi:+.3f}] | {f.verdict} |"
    )
  lines += [
    "",
    "Paper (Chang et al. 2024): more frequent tokens reach lower final surprisal, vary less within and across runs, "
    "are acquired earlier and are less forgettable; higher n-gram probability accentuates these; shorter and more "
    "frequent contexts give marginally more stable, earlier-acquired predictions. The paper reports these as "
    "signs of regression effects (its R² and LRT values are printed by its code, not tabulated), so signs and "
    "their uncertainty are what is compared.",
    "",
    "## Diagnostics of the variability effects",
    "",
    "The same runs, two further views (95% CIs from the token-type bootstrap). A negative value is the paper's "
    "direction. For var_runs the square root is used, so both metrics are standard deviations.",
    "",
    *(cli.md_table(diag, ["metric", "check", "value", "ci_lo", "ci_hi"]) if len(diag) else ["(not computed)"]),
    "",
    "## Sequential likelihood-ratio tests (predictors clipped at mean ± 5 sd as Chang's code; blocks added in Chang's order)",
    "",
  ]
  if len(lrt):
    lines += cli.md_table(lrt, ["metric", "block", "df", "r2", "adj_r2", "delta_adj_r2", "lr_stat", "p", "n"])
  lines += ["", "Not included here: contextual diversity and POS tags (no POS for a synthetic language)."]
  return cli.write_report(out, lines, figs, scale)


def run(out: str, scale: str = "nano", data_dir: str = "") -> dict:
  """The whole experiment into `out`; resumable (finished training and stored checkpoints are skipped)."""
  if scale not in SCALES:
    raise errors.ConfigError(f"--scale={scale!r}: expected one of {', '.join(SCALES)}")
  s = SCALES[scale]
  sw = Sweep.from_dict(sweep_spec(scale, data_dir), out)
  wds, tm = train_and_extract(sw, s["sequences"], positions=10, freq_docs=s["ngram_docs"])
  feats = TT.chang_features(tm)  # Chang's predictors: unigram and ngram (residualised on unigram), clipped at 5 sd
  tm = tm.assign(unigram=feats["unigram"], ngram=feats["ngram"])
  tm.to_parquet(os.path.join(out, "token_metrics.parquet"), index=False)
  lrt, eff = regressions(tm)
  lrt.to_csv(os.path.join(out, "regressions.csv"), index=False)
  eff.to_csv(os.path.join(out, "effects.csv"), index=False)
  fx = frequency_effects(tm, eff)
  fx.to_csv(os.path.join(out, "frequency_effects.csv"), index=False, float_format="%.6g")
  figs = figures(out, wds, tm)
  from lib import ckpt as C

  steps = sorted(set.intersection(*(set(C.available_steps(w)) for w in wds)))
  proto = protocol(wds, tm, steps, scale)
  proto.to_csv(os.path.join(out, "protocol.csv"), index=False)
  diag = diagnostics(tm)
  diag.to_csv(os.path.join(out, "diagnostics.csv"), index=False, float_format="%.6g")
  report(out, scale, tm, lrt, fx, proto, diag, figs, len(steps))
  return {
    "workdirs": wds,
    "token_metrics": tm,
    "regressions": lrt,
    "effects": eff,
    "frequency_effects": fx,
    "protocol": proto,
    "diagnostics": diag,
    "figures": figs,
  }


PUBLISH = (
  "report.md",
  "frequency_effects.csv",
  "protocol.csv",
  "diagnostics.csv",
)  # what --publish copies (the figures stay in DIR)


def main(argv=None) -> int:
  return cli.main("chang", __doc__, SCALES, run, argv, publish=PUBLISH)


if __name__ == "__main__":
  sys.exit(main())
