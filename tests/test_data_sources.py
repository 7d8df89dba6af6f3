"""Data sources: text files (bytes / SentencePiece), TFDS catalog errors, groups and mixtures."""

import json
import os

import ml_collections as mlc
import numpy as np
import pytest

from data import pipeline as dp
from data import sources, text, tfds_builders, vocab

WORDS = "the a cat dog sat ran on under mat log tree and then quickly slowly red blue".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for f in range(3):
    paras = [" ".join(rng.choice(WORDS, rng.integers(5, 30))) + "." for _ in range(120)]
    (d / f"part{f}.txt").write_text("\n\n".join(paras))
  return str(d)


def test_byte_level_text_group(corpus, tmp_path):
  g = sources.make_group("txt", {"kind": "text", "path": corpus, "doc_tokens": 64}, str(tmp_path))
  assert g.vocab_size == 260
  assert set(g.splits) == {"train", "validation", "test"}
  n = sum(len(s) for s in g.splits.values())
  assert n >= 360 and len(g.splits["validation"]) > 0
  ex = g.splits["train"][0]
  assert ex["tokens"][0] == vocab.BOS and ex["tokens"][-1] == vocab.EOS
  assert len(ex["tokens"]) <= 66
  tok = text.tokenizer_for(g)
  s = tok.decode(ex["tokens"])
  assert all(w.strip(".") in WORDS for w in s.split())
  # deterministic: building again reuses the same dataset
  g2 = sources.make_group("txt", {"kind": "text", "path": corpus, "doc_tokens": 64}, str(tmp_path))
  np.testing.assert_array_equal(g2.splits["train"][5]["tokens"], g.splits["train"][5]["tokens"])


def test_sentencepiece_text_group(corpus, tmp_path):
  g = sources.make_group(
    "sp", {"kind": "text", "path": os.path.join(corpus, "*.txt"), "tokenizer": "sentencepiece", "vocab_size": 40}, str(tmp_path)
  )
  tok = text.tokenizer_for(g)
  assert g.vocab_size == tok.n + vocab.N_SPECIAL and 20 <= tok.n <= 60
  ex = g.splits["validation"][0]["tokens"]
  assert ex.max() < g.vocab_size and ex.min() >= 0
  assert tok.decode(ex).split()[0].strip(".") in WORDS


def test_bad_sources(tmp_path):
  with pytest.raises(dp.DataError, match="unknown kind 'pcfgg'.*valid kinds"):
    sources.make_group("x", {"kind": "pcfgg"}, str(tmp_path))
  with pytest.raises(dp.DataError, match="no text files match"):
    sources.make_group("x", {"kind": "text", "path": str(tmp_path / "nothing*.txt")}, str(tmp_path))
  with pytest.raises(dp.DataError, match="not prepared.*never downloads"):
    sources.make_group("x", {"kind": "tfds", "name": "lm1b"}, str(tmp_path))
  g = sources.make_group("b", {"kind": "bigram", "seed": 0, "n_train": 50, "n_validation": 10, "n_test": 10}, str(tmp_path))
  with pytest.raises(dp.DataError, match="has no split 'dev'.*'validation'"):
    sources.select_split(g, "dev")


def test_building_says_building_not_downloading(tmp_path, capfd, corpus):
  spec = {"kind": "bigram", "seed": 6, "n_train": 20, "n_validation": 10, "n_test": 10}
  sources.make_group("b", spec, str(tmp_path))
  sources.make_group("t", {"kind": "text", "path": corpus, "doc_tokens": 64}, str(tmp_path))
  out, err = capfd.readouterr()
  assert "Downloading" not in out and "Unknown size" not in out
  assert "\x1b[" not in err and "examples/s" not in err  # no progress bars off a terminal
  assert out.count("lmtrace: building dataset") == 2 and out.count("later runs reuse it") == 2
  sources.make_group("b", spec, str(tmp_path))  # cached: silent
  assert "building" not in capfd.readouterr().out


def test_missing_or_corrupt_shard_names_the_file(tmp_path):
  spec = {"kind": "bigram", "seed": 4, "n_train": 50, "n_validation": 10, "n_test": 10}
  g = sources.make_group("b", spec, str(tmp_path))
  d = g.info["tfds_dir"]
  shard = [f for f in os.listdir(d) if "-train.array_record" in f][0]
  open(os.path.join(d, shard), "wb").close()
  with pytest.raises(dp.DataError, match=f"{shard}.*corrupted"):
    sources.make_group("b", spec, str(tmp_path))
  os.remove(os.path.join(d, shard))
  with pytest.raises(dp.DataError, match="should have 1 array_record shard"):
    sources.make_group("b", spec, str(tmp_path))


