"""Per-token trajectories: probe sets, hook == offline, 8 devices == 1, resumability, refusals,
corrupt checkpoints, units, loaders, token metrics and plots (one tiny run trained once)."""

import json
import math
import os
import re
import shutil

import ml_collections
import numpy as np
import pytest

import train
from analysis import load as LD
from analysis import token_table as TT
from analysis import trajectories as TJ
from data import sources, vocab
from lib import ckpt as C
from lib import model as M
from lib import sharding
from tests import helpers

STEPS = [0, 1, 2, 4, 8]  # pythia:every=4 over 8 steps: the checkpoint and probe schedule
SEQS = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_cfg(data_dir, **over):
  """The shared tiny card, with probes on and the 8-step schedule these tests expect."""
  return helpers.tiny_cfg(
    data_dir,
    **{
      "data.source.n_train": 500,
      "data.source.n_validation": 40,
      "data.source.n_test": 10,
      "train.steps": 8,
      "train.log_every": 4,
      "eval.every": 4,
      "ckpt.resume_every": 4,
      "ckpt.async_save": False,
      "probes.enabled": True,
      "probes.schedule": "pythia:every=4",
      "probes.sequences": SEQS,
      "probes.positions": 0,
      **over,
    },
  )


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
  """8 steps on a (2,2,2) mesh of 8 devices with the probe hook on at every checkpoint."""
  w = str(tmp_path_factory.mktemp("runs") / "seed0")
  cfg = tiny_cfg(data_dir, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  train.train_and_evaluate(cfg, w)
  return w, cfg


@pytest.fixture(scope="module")
def offline1(run):
  """Offline extraction of the same run on one device, into its own store."""
  w, _ = run
  rep = TJ.extract(w, store="one", progress=False)
  return w, rep


def _hook_store(w):
  return TJ.Store.of(w)


@pytest.mark.slow
def test_hook_recorded_every_probe_step(run):
  w, cfg = run
  st = _hook_store(w)
  assert st.steps() == STEPS
  rows = [st.row(s) for s in STEPS]
  assert {r["source"] for r in rows} == {"hook"}
  assert [r["tokens_seen"] for r in rows] == [s * 8 * 32 for s in STEPS]
  n = M.param_count(M.make(M.ModelConfig.from_config(json.load(open(os.path.join(w, "config.json")))["model"])))
  assert all(r["n_params"] == n and r["flops"] == 6.0 * n * r["tokens_seen"] for r in rows)
  assert rows[0]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  # training lowers the probe loss; a constant would mean we read the same params every time
  assert rows[-1]["probe_loss"] < rows[0]["probe_loss"] - 0.05


@pytest.mark.slow
def test_probe_set_definition(run):
  w, cfg = run
  every = TJ.ProbeSet.load(TJ.store_dir(w))
  docs = sources.select_split(sources.make_groups(cfg.data)[0], "validation")
  assert every.doc_S.tolist() == list(range(SEQS))
  # positions=0: every target of every document, position 0 = the first word after BOS
  n_S = [min(len(docs[i]["tokens"]) - 1, 32) for i in range(SEQS)]
  assert every.num_tokens == sum(n_S)
  first = every.position_T == 0
  assert first.sum() == SEQS
  assert np.all(every.rows["inputs"][every.row_T[first], 0] == vocab.BOS)
  cols = every.token_columns()
  for t in (0, 5, every.num_tokens - 1):
    d, p = cols["doc"][t], cols["position"][t]
    assert cols["token"][t] == docs[d]["tokens"][p + 1] and cols["context_len"][t] == p + 1
    assert cols["true_logprob"][t] == docs[d]["true_logprob"][p]
  # positions=K: K distinct positions per document, never position 0, seeded, stable under more sequences
  k3 = TJ.build_probe_set(cfg.data, TJ.ProbeSpec(SEQS, 3, 0))
  k3b = TJ.build_probe_set(cfg.data, TJ.ProbeSpec(SEQS, 3, 1))
  k3_more = TJ.build_probe_set(cfg.data, TJ.ProbeSpec(SEQS + 4, 3, 0))
  assert k3.position_T.min() >= 1
  per_doc = np.bincount(k3.row_T, minlength=SEQS)
  assert np.all(per_doc == np.minimum(3, np.asarray(n_S) - 1))
  assert np.all(k3.position_T < np.asarray(n_S)[k3.row_T])
  assert not np.array_equal(k3.position_T, k3b.position_T)
  assert np.array_equal(k3_more.position_T[: k3.num_tokens], k3.position_T)
  assert k3.meta()["fingerprint"] != every.meta()["fingerprint"]
  assert TJ.build_probe_set(cfg.data, TJ.ProbeSpec(SEQS, 3, 0)).meta() == k3.meta()


@pytest.mark.slow
def test_mean_surprisal_equals_model_loss(run, offline1):
  """The stored surprisal is the model's per-token loss on those documents, computed directly."""
  w, cfg = run
  docs = sources.select_split(sources.make_groups(cfg.data)[0], "validation")
  L = 32
  batch = {k: np.zeros((SEQS, L), np.int32) for k in ("inputs", "targets", "mask", "segment_ids", "positions")}
  for i in range(SEQS):
    tok = docs[i]["tokens"][: L + 1]
    n = len(tok) - 1
    batch["inputs"][i, :n], batch["targets"][i, :n] = tok[:-1], tok[1:]
    batch["mask"][i, :n], batch["segment_ids"][i, :n], batch["positions"][i, :n] = 1, 1, np.arange(n)
  model, _, _ = C.load_model(w)
  st = TJ.Store.of(w, "one")
  for step in (0, 8):
    loss_BxL = np.asarray(M.per_token_loss(model, C.restore_params(w, step), batch))
    direct = loss_BxL[batch["mask"] > 0].astype(np.float64)
    np.testing.assert_allclose(st.read(step), direct, rtol=0, atol=1e-5)
    assert abs(st.row(step)["probe_loss"] - direct.mean()) < 1e-6
    assert st.row(step)["probe_ppl"] == pytest.approx(math.exp(st.row(step)["probe_loss"]), rel=1e-12)


@pytest.mark.slow
def test_offline_same_mesh_equals_hook_exactly(run):
  w, _ = run
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rep = TJ.extract(w, mesh=mesh, store="mesh8", progress=False)
  assert rep.computed[os.path.basename(w)] == STEPS and not rep.skipped
  hook, off = _hook_store(w), TJ.Store.of(w, "mesh8")
  for s in STEPS:
    np.testing.assert_array_equal(off.read(s), hook.read(s))
    assert off.row(s)["source"] == "offline"
  assert json.load(open(os.path.join(off.dir, "probes.json"))) == json.load(open(os.path.join(hook.dir, "probes.json")))


@pytest.mark.slow
def test_one_device_equals_eight(run, offline1):
  w, rep = offline1
  assert rep.computed[os.path.basename(w)] == STEPS
  one, hook = TJ.Store.of(w, "one"), _hook_store(w)
  assert one.row(4)["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  for s in STEPS:
    np.testing.assert_allclose(one.read(s), hook.read(s), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_no_recompile_across_checkpoints(run):
  w, cfg = run
  model, _, _ = C.load_model(w)
  probes = TJ.ProbeSet.load(TJ.store_dir(w))
  mesh = sharding.single_device_mesh()
  fn = TJ.SurprisalFn(model, probes, mesh)
  restore = TJ._Restorer(w, model, mesh)
  for s in (1, 2, 4):
    fn(restore(s, "checkpoints"))
  restore.close()
  assert fn.fn._cache_size() == 1


@pytest.mark.slow
def test_resumable(run, offline1, tmp_path):
  w, _ = run
  before = LD.load_trajectories(w, store="one")
  rep = TJ.extract(w, store="one", progress=False)
  assert rep.computed[os.path.basename(w)] == [] and rep.present[os.path.basename(w)] == STEPS
  st = TJ.Store.of(w, "one")
  row8 = st.row(8)
  os.remove(os.path.join(st.steps_dir, "8.npy"))  # killed between the row and the vector of step 8
  assert st.steps() == STEPS[:-1]
  rep = TJ.extract(w, store="one", progress=False)
  assert rep.computed[os.path.basename(w)] == [8]
  after = LD.load_trajectories(w, store="one")
  np.testing.assert_array_equal(after.values, before.values)
  assert after.step.values.tolist() == STEPS
  assert {k: v for k, v in st.row(8).items() if k != "time"} == {k: v for k, v in row8.items() if k != "time"}
  assert not [f for f in os.listdir(st.steps_dir) if ".tmp" in f]


def _copy_config(w, dst, edit):
  os.makedirs(dst)
  cfg = json.load(open(os.path.join(w, "config.json")))
  edit(cfg)
  json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
  return str(dst)


@pytest.mark.slow
def test_incompatible_runs_are_refused(run, tmp_path, capsys):
  w, _ = run
  small = lambda c: c["data"]["source"].update(n_train=20, n_validation=SEQS, n_test=2)  # noqa: E731
  other_vocab = _copy_config(w, tmp_path / "vocab", lambda c: (small(c), c["data"]["source"].update(n_terminals=12)))
  other_lang = _copy_config(w, tmp_path / "lang", lambda c: (small(c), c["data"]["source"].update(seed=7)))
  other_spec = _copy_config(w, tmp_path / "spec", lambda c: c["probes"].update(positions=3))
  same_data = _copy_config(w, tmp_path / "same", lambda c: c["data"]["source"].update(n_train=20, n_test=2))
  with pytest.raises(TJ.IncompatibleProbes, match=r"different vocabulary/tokenizer \(vocab_size 20 vs 16"):
    TJ.extract([w, other_vocab], store="x", progress=False)
  with pytest.raises(TJ.IncompatibleProbes, match="different validation data"):
    TJ.extract([w, other_lang], store="x", progress=False)
  with pytest.raises(TJ.IncompatibleProbes, match="different probe spec"):
    TJ.extract([w, other_spec], store="x", progress=False)
  TJ.check_runs([TJ.open_run(w), TJ.open_run(same_data)])  # compatible: no error
  assert not os.path.exists(TJ.store_dir(w, "x"))  # refused before writing anything
  # a store refuses a probe set other than its own; the CLI says why and exits 2
  with pytest.raises(TJ.IncompatibleProbes, match=r"another probe set: different probe spec"):
    TJ.extract(w, store="one", spec={"positions": 3}, progress=False)
  assert TJ.main([f"--workdir={w}", f"--workdir={other_vocab}", "--store=x", "--quiet"]) == 2
  assert "different vocabulary/tokenizer" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop after a failed read
def test_corrupt_and_missing_checkpoints_are_skipped_and_listed(run, tmp_path, capsys):
  w, _ = run
  wc = str(tmp_path / "corrupt")
  shutil.copytree(w, wc, ignore=shutil.ignore_patterns("analysis", "resume"))
  params = os.path.join(wc, "checkpoints", "4", "params")
  data_files = [os.path.join(r, f) for r, _, fs in os.walk(params) for f in fs if os.path.basename(r) == "d"]
  assert data_files
  for f in data_files:
    os.truncate(f, os.path.getsize(f) // 2)
  assert TJ.main([f"--workdir={wc}", "--steps=0,3,4,8", "--quiet"]) == 0
  out = capsys.readouterr().out
  assert "skipped 2 checkpoint(s)" in out
  assert "step 3: no checkpoint" in out
  # truncated files: the integrity manifest names the damage before orbax would fail to read them
  assert re.search(r"step 4: .*checkpoints/4 is damaged: .* bytes, \d+ when saved", out), out
  st = TJ.Store.of(wc)
  assert st.steps() == [0, 8]
  np.testing.assert_allclose(st.read(8), TJ.Store.of(w, "one").read(8), atol=1e-6)


@pytest.mark.slow
def test_bits_are_nats_over_ln2(offline1):
  w, _ = offline1
  nats, bits = LD.load_trajectories(w, store="one"), LD.load_trajectories(w, store="one", unit="bits")
  assert bits.attrs["unit"] == "bits"
  np.testing.assert_allclose(bits.values, nats.values / np.log(2), rtol=1e-6)
  np.testing.assert_allclose(bits.val_loss.values, nats.val_loss.values / np.log(2), rtol=1e-9)
  np.testing.assert_allclose(bits.val_ppl.values, nats.val_ppl.values)
  with pytest.raises(ValueError, match="unit"):
    LD.load_trajectories(w, store="one", unit="dB")


@pytest.fixture(scope="module")
def two_runs(run, offline1, tmp_path_factory):
  """The run and a copy of its store standing in for a second seed (noisier curves)."""
  w, _ = run
  w2 = str(tmp_path_factory.mktemp("runs") / "seed1")
  shutil.copytree(w, w2, ignore=shutil.ignore_patterns("checkpoints", "resume"))
  st = TJ.Store.of(w2, "one")
  rng = np.random.default_rng(0)
  for s in st.steps():
    st.write(s, st.read(s) + rng.normal(0, 0.05, st.read(s).shape).astype(np.float32), dict(st.row(s), run="seed1", seed=1))
  return w, w2


@pytest.mark.slow
def test_loader_shapes_and_coords(two_runs, tmp_path):
  w, w_other = two_runs
  w2 = str(tmp_path / "seed1")  # a second run that lacks step 2
  shutil.copytree(w_other, w2)
  os.remove(os.path.join(TJ.Store.of(w2, "one").steps_dir, "2.npy"))
  da = LD.load_trajectories([w, w2], store="one")
  T = TJ.ProbeSet.load(TJ.store_dir(w)).num_tokens
  assert da.dims == ("run", "step", "token") and da.shape == (2, len(STEPS), T)
  assert da.run.values.tolist() == ["seed0", "seed1"] and da.seed.values.tolist() == [0, 1]
  assert da.step.values.tolist() == STEPS
  assert np.isnan(da.sel(run="seed1", step=2).values).all() and np.isfinite(da.sel(run="seed1", step=4).values).all()
  assert np.isnan(da.tokens_seen.sel(run="seed1", step=2))
  assert da.tokens_seen.sel(run="seed0", step=4) == 4 * 8 * 32
  np.testing.assert_allclose(da.flops.values[0], 6.0 * da.n_params.values[0] * da.tokens_seen.values[0])
  np.testing.assert_allclose(da.val_ppl.values[0], np.exp(da.isel(run=0).values.astype(np.float64).mean(-1)), rtol=1e-5)
  assert np.isfinite(da.eval_loss.sel(run="seed0", step=4)) and np.isnan(da.eval_loss.sel(run="seed0", step=1))
  assert da.position.shape == (T,) and da.token_id.shape == (T,) and (da.true_surprisal > 0).all()
  assert set(da.coords) >= {"doc", "group", "context_len", "workdir", "n_params", "eval_ppl", "val_loss"}
  sub = LD.load_trajectories([w, w2], store="one", steps=[4, 8])
  assert sub.shape == (2, 2, T)
  m = LD.load_metrics(w)
  logged = [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
  assert len(logged) > len(m) and m["step"].tolist() == sorted({r["step"] for r in logged})
  assert np.isfinite(m.loc[m.step == 4, ["train/loss", "eval/loss"]].values).all()  # train + eval merged
  ix = LD.load_index(w, "one")
  assert ix["step"].tolist() == STEPS and ix["source"].eq("offline").all()
  np.testing.assert_allclose(ix.set_index("step").loc[4, "eval_loss"], m.set_index("step").loc[4, "eval/loss"])
  probes = LD.load_probes(w)
  assert len(probes) == T and (probes["context_len"] == probes["position"] + 1).all()


@pytest.mark.slow
def test_token_metrics_and_plots(two_runs):
  from analysis import curves, plots

  w, w2 = two_runs
  assert TJ.main([f"--workdir={w}", f"--workdir={w2}", "--store=one", "--metrics", "--freq_docs=500", "--quiet"]) == 0
  T = TJ.ProbeSet.load(TJ.store_dir(w)).num_tokens
  loaded = LD.load_token_metrics(w)
  assert len(loaded) == T and loaded["position"].tolist() == LD.load_probes(w)["position"].tolist()
  assert loaded.attrs["runs"] == ["seed0", "seed1"] and loaded.attrs["steps"] == STEPS
  assert {"aoa_gam_r0", "aoa_gam_r1", "var_runs", "trend_class", "trend_name", "log_freq", "flags"} <= set(loaded)
  # 5 checkpoints < the last 11 Chang averages over: NaN + flag passed through from curves
  assert loaded["final_surprisal"].isna().all()
  assert (loaded["flags"] & curves.FLAG_FEW_FINAL_POINTS).all()
  assert np.isfinite(loaded["aoa_gam"]).all() and np.isfinite(loaded["aoa_gam_r1"]).all()
  assert (loaded["var_runs_raw"] > 0).all()
  counts_V = TJ.unigram_counts(ml_collections.ConfigDict(json.load(open(os.path.join(w, "config.json")))).data, 500)
  expect = np.log10((counts_V[loaded["token"]] + 1) / (counts_V.sum() + counts_V.size))
  np.testing.assert_allclose(loaded["log_freq"], expect)
  assert counts_V.sum() > 500 and counts_V[vocab.BOS] == 0 and counts_V[vocab.EOS] == 500
  da = LD.load_trajectories([w, w2], store="one")
  fig = plots.learning_curves(da, tokens=[0, 3, 7], run="seed1")
  assert len(fig.axes[0].lines) == 3 + 3  # raw + GAM-smoothed (4 checkpoints after step 0)
  assert fig.axes[0].lines[0].get_xdata().tolist() == STEPS[1:]
  fig = plots.learning_curves(da.sel(step=[0, 2, 4, 8]), tokens=[0, 3, 7])
  assert len(fig.axes[0].lines) == 3  # 3 checkpoints after step 0: too few to smooth, raw only
  fig = plots.aoa_vs_frequency(loaded)
  n_ok = int((np.isfinite(loaded["aoa_gam"]) & np.isfinite(loaded["log_freq"])).sum())
  assert fig.axes[0].collections[0].get_offsets().shape[0] == n_ok and len(fig.axes[0].lines) == 1
  fig = plots.trend_fractions_vs_ppl(da)
  assert len(fig.axes[0].lines) == 2 * 3
  fig = plots.cross_run_scatter(loaded, "aoa_gam", 0, 1)
  assert fig.axes[0].collections[0].get_offsets().shape[0] == int(
    (np.isfinite(loaded["aoa_gam_r0"]) & np.isfinite(loaded["aoa_gam_r1"])).sum()
  )
  fig = plots.class_ppl_vs_val_ppl(da, loaded["trend_class"])
  assert len(fig.axes[0].lines) == 2 * loaded["trend_class"].nunique()


# ----------------------------------------------------------------------------------------------
# Packed probe rows, invalid checkpoints, n-gram join


def test_pack_rows_by_hand():
  """Three documents of 3, 2 and 2 targets in rows of 5: next-fit gives [d0 d1] [d2]."""
  L = 5
  rows = {k: np.zeros((3, L), np.int32) for k in TJ.ROW_FIELDS}
  for s, toks in enumerate(([1, 7, 8, 9], [1, 5, 2], [1, 6, 2])):
    n = len(toks) - 1
    rows["inputs"][s, :n], rows["targets"][s, :n] = toks[:-1], toks[1:]
    rows["mask"][s, :n], rows["segment_ids"][s, :n], rows["positions"][s, :n] = 1, 1, np.arange(n)
  p = TJ.pack_rows(rows)
  assert p.row_S.tolist() == [0, 0, 1] and p.col_S.tolist() == [0, 3, 0]
  assert p.rows["inputs"].tolist() == [[1, 7, 8, 1, 5], [1, 6, 0, 0, 0]]
  assert p.rows["targets"].tolist() == [[7, 8, 9, 5, 2], [6, 2, 0, 0, 0]]
  assert p.rows["mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
  assert p.rows["segment_ids"].tolist() == [[1, 1, 1, 2, 2], [1, 1, 0, 0, 0]]
  assert p.rows["positions"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]


@pytest.mark.slow
def test_packed_equals_unpacked_per_token(run):
  """The packed forward pass gives every probe the surprisal of its one-document row, with far fewer rows."""
  w, _ = run
  model, _, _ = C.load_model(w)
  probes = TJ.ProbeSet.load(TJ.store_dir(w))
  mesh = sharding.single_device_mesh()
  packed, unpacked = TJ.SurprisalFn(model, probes, mesh), TJ.SurprisalFn(model, probes, mesh, packed=False)
  assert unpacked.num_rows == SEQS and packed.num_rows < SEQS / 2  # short bigram documents in rows of 32
  p = probes.packed
  real = p.rows["mask"].sum()
  assert real == probes.rows["mask"].sum() == probes.num_tokens  # positions=0: every target is a probe
  for s in range(SEQS):  # each document sits intact at (row_S, col_S) with its own segment id
    n = int(probes.rows["mask"][s].sum())
    seg = p.rows["segment_ids"][p.row_S[s], p.col_S[s] : p.col_S[s] + n]
    assert (seg == seg[0]).all() and (p.rows["segment_ids"][p.row_S[s]] == seg[0]).sum() == n
    for k in ("inputs", "targets", "positions"):
      np.testing.assert_array_equal(p.rows[k][p.row_S[s], p.col_S[s] : p.col_S[s] + n], probes.rows[k][s, :n])
  for step in (0, 8):
    params = C.restore_params(w, step)
    np.testing.assert_allclose(packed(params), unpacked(params), rtol=0, atol=2e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's loop after a failed read
def test_invalid_checkpoints_are_recorded_listed_and_retried(run, tmp_path, monkeypatch, capsys):
  """Unrestorable (CheckpointError) and non-finite checkpoints: no result stored, an invalid marker with
  its reason (visible in the loaders), the others measured; a rerun retries exactly those."""
  import jax

  from analysis import probes

  w, _ = run
  wc = str(tmp_path / "damaged")
  shutil.copytree(w, wc, ignore=shutil.ignore_patterns("analysis", "resume"))
  params4 = os.path.join(wc, "checkpoints", "4", "params")
  saved4 = str(tmp_path / "params4")
  shutil.copytree(params4, saved4)
  for f in [os.path.join(r, f) for r, _, fs in os.walk(params4) for f in fs if os.path.basename(r) == "d"]:
    os.truncate(f, os.path.getsize(f) // 2)
  real_restore = C.restore_params_at  # extraction's one restore path (the workdir listed once per job)

  def nan_at_2(step_dir, mcfg, mesh=None):
    params = real_restore(step_dir, mcfg, mesh)
    return jax.tree.map(lambda x: x * np.nan, params) if os.path.basename(step_dir) == "2" else params

  monkeypatch.setattr(probes.C, "restore_params_at", nan_at_2)
  assert TJ.main([f"--workdir={wc}", "--quiet"]) == 0
  out = capsys.readouterr().out
  assert "2 invalid (steps [2, 4]; rerun retries them)" in out
  assert "step 2: " in out and "probe surprisals are not finite" in out
  assert re.search(r"step 4: .*checkpoints/4 is damaged", out), out  # the integrity manifest names the damage
  st = TJ.Store.of(wc)
  assert st.steps() == [0, 1, 8] and not os.path.exists(os.path.join(st.steps_dir, "2.npy"))
  bad = LD.load_invalid(wc)
  assert bad["step"].tolist() == [2, 4] and bad["source"].eq("offline").all()
  assert "not finite" in bad["reason"][0] and "is damaged" in bad["reason"][1]
  ix = LD.load_index(wc, include_invalid=True)
  assert ix.set_index("step")["valid"].to_dict() == {0: True, 1: True, 2: False, 4: False, 8: True}
  assert LD.load_index(wc)["step"].tolist() == [0, 1, 8]
  da = LD.load_trajectories(wc)
  assert da.step.values.tolist() == [0, 1, 8] and [s for s, _ in json.loads(da.attrs["invalid"])["damaged"]] == [2, 4]
  # repaired: a rerun measures exactly the invalid ones and clears their markers
  monkeypatch.setattr(probes.C, "restore_params_at", real_restore)
  shutil.rmtree(params4)
  shutil.copytree(saved4, params4)
  rep = TJ.extract(wc, progress=False)
  assert rep.computed["damaged"] == [2, 4] and not rep.skipped and st.invalid() == [] and len(LD.load_invalid(wc)) == 0
  for s in STEPS:
    np.testing.assert_allclose(st.read(s), TJ.Store.of(w, "one").read(s), atol=1e-6)


@pytest.mark.slow
def test_ngram_predictors_joined(two_runs, tmp_path):
  """token_metrics carries n-gram surprisals that equal brute-force counts of the training documents."""
  import collections

  w, w2 = two_runs
  df, path = TJ.write_token_metrics([w, w2], store="one", out=str(tmp_path / "tm.parquet"), freq_docs=500)
  assert {f"ngram{n}_surprisal" for n in range(1, 6)} | {"context_loglen", "context_logprob"} <= set(df)
  assert LD.load_token_metrics(w, path=path).attrs["ngram_n"] == 5
  data_cfg = ml_collections.ConfigDict(json.load(open(os.path.join(w, "config.json")))).data
  train_docs = [d[1:] for d in TT.train_documents(data_cfg, 500)[0]]  # w_1 .. EOS
  uni = collections.Counter(t for d in train_docs for t in d.tolist())
  total = sum(uni.values())
  pad = -1
  bi = collections.Counter((([pad] + d.tolist())[i], t) for d in train_docs for i, t in enumerate(d.tolist()))
  ctx = collections.Counter(c for (c, _) in bi.elements())
  probes = TJ.ProbeSet.load(TJ.store_dir(w))
  docs = [d[1:].tolist() for d in probes.documents()]
  for t in range(0, probes.num_tokens, 7):
    s, p = probes.row_T[t], probes.position_T[t]
    tok = docs[s][p]
    assert tok == df["token"][t]
    assert df["ngram1_surprisal"][t] == pytest.approx(-math.log(uni[tok] / total), rel=1e-9)
    c = pad if p == 0 else docs[s][p - 1]
    expect2 = -math.log(bi[(c, tok)] / ctx[c]) if bi[(c, tok)] else -math.log(uni[tok] / total)
    assert df["ngram2_surprisal"][t] == pytest.approx(expect2, rel=1e-9)
  np.testing.assert_allclose(df["context_loglen"], np.log2(df["context_len"]))
  reg = TJ.chang_regressions(df, metrics=["aoa_gam", "forgettability"])
  assert reg["metric"].unique().tolist() == ["aoa_gam", "forgettability"]
  assert reg["block"].tolist()[:5] == ["intercept", "unigram", "ngram", "context_loglen", "context_logprob"]


def test_store_result_marks_nonfinite_invalid_then_clears(tmp_path):
  """The write path shared by the hook and extraction: a non-finite vector leaves only a marker."""
  from analysis import probes

  st = TJ.Store(str(tmp_path / "store"))
  assert len(LD.load_invalid(str(tmp_path / "nowhere"))) == 0
  row = {"source": "hook", "probe_loss": float("nan"), "step": 3}
  why = probes._store_result(st, 3, np.array([1.0, np.nan, np.inf], np.float32), row)
  assert why.startswith("2 of 3 probe surprisals are not finite")
  assert st.steps() == [] and [(r["step"], r["source"], r["reason"]) for r in st.invalid()] == [(3, "hook", why)]
  assert probes._store_result(st, 3, np.array([1.0, 2.0, 3.0], np.float32), dict(row, probe_loss=2.0)) is None
  assert st.steps() == [3] and st.invalid() == [] and st.read(3).tolist() == [1.0, 2.0, 3.0]


@pytest.mark.slow
def test_extraction_lists_once_overlaps_writes_and_surfaces_write_failures(run, offline1, tmp_path, monkeypatch):
  """One listing of the workdir per job (no per-checkpoint available_steps/read_meta), the same records
  as before, every phase timed; a store write that fails in the background writer fails the job, the
  records written before it stay, and a rerun completes the store with identical numbers."""
  from analysis import probes

  w, _ = run
  wc = str(tmp_path / "copy")
  shutil.copytree(w, wc, ignore=shutil.ignore_patterns("analysis", "resume"))
  model, mcfg, _ = C.load_model(w)
  assert C.param_count(mcfg) == M.param_count(model)
  calls = {"available_steps": 0, "read_meta": 0}
  real_avail, real_meta = C.available_steps, C.read_meta

  def avail(*a, **k):
    calls["available_steps"] += 1
    return real_avail(*a, **k)

  def meta(*a, **k):
    calls["read_meta"] += 1
    return real_meta(*a, **k)

  monkeypatch.setattr(probes.C, "available_steps", avail)
  monkeypatch.setattr(probes.C, "read_meta", meta)
  rep = TJ.extract(wc, progress=False, prefetch=1)  # one restore ahead; the store "one" was made with the default 2
  assert calls == {"available_steps": 1, "read_meta": 0}
  assert rep.computed["copy"] == STEPS and set(rep.phases) == set(probes._PHASES) and min(rep.phases.values()) >= 0
  one, st = TJ.Store.of(w, "one"), TJ.Store.of(wc)
  drop = ("time", "run", "workdir")
  for s in STEPS:
    np.testing.assert_array_equal(st.read(s), one.read(s))
    assert {k: v for k, v in st.row(s).items() if k not in drop} == {k: v for k, v in one.row(s).items() if k not in drop}
    assert st.row(s)["tokens_seen"] == real_meta(w, s)["tokens_seen"]

  shutil.rmtree(st.dir)
  real_write = TJ.Store.write

  def full_disk(self, step, *a, **k):
    if step == 4:
      raise OSError(28, "No space left on device")
    return real_write(self, step, *a, **k)

  monkeypatch.setattr(TJ.Store, "write", full_disk)
  with pytest.raises(OSError, match="No space left"):
    TJ.extract(wc, progress=False, prefetch=3)
  assert 4 not in st.steps() and set(st.steps()) <= set(STEPS) - {4}
  assert not [f for f in os.listdir(st.steps_dir) if ".tmp" in f]
  monkeypatch.setattr(TJ.Store, "write", real_write)
  rep = TJ.extract(wc, progress=False)
  assert 4 in rep.computed["copy"] and st.steps() == STEPS
  for s in STEPS:
    np.testing.assert_array_equal(st.read(s), one.read(s))
