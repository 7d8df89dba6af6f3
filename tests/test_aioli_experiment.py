"""experiments/aioli.py's logic on a planted world: a fake trainer whose final losses follow a known
static mixing law, so GS, DML and the table can be checked exactly without training (fast). The real
trainer end-to-end is covered by tests/test_mixture.py (every controller)."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from experiments import aioli
from lib import mixing_laws, mixture

C, B, A = np.array([2.0, 1.0]), np.array([1.0, 2.0]), np.array([[3.0, 0.0], [0.5, 2.0]])


def _fake_train(calls):
  def train_and_evaluate(cfg, workdir):
    calls.append(workdir)
    names = list(cfg.data.groups)
    mc = cfg.mixture
    p = mixture.parse_proportions(mc.proportions, names) if mc.method == "static" else np.full(len(names), 0.5)
    if mc.method == "aioli":
      p = np.array([0.3, 0.7])
    L = mixing_laws.static_law(p, C, B, A)[0]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json())
    rows = [{"step": 0, **{f"eval/{n}/loss": 4.0 for n in names}}]
    row = {"step": cfg.train.steps, "train/loss": 1.0, **{f"mixture/p/{n}": float(x) for n, x in zip(names, p)}}
    if mc.method in ("doremi", "doge"):
      row.update({f"mixture/w/{n}": float(x) for n, x in zip(names, (0.6, 0.4))})
      row.update({f"mixture/w_avg/{n}": float(x) for n, x in zip(names, (0.6, 0.4))})
    rows.append(row)
    rows.append({"step": cfg.train.steps, **{f"eval/{n}/loss": float(x) for n, x in zip(names, L)}})
    test = {f"test/{n}/ppl": float(np.exp(x)) for n, x in zip(names, L)}
    rows.append({"step": cfg.train.steps, **test, "test/avg_ppl": float(np.mean(list(test.values())))})
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows[-1]

  return train_and_evaluate


@pytest.mark.slow
def test_aioli_experiment_on_a_planted_law(tmp_path, monkeypatch):
  import train

  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake_train(calls))
  out = str(tmp_path / "out")
  assert aioli.main(["--out", out, "--scale", "nano"]) == 0
  # stratified, aioli, doge proxy, 4 GS points, 2 one-hot, then dml, skillit, doremi proxy, doge, then doremi
  assert len(calls) == 1 + 1 + 1 + 4 + 2 + 4 + 1
  df = pd.read_parquet(os.path.join(out, "aioli.parquet"))
  assert list(df.method) == list(aioli.METHODS)
  r = df.set_index("method")
  strat = float(np.mean(np.exp(mixing_laws.static_law([0.5, 0.5], C, B, A)[0])))
  assert abs(r.loc["stratified", "test_avg_ppl"] - strat) < 1e-9
  # GS picks the cover point with the lowest average validation loss
  cover = mixing_laws.dirichlet_cover(2, 4, seed=0)
  best = cover[np.argmin(mixing_laws.static_law(cover, C, B, A).mean(1))]
  np.testing.assert_allclose(list(json.loads(r.loc["gs", "p_final"]).values()), best, atol=1e-4)
  # DML fits the law on those 4 runs and lands on the planted law's argmin of the average loss
  grid = np.linspace(0, 1, 10001)
  p_star = grid[np.argmin(mixing_laws.static_law(np.stack([grid, 1 - grid], 1), C, B, A).mean(1))]
  assert abs(json.loads(r.loc["dml", "p_final"])["easy"] - p_star) < 2e-3
  p_dml = list(json.loads(r.loc["dml", "p_final"]).values())
  assert mixing_laws.static_law(p_dml, C, B, A).mean() <= mixing_laws.static_law(best, C, B, A).mean()  # both minimise loss
  np.testing.assert_allclose(list(json.loads(r.loc["doremi", "p_final"]).values()), [0.6, 0.4])
  assert (r["diff_vs_stratified"] == r["test_avg_ppl"] - strat).all()
  assert list(r["extra_runs"]) == [0, 4, 4, 2, 2, 1, 0]
  report = open(os.path.join(out, "report.md")).read()
  assert "| Stratified | " in report and "SlimPajama" in report and "| DML | " in report
  # the nano command writes the faithful study's schema: the committed report's sections, protocol rows, CSV columns
  schema = aioli.report_schema(report)
  assert schema["sections"][:2] == ["## Protocol", "## Table 2 (ours)"] and "Aioli rounds per run" in schema["invariants"]
  table = pd.read_csv(os.path.join(out, "aioli_table.csv"))
  assert list(table.columns) == aioli.TABLE_COLUMNS and len(table) == len(aioli.METHODS)
  committed = os.path.join(os.path.dirname(aioli.__file__), "results", "aioli")  # the published faithful study
  assert aioli.report_schema(open(os.path.join(committed, "report.md")).read()) == schema
  assert list(pd.read_csv(os.path.join(committed, "aioli_table.csv")).columns) == aioli.TABLE_COLUMNS
  assert os.path.getsize(os.path.join(out, "p_over_time.png")) > 0
  assert len(pd.read_parquet(os.path.join(out, "p_over_time.parquet")))
  # finished runs are skipped: a second invocation trains nothing
  n = len(calls)
  assert aioli.main(["--out", out, "--scale", "nano"]) == 0
  assert len(calls) == n


def test_aioli_experiment_bad_setting(tmp_path, capsys):
  assert aioli.main(["--out", str(tmp_path), "--scale", "nano", "--settings", "nope"]) == 2
  assert "unknown settings ['nope']" in capsys.readouterr().err


def test_findings_counts_settings_and_seed_spread():
  """Hand-made table: Aioli better in 1 of 2 settings, DML in both; stratified's seed spread is 0.5 and 0.1."""
  rows = []
  for seed, (sa, sb) in enumerate([(10.0, 20.0), (10.5, 20.1)]):
    rows += [
      dict(setting="a", seed=seed, method="stratified", test_avg_ppl=sa, diff_vs_stratified=0.0),
      dict(setting="b", seed=seed, method="stratified", test_avg_ppl=sb, diff_vs_stratified=0.0),
      dict(setting="a", seed=seed, method="aioli", test_avg_ppl=sa - 1, diff_vs_stratified=-1.0),
      dict(setting="b", seed=seed, method="aioli", test_avg_ppl=sb + 2, diff_vs_stratified=2.0),
      dict(setting="a", seed=seed, method="dml", test_avg_ppl=sa - 0.2, diff_vs_stratified=-0.2),
      dict(setting="b", seed=seed, method="dml", test_avg_ppl=sb - 0.4, diff_vs_stratified=-0.4),
      dict(setting="a", seed=seed, method="skillit", test_avg_ppl=sa - 1e-5, diff_vs_stratified=-1e-5),  # a tie
      dict(setting="b", seed=seed, method="skillit", test_avg_ppl=sb - 1e-5, diff_vs_stratified=-1e-5),
    ]
  text = aioli.findings(pd.DataFrame(rows))
  assert "- Aioli: better than stratified in 1/2 settings (mean difference +0.500 ppl)" in text
  assert "- DML: better than stratified in 2/2 settings (mean difference -0.300 ppl)" in text
  assert "every setting here: DML (the paper" in text
  assert "- Skill-It: better than stratified in 0/2 settings (mean difference +0.000 ppl)" in text  # ties are not wins
  assert "a 0.500, b 0.100" in text
  one = aioli.findings(pd.DataFrame([r for r in rows if r["seed"] == 0]))
  assert "One seed: no estimate" in one


