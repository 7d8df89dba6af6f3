"""The Aioli paper's Table 2 on synthetic groups with known optima: every mixing method vs stratified.

  python -m experiments.aioli --out=DIR [--scale=nano|quick|paper] [--seeds=N] [--dry_run] [--emit=slurm|tpu]

For each setting (groups of PCFG / HMM / bigram languages of different difficulty and size) and seed,
runs every method through the trainer as four dependent sweeps (experiments/sweep.py `run_stages`; a run
is finished when its workdir's metrics hold the end-of-run test row, finished runs are skipped):
  DIR/base/   stratified, aioli, the DoGE proxy and the m one-hot runs, crossed with the seeds (each
              setting's static seeds train as one vectorised group; the controllers with host state,
              aioli and doge, fall back to one seed after another)
  DIR/cover/  GS's Dirichlet cover: N static runs per setting and seed (the cover depends on the seed)
  DIR/fit/    DML (static law fitted on the cover runs), Skill-It (graph from the one-hot runs), the
              DoReMi proxy (the stratified run is its reference) and DoGE's final static run
  DIR/doremi/ DoReMi's final static run on the proxy's averaged weights
Each is an ordinary sweep directory (analysis.load_sweep(DIR/<stage>) has setting/method/seed columns).
`--dry_run` prints what would be trained; `--emit` writes DIR/launch_<stage>_slurm.sh (or _tpu.txt) for
every stage whose inputs are finished and stops: launch those, then emit again for the next stage, and
finally run without --emit for the table. Then writes
  DIR/aioli.parquet      one row per (setting, seed, method): final average test ppl, its difference
                         to stratified, extra runs, the final p, the chosen run's workdir
  DIR/p_over_time.parquet  p (or DoReMi/DoGE's weights w) per logged step, per method
  DIR/p_over_time.png    p of the first group over time, one line per method, one panel per setting
  DIR/report.md          the Table-2-shaped table beside the paper's Table 2 (Chen et al., Aioli, ICLR 2025, v2)

Methods and their extra runs (as the paper counts them):
  stratified  p = 1/m                                                                  0
  GS          best (validation) of N static runs on a Dirichlet cover of the simplex    N
  DML         static law fitted on GS's N runs (L-BFGS + Huber), argmin run              N (+ the final run)
  Skill-It    skills graph from m one-hot runs, then online Skill-It                    m
  DoReMi      the stratified run is the reference; proxy on reweighted loss; final static run on avg w  2
  DoGE        proxy with per-group gradient weights; final static run on avg w          1
  Aioli       online, no extra runs                                                     0

The run card of one (scale, setting) is this module's `get_config("<scale>,<setting>")`, so emitted lines
are plain `python train.py --config=experiments/aioli.py:quick,pcfg2 ...`.
Expected runtime: nano ≈ 2-4 min, quick ≤ 30 min on 2 CPU cores
(see README for what was measured); paper = the same synthetic settings at the paper's 5k steps
(hours; the paper's SlimPajama groups are not bundled and are never downloaded).
"""

from __future__ import annotations

import argparse
import functools
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


