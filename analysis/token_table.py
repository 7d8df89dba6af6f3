"""The tidy per-token table: curve metrics (analysis/curves.py) joined with the token predictors
(log-frequency, n-gram surprisals n = 1..5, context length and log-prob; analysis/ngram.py), and
Chang et al.'s regressions of each metric on those predictors (analysis/stats.py).

  df, path = write_token_metrics(["runs/s0", "runs/s1"])      # -> W/analysis/token_metrics.parquet
  reg = chang_regressions(df)                                   # one row per (metric, predictor block)

n-gram predictors follow Chang's `CurveAnnotator` (analysis/ngram.py): counted on the training
documents w_1 .. w_n EOS (BOS left out: the n-gram context pad plays its role), surprisals in the
table's unit (Chang: bits). A probe at target position p (predicting w_{p+1}) has the n-gram context
w_1 .. w_p, so `ngram1_surprisal` is the target's unigram surprisal.

Shape legend: T probe tokens, S probe documents, V vocabulary, N regression rows.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
import pandas as pd

from analysis import curves, ngram, stats
from analysis import load as LD
from analysis.probe_store import METRICS_FILE, STORE, ProbeSet, atomic_write, store_dir
from analysis.probes import read_docs
from data import sources
from lib import ckpt as C
from lib import errors

DEFAULT_NGRAM_N = 5
# Chang's regression targets (run-averaged metrics) and predictor blocks, in his LRT order.
CHANG_TARGETS = ("final_surprisal", "var_steps", "aoa_gam", "forgettability", "var_runs")
CHANG_BLOCKS = ("unigram", "ngram", "context_loglen", "context_logprob")


def train_documents(data_cfg, max_docs: int = 100_000) -> tuple[list[np.ndarray], int]:
  """The framed token arrays of the first `max_docs` training documents of every group, and V."""
  groups = sources.make_groups(data_cfg)
  docs = [np.asarray(d["tokens"], np.int64) for g in groups for d in read_docs(sources.select_split(g, "train"), max_docs)]
  return docs, int(groups[0].vocab_size)


def unigram_counts(data_cfg, max_docs: int = 100_000, docs: list[np.ndarray] | None = None) -> np.ndarray:
  """Counts [V] of each target token over the first `max_docs` training documents of every group."""
  if docs is None:
    docs, V = train_documents(data_cfg, max_docs)
  else:
    V = int(sources.make_groups(data_cfg)[0].vocab_size)
  counts = np.zeros(V, np.int64)
  for d in docs:
    counts += np.bincount(np.asarray(d[1:]), minlength=counts.size)[: counts.size]
  return counts


def log_frequency(counts_V: np.ndarray, tokens_T: np.ndarray) -> np.ndarray:
  """log10 add-one unigram frequency of each token."""
  return np.log10((counts_V[np.asarray(tokens_T)] + 1.0) / (counts_V.sum() + counts_V.size))


def ngram_predictors(
  probes: ProbeSet,
  train_docs: Sequence[np.ndarray],
  vocab_size: int,
  max_n: int = DEFAULT_NGRAM_N,
  unit: str = "nats",
) -> pd.DataFrame:
  """One row per probe token (probe order): `ngram<n>_surprisal` for n = 1..max_n (backoff, Chang's
  pruning; in `unit`), `context_loglen` = log2(context_len) and `context_logprob` (minus the mean
  unigram surprisal of the context words w_1..w_p; NaN at position 0)."""
  if max_n < 1:
    raise errors.ConfigError(f"n-gram order must be >= 1, got {max_n}")
  scale = {"bits": 1.0, "nats": math.log(2.0)}[unit]  # ngram.py works in bits
  model = ngram.build_ngram_model([d[1:] for d in train_docs], vocab_size, max_n=max_n)
  seqs = [d[1:] for d in probes.documents()]  # w_1 .. w_n EOS: probe p predicts seqs[s][p]
  at_TX2 = np.stack([probes.row_T, probes.position_T], 1).astype(np.int64)
  out = {f"ngram{n}_surprisal": ngram.ngram_surprisal(model, seqs, at_TX2, n) * scale for n in range(1, max_n + 1)}
  out["context_loglen"] = np.log2(probes.position_T + 1.0)  # context_len tokens, BOS included
  out["context_logprob"] = ngram.context_logprob(model, seqs, at_TX2, n=1) * scale
  return pd.DataFrame(out)


def write_token_metrics(
  workdirs: str | Sequence[str],
  *,
  unit: str = "nats",
  store: str = STORE,
  out: str | None = None,
  freq_docs: int = 100_000,
  ngram_n: int = DEFAULT_NGRAM_N,
  **metric_kw,
):
  """curves.token_metrics over the runs' common valid checkpoints, joined with the token predictors
  -> W/analysis/token_metrics.parquet (first workdir) + a .json sidecar.

  One row per probe token: the probe descriptors, `log_freq` (log10 add-one unigram frequency of the
  target in the training data of the first run), the n-gram predictors (`ngram_predictors`, with
  ngram_n=0 none), every Chang/Xia metric (per-run columns `<metric>_r<i>`) and `trend_name`. Too few
  checkpoints give NaN + `flags` (curves' job). Checkpoints marked invalid in a store are left out.
  """
  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  da = LD.load_trajectories(workdirs, unit=unit, store=store)
  ok_C = np.isfinite(da.values).all(axis=(0, 2))  # checkpoints every run has
  if not ok_C.any():
    raise errors.AnalysisError(f"the runs {list(da.run.values)} share no checkpoint in their stores")
  steps_C = da.step.values[ok_C]
  chance = math.log(da.attrs["vocab_size"]) / (math.log(2.0) if unit == "bits" else 1.0)
  y_RxTxC = np.ascontiguousarray(np.transpose(da.values[:, ok_C, :], (0, 2, 1)))
  kw = dict(unit=unit, per_run=True)
  kw.update(metric_kw)
  df = curves.token_metrics(y_RxTxC, steps_C, chance, **kw)
  df.insert(0, "token_index", np.arange(da.sizes["token"]))
  for i, col in enumerate(("doc", "group", "position", "context_len", "token_id")):
    df.insert(1 + i, col.replace("token_id", "token"), da[col].values)
  data_cfg = ml_collections.ConfigDict(C.read_config(workdirs[0])).data
  docs, V = train_documents(data_cfg, freq_docs)
  counts_V = unigram_counts(data_cfg, docs=docs)
  df.insert(6, "log_freq", log_frequency(counts_V, df["token"].to_numpy()))
  if ngram_n:
    pred = ngram_predictors(ProbeSet.load(store_dir(workdirs[0], store)), docs, V, ngram_n, unit)
    for j, c in enumerate(pred.columns):
      df.insert(7 + j, c, pred[c].to_numpy())
  if "trend_class" in df:
    df["trend_name"] = df["trend_class"].map(curves.TREND_NAMES)
  path = out or os.path.join(workdirs[0], "analysis", METRICS_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  df.to_parquet(tmp, index=False)
  os.replace(tmp, path)
  side = {
    "runs": list(map(str, da.run.values)),
    "workdirs": workdirs,
    "steps": steps_C.tolist(),
    "unit": unit,
    "chance": chance,
    "fingerprint": da.attrs["fingerprint"],
    "ngram_n": int(ngram_n),
    "freq_docs": int(freq_docs),
  }
  atomic_write(os.path.splitext(path)[0] + ".json", json.dumps(side, indent=1, sort_keys=True).encode())
  return df, path


# ----------------------------------------------------------------------------------------------
# Chang's regressions


def chang_features(df: pd.DataFrame, ngram_n: int | None = None, clip: float | None = 5.0) -> pd.DataFrame:
  """Chang's predictor columns from a token_metrics table: `unigram` = log_freq, `ngram` = the
  highest-order n-gram log-prob (-ngram<n>_surprisal) residualised on log_freq (OLS over the tokens
  where both are finite), `context_loglen`, `context_logprob`; each clipped at mean +- clip*sd
  (Chang: 5; None = no clipping). Rows keep df's index; NaN where an input is missing."""
  if ngram_n is None:
    orders = [int(c[5:-10]) for c in df.columns if c.startswith("ngram") and c.endswith("_surprisal") and c[5:-10].isdigit()]
    if not orders:
      raise errors.AnalysisError("the table has no ngram<n>_surprisal columns; write it with n-gram predictors (--ngram_n)")
    ngram_n = max(orders)
  need = ["log_freq", f"ngram{ngram_n}_surprisal", "context_loglen", "context_logprob"]
  missing = [c for c in need if c not in df]
  if missing:
    raise errors.AnalysisError(f"the table lacks predictor column(s) {missing}")
  feats = pd.DataFrame(index=df.index)
  feats["unigram"] = df["log_freq"].to_numpy(np.float64)
  logp = -df[f"ngram{ngram_n}_surprisal"].to_numpy(np.float64)
  ok = np.isfinite(logp) & np.isfinite(feats["unigram"].to_numpy())
  resid = np.full(len(df), np.nan)
  if ok.sum() > 2:
    resid[ok] = stats.residualize(logp[ok], feats["unigram"].to_numpy()[ok])
  feats["ngram"] = resid
  feats["context_loglen"] = df["context_loglen"].to_numpy(np.float64)
  feats["context_logprob"] = df["context_logprob"].to_numpy(np.float64)
  if clip is not None:
    for c in feats:
      feats[c] = stats.clip_sigma(feats[c].to_numpy(), clip)
  return feats


def chang_regressions(
  df: pd.DataFrame,
  metrics: Sequence[str] = CHANG_TARGETS,
  blocks: Sequence[str] = CHANG_BLOCKS,
  ngram_n: int | None = None,
  clip: float | None = 5.0,
) -> pd.DataFrame:
  """Chang's regressions of each metric on the token predictors, as one tidy DataFrame.

  For each metric present in `df` (run-averaged columns of token_metrics): the rows where the metric
  and every predictor are finite; predictor blocks added one at a time in `blocks` order with a
  likelihood-ratio test against the previous model (stats.sequential_lrt), and the full model's
  coefficient of each predictor (sign checks). Columns: metric, block (the intercept-only row first),
  nobs, df, llf, r2, adj_r2, delta_adj_r2, lr_stat, p, coef, coef_se, coef_p. Metrics that are absent
  or all-NaN (e.g. final_surprisal with fewer than 11 checkpoints) are left out.
  """
  feats = chang_features(df, ngram_n, clip)
  unknown = [b for b in blocks if b not in feats]
  if unknown:
    raise errors.AnalysisError(f"unknown predictor block(s) {unknown}; known: {list(feats.columns)}")
  X_NxF = feats[list(blocks)].to_numpy(np.float64)
  frames = []
  for m in metrics:
    if m not in df:
      continue
    y = df[m].to_numpy(np.float64)
    ok = np.isfinite(y) & np.isfinite(X_NxF).all(1)
    if ok.sum() <= len(blocks) + 1:
      continue
    seq = stats.sequential_lrt(y[ok], [(b, X_NxF[ok, i]) for i, b in enumerate(blocks)])
    full = stats.ols(y[ok], X_NxF[ok], names=list(blocks))
    seq.insert(0, "metric", m)
    seq.insert(2, "nobs", int(ok.sum()))
    seq["coef"] = seq["block"].map(full["params"]).where(seq["block"] != "intercept", full["params"]["const"])
    seq["coef_se"] = seq["block"].map(full["se"]).where(seq["block"] != "intercept", full["se"]["const"])
    seq["coef_p"] = seq["block"].map(full["p"]).where(seq["block"] != "intercept", full["p"]["const"])
    frames.append(seq)
  if not frames:
    raise errors.AnalysisError(f"none of the metrics {list(metrics)} has enough finite rows to regress")
  return pd.concat(frames, ignore_index=True)
