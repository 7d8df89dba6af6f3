"""Chang's regressions over a token table (analysis/token_table.py) against statsmodels, on planted data."""

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats as sps

from analysis import stats, token_table
from lib import errors


def planted_table(n=400, seed=0):
  """A token table whose aoa depends on log-frequency only and whose forgettability on context length only."""
  rng = np.random.default_rng(seed)
  log_freq = rng.normal(-3.0, 1.0, n)
  ngram5 = -(1.5 * log_freq) + rng.normal(0, 0.5, n)  # surprisal (nats): frequent tokens are predictable
  ctx_len = rng.integers(1, 30, n)
  df = pd.DataFrame(
    {
      "log_freq": log_freq,
      **{f"ngram{k}_surprisal": ngram5 + 0.1 * (5 - k) for k in range(1, 6)},
      "context_len": ctx_len,
      "context_loglen": np.log2(ctx_len),
      "context_logprob": rng.normal(-4.0, 1.0, n),
    }
  )
  df["aoa_gam"] = 2.0 - 0.8 * df["log_freq"] + rng.normal(0, 0.3, n)
  df["forgettability"] = 0.5 + 0.2 * df["context_loglen"] + rng.normal(0, 0.3, n)
  df["final_surprisal"] = np.nan  # too few checkpoints: left out, not an error
  df.loc[3, "aoa_gam"] = np.nan  # a NaN metric drops that row for that metric only
  return df


def test_chang_regressions_match_statsmodels():
  df = planted_table()
  reg = token_table.chang_regressions(df, metrics=["final_surprisal", "aoa_gam", "forgettability"])
  assert reg["metric"].unique().tolist() == ["aoa_gam", "forgettability"]
  assert reg.groupby("metric")["nobs"].first().to_dict() == {"aoa_gam": 399, "forgettability": 400}
  feats = token_table.chang_features(df)
  # the ngram predictor: the 5-gram log-prob residualised on log_freq, then clipped at 5 sigma
  logp = -df["ngram5_surprisal"].to_numpy()
  resid = logp - sm.OLS(logp, sm.add_constant(df["log_freq"].to_numpy())).fit().fittedvalues
  np.testing.assert_allclose(feats["ngram"], stats.clip_sigma(resid, 5.0), atol=1e-10)
  for metric in ("aoa_gam", "forgettability"):
    ok = df[metric].notna().to_numpy()
    y = df.loc[ok, metric].to_numpy()
    rows = reg[reg["metric"] == metric].set_index("block")
    prev = sm.OLS(y, np.ones((ok.sum(), 1))).fit()
    cols = []
    for b in token_table.CHANG_BLOCKS:
      cols.append(feats.loc[ok, b].to_numpy())
      fit = sm.OLS(y, sm.add_constant(np.column_stack(cols))).fit()
      assert rows.loc[b, "llf"] == pytest.approx(fit.llf, rel=1e-9)
      assert rows.loc[b, "adj_r2"] == pytest.approx(fit.rsquared_adj, rel=1e-9, abs=1e-12)
      lr = 2 * (fit.llf - prev.llf)
      assert rows.loc[b, "lr_stat"] == pytest.approx(lr, rel=1e-7, abs=1e-9)
      assert rows.loc[b, "p"] == pytest.approx(sps.chi2.sf(lr, 1), rel=1e-6, abs=1e-300)
      prev = fit
    np.testing.assert_allclose(rows.loc[list(token_table.CHANG_BLOCKS), "coef"], fit.params[1:], rtol=1e-9)
    np.testing.assert_allclose(rows.loc[list(token_table.CHANG_BLOCKS), "coef_p"], fit.pvalues[1:], rtol=1e-6)
  aoa = reg[reg["metric"] == "aoa_gam"].set_index("block")
  forg = reg[reg["metric"] == "forgettability"].set_index("block")
  assert aoa.loc["unigram", "p"] < 1e-30 and aoa.loc["unigram", "coef"] < 0  # planted: earlier AoA for frequent tokens
  assert forg.loc["context_loglen", "p"] < 1e-10 and forg.loc["unigram", "p"] > 1e-3  # planted on context length only


def test_chang_regressions_refuse_missing_predictors():
  df = planted_table().drop(columns=[f"ngram{k}_surprisal" for k in range(1, 6)])
  with pytest.raises(errors.AnalysisError, match="no ngram<n>_surprisal columns"):
    token_table.chang_regressions(df)
  with pytest.raises(errors.AnalysisError, match="unknown predictor block"):
    token_table.chang_regressions(planted_table(), blocks=["unigram", "pos"])
  with pytest.raises(errors.AnalysisError, match="enough finite rows"):
    token_table.chang_regressions(planted_table(), metrics=["final_surprisal"])
