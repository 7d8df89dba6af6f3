"""Flatness CLI over a workdir: rows per checkpoint, resumable, cross-mesh, bad input, NaN rows."""

import dataclasses
import json
import os
import shutil
import sys

import numpy as np
import pandas as pd
import pytest

import train
from analysis import flatness as F
from analysis import load, plots
from lib import ckpt as C
from lib import errors, sharding
from lib import model as M
from lib.sharding import ShardingError
from tests.helpers import tiny_cfg

pytestmark = pytest.mark.slow  # trains a run, then flatness jobs over its checkpoints


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("flat")
  w = str(root / "w")
  cfg = tiny_cfg(
    str(root / "data"),
    **{"train.steps": 8, "ckpt.resume_every": 8, "eval.every": 0, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
  )
  train.train_and_evaluate(cfg, w)  # trained on 8 devices; flatness reads it on 1 (and on 8)
  return w


def _args(**kw):
  argv = []
  for k, v in kw.items():
    argv += [f"--{k}"] if v is True else [f"--{k}={v}"]
  return F.job_from_args(F.parse_args(["--workdir=unused", "--batches=2", "--batch_size=8", *argv]))


def test_rows_per_checkpoint_and_estimator(run, capsys, monkeypatch):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # bars are drawn on a terminal only
  df = F.run(
    run,
    _args(steps="0,8", estimator="hutchinson,fisher,ggn,lanczos,slq", probes=6, blocks=True, lanczos_steps=6, topk=2, slq_runs=3),
  )
  bars = capsys.readouterr().err  # progress: checkpoints, and probes within each estimator
  assert "2/2" in bars and "step 8 hutchinson" in bars and "6/6" in bars and "step 0 lanczos" in bars
  assert set(df["step"]) == {0, 8}
  tr = df[(df.estimator == "hutchinson") & (df.quantity == "trace")]
  assert len(tr) == 2 and (tr["n_hvps"] == 6).all() and (tr["stderr"] > 0).all() and tr["valid"].all()
  blocks = df[df.quantity.str.startswith("trace/")]
  assert {"trace/embeddings", "trace/layer_0/attn", "trace/layer_1/mlp", "trace/head"} <= set(blocks.quantity)
  for s in (0, 8):  # blocks add up to the total
    b = blocks[(blocks.step == s)]["estimate"].sum()
    t = tr[tr.step == s]["estimate"].item()
    assert abs(b - t) < 1e-3 * max(1.0, abs(t))
  assert set(df[df.estimator == "lanczos"].quantity) == {"eig_0", "eig_1", "eig_min"}
  eig = df[df.estimator == "lanczos"].pivot_table(index="step", columns="quantity", values="estimate")
  assert (eig["eig_min"] < eig["eig_1"]).all() and (eig["eig_1"] <= eig["eig_0"]).all()
  slq = df[df.estimator == "slq"]
  assert list(slq.quantity) == ["trace", "trace"] and (slq.stderr > 0).all() and (slq.n_hvps == 18).all()
  dens = json.loads(slq.density.iloc[1])
  assert abs(np.trapezoid(dens["density"], dens["grid"]) - 1) < 1e-2  # a density: integrates to one
  assert plots.spectral_density(df) is not None
  for s in (0, 8):  # SLQ and Hutchinson estimate the same trace
    a, b = slq[slq.step == s].iloc[0], tr[tr.step == s].iloc[0]
    assert abs(a.estimate - b.estimate) < 4 * np.hypot(a.stderr, b.stderr)
  assert (df[df.estimator == "fisher"]["estimate"] > 0).all()
  ggn = df[df.quantity == "ggn_trace"]
  assert len(ggn) == 2 and (ggn.estimate > 0).all() and (ggn.n_hvps == 6).all()
  assert "ggn_trace/layer_1/mlp" in set(df.quantity)
  fisher = df[df.quantity == "fisher_trace"]
  for s in (0, 8):  # one quantity, two estimators: tr G = tr F
    a, b = ggn[ggn.step == s].iloc[0], fisher[fisher.step == s].iloc[0]
    assert abs(a.estimate - b.estimate) < 4 * np.hypot(a.stderr, b.stderr), (s, a.estimate, b.estimate)
  n = M.param_count(C.load_model(run)[0])
  assert (df["n_params"] == n).all()
  assert (df["cfg_matmul_precision"] == "highest").all()  # true fp32 matmuls unless asked otherwise
  assert (df["loss"] > 0).all() and df["data_fingerprint"].nunique() == 1
  assert df[df.step == 8]["tokens_seen"].iloc[0] == 8 * 8 * 32


def test_resumable_and_same_table_after_interruption(run, tmp_path):
  w = str(tmp_path / "copy")
  shutil.copytree(run, w, ignore=shutil.ignore_patterns("analysis"))
  a = _args(steps="all", estimator="hutchinson", probes=4)
  F.run(w, _args(steps="0,1", estimator="hutchinson", probes=4))  # "interrupted" after two checkpoints
  part = F.run(w, a)
  again = F.run(w, a)  # nothing left to do
  assert len(again) == len(part) == len(C.available_steps(w))
  whole = F.run(str(shutil.copytree(run, str(tmp_path / "fresh"), ignore=shutil.ignore_patterns("analysis"))), a)
  cols = ["step", "estimator", "quantity", "estimate", "stderr", "n_hvps", "loss"]
  pd.testing.assert_frame_equal(
    part[cols].sort_values("step").reset_index(drop=True), whole[cols].sort_values("step").reset_index(drop=True)
  )
  df = load.load_flatness([w])
  assert df["run"].iloc[0] == "copy"
  import analysis

  pd.testing.assert_frame_equal(analysis.load_flatness(w), df)  # the package-level loader, one workdir
  assert plots.flatness(df) is not None


def test_eight_devices_match_one(run, tmp_path):
  w8 = str(tmp_path / "w8")
  shutil.copytree(run, w8, ignore=shutil.ignore_patterns("analysis"))
  a1 = F.run(run, _args(steps="8", estimator="hutchinson", probes=3, seed=5))
  a8 = F.run(w8, _args(steps="8", estimator="hutchinson", probes=3, seed=5, mesh="2,2,2"))
  x = a1[(a1.step == 8) & (a1.cfg_seed == 5)]["estimate"].item()
  y = a8[(a8.step == 8)]["estimate"].item()
  assert abs(x - y) < 1e-4 * max(1.0, abs(x))


def test_bad_input(run, tmp_path, monkeypatch):
  with pytest.raises(F.FlatnessError, match="unknown estimator"):
    F.run(run, _args(estimator="hutchinsn"))
  with pytest.raises(C.CheckpointError, match="no checkpoint at step 7"):
    F.run(run, _args(steps="7"))
  with pytest.raises(ShardingError, match="needs 3 integer sizes"):
    F.run(run, _args(mesh="2,2"))
  with pytest.raises(ShardingError, match="batch_size=6 is not divisible by the data-parallel mesh size 4"):
    F.run(run, _args(mesh="4,1,2", batch_size=6))
  with pytest.raises(ValueError, match="matches no parameter"):
    F.run(run, _args(steps="8", filter="no_such_param"))
  only = F.run(
    str(shutil.copytree(run, str(tmp_path / "f"), ignore=shutil.ignore_patterns("analysis"))),
    _args(steps="8", filter="layer_0/mlp", probes=2),
  )
  assert only["n_params"].iloc[0] == 2 * (32 * 64) + 64 + 32  # nano: wi, wo kernels and biases
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(os.path.join(run, "config.json"), empty / "config.json")
  with pytest.raises(F.FlatnessError, match="has no checkpoints"):
    F.run(str(empty), _args())
  with pytest.raises(C.CheckpointError, match="does not exist"):
    F.run(str(tmp_path / "nowhere"), _args())

  from analysis import hessian as H

  def nan_trace(*a, **k):
    raise FloatingPointError("non-finite value (nan) in Hutchinson probe 0")

  monkeypatch.setattr(H, "hutchinson_trace", nan_trace)
  w = str(tmp_path / "nan")
  shutil.copytree(run, w, ignore=shutil.ignore_patterns("analysis"))
  df = F.run(w, _args(steps="8", estimator="hutchinson"))
  assert not df["valid"].any() and "non-finite" in df["reason"].iloc[0]


def test_masked_lm_workdir(tmp_path):
  """Liu et al.'s setting: a bidirectional masked LM; the loss, HVPs and Fisher count masked tokens only."""
  w = str(tmp_path / "mlm")
  cfg = tiny_cfg(
    str(tmp_path / "data"),
    **{"train.steps": 4, "ckpt.resume_every": 4, "eval.every": 0, "model.causal": False, "data.objective": "mlm"},
  )
  train.train_and_evaluate(cfg, w)
  df = F.run(w, _args(steps="4", estimator="hutchinson,fisher,ggn", probes=4))
  assert df["valid"].all() and len(df) == 3 and (df[df.estimator == "ggn"]["estimate"] > 0).all()
  all_tokens = 2 * 8 * 32  # --batches=2 --batch_size=8, seq_len 32
  assert 0.05 * all_tokens < df["n_tokens"].iloc[0] < 0.3 * all_tokens  # ~15% of the tokens are predicted
  assert (df[df.estimator == "fisher"]["estimate"] > 0).all()
  batches, _ = F.fixed_batches(w, batches=2, batch_size=8, seed=0)
  assert sum(int(b["mask"].sum()) for b in batches) == df["n_tokens"].iloc[0]


def test_checkpoints_share_one_compilation(run):
  """The estimators' jitted bodies are built once per run and reused for every checkpoint."""
  a = _args(estimator="hutchinson,fisher", probes=4).settings
  batches, _ = F.fixed_batches(run, batches=2, batch_size=8, seed=0)
  ms = F.Measurer(run, batches, a)
  mesh = sharding.mesh_from_flag("")
  rows = [F.measure_checkpoint(run, s, ["hutchinson", "fisher"], a, batches, mesh, ms) for s in (0, 8)]
  assert rows[0][0]["estimate"] != rows[1][0]["estimate"]
  for owner in (ms.matvec, ms.logits_fn):
    (fn,) = owner.__dict__["_hessian_jit_cache"].values()
    assert fn._cache_size() == 1  # one trace and compilation for both checkpoints


def _copy(run, tmp_path, name):
  return str(shutil.copytree(run, str(tmp_path / name), ignore=shutil.ignore_patterns("analysis")))


def test_an_unreadable_checkpoint_is_skipped_marked_and_retried(run, tmp_path, capsys):
  w = _copy(run, tmp_path, "damaged")
  good = os.path.join(w, C.ANALYSIS_DIR, "2", "params")
  shutil.move(good, good + ".bak")
  os.makedirs(good)  # still listed (a 'params' item), but nothing in it can be restored
  a = _args(steps="all", estimator="hutchinson,power", probes=2, power_iters=3)
  df = F.run(w, a)
  assert "skipping step 2" in capsys.readouterr().err
  assert set(df.step) == set(C.available_steps(w)) and len(df) == 2 * len(C.available_steps(w))  # the later ones too
  bad = df[df.step == 2]
  assert not bad.valid.any() and bad.reason.str.startswith(F.UNREADABLE).all()
  assert set(bad.quantity) == {"trace", "lambda_absmax"} and bad.estimate.isna().all()
  assert df[df.step != 2].valid.all()
  shutil.rmtree(good)
  shutil.move(good + ".bak", good)  # repaired: a rerun retries it, and only it
  again = F.run(w, a)
  assert len(again) == len(df) and again.valid.all()
  pd.testing.assert_frame_equal(
    again[again.step != 2].reset_index(drop=True), df[df.step != 2].reset_index(drop=True), check_dtype=False
  )
  fresh = F.run(_copy(run, tmp_path, "fresh"), a)
  x = fresh[fresh.step == 2].sort_values("estimator")[["estimator", "quantity", "estimate"]].reset_index(drop=True)
  y = again[again.step == 2].sort_values("estimator")[["estimator", "quantity", "estimate"]].reset_index(drop=True)
  pd.testing.assert_frame_equal(x, y)


def test_steps_all_reads_analysis_checkpoints_unless_asked(run, tmp_path):
  w = _copy(run, tmp_path, "with_resume")
  os.makedirs(os.path.join(w, C.RESUME_DIR), exist_ok=True)
  shutil.copytree(os.path.join(w, C.ANALYSIS_DIR, "4"), os.path.join(w, C.RESUME_DIR, "5"))  # a short-lived one
  assert C.available_steps(w)[5] == C.RESUME_DIR
  analysis_steps = {s for s, sub in C.available_steps(w).items() if sub == C.ANALYSIS_DIR}
  df = F.run(w, _args(steps="all", estimator="hutchinson", probes=2))
  assert set(df.step) == analysis_steps
  df = F.run(w, _args(steps="all", estimator="hutchinson", probes=2, include_resume=True))
  assert set(df.step) == analysis_steps | {5}
  only = str(tmp_path / "only_resume")
  os.makedirs(os.path.join(only, C.RESUME_DIR))
  shutil.copy(os.path.join(run, "config.json"), only)
  shutil.copytree(os.path.join(w, C.RESUME_DIR, "5"), os.path.join(only, C.RESUME_DIR, "5"))
  with pytest.raises(F.FlatnessError, match="add --include_resume"):
    F.run(only, _args(steps="all"))
  assert set(F.run(only, _args(steps="5", probes=2)).step) == {5}  # named explicitly: read


def test_power_iteration_row_is_named_for_what_it_holds_and_reports_convergence(run, tmp_path):
  w = _copy(run, tmp_path, "power")
  capped = F.run(w, _args(steps="0", estimator="power,lanczos", power_iters=3, power_tol=0.0, lanczos_steps=40, topk=1))
  p = capped[capped.estimator == "power"].iloc[0]
  assert p.quantity == "lambda_absmax" and p.n_hvps == 3 and not p.converged  # its own cap, not --lanczos_steps
  conv = F.run(w, _args(steps="0", estimator="power", power_iters=2000, power_tol=1e-6))
  q = conv[(conv.estimator == "power") & (conv.cfg_power_iters == 2000)].iloc[0]
  assert q.converged and q.n_hvps < 2000
  eig = capped[capped.estimator == "lanczos"].set_index("quantity")["estimate"]
  # |λ| of largest magnitude is max(|eig_0|, |eig_min|) of the same operator (Lanczos, 40 steps: converged ends)
  assert abs(abs(q.estimate) - max(abs(eig["eig_0"]), abs(eig["eig_min"]))) < 1e-2 * abs(q.estimate) + q.stderr
  assert capped[capped.estimator == "lanczos"]["converged"].notna().all()
  assert load.load_flatness([w])["converged"].dtype == "boolean"


def test_settings_key_is_every_field(run):
  st = F.Settings()
  assert set(json.loads(st.key())) == {f.name for f in dataclasses.fields(F.Settings)}
  assert F.Settings(power_iters=7).key() != st.key() and F.Settings(power_iters=7).key() == F.Settings(power_iters=7).key()
  job = _args(filter="layer_0", power_iters=7, estimator="power,lanczos")
  assert job.settings.power_iters == 7 and job.settings.selection.include == "layer_0" and job.estimators == ("power", "lanczos")


def test_cli_prints_project_errors_as_one_line_and_keeps_tracebacks_for_bugs(run, monkeypatch, capsys):
  with pytest.raises(SystemExit) as e:
    F.main([f"--workdir={run}", "--estimator=hutchinsn"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and err.startswith("lmtrace flatness: error: unknown estimator") and "\n" not in err

  def bug(*a, **k):
    raise KeyError("a genuine bug")

  monkeypatch.setattr(F, "run", bug)
  with pytest.raises(KeyError, match="a genuine bug"):
    F.main([f"--workdir={run}"])
  assert issubclass(F.FlatnessError, errors.LmtraceError)


def test_no_progress_bars_when_stderr_is_not_a_terminal(run, capsys):
  """Redirected output (log files, CI) gets no bars and no carriage-return escape codes."""
  F.run(run, _args(steps="0", estimator="hutchinson", probes=2))
  err = capsys.readouterr().err
  assert "\r" not in err and "ckpt" not in err


def test_a_registered_estimator_runs_end_to_end_and_matches_an_exact_reference(run, tmp_path, monkeypatch, capsys):
  """A new estimator is one registry entry: here 1ᵀH1 (v = every parameter set to 1) through the run's HVP
  operator, measured by the CLI beside Hutchinson, equal to forward-over-reverse on the same tokens."""
  import jax
  import jax.numpy as jnp

  monkeypatch.setattr(F, "ESTIMATORS", dict(F.ESTIMATORS))  # registered for this test only

  def ones_quad(ms, params, key, st, progress):
    v = jax.tree.map(jnp.ones_like, params)
    hv = ms.matvec(params, v)
    q = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(hv)))
    return [dict(quantity="ones_quad", estimate=q, stderr=0.0, n_hvps=1)]

  F.register(F.Estimator("ones_quad", ones_quad, primary="ones_quad", budget=lambda st: 1, doc="1ᵀH1, for tests"))
  w = _copy(run, tmp_path, "toy")
  reads = {"read_config": 0, "available_steps": 0}

  def counted(name):
    real = getattr(C, name)

    def fn(*a, **k):
      reads[name] += 1
      return real(*a, **k)

    return fn

  for name in reads:  # the workdir is opened once: one config parse and one listing for the whole job
    monkeypatch.setattr(C, name, counted(name))
  F.main([f"--workdir={w}", "--steps=0,8", "--estimator=ones_quad,hutchinson", "--probes=2", "--batches=2", "--batch_size=8"])
  assert "4 rows" in capsys.readouterr().out  # per checkpoint: one ones_quad row, one Hutchinson trace
  assert reads == {"read_config": 1, "available_steps": 1}
  monkeypatch.undo()
  monkeypatch.setattr(F, "ESTIMATORS", dict(F.ESTIMATORS))
  F.register(F.Estimator("ones_quad", ones_quad, primary="ones_quad", budget=lambda st: 1))
  df = load.load_flatness(w)
  row = df[(df.estimator == "ones_quad") & (df.step == 8)].iloc[0]
  assert row.valid and row.quantity == "ones_quad" and row.n_hvps == 1
  model, _, _ = C.load_model(w)  # the reference: no lmtrace operator, one token-mean loss over the same batches
  params = C.restore_params(w, 8)
  batches, _ = F.fixed_batches(w, batches=2, batch_size=8, seed=0)
  n = sum(float(b["mask"].sum()) for b in batches)
  f = lambda p: sum(M.per_token_loss(model, p, b).sum() for b in batches) / n  # noqa: E731
  v = jax.tree.map(jnp.ones_like, params)
  with jax.default_matmul_precision("highest"):
    _, hv = jax.jvp(jax.grad(f), (params,), (v,))
  ref = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(hv)))
  assert abs(row.estimate - ref) <= 1e-4 * abs(ref), (row.estimate, ref)
  again = F.run(w, F.Job(F.Settings(probes=2, batches=2, batch_size=8), ("ones_quad",), "8"))  # resumable like the rest
  assert len(again) == len(df)
