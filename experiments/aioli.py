"""The Aioli paper's Table 2 on synthetic groups with known optima: every mixing method vs stratified.

  python -m experiments.aioli --out=DIR [--scale=nano|quick|paper] [--seeds=N]

For each setting (groups of PCFG / HMM / bigram languages of different difficulty and size) and seed,
runs every method through the trainer, skipping finished runs (a run is finished when its workdir's
metrics hold the end-of-run test row), then writes
  DIR/aioli.parquet      one row per (setting, seed, method): final average test ppl, its difference
                         to stratified, extra runs, the final p, the chosen run's workdir
  DIR/p_over_time.parquet  p (or DoReMi/DoGE's weights w) per logged step, per method
  DIR/p_over_time.png    p of the first group over time, one line per method, one panel per setting
  DIR/report.md          the Table-2-shaped table beside the paper's Table 2 (papers.md §4.5)

Methods and their extra runs (as the paper counts them):
  stratified  p = 1/m                                                                  0
  GS          best (validation) of N static runs on a Dirichlet cover of the simplex    N
  DML         static law fitted on GS's N runs (L-BFGS + Huber), argmin run              N (+ the final run)
  Skill-It    skills graph from m one-hot runs, then online Skill-It                    m
  DoReMi      the stratified run is the reference; proxy on reweighted loss; final static run on avg w  2
  DoGE        proxy with per-group gradient weights; final static run on avg w          1
  Aioli       online, no extra runs                                                     0

Runs go through ONE function, `run_grid(runs, out)` (a list of named configs), so a sweep runner
(experiments/sweep.py) can replace it. Expected runtime: nano ≈ 2-4 min, quick ≤ 30 min on 2 CPU cores
(see README for what was measured); paper = the same synthetic settings at the paper's 5k steps
(hours; the paper's SlimPajama groups are not bundled and are never downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections as mlc
import numpy as np

from configs import base
from lib import mixing_laws
from lib.errors import LmtraceError

PAPER_TABLE2 = """| Method | A/SE | GH/C4 | B/SE | A/B/SE | CC/GH/W | SlimPajama | #<strat | extra runs |
|---|---|---|---|---|---|---|---|---|
| Stratified (abs) | 16.532 | 35.991 | 47.192 | 35.114 | 41.583 | 26.426 | – | 0 |
| GS | −0.399 | −0.407 | −0.645 | −0.247 | +0.298 | +0.490 | 4 | 10 |
| DML | −0.241 | −0.110 | −0.644 | −0.599 | +0.242 | +1.641 | 4 | 10 |
| Skill-It | −0.326 | +0.551 | −0.728 | −0.568 | −0.195 | −0.184 | 5 | m |
| DoReMi | −0.307 | +5.303 | −0.217 | −0.393 | +6.898 | +0.703 | 3 | 2 |
| DoGE | +0.419 | +0.184 | −0.678 | +1.843 | +0.604 | +0.949 | 1 | 1 |
| **Aioli** | −0.205 | −0.340 | −0.439 | −0.226 | −0.196 | −0.240 | **6** | 0 |"""

METHODS = ("stratified", "gs", "dml", "skillit", "doremi", "doge", "aioli")
LABELS = {
  "stratified": "Stratified",
  "gs": "GS",
  "dml": "DML",
  "skillit": "Skill-It",
  "doremi": "DoReMi",
  "doge": "DoGE",
  "aioli": "Aioli",
}


def _spec(kind: str, seed: int, n_train: int, n_val: int, n_test: int, **kw) -> dict:
  return dict(kind=kind, seed=seed, n_train=n_train, n_validation=n_val, n_test=n_test, **kw)


def settings(scale: str) -> dict[str, dict]:
  """Group settings: name -> {group: source spec}. Groups differ in difficulty (entropy) and size."""
  if scale == "nano":
    return {
      "bigram2": {
        "easy": _spec("bigram", 1, 400, 40, 40, n_terminals=16),
        "hard": _spec("bigram", 2, 200, 40, 40, n_terminals=16),
      }
    }
  big = scale == "paper"
  n, v = (50_000, 1_000) if big else (4_000, 200)
  pc = dict(n_terminals=60)
  return {
    "pcfg2": {
      "easy": _spec("pcfg", 1, n, v, v, n_nonterminals=12, n_roots=3, levels=2, **pc),
      "hard": _spec("pcfg", 3, n // 2, v, v, n_nonterminals=40, **pc),
    },
    "hmm_pcfg": {
      "hmm": _spec("hmm", 0, n, v, v, n_states=20, n_tokens=60, length=16),
      "pcfg": _spec("pcfg", 2, n, v, v, n_nonterminals=25, n_roots=5, levels=3, **pc),
    },
    "pcfg3": {
      "easy": _spec("pcfg", 1, n, v, v, n_nonterminals=12, n_roots=3, levels=2, **pc),
      "medium": _spec("pcfg", 2, n // 2, v, v, n_nonterminals=25, n_roots=5, levels=3, **pc),
      "hard": _spec("pcfg", 3, n // 4, v, v, n_nonterminals=40, **pc),
    },
  }


SCALES = {
  # steps, batch, seq_len, model preset, #GS points, Aioli (U, R, s, eta), Skill-It update steps, seeds
  "nano": dict(steps=16, batch=8, seq_len=32, model="nano", gs=4, aioli=(8, 1, 1, 1.0), skillit=4, seeds=1, mu=1.0),
  "quick": dict(steps=120, batch=16, seq_len=32, model="nano", gs=5, aioli=(40, 1, 2, 1.0), skillit=20, seeds=2, mu=1.0),
  "paper": dict(steps=5000, batch=16, seq_len=64, model="tiny", gs=10, aioli=(250, 4, 4, 0.2), skillit=500, seeds=5, mu=0.01),
}


def run_config(scale: str, groups: dict, seed: int, data_dir: str, **mixture) -> mlc.ConfigDict:
  """One run's config: the scale's model and budget, the setting's groups, a mixture method."""
  s = SCALES[scale]
  c = base.defaults()
  c.model = base.model_config(s["model"])
  c.model.vocab_size = -1
  c.model.max_len = s["seq_len"]
  c.data.groups = mlc.ConfigDict(groups)
  c.data.data_dir = data_dir
  c.data.seq_len = s["seq_len"]
  c.data.num_threads = 1
  c.train.steps, c.train.batch_size = s["steps"], s["batch"]
  c.train.log_every = max(1, s["steps"] // 16)
  c.eval.every, c.eval.batches, c.eval.batch_size = s["steps"], 2, 8
  c.ckpt.schedule, c.ckpt.resume_every, c.ckpt.keep_resume = f"interval:every={s['steps']}", s["steps"], 1
  c.ckpt.async_save = False
  c.log.tensorboard = False
  c.opt.lr = 3e-3
  c.seed = seed
  c.mixture.update(mixture)
  return c


def finished(workdir: str) -> bool:
  return any("test/avg_ppl" in r for r in read_rows(workdir))


def read_rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  return [json.loads(x) for x in open(path)] if os.path.exists(path) else []


def run_grid(runs: list[dict], out: str) -> None:
  """Runs every {"name", "config"} in `runs` under out/runs/<name>, skipping finished ones.
  (The one place runs are launched: a sweep runner can take over this function.)"""
  import train

  for r in runs:
    w = os.path.join(out, "runs", r["name"])
    if finished(w):
      continue
    print(f"aioli: run {r['name']}", flush=True)
    train.train_and_evaluate(r["config"], w)


def summary(workdir: str, names: list[str]) -> dict:
  """Final test ppl, validation losses at the end and at step 0, the p/w trajectory of one run."""
  rows = read_rows(workdir)
  test = [r for r in rows if "test/avg_ppl" in r][-1]
  evals = [r for r in rows if all(f"eval/{n}/loss" in r for n in names)]
  traj = []
  for r in rows:
    for key in ("mixture/w", "mixture/p"):  # reweighting proxies log w; others log sampling p
      if f"{key}/{names[0]}" in r:
        traj.append({"step": r["step"], **{n: r[f"{key}/{n}"] for n in names}})
        break
  last = [r for r in rows if f"mixture/w_avg/{names[0]}" in r]
  return {
    "test_avg_ppl": test["test/avg_ppl"],
    "test_ppl": {n: test[f"test/{n}/ppl"] for n in names},
    "val_end": np.array([evals[-1][f"eval/{n}/loss"] for n in names]),
    "val_start": np.array([evals[0][f"eval/{n}/loss"] for n in names]),
    "w_avg": np.array([last[-1][f"mixture/w_avg/{n}"] for n in names]) if last else None,
    "traj": traj,
  }


def _p(names, p) -> str:
  p = np.asarray(p, np.float64)
  p = p / p.sum()
  return ",".join(f"{n}={x:.6f}" for n, x in zip(names, np.round(p, 6)[:-1].tolist() + [1 - np.round(p, 6)[:-1].sum()]))


def run_setting(scale: str, setting: str, groups: dict, seed: int, out: str) -> list[dict]:
  """Every method on one setting and seed, in dependency stages; returns the result rows."""
  s = SCALES[scale]
  names, m = list(groups), len(groups)
  data_dir = os.path.join(out, "data")
  tag = f"{setting}/s{seed}"

  def cfg(**mix):
    return run_config(scale, groups, seed, data_dir, **mix)

  U, R, lp_s, eta = s["aioli"]
  cover = mixing_laws.dirichlet_cover(m, s["gs"], seed=seed)
  stage1 = [
    {"name": f"{tag}/stratified", "config": cfg(method="stratified")},
    {"name": f"{tag}/aioli", "config": cfg(method="aioli", update_steps=U, lp_rounds=R, lp_steps=lp_s, eta=eta)},
    {"name": f"{tag}/doge_proxy", "config": cfg(method="doge")},
    *({"name": f"{tag}/gs{k}", "config": cfg(method="static", proportions=_p(names, q))} for k, q in enumerate(cover)),
    *(
      {"name": f"{tag}/onehot_{n}", "config": cfg(method="static", proportions=_p(names, np.eye(m)[i]))}
      for i, n in enumerate(names)
    ),
  ]
  run_grid(stage1, out)
  w = lambda name: os.path.join(out, "runs", f"{tag}/{name}")  # noqa: E731
  S = {r["name"].split("/")[-1]: summary(os.path.join(out, "runs", r["name"]), names) for r in stage1}
  # GS: the cover point with the best average validation loss; DML: fit the static law on the same runs
  gs_val = [S[f"gs{k}"]["val_end"].mean() for k in range(len(cover))]
  gs_best = int(np.argmin(gs_val))
  law = mixing_laws.fit_static_law(cover, np.stack([S[f"gs{k}"]["val_end"] for k in range(len(cover))]))
  p_dml = mixing_laws.choose_p(law)
  graph = mixture_graph(S, names)
  stage2 = [
    {"name": f"{tag}/dml", "config": cfg(method="static", proportions=_p(names, p_dml))},
    {"name": f"{tag}/skillit", "config": cfg(method="skillit", graph=graph, update_steps=s["skillit"], eta=0.2, window=3)},
    {"name": f"{tag}/doremi_proxy", "config": cfg(method="doremi", reference=w("stratified"), mu=s["mu"])},
    {"name": f"{tag}/doge", "config": cfg(method="static", proportions=_p(names, S["doge_proxy"]["w_avg"]))},
  ]
  run_grid(stage2, out)
  S.update({r["name"].split("/")[-1]: summary(os.path.join(out, "runs", r["name"]), names) for r in stage2})
  stage3 = [{"name": f"{tag}/doremi", "config": cfg(method="static", proportions=_p(names, S["doremi_proxy"]["w_avg"]))}]
  run_grid(stage3, out)
  S["doremi"] = summary(w("doremi"), names)
  chosen = {
    "stratified": ("stratified", 0, np.full(m, 1 / m)),
    "gs": (f"gs{gs_best}", len(cover), cover[gs_best]),
    "dml": ("dml", len(cover), p_dml),
    "skillit": ("skillit", m, None),
    "doremi": ("doremi", 2, S["doremi_proxy"]["w_avg"]),
    "doge": ("doge", 1, S["doge_proxy"]["w_avg"]),
    "aioli": ("aioli", 0, None),
  }
  base_ppl = S["stratified"]["test_avg_ppl"]
  rows = []
  for meth, (run, extra, p) in chosen.items():
    traj_run = {"doremi": "doremi_proxy", "doge": "doge_proxy"}.get(meth, run)
    final_p = p if p is not None else np.array([S[run]["traj"][-1][n] for n in names])
    rows.append(
      dict(
        setting=setting,
        seed=seed,
        method=meth,
        m=m,
        test_avg_ppl=S[run]["test_avg_ppl"],
        diff_vs_stratified=S[run]["test_avg_ppl"] - base_ppl,
        extra_runs=extra,
        p_final=json.dumps(dict(zip(names, np.round(np.asarray(final_p, float), 4).tolist()))),
        workdir=w(run),
        traj=json.dumps(S[traj_run]["traj"]),
        dml_fit_r2=law["r2"] if meth == "dml" else None,
      )
    )
  return rows


def mixture_graph(S: dict, names: list[str]) -> str:
  """Skill-It's graph from the one-hot runs (rows: trained group), as mixture.graph text."""
  from lib import mixture

  L0 = S[f"onehot_{names[0]}"]["val_start"]
  L1 = np.stack([S[f"onehot_{n}"]["val_end"] for n in names])
  A = mixture.skills_graph(L0, L1)
  return ";".join(",".join(f"{x:.6f}" for x in row) for row in A)


def table(df) -> str:
  """Table-2-shaped markdown: stratified's absolute average test ppl, each method's mean difference."""
  g = df.groupby(["setting", "method"])
  mean = g["test_avg_ppl"].mean().unstack("setting")
  diff = g["diff_vs_stratified"].mean().unstack("setting")
  sets = list(mean.columns)
  extra = df.groupby("method")["extra_runs"].first()
  lines = ["| Method | " + " | ".join(sets) + " | #<strat | extra runs |", "|" + "---|" * (len(sets) + 3)]
  for meth in METHODS:
    if meth not in mean.index:
      continue
    if meth == "stratified":
      cells = [f"{mean.loc[meth, s]:.3f}" for s in sets]
      n_better = "–"
    else:
      cells = [f"{diff.loc[meth, s]:+.3f}" for s in sets]
      n_better = str(int((diff.loc[meth] < 0).sum()))
    ex = "m" if meth == "skillit" else str(int(extra[meth]))
    lines.append(f"| {LABELS[meth]} | " + " | ".join(cells) + f" | {n_better} | {ex} |")
  return "\n".join(lines)


def plot(df, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sets = sorted(df["setting"].unique())
  fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.5), squeeze=False)
  for ax, s in zip(axes[0], sets):
    sub = df[(df.setting == s) & (df.seed == df.seed.min())]
    for _, r in sub.iterrows():
      traj = json.loads(r["traj"])
      if traj:
        first = next(iter(k for k in traj[0] if k != "step"))
        ax.plot([t["step"] for t in traj], [t[first] for t in traj], label=LABELS[r["method"]])
        ax.set_ylabel(f"p (or w) of group {first!r}")
    ax.set_title(s)
    ax.set_xlabel("step")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="output directory (runs, aioli.parquet, report.md)")
  ap.add_argument("--scale", default="quick", choices=sorted(SCALES))
  ap.add_argument("--seeds", type=int, default=0, help="number of seeds (0 = the scale's default)")
  ap.add_argument("--settings", default="", help="comma-separated subset of the scale's settings")
  a = ap.parse_args(argv)
  import pandas as pd

  from lib import metrics as MX

  MX.quiet_logs()
  try:
    sets = settings(a.scale)
    if a.settings:
      unknown = sorted(set(a.settings.split(",")) - set(sets))
      if unknown:
        raise LmtraceError(f"--settings names unknown settings {unknown}; this scale has {sorted(sets)}")
      sets = {k: v for k, v in sets.items() if k in a.settings.split(",")}
    rows = []
    for seed in range(a.seeds or SCALES[a.scale]["seeds"]):
      for name, groups in sets.items():
        rows += run_setting(a.scale, name, groups, seed, a.out)
  except LmtraceError as e:
    print(f"aioli: error: {e}", file=sys.stderr)
    return 2
  df = pd.DataFrame(rows)
  df.to_parquet(os.path.join(a.out, "aioli.parquet"))
  traj = [
    dict(setting=r.setting, seed=r.seed, method=r.method, step=t["step"], group=k, p=v)
    for r in df.itertuples()
    for t in json.loads(r.traj)
    for k, v in t.items()
    if k != "step"
  ]
  pd.DataFrame(traj).to_parquet(os.path.join(a.out, "p_over_time.parquet"))
  plot(df, os.path.join(a.out, "p_over_time.png"))
  tab = table(df)
  with open(os.path.join(a.out, "report.md"), "w") as f:
    f.write(
      f"# Aioli Table 2, scale={a.scale}, seeds={df.seed.nunique()}\n\n"
      "Average test perplexity (mean over groups of exp(test loss)), mean over seeds; the Stratified row "
      "is absolute, the others are differences to it (negative = better).\n\n"
      f"{tab}\n\n## The paper's Table 2 (papers.md §4.5; SlimPajama groups, Pythia-160M, 5k/40k steps)\n\n"
      f"{PAPER_TABLE2}\n"
    )
  print(tab)
  return 0


if __name__ == "__main__":
  sys.exit(main())