def test_settings_file_of_local_corpora(tmp_path, capsys):
  """The paper's settings from local text corpora: the run cards carry the file, so an emitted job
  (`train.py --config=experiments/aioli.py:<scale>,<setting>,<file>`) rebuilds the same groups; bad files
  are one line each."""
  corpora = {}
  for name, word in (("law", "court"), ("code", "def")):
    d = tmp_path / name
    d.mkdir()
    (d / "a.txt").write_text("\n\n".join(f"{word} {i} {word * (i % 5)}" for i in range(60)))
    corpora[name] = {"kind": "text", "path": str(d), "doc_tokens": 32}
  f = tmp_path / "settings.json"
  f.write_text(json.dumps({"law_code": corpora}))
  assert aioli.settings("paper", str(f)) == {"law_code": corpora}
  cfg = aioli.get_config(f"nano,law_code,{f}")
  assert {k: dict(v) for k, v in cfg.data.groups.items()} == corpora
  out = tmp_path / "out"
  assert aioli.main(["--out", str(out), "--scale", "nano", "--settings_file", str(f), "--emit", "slurm"]) == 0
  script = (out / "launch_base_slurm.sh").read_text()
  assert f"experiments/aioli.py:nano,law_code,{f}" in script and "runs/law_code/stratified" in script
  for bad, why in (
    ("[1, 2]", "expected {setting: {group: source spec}}"),
    ('{"s": {"only": {"kind": "text"}}}', "setting 's' needs at least 2 groups"),
    ('{"s": {"a": {"kind": "text"}, "b": {"kind": "web"}}}', "group s/b needs a source spec with kind in"),
    ("{not json", "cannot read it as JSON"),
  ):
    f.write_text(bad)
    assert aioli.main(["--out", str(tmp_path / "o2"), "--scale", "nano", "--settings_file", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0], err


def test_every_scale_runs_enough_static_mixtures_for_dml():
  """DML reuses grid search's runs and fits m + 2 parameters per group: every scale covers m = 2 and 3 with
  enough points that the fit runs (the faithful scale's 4 points left m = 3 unfittable)."""
  for scale in aioli.SCALES:
    for m in (2, 3):
      P = mixing_laws.dirichlet_cover(m, aioli.gs_points(scale, m), seed=0)
      assert len(P) >= m + 2
      mixing_laws.fit_static_law(P, mixing_laws.static_law(P, np.full(m, 2.0), np.ones(m), 2 * np.eye(m)))


@pytest.mark.slow
def test_aioli_diagnostics_nano_trains_both_runs_under_the_variant(tmp_path, capsys):
  """experiments/aioli_diagnostics at nano scale, really trained: the variant's change reaches both runs
  (mixture.rows=sampled) and only Aioli's (η), the CSV has one row per variant and setting, a rerun adds a
  variant's rows without losing the others', and an unknown variant is one clear error."""
  from experiments import aioli_diagnostics as D
  from lib import ckpt

  out = str(tmp_path / "diag")
  assert D.main(["--out", out, "--scale", "nano", "--variant", "sampled_rows,eta0.5"]) == 0
  df = pd.read_csv(os.path.join(out, "diagnostics.csv"))
  assert list(df.columns) == D.COLUMNS and list(df.variant) == ["sampled_rows", "eta0.5"]
  assert (df.seeds == 1).all() and np.isfinite(df["diff"]).all() and (df.p_move_max >= 0).all()
  cfgs = {
    os.path.relpath(os.path.dirname(p), out): ckpt.read_config(os.path.dirname(p))
    for p in __import__("glob").glob(os.path.join(out, "*", "runs", "**", "config.json"), recursive=True)
  }
  rows = {k: c["mixture"]["rows"] for k, c in cfgs.items() if k.startswith("sampled_rows")}
  assert len(rows) == 2 and set(rows.values()) == {"sampled"}
  etas = {c["mixture"]["method"]: c["mixture"]["eta"] for k, c in cfgs.items() if k.startswith("eta0.5")}
  assert etas["aioli"] == 0.5 and etas["stratified"] != 0.5
  assert "| sampled_rows | " in capsys.readouterr().out
  assert D.main(["--out", out, "--scale", "nano", "--variant", "released"]) == 0
  assert list(pd.read_csv(os.path.join(out, "diagnostics.csv")).variant) == ["sampled_rows", "eta0.5", "released"]
  assert D.main(["--out", out, "--variant", "nope"]) == 2
  assert "unknown variants ['nope']" in capsys.readouterr().err
