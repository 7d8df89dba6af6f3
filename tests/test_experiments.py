"""experiments.chang and experiments.xia at nano scale: every table, figure and report is written, the
n-gram join is aligned with the probe tokens (brute-force unigram counts), and a rerun resumes."""

import os

import numpy as np
import pandas as pd
import pytest

from experiments import chang, xia

pytestmark = pytest.mark.slow  # each trains 2-5 nano models and extracts every checkpoint (~1 min each on 2 cores)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_chang_nano(tmp_path, data_dir):
  out = str(tmp_path / "chang")
  res = chang.run(out, "nano", data_dir)
  tm = pd.read_parquet(os.path.join(out, "token_metrics.parquet"))
  assert len(tm) > 100 and {"unigram", "ngram", "context_loglen", "context_logprob", "aoa_gam", "var_runs", "log_freq"} <= set(tm)
  assert len(res["workdirs"]) == 5 and all(os.path.basename(w) == f"seed_{i}" for i, w in enumerate(res["workdirs"]))
  # the join is aligned: unigram predictor == log10 add-one frequency of the probe's target (clipped at 5 sd,
  # as Chang's code), counted by brute force over the training documents
  import ml_collections

  from analysis import stats
  from analysis.token_table import train_documents
  from lib import ckpt as C

  docs, V = train_documents(ml_collections.ConfigDict(C.read_config(res["workdirs"][0])).data, chang.SCALES["nano"]["ngram_docs"])
  counts = np.bincount(np.concatenate([d[1:] for d in docs]), minlength=V)[:V]
  want = stats.clip_sigma(np.log10((counts[tm["token"]] + 1.0) / (counts.sum() + V)))
  np.testing.assert_allclose(tm["unigram"], want, rtol=1e-9)
  np.testing.assert_allclose(tm["context_loglen"], np.log2(tm["position"] + 1.0))  # context = BOS .. probe input
  lrt = pd.read_csv(os.path.join(out, "regressions.csv"))
  assert set(lrt["metric"]) >= {"final_surprisal", "aoa_gam", "var_runs"}
  assert list(lrt[lrt.metric == "aoa_gam"]["block"]) == ["intercept", *chang.BLOCKS]
  assert lrt["p"].dropna().between(0, 1).all()
  text = open(os.path.join(out, "report.md")).read()
  assert "Chang, Tu and Bergen" in text and "final_surprisal" in text and all(os.path.exists(f) for f in res["figures"])
  from experiments.sweep import Sweep

  assert Sweep.from_dict(chang.sweep_spec("nano", data_dir), out).plan() == []  # a rerun trains nothing


def test_xia_nano(tmp_path, data_dir):
  out = str(tmp_path / "xia")
  res = xia.run(out, "nano", data_dir)
  cl = pd.read_parquet(os.path.join(out, "classes.parquet"))
  assert set(cl["trend"]) <= {"upward", "downward", "stagnated", "other"} and len(cl) > 100
  tab = pd.read_csv(os.path.join(out, "class_ppl.csv"))
  assert set(tab["run"]) == {"nano", "tiny"}
  # each class's perplexity is the exp of its tokens' mean surprisal: the fractions add up to one
  assert abs(sum(res["fractions"]["tiny"].values()) - 1.0) < 1e-9
  text = open(os.path.join(out, "report.md")).read()
  assert "9.4%" in text and "upward (double descent)" in text
  assert all(os.path.exists(f) for f in res["figures"])