def test_optimal_loss_metadata_matches_exact_conditionals(tmp_path):
  spec = {"kind": "bigram", "seed": 2, "n_terminals": 8, "n_train": 20, "n_validation": 300, "n_test": 10}
  g = sources.make_group("b", spec, str(tmp_path))
  lang = sources.language(spec)
  val = g.splits["validation"]
  nll = -np.concatenate([lang.token_logprobs(vocab.unframe(val[i]["tokens"])) for i in range(len(val))])
  assert abs(g.info["optimal_loss"] - nll.mean()) < 1e-5
  # the entropy rate of this chain, computed in closed form, is within 4 standard errors
  assert g.info["optimal_loss_stderr"] > 0


@pytest.mark.slow
def test_multi_group_training_reports_groups_and_exact_counts(tmp_path):
  import train
  from tests.helpers import tiny_cfg

  cfg = tiny_cfg(str(tmp_path / "data"))
  cfg.data.groups = mlc.ConfigDict(
    {
      n: dict(kind="bigram", seed=s, n_terminals=16, n_train=500, n_validation=60, n_test=10)
      for n, s in (("easy", 1), ("mid", 2), ("hard", 3))
    }
  )
  cfg.mixture.method = "static"
  cfg.mixture.proportions = "easy=0.5,mid=0.25,hard=0.25"
  cfg.train.steps = 4
  cfg.eval.every = 4
  w = str(tmp_path / "w")
  train.train_and_evaluate(cfg, w)
  rows = [json.loads(x) for x in open(os.path.join(w, "metrics.jsonl"))]
  tr = [r for r in rows if "train/loss" in r]
  assert all(r["data/rows/easy"] == 4 and r["data/rows/mid"] == 2 and r["data/rows/hard"] == 2 for r in tr)
  assert all(r["mixture/p/easy"] == 0.5 for r in tr)
  assert all(np.isfinite(r[f"train/{g}/loss"]) for r in tr for g in ("easy", "mid", "hard"))
  ev = [r for r in rows if "eval/loss" in r][-1]
  for g in ("easy", "mid", "hard"):
    assert abs(ev[f"eval/{g}/excess_loss"] - (ev[f"eval/{g}/loss"] - ev[f"eval/{g}/optimal_loss"])) < 1e-9
  cfg.mixture.proportions = "easy=0.5,mid=0.6,hard=0.25"
  with pytest.raises(dp.DataError, match="sum to 1"):
    train.train_and_evaluate(cfg, str(tmp_path / "w2"))
  cfg.mixture.proportions = "easy=0.5,medium=0.5"
  with pytest.raises(ValueError, match=r"unknown groups \['medium'\]"):
    train.train_and_evaluate(cfg, str(tmp_path / "w3"))


def test_describe(tmp_path):
  g = sources.make_group("b", {"kind": "bigram", "seed": 0, "n_train": 50, "n_validation": 10, "n_test": 10}, str(tmp_path))
  d = tfds_builders.describe(g)
  assert d["n_train"] == 50 and d["vocab_size"] == 20 and "optimal_loss" in d


def test_downstream_task_splits(tmp_path):
  from data import hmm as H
  from data import pcfg as P

  g = sources.make_group(
    "p", {"kind": "pcfg", "seed": 0, "n_train": 100, "n_validation": 50, "n_test": 10, "n_downstream": 300}, str(tmp_path)
  )
  assert {"task_A", "task_B", "task_C", "task_span8"} <= set(g.splits)
  lang = P.PCFG.random(seed=0)
  ex = [g.splits["task_B"][i] for i in range(20)]
  sents = [vocab.unframe(e["tokens"]) for e in ex]
  assert all(4 < len(s) < 32 for s in sents)
  np.testing.assert_array_equal([e["label"] for e in ex], lang.span_labels(sents, "B", definition="code"))
  assert g.info["tasks"]["task_B"] == len(g.splits["task_B"])
  h = sources.make_group(
    "h",
    {"kind": "hmm", "seed": 0, "length": 12, "n_train": 100, "n_validation": 20, "n_test": 10, "n_downstream": 50},
    str(tmp_path),
  )
  assert {"task_state6", "task_state10"} <= set(h.splits)
  labels = [h.splits["task_state6"][i]["label"] for i in range(50)]
  assert 0 <= min(labels) and max(labels) < H.HMM.random(seed=0, length=12).n_states
  assert "label" not in h.splits["train"][0]