def settings(scale: str, settings_file: str = "") -> dict[str, dict]:
  """Group settings: name -> {group: source spec}. Groups differ in difficulty (entropy) and size.
  `settings_file`: a JSON file {setting: {group: source spec}} that replaces the synthetic settings, e.g.
  the paper's A/SE or GH/C4 from the user's local corpora (`{"kind": "text", "path": "corpora/arxiv"}`,
  the same tokenizer for every group; see data/text.py). Nothing is downloaded."""
  if settings_file:
    return read_settings_file(settings_file)
  if scale == "nano":
    return {
      "bigram2": {
        "easy": _spec("bigram", 1, 400, 40, 40, n_terminals=16),
        "hard": _spec("bigram", 2, 200, 40, 40, n_terminals=16),
      }
    }
  n, v = {"paper": (50_000, 1_000), "faithful": (20_000, 1_000)}.get(scale, (4_000, 200))
  pc = dict(n_terminals=60)
  sets = {
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
  if scale == "faithful":  # a control: two groups of one language with different sentences (statistically identical)
    same = _spec("pcfg", 2, n // 2, v, v, n_nonterminals=25, n_roots=5, levels=3, **pc)
    sets["identical"] = {"a": dict(same, sample_seed=0), "b": dict(same, sample_seed=11)}
  return sets


def read_settings_file(path: str) -> dict[str, dict]:
  """The settings of a --settings_file, checked: each setting names >= 2 groups, each a source spec with a kind."""
  from data.sources import KINDS

  try:
    with open(path) as f:
      sets = json.load(f)
  except (OSError, ValueError) as e:
    raise LmtraceError(f"--settings_file {path}: cannot read it as JSON ({e})") from None
  if not isinstance(sets, dict) or not sets:
    raise LmtraceError(f"--settings_file {path}: expected {{setting: {{group: source spec}}}}, got {sets!r}")
  for name, groups in sets.items():
    if not isinstance(groups, dict) or len(groups) < 2:
      raise LmtraceError(f"--settings_file {path}: setting {name!r} needs at least 2 groups, got {groups!r}")
    for g, spec in groups.items():
      if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise LmtraceError(f"--settings_file {path}: group {name}/{g} needs a source spec with kind in {KINDS}, got {spec!r}")
  return sets


SCALES = {
  # steps, batch, seq_len, model preset, #GS points, Aioli (U, R, s, eta), Skill-It update steps, seeds, DoReMi μ
  "nano": dict(steps=16, batch=8, seq_len=32, model="nano", gs=4, aioli=(8, 1, 1, 1.0), skillit=4, seeds=1, mu=1.0),
  "quick": dict(steps=120, batch=16, seq_len=32, model="nano", gs=5, aioli=(40, 1, 2, 1.0), skillit=20, seeds=2, mu=1.0),
  "paper": dict(steps=5000, batch=16, seq_len=64, model="tiny", gs=10, aioli=(250, 4, 4, 0.2), skillit=500, seeds=5, mu=0.01),
  # the paper's protocol on a CPU-sized model and data: 10 Aioli rounds after a 20-step warmup, the
  # released scripts' R/s/f/η/γ per m (RELEASED_AIOLI), Skill-It's released form (10 updates, evaluations
  # every U/2), DoReMi μ = 0.01, DoGE clipped gradients, 8 validation batches of 16 rows per group, 5 seeds
  "faithful": dict(
    steps=1020,
    batch=16,
    seq_len=32,
    model="nano",
    gs=4,
    aioli="released",
    skillit=100,
    seeds=5,
    mu=0.01,
    warmup=20,
    rounds=10,
    eval_batches=8,
    eval_batch_size=16,
    log_every=10,
  ),  # fmt: skip
}
# The released scripts' Aioli hyperparameters (HazyResearch/aioli scripts; Chen et al. 2024): m -> R, s, f, η, γ
RELEASED_AIOLI = {
  2: dict(lp_rounds=4, lp_steps=4, one_hot_factor=0.625, eta=0.2, ema=0.1),
  3: dict(lp_rounds=4, lp_steps=6, one_hot_factor=0.5, eta=0.1, ema=0.5),
}


def aioli_mixture(scale: str, m: int) -> dict:
  """The Aioli run's mixture settings at `scale` for m groups. Faithful: the released scripts' R, s, f, η, γ;
  U = (steps − warmup) / rounds; the rounds start after the warmup (restricted mode with a uniform prior
  for the warmup steps, so LearnParams never trains at the warmup's near-zero learning rates)."""
  s = SCALES[scale]
  if s["aioli"] != "released":
    U, R, lp_s, eta = s["aioli"]
    return dict(method="aioli", update_steps=U, lp_rounds=R, lp_steps=lp_s, eta=eta)
  if m not in RELEASED_AIOLI:
    raise LmtraceError(f"scale {scale}: the released scripts set Aioli's settings for m in {sorted(RELEASED_AIOLI)}, not m={m}")
  U = (s["steps"] - s["warmup"]) // s["rounds"]
  prior = ",".join([f"{1 / m:.6f}"] * (m - 1) + [f"{1 - (m - 1) * round(1 / m, 6):.6f}"])
  return dict(method="aioli", update_steps=U, prior=prior, prior_steps=s["warmup"], **RELEASED_AIOLI[m])


def skillit_mixture(scale: str, graph: str) -> dict:
  """Skill-It's settings: η = 0.2, window 3 (released), the released form (stale window, evaluations every U/2)."""
  U = SCALES[scale]["skillit"]
  mix = dict(method="skillit", graph=graph, update_steps=U, eval_every=max(U // 2, 1), eta=0.2, window=3)
  return mix | {"skillit_form": "released"}


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
  c.train.log_every = s.get("log_every", max(1, s["steps"] // 16))
  c.eval.every, c.eval.batches, c.eval.batch_size = s["steps"], s.get("eval_batches", 2), s.get("eval_batch_size", 8)
  c.opt.warmup_steps = s.get("warmup", c.opt.warmup_steps)
  c.ckpt.schedule, c.ckpt.resume_every, c.ckpt.keep_resume = f"interval:every={s['steps']}", s["steps"], 1
  c.ckpt.async_save = False
  c.log.tensorboard = False
  c.opt.lr = 3e-3
  c.seed = seed
  c.mixture.update(mixture)
  return c


def get_config(arg: str = "quick,pcfg2") -> mlc.ConfigDict:
  """Run card '<scale>,<setting>[,<settings file>]': the scale's model and budget on the setting's groups
  (stratified, seed 0)."""
  scale, setting, settings_file = ((arg or "quick,pcfg2").split(",", 2) + [""])[:3]
  if scale not in SCALES:
    raise ValueError(f"unknown scale {scale!r}; valid: {sorted(SCALES)}")
  sets = settings(scale, settings_file)
  if setting not in sets:
    raise ValueError(f"unknown setting {setting!r} at scale {scale}; valid: {sorted(sets)}")
  return run_config(scale, sets[setting], 0, "")


def doge_mu(scale: str) -> float:
  """DoGE's μ: its weight step is lr·score/μ, and the released μ = 0.01 goes with the released peak lr 5e-4;
  at the faithful scale μ keeps that lr/μ at our learning rate (0.06 at 3e-3); other scales use 0.01."""
  return 0.01 * base.defaults().opt.lr / 5e-4 if scale == "faithful" else 0.01


def finished(workdir: str) -> bool:
  return any("test/avg_ppl" in r for r in read_rows(workdir))


def read_rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  return [json.loads(x) for x in open(path)] if os.path.exists(path) else []


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


def _mix(mixture: dict) -> dict:
  return {f"mixture.{k}": v for k, v in mixture.items()}


def _card(scale: str, setting: str, settings_file: str = "") -> str:
  return f"experiments/aioli.py:{scale},{setting}" + (f",{os.path.abspath(settings_file)}" if settings_file else "")


def _entry(scale: str, setting: str, method: str, mixture: dict, seed: int | None = None, settings_file: str = "") -> dict:
  name = f"{setting}/{method}" if seed is None else f"{setting}/s{seed}/{method}"
  over = _mix(mixture) | ({"seed": seed} if seed is not None else {})
  return {
    "name": name,
    "config": _card(scale, setting, settings_file),
    "set": over,
    "labels": {"setting": setting, "method": method},
  }


def stages(scale: str, sets: dict[str, dict], seeds: list[int], out: str, settings_file: str = "") -> list:
  """The four dependent sweeps of the study: [(stage, make_spec(done) -> spec)] for sweep.run_stages."""
  s = SCALES[scale]
  common = {"config": _card(scale, next(iter(sets)), settings_file), "set": {"data.data_dir": os.path.join(out, "data")}}
  entry = functools.partial(_entry, settings_file=settings_file)  # every run card names the file: emitted jobs rebuild the groups

  def base_stage(done):
    runs = []
    for setting, groups in sets.items():
      runs += [
        entry(scale, setting, "stratified", dict(method="stratified")),
        entry(scale, setting, "aioli", aioli_mixture(scale, len(groups))),
        entry(scale, setting, "doge_proxy", dict(method="doge", mu=doge_mu(scale), doge_clip=1.0)),
        *(
          entry(scale, setting, f"onehot_{n}", dict(method="static", proportions=_p(list(groups), np.eye(len(groups))[i])))
          for i, n in enumerate(groups)
        ),
      ]
    return common | {"runs": runs, "axes": {"seed": seeds}, "vectorise": "auto"}

  def cover_stage(done):
    runs = [
      entry(scale, setting, f"gs{k}", dict(method="static", proportions=_p(list(groups), q)), seed)
      for setting, groups in sets.items()
      for seed in seeds
      for k, q in enumerate(mixing_laws.dirichlet_cover(len(groups), gs_points(scale, len(groups)), seed=seed))
    ]
    return common | {"runs": runs, "vectorise": False}

  def fit_stage(done):
    runs = []
    for setting, groups in sets.items():
      for seed in seeds:
        f = fitted(scale, setting, list(groups), seed, done)
        runs += [
          entry(scale, setting, "dml", dict(method="static", proportions=_p(list(groups), f["p_dml"])), seed),
          entry(scale, setting, "skillit", skillit_mixture(scale, f["graph"]), seed),
          entry(
            scale,
            setting,
            "doremi_proxy",
            dict(method="doremi", reference=done["base"].workdir(f"{setting}/stratified", seed), mu=s["mu"], smoothing=1e-3),
            seed,
          ),
          entry(scale, setting, "doge", dict(method="static", proportions=_p(list(groups), f["S"]["doge_proxy"]["w_avg"])), seed),
        ]
    return common | {"runs": runs, "vectorise": False}

  def doremi_stage(done):
    runs = []
    for setting, groups in sets.items():
      for seed in seeds:
        w = summary(done["fit"].workdir(f"{setting}/s{seed}/doremi_proxy", seed), list(groups))["w_avg"]
        runs.append(entry(scale, setting, "doremi", dict(method="static", proportions=_p(list(groups), w)), seed))
    return common | {"runs": runs, "vectorise": False}

  return [("base", base_stage), ("cover", cover_stage, ()), ("fit", fit_stage), ("doremi", doremi_stage)]


def gs_points(scale: str, m: int) -> int:
  """Grid search's static runs for m groups: the scale's count, at least m + 2 (the fewest runs DML's law,
  m + 2 parameters per group, can be fitted on: DML reuses these runs)."""
  return max(SCALES[scale]["gs"], m + 2)


def fitted(scale: str, setting: str, names: list[str], seed: int, done: dict) -> dict:
  """What the dependent methods need from the base and cover runs of one setting and seed: the runs'
  summaries S, the cover, GS's best point, DML's fitted law and choice, Skill-It's graph."""
  m = len(names)
  cover = mixing_laws.dirichlet_cover(m, gs_points(scale, m), seed=seed)
  S = {x: summary(done["base"].workdir(f"{setting}/{x}", seed), names) for x in ("stratified", "aioli", "doge_proxy")}
  S |= {f"onehot_{n}": summary(done["base"].workdir(f"{setting}/onehot_{n}", seed), names) for n in names}
  S |= {f"gs{k}": summary(done["cover"].workdir(f"{setting}/s{seed}/gs{k}", seed), names) for k in range(len(cover))}
  # GS: the cover point with the best average validation loss; DML: fit the static law on the same runs
  gs_best = int(np.argmin([S[f"gs{k}"]["val_end"].mean() for k in range(len(cover))]))
  law = mixing_laws.fit_static_law(cover, np.stack([S[f"gs{k}"]["val_end"] for k in range(len(cover))]))
  return dict(S=S, cover=cover, gs_best=gs_best, law=law, p_dml=mixing_laws.choose_p(law), graph=mixture_graph(S, names))


def setting_rows(scale: str, setting: str, groups: dict, seed: int, done: dict) -> list[dict]:
  """The result rows of every method on one setting and seed, from the finished stages."""
  names, m = list(groups), len(groups)
  f = fitted(scale, setting, names, seed, done)
  S, cover, gs_best = f["S"], f["cover"], f["gs_best"]
  wd = {k: done["base"].workdir(f"{setting}/{k}", seed) for k in ("stratified", "aioli")}
  wd[f"gs{gs_best}"] = done["cover"].workdir(f"{setting}/s{seed}/gs{gs_best}", seed)
  wd |= {k: done["fit"].workdir(f"{setting}/s{seed}/{k}", seed) for k in ("dml", "skillit", "doremi_proxy", "doge")}
  wd["doremi"] = done["doremi"].workdir(f"{setting}/s{seed}/doremi", seed)
  wd["doge_proxy"] = done["base"].workdir(f"{setting}/doge_proxy", seed)
  S |= {k: summary(wd[k], names) for k in ("dml", "skillit", "doremi_proxy", "doge", "doremi")}
  chosen = {
    "stratified": ("stratified", 0, np.full(m, 1 / m)),
    "gs": (f"gs{gs_best}", len(cover), cover[gs_best]),
    "dml": ("dml", len(cover), f["p_dml"]),
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
        workdir=wd[run],
        method_workdir=wd[traj_run],  # the run whose mixture config says which form of the method ran (the proxy's)
        traj=json.dumps(S[traj_run]["traj"]),
        dml_fit_r2=f["law"]["r2"] if meth == "dml" else None,
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


TIE = 5e-4  # ppl: a difference below half the printed precision is a tie (e.g. a method that stays at uniform p)


def _signed(x: float) -> str:
  """+0.123 / -0.123, and +0.000 for a tie (never '-0.000')."""
  return f"{0.0 if abs(x) < TIE else x:+.3f}"


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
      cells = [_signed(diff.loc[meth, s]) for s in sets]
      n_better = str(int((diff.loc[meth] < -TIE).sum()))
    ex = "m" if meth == "skillit" else str(int(extra[meth]))
    lines.append(f"| {LABELS[meth]} | " + " | ".join(cells) + f" | {n_better} | {ex} |")
  return "\n".join(lines)


def findings(df) -> str:
  """The paper's claims checked on this table, in words: how many settings each method beats stratified in
  (the paper: only Aioli in all 6), and how large the seed-to-seed spread of stratified is next to the
  differences (a difference below it is not a finding)."""
  diff = df.groupby(["setting", "method"])["diff_vs_stratified"].mean().unstack("setting")
  strat = df[df.method == "stratified"].groupby("setting")["test_avg_ppl"]
  spread = (strat.max() - strat.min()) if df.seed.nunique() > 1 else None
  n_sets = diff.shape[1]
  lines = ["## Findings (computed from the table above)", ""]
  for meth in METHODS:
    if meth == "stratified" or meth not in diff.index:
      continue
    d = diff.loc[meth]
    lines.append(
      f"- {LABELS[meth]}: better than stratified in {int((d < -TIE).sum())}/{n_sets} settings "
      f"(mean difference {_signed(d.mean())} ppl)"
      + ("; the paper: 6/6, the only method that never loses" if meth == "aioli" else "")
    )
  always = [LABELS[m] for m in METHODS if m != "stratified" and m in diff.index and bool((diff.loc[m] < -TIE).all())]
  lines.append(f"- Methods better than stratified in every setting here: {', '.join(always) or 'none'} (the paper: Aioli only).")
  if spread is not None:
    cells = ", ".join(f"{k} {v:.3f}" for k, v in spread.items())
    lines.append(f"- Stratified's spread over seeds (max - min test ppl): {cells}; differences smaller than this are noise.")
  else:
    lines.append("- One seed: no estimate of seed-to-seed noise; run with --seeds >= 2 before reading small differences.")
  return "\n".join(lines)


def t_ci(x, level: float = 0.95) -> tuple[float, float, float]:
  """Mean and the t confidence interval over seeds (nan bounds with fewer than 2 values)."""
  from scipy import stats

  x = np.asarray(x, np.float64)
  m = float(x.mean())
  if len(x) < 2:
    return m, float("nan"), float("nan")
  h = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
  return m, m - h, m + h


TABLE_COLUMNS = ["setting", "method", "m", "seeds", "test_avg_ppl", "diff", "ci_low", "ci_high", "p_final", "extra_runs"]


def report_schema(text: str) -> dict:
  """What every scale's report.md shares: its section headers and its protocol invariants (names without the
  per-setting / per-m suffix). A test checks the nano command against the committed faithful report."""
  import re

  heads = [ln for ln in text.splitlines() if ln.startswith("## ")]
  inv = []
  for ln in text.split("## Protocol", 1)[-1].split("\n## ", 1)[0].splitlines()[4:]:
    if ln.startswith("| "):
      name = re.sub(r" \((?:[^()]*)\)$| at m = \d+.*$", "", ln.split(" | ")[0][2:])
      if name not in inv:
        inv.append(name)
  return {"sections": heads, "invariants": inv}


def ci_table(df):
  """One row per (setting, method): seeds, mean test ppl, the difference to stratified with its 95% t CI over
  seeds (paired by seed), the mean final p. The CSV committed next to the report."""
  import pandas as pd

  out = []
  for (setting, meth), g in df.groupby(["setting", "method"], sort=False):
    d, lo, hi = t_ci(g["diff_vs_stratified"])
    ps = np.array([list(json.loads(x).values()) for x in g["p_final"]])
    out.append(
      dict(
        setting=setting,
        method=meth,
        m=int(g["m"].iloc[0]),
        seeds=len(g),
        test_avg_ppl=float(g["test_avg_ppl"].mean()),
        diff=d,
        ci_low=lo,
        ci_high=hi,
        p_final=json.dumps(np.round(ps.mean(0), 4).tolist()),
        extra_runs=int(g["extra_runs"].iloc[0]),
      )  # fmt: skip
    )
  return pd.DataFrame(out, columns=TABLE_COLUMNS)


def ci_markdown(tab) -> str:
  """Table-2-shaped: Stratified's absolute ppl, every other method's difference [95% CI] per setting."""
  sets = list(dict.fromkeys(tab.setting))
  t = tab.set_index(["method", "setting"])
  lines = ["| Method | " + " | ".join(sets) + " | #<strat (CI < 0) | extra runs |", "|" + "---|" * (len(sets) + 3)]
  for meth in METHODS:
    if meth not in set(tab.method):
      continue
    if meth == "stratified":
      cells, nb = [f"{t.loc[(meth, x), 'test_avg_ppl']:.3f}" for x in sets], "–"
    else:
      cells = [
        f"{_signed(t.loc[(meth, x), 'diff'])} [{_signed(t.loc[(meth, x), 'ci_low'])}, {_signed(t.loc[(meth, x), 'ci_high'])}]"
        for x in sets
      ]
      below = sum(t.loc[(meth, x), "diff"] < -TIE for x in sets)
      sig = sum(t.loc[(meth, x), "ci_high"] < -TIE for x in sets)
      nb = f"{below} ({sig})"
    ex = "m" if meth == "skillit" else str(int(t.loc[(meth, sets[0]), "extra_runs"]))
    lines.append(f"| {LABELS[meth]} | " + " | ".join(cells) + f" | {nb} | {ex} |")
  return "\n".join(lines)


def aioli_rounds(workdir: str) -> dict:
  """Aioli's rounds rebuilt from a run's logged evaluations (every LearnParams sub-phase is evaluated):
  per round the column sums 1ᵀÂ (what moves p) and their jackknife standard error over the R LearnParams
  repeats; the run's R, s, f, η, γ, warmup, the first LearnParams step, the lowest learning rate logged
  inside LearnParams, the validation tokens per group and p between rounds (outside LearnParams)."""
  import ml_collections as mlc

  from lib import ckpt as C
  from lib import mixture

  cfg = mlc.ConfigDict(C.read_config(workdir))
  names = list(cfg.data.groups)
  c = mixture.make(cfg.mixture, names, seed=cfg.seed)
  rows, total = read_rows(workdir), int(cfg.train.steps)
  ev = {r["step"]: np.array([r[f"eval/{n}/loss"] for n in names]) for r in rows if f"eval/{names[0]}/loss" in r}
  tokens = [r["eval/tokens"] / len(names) for r in rows if "eval/tokens" in r]
  K = c.R * c.m
  lp = set()
  cols, ses = [], []
  for r in range(total):
    t0 = c.P + r * c.U
    steps_ = [t0 + k * c.s for k in range(K + 1)]
    if steps_[-1] > total or not all(t in ev for t in steps_):
      break
    lp.update(range(t0, t0 + K * c.s))
    Gq = np.zeros((c.R, c.m, c.m))
    for k, j in enumerate(c.permutation(r)):
      Gq[k // c.m, :, int(j)] = ev[steps_[k]] - ev[steps_[k + 1]]
    cols.append(c.estimate_A(Gq.mean(0)).sum(0))
    if c.R < 2:  # one LearnParams repeat: no jackknife
      ses.append(np.full(c.m, np.nan))
      continue
    jack = np.array([c.estimate_A(np.delete(Gq, q, 0).mean(0)).sum(0) for q in range(c.R)])
    ses.append(np.sqrt((c.R - 1) / c.R * ((jack - jack.mean(0)) ** 2).sum(0)))
  lr_lp = [r["train/lr"] for r in rows if "train/lr" in r and r["step"] - 1 in lp]
  p_out = [[r[f"mixture/p/{n}"] for n in names] for r in rows if f"mixture/p/{names[0]}" in r and r["step"] - 1 not in lp]
  return dict(
    names=names, rounds=len(cols), R=c.R, s=c.s, f=c.f, eta=c.eta, ema=c.ema, warmup=int(cfg.opt.warmup_steps), U=c.U,
    first_lp=c.P if cols else None, lr_lp_min=min(lr_lp) if lr_lp else float("nan"), val_tokens=min(tokens) if tokens else 0.0,
    colsums=np.array(cols), colsum_se=np.array(ses), p_between=np.array(p_out),
  )  # fmt: skip


def protocol(df, aioli_runs: dict, scale: str, wall_s: float | None) -> list[tuple[str, str, str, bool]]:
  """The faithful protocol's invariants, measured from the runs: (invariant, target, measured, ok)."""
  A = list(aioli_runs.values())
  out = []
  rounds = min(a["rounds"] for a in A)
  out.append(("Aioli rounds per run", ">= 10", f"min {rounds} over {len(A)} runs", rounds >= 10))
  R = min(a["R"] for a in A)
  out.append(("LearnParams repeats R (evaluations per round / m)", ">= 4", f"min {R}", R >= 4))
  for m in sorted({len(a["names"]) for a in A}):
    got = sorted({(a["s"], a["f"], a["eta"], a["ema"]) for a in A if len(a["names"]) == m})
    want = RELEASED_AIOLI.get(m, {})
    target = (want.get("lp_steps"), want.get("one_hot_factor"), want.get("eta"), want.get("ema"))
    out.append((f"s, f, η, γ at m = {m} (the released scripts)", str(target), ", ".join(map(str, got)), got == [target]))
  first = min((a["first_lp"] for a in A if a["first_lp"] is not None), default=-1)
  warm = max(a["warmup"] for a in A)
  lr_min = min(a["lr_lp_min"] for a in A)
  out.append(
    ("LearnParams outside the zero-lr warmup", f"first LearnParams step >= warmup ({warm}), lr > 0",
     f"first step {first}, lowest logged lr inside LearnParams {lr_min:.2e}", first >= warm and lr_min > 0)
  )  # fmt: skip
  vt = min(a["val_tokens"] for a in A)
  out.append(("Validation tokens per group", "reported", f"{vt:.0f}", vt > 0))
  for setting in [x for x in dict.fromkeys(df.setting) if x != "identical"]:
    runs = [a for k, a in aioli_runs.items() if k[0] == setting]
    cs = [a["colsums"] for a in runs if a["rounds"]]
    if not cs:
      out.append((f"Â's standard error < its spread ({setting})", "SE < spread", "no complete round", False))
      continue
    se = float(np.median(np.concatenate([a["colsum_se"].mean(1) for a in runs if a["rounds"]])))
    between = float(np.mean([np.ptp(x, axis=1).mean() for x in cs]))
    sd = float(np.nanstd(np.concatenate(cs), axis=0, ddof=1).mean()) if sum(len(x) for x in cs) > 1 else float("nan")
    out.append(
      (f"Â's standard error < its spread ({setting})", "SE < spread",
       f"SE {se:.4f} (jackknife over the R repeats, median); spread {between:.4f} (between groups, mean over rounds); "
       f"sd over rounds and seeds {sd:.4f}", se < between)
    )  # fmt: skip
  seeds = df.seed.nunique()
  out.append(("Seeds", ">= 5", str(seeds), seeds >= 5))
  sets = [x for x in df.setting.unique() if x != "identical"]
  out.append(("Settings (besides the identical-groups control)", ">= 3", str(len(sets)), len(sets) >= 3))
  cells = df.groupby(["setting", "method"]).seed.nunique()
  out.append(
    ("Every method's difference to stratified has a seed CI", ">= 2 seeds per cell", f"min {cells.min()} seeds", cells.min() >= 2)
  )
  if wall_s is not None:
    out.append(("Study wall time (first run start to last run end)", "<= 90 min", f"{wall_s / 60:.1f} min", wall_s <= 5400))
  return out


def noise_floor(df, aioli_runs: dict) -> list[str]:
  """How far each method's mixture moves on statistically identical groups (setting `identical`)."""
  sub = df[df.setting == "identical"]
  if sub.empty:
    return ["No identical-groups control at this scale (the faithful scale has one: setting `identical`)."]
  lines = [
    "| Method | max_j abs(p_j − 1/m) of the final / chosen p, mean over seeds [max] | online: max over the run |",
    "|---|---|---|",
  ]
  for meth in METHODS:
    g = sub[sub.method == meth]
    if g.empty or meth == "stratified":
      continue
    dev = [float(np.abs(np.array(list(json.loads(x).values())) - 1 / len(json.loads(x))).max()) for x in g.p_final]
    online = ""
    if meth == "aioli":
      online = f"{max(float(np.abs(a['p_between'] - 0.5).max()) for k, a in aioli_runs.items() if k[0] == 'identical'):.4f}"
    elif meth in ("skillit", "doremi", "doge"):
      online = f"{max(max(abs(v - 0.5) for t in json.loads(x) for k, v in t.items() if k != 'step') for x in g.traj):.4f}"
    lines.append(f"| {LABELS[meth]} | {np.mean(dev):.4f} [{np.max(dev):.4f}] | {online} |")
  return lines


def study_wall(out: str) -> float | None:
  """Seconds from the first run's config.json to the last run's metrics.jsonl (file times), None without runs."""
  import glob

  starts = [os.path.getmtime(f) for f in glob.glob(os.path.join(out, "*", "runs", "**", "config.json"), recursive=True)]
  ends = [os.path.getmtime(f) for f in glob.glob(os.path.join(out, "*", "runs", "**", "metrics.jsonl"), recursive=True)]
  return max(ends) - min(starts) if starts and ends else None


def report(df, a, out: str) -> str:
  """report.md: the protocol table (measured), our Table 2 with seed CIs, the paper's, the noise floor."""
  aioli_runs = {(r.setting, r.seed): aioli_rounds(r.workdir) for r in df[df.method == "aioli"].itertuples()}
  tab = ci_table(df)
  tab.to_csv(os.path.join(out, "aioli_table.csv"), index=False, float_format="%.5f")
  lines = [f"# Aioli Table 2, scale={a.scale}, seeds={df.seed.nunique()}", ""]
  lines += ["## Protocol", "", "| Invariant | Target | Measured (from the runs) | |", "|---|---|---|---|"]
  for inv, target, got, ok in protocol(df, aioli_runs, a.scale, study_wall(out)):
    lines.append(f"| {inv} | {target} | {got} | {'✓' if ok else '✗'} |")
  forms = sorted(
    {json.dumps(mixture_form(r.method_workdir)) for r in df[df.method.isin(["skillit", "doge", "doremi"])].itertuples()}
  )
  lines += ["", "Method forms used (from the runs' config.json): " + "; ".join(forms) + "."]
  lines += ["", protocol_notes(a.scale)]
  lines += [
    "",
    "## Table 2 (ours)",
    "",
    "Average test perplexity (mean over groups of exp(test loss)); Stratified: absolute, mean over seeds; the others: "
    "difference to stratified (paired by seed; negative = better), mean [95% t interval over seeds]. `#<strat`: settings "
    "with a negative mean (with the whole interval below 0).",
    "",
    ci_markdown(tab),
    "",
    findings(df),
    "",
    "## The paper's Table 2 (Chen et al. 2024, v2; SlimPajama groups, Pythia-160M, 5k/40k steps)",
    "",
    PAPER_TABLE2,
  ]
  lines += ["", "## Identical groups: how far each method moves (its noise floor)", ""] + noise_floor(df, aioli_runs)
  return "\n".join(lines) + "\n"


def protocol_notes(scale: str) -> str:
  """What this scale keeps from the paper's protocol and what it shrinks, in words (from SCALES)."""
  s = SCALES[scale]
  if s["aioli"] != "released":
    U, R, lp_s, eta = s["aioli"]
    return (
      f"Scale `{scale}` is not the paper's protocol: {s['steps']} steps, Aioli U = {U}, R = {R}, s = {lp_s}, η = {eta}, "
      "no EMA, LearnParams from step 0 (inside the warmup). Use `--scale=faithful` for the protocol above."
    )
  U = (s["steps"] - s["warmup"]) // s["rounds"]
  share = {m: v["lp_rounds"] * v["lp_steps"] * m / U for m, v in RELEASED_AIOLI.items()}
  return (
    f"Scale `{scale}`: the model ({s['model']} preset) and data shrink to a 2-core CPU, the protocol does not: "
    f"{s['steps']} steps of {s['batch']}x{s['seq_len']} tokens; a {s['warmup']}-step warmup trained on uniform p "
    f"(Aioli's restricted mode with a uniform prior), then {s['rounds']} Aioli rounds of U = {U} steps with the released "
    f"scripts' R, s, f, η, γ; LearnParams takes {share[2]:.0%} of a round at m = 2 and {share[3]:.0%} at m = 3 (released: "
    "12.8% and 28.8% of U = 250; 70% at m = 7). Skill-It: released form, η = 0.2, window 3, an update every "
    f"{s['skillit']} steps (10 per run, evaluations every {s['skillit'] // 2}). DoReMi: μ = {s['mu']}, ε = 1e-3, the proxy "
    f"as long as the run ({s['steps']} steps; released: 10k). DoGE: gradients clipped to norm 1, μ = {doge_mu(scale):.2f} "
    "so that lr/μ matches the released μ = 0.01 at lr 5e-4. GS: a Dirichlet cover of "
    f"{gs_points(scale, 2)} points at m = 2, {gs_points(scale, 3)} at m = 3 (the paper: 10); DML fits its law on the same runs. "
    f"Test ppl on {s['eval_batches']}x{s['eval_batch_size']} rows per group."
  )


def mixture_form(workdir: str) -> dict:
  """The mixture keys that say which form of a method a run used (Skill-It's form, DoGE's clipping, μ)."""
  from lib import ckpt as C

  mc = C.read_config(workdir)["mixture"]
  keep = {
    "skillit": ("skillit_form", "eval_every", "update_steps", "window", "eta"),
    "doge": ("doge_clip", "mu"),
    "doremi": ("mu", "smoothing"),
  }
  return {"method": mc["method"], **{k: mc.get(k) for k in keep.get(mc["method"], ())}}


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
  ap.add_argument("--settings_file", default="", help="JSON {setting: {group: source spec}} replacing the synthetic settings")
  ap.add_argument("--dry_run", action="store_true", help="print what would be trained (stages whose inputs exist), then stop")
  ap.add_argument("--emit", choices=("slurm", "tpu"), help="write launch commands for the stages that can start now, then stop")
  ap.add_argument("--jobs", type=int, default=1, help="training jobs at once, each its own process (e.g. the machine's cores)")
  ap.add_argument("--publish", default="", help="also copy report.md and aioli_table.csv here (experiments/results/aioli)")
  a = ap.parse_args(argv)
  import pandas as pd

  from lib import metrics as MX

  MX.quiet_logs()
  try:
    sets = settings(a.scale, a.settings_file)
    if a.settings:
      unknown = sorted(set(a.settings.split(",")) - set(sets))
      if unknown:
        raise LmtraceError(f"--settings names unknown settings {unknown}; this scale has {sorted(sets)}")
      sets = {k: v for k, v in sets.items() if k in a.settings.split(",")}
    from experiments.sweep import run_stages

    seeds = list(range(a.seeds or SCALES[a.scale]["seeds"]))
    out = os.path.abspath(a.out)
    log = lambda msg: print(f"aioli: {msg}", flush=True)  # noqa: E731
    then = f"python -m experiments.aioli --out={out} --scale={a.scale} --seeds={len(seeds)}" + (
      f" --settings={a.settings}" if a.settings else ""
    )
    then += f" --settings_file={os.path.abspath(a.settings_file)}" if a.settings_file else ""
    then += f" --emit={a.emit}  (the next stages, then the table without --emit)"
    done = run_stages(
      out,
      stages(a.scale, sets, seeds, out, a.settings_file),
      dry_run=a.dry_run,
      emit=a.emit,
      log=log,
      finished=finished,
      then=then,
      jobs=a.jobs,
    )
    if a.dry_run or a.emit:
      return 0
    rows = [r for seed in seeds for name, groups in sets.items() for r in setting_rows(a.scale, name, groups, seed, done)]
    df = pd.DataFrame(rows)
    text = report(df, a, out)
  except LmtraceError as e:
    print(f"aioli: error: {e}", file=sys.stderr)
    return 2
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
  with open(os.path.join(a.out, "report.md"), "w") as f:
    f.write(text)
  print(table(df))
  if a.publish:
    from experiments import cli

    print(f"published: {cli.publish_results(a.out, a.publish, PUBLISH)}")
  return 0


PUBLISH = ("report.md", "aioli_table.csv")  # what --publish copies (the figures and parquet tables stay in DIR)


if __name__ == "__main__":
  sys.exit(main())