def test_aioli_controller_schedule_and_update():
  from lib import mixture

  cfg = mlc.ConfigDict(
    dict(method="aioli", update_steps=20, lp_rounds=2, lp_steps=2, one_hot_factor=0.75, eta=1.0, ema=0.0, seed=0)
  )
  c = mixture.make(cfg, ["a", "b", "c"])
  st = c.init()
  # LearnParams: R·m = 6 sub-phases of 2 steps, each on q^(j); every group probed R times per round
  probed = [int(np.argmax(c.proportions(st, t))) for t in range(0, 12, 2)]
  assert sorted(probed) == [0, 0, 1, 1, 2, 2]
  assert np.allclose(c.proportions(st, 0)[probed[0]], 0.75)
  np.testing.assert_allclose(c.proportions(st, 15), [1 / 3] * 3)  # after LearnParams: p
  assert [t for t in range(20) if c.wants_eval(st, t)] == [0, 2, 4, 6, 8, 10, 12]
  # a planted world where training on group 1 lowers every loss most: p must move towards group 1
  st = c.update(st, 0, {"eval/group_loss": np.array([3.0, 3.0, 3.0])})
  ell = np.array([3.0, 3.0, 3.0])
  for t in range(2, 14, 2):
    _, _, j = c._phase(t - 1)
    ell = ell - (0.05 if j == 1 else 0.01)
    st = c.update(st, t, {"eval/group_loss": ell})
  assert int(st["rounds"]) == 1
  assert np.argmax(st["p"]) == 1 and abs(st["p"].sum() - 1) < 1e-6


@pytest.mark.slow
def test_aioli_training_run_resumes_identically(tmp_path):
  import train
  from lib import ckpt as C
  from tests.helpers import tiny_cfg

  def cfg_(stop=0):
    cfg = tiny_cfg(str(tmp_path / "data"))
    cfg.data.groups = mlc.ConfigDict(
      {n: dict(kind="bigram", seed=s, n_terminals=16, n_train=300, n_validation=40, n_test=10) for n, s in (("a", 1), ("b", 2))}
    )
    cfg.mixture.update(dict(method="aioli", update_steps=8, lp_rounds=1, lp_steps=2, one_hot_factor=0.75, eta=5.0))
    cfg.train.steps, cfg.train.stop_at, cfg.eval.every, cfg.ckpt.resume_every = 12, stop, 0, 3
    return cfg

  train.train_and_evaluate(cfg_(), str(tmp_path / "straight"))
  rows = [json.loads(x) for x in open(tmp_path / "straight" / "metrics.jsonl")]
  p = {r["step"]: r["mixture/p/a"] for r in rows if "mixture/p/a" in r}
  # logged p at step t is the p of the batch of step t-1; U=8, R·s·m=4
  assert all(p[t] in (0.75, 0.25) for t in (1, 2, 3, 4, 9, 10))  # LearnParams sub-phases probe q^(j)
  assert p[5] == p[6] == p[7] == p[8] and abs(p[5] - 0.5) > 1e-3  # then the learned p for the rest of the round
  train.train_and_evaluate(cfg_(stop=5), str(tmp_path / "resumed"))
  train.train_and_evaluate(cfg_(), str(tmp_path / "resumed"))
  import jax

  for x, y in zip(
    jax.tree.leaves(C.restore_params(str(tmp_path / "straight"), 12)),
    jax.tree.leaves(C.restore_params(str(tmp_path / "resumed"), 12)),
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_two_jobs_building_one_language_at_once_both_get_it(tmp_path):
  """Two experiments started together need the same language: the build is serialised by a file lock, so
  neither dies on TFDS's final rename (FileExistsError) and both read the same finished data."""
  import threading

  spec = {"kind": "bigram", "seed": 5, "n_train": 3000, "n_validation": 50, "n_test": 10}
  start, out, errs = threading.Barrier(3), {}, []

  def build(i):
    start.wait()
    try:
      out[i] = sources.make_group("b", spec, str(tmp_path)).splits["train"]
    except Exception as e:  # noqa: BLE001 - the test reports what the old code raised
      errs.append(repr(e))

  threads = [threading.Thread(target=build, args=(i,)) for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errs, errs
  assert len(out) == 3 and all(len(s) == 3000 for s in out.values())
  assert all(np.array_equal(out[0][7]["tokens"], s[7]["tokens"]) for s in out.values())
