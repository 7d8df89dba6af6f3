"""Planted-answer tests for analysis/curves.py and analysis/stats.py.

Shapes: T tokens, C checkpoints (Chang's 222-step schedule unless stated), D
checkpoints with step > 0, R runs, K spline basis functions.
"""

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from statsmodels.stats.outliers_influence import variance_inflation_factor

from analysis import curves as cv
from analysis import stats as st

CHANCE = 15.61
STEPS_C = cv.chang_checkpoint_steps()
X_D, KEEP_C = cv.log10_axis(STEPS_C)


def logistic_surprisal(x, hi, lo, xmid, width):
  """Surprisal falling from hi to lo around xmid (a planted learning curve)."""
  return hi + (lo - hi) / (1.0 + np.exp(-(x - xmid) / width))


def with_step0(curves_TxD, value=CHANCE):
  """Prepend the step-0 column that every log-axis metric must ignore."""
  curves_TxD = np.atleast_2d(curves_TxD)
  return np.concatenate([np.full((curves_TxD.shape[0], 1), value), curves_TxD], 1)


# ----------------------------------------------------------------------- schedule


def test_chang_schedule_matches_reference_values():
  assert STEPS_C.size == 222
  np.testing.assert_array_equal(STEPS_C[:4], [0, 101, 205, 311])
  np.testing.assert_array_equal(STEPS_C[-2:], [957299, 981536])
  # The last 11 checkpoints are exactly the last 25% of the 1M trained steps; 25% of
  # the last checkpoint's step (981,536) admits one more.
  np.testing.assert_array_equal(
    cv.final_window(STEPS_C, 222, last_frac=0.25, total_steps=1e6),
    cv.final_window(STEPS_C, 222, last_n=11),
  )
  assert cv.final_window(STEPS_C, 222, last_frac=0.25).sum() == 12


# ------------------------------------------------------------------------ splines


def test_smoother_equals_direct_penalised_solve_fixed_lambda():
  rng = np.random.default_rng(0)
  y_D = np.sin(X_D) * 3 + rng.normal(0, 0.3, X_D.size)
  lam = 0.37
  sm0 = cv.GamSmoother(X_D, lams_L=[lam], ridge=0.0)
  fit = sm0.fit(y_D[None])
  B, P = sm0.B_DxK, sm0.P_KxK
  beta = np.linalg.solve(B.T @ B + lam * P, B.T @ y_D)
  np.testing.assert_allclose(fit.coef_NxK[0], beta, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(fit.coef_NxK[0] @ B.T, B @ beta, rtol=1e-10, atol=1e-10)
  # Basis: 25 cubic B-splines summing to one over the data range, P kills lines.
  assert B.shape == (X_D.size, 25)
  np.testing.assert_allclose(B.sum(1), 1.0, atol=1e-12)
  np.testing.assert_allclose(P @ np.arange(25.0), 0.0, atol=1e-12)


def test_intercept_reduction_matches_pygam_26_column_system():
  """pyGAM fits [1, B] with penalty blockdiag(0, lam P) + sqrt(eps) I; our 25-column
  system with the reduced ridge must give the same fitted values and edof."""
  rng = np.random.default_rng(1)
  y_D = 5 + np.cos(2 * X_D) + rng.normal(0, 0.2, X_D.size)
  smoother = cv.GamSmoother(X_D)
  X_full = np.column_stack([np.ones(X_D.size), smoother.B_DxK])
  eps = np.sqrt(np.finfo(float).eps)
  for l_idx in (0, 5, 10):
    lam = smoother.lams_L[l_idx]
    pen = np.zeros((26, 26))
    pen[1:, 1:] = lam * smoother.P_KxK
    pen += eps * np.eye(26)
    # pyGAM's route: QR of the data rows stacked on chol(penalty) (well conditioned,
    # unlike inverting the nearly singular 26 x 26 normal matrix).
    q_aug, _ = np.linalg.qr(np.vstack([X_full, np.linalg.cholesky(pen).T]))
    q_data = q_aug[: X_D.size]
    hat_full_y = q_data @ (q_data.T @ y_D)
    edof_full = float(np.sum(q_data**2))
    hat_ours = smoother.hat_matrix(l_idx)
    np.testing.assert_allclose(hat_ours @ y_D, hat_full_y, rtol=1e-8, atol=1e-8)
    assert np.trace(hat_ours) == pytest.approx(edof_full, rel=1e-8)
    assert smoother.edof_L[l_idx] == pytest.approx(edof_full, rel=1e-8)


def test_vectorised_gcv_equals_explicit_formula():
  rng = np.random.default_rng(2)
  y_NxD = np.stack([np.exp(-X_D) * 50 + rng.normal(0, s, X_D.size) for s in (0.1, 0.5, 2.0)])
  smoother = cv.GamSmoother(X_D)
  fit = smoother.fit(y_NxD)
  n = X_D.size
  for i in range(3):
    gcv_L = []
    for l_idx in range(smoother.lams_L.size):
      hat = smoother.hat_matrix(l_idx)
      resid = y_NxD[i] - hat @ y_NxD[i]
      gcv_L.append(n * (resid @ resid) / (n - 1.4 * np.trace(hat)) ** 2)
    np.testing.assert_allclose(fit.gcv_NxL[i], gcv_L, rtol=1e-8)
    assert fit.lam_idx_N[i] == int(np.argmin(gcv_L))
  # Textbook GCV when gamma = 1.
  sm1 = cv.GamSmoother(X_D, gamma=1.0)
  hat = sm1.hat_matrix(3)
  resid = y_NxD[0] - hat @ y_NxD[0]
  want = n * (resid @ resid) / (n - np.trace(hat)) ** 2
  assert sm1.fit(y_NxD[:1]).gcv_NxL[0, 3] == pytest.approx(want, rel=1e-8)


def test_gcv_picks_large_lambda_for_line_small_for_wiggles():
  rng = np.random.default_rng(3)
  smoother = cv.GamSmoother(X_D)
  lines = np.stack([1 + 0.5 * X_D + rng.normal(0, 0.3, X_D.size) for _ in range(20)])
  span = X_D[-1] - X_D[0]
  wiggles = np.stack([3 * np.sin(2 * np.pi * 5 * (X_D - X_D[0]) / span) + rng.normal(0, 0.05, X_D.size) for _ in range(20)])
  lam_lines = smoother.lams_L[smoother.fit(lines).lam_idx_N]
  lam_wig = smoother.lams_L[smoother.fit(wiggles).lam_idx_N]
  assert np.all(lam_lines >= 100.0), lam_lines
  assert np.all(lam_wig == smoother.lams_L[0]), lam_wig


# ------------------------------------------------------------------ AoA, planted


def test_aoa_sigmoid_and_gam_recover_planted_midpoint():
  rng = np.random.default_rng(4)
  # Starts below chance, so the AoA threshold (halfway between chance and the best
  # surprisal) is not the sigmoid's own midpoint: AoA = xmid + width * logit(frac).
  hi, xmid, width, lo = 12.0, 4.0, 0.3, 3.0
  clean_D = logistic_surprisal(X_D, hi, lo, xmid, width)
  curves_TxC = with_step0(np.stack([clean_D + rng.normal(0, 0.02, X_D.size) for _ in range(6)]))
  best = clean_D.min()
  frac = (hi - 0.5 * (CHANCE + best)) / (hi - lo)
  planted_sig = xmid + width * np.log(frac / (1 - frac))
  assert abs(planted_sig - xmid) > 0.2
  for init in ("gam", "p0"):
    res = cv.aoa_sigmoid(curves_TxC, STEPS_C, CHANCE, init=init)
    assert res.converged_T.all()
    np.testing.assert_allclose(res.aoa_T, planted_sig, atol=0.01)
    np.testing.assert_allclose(res.params_Tx4[:, 2], xmid, atol=0.01)
  # GAM AoA: first grid point where the curve is <= 0.5 chance + 0.5 min(curve).
  smooth = cv.smooth_curves(curves_TxC, STEPS_C, fine_points=1000)
  fine_true = logistic_surprisal(smooth.x_G, hi, lo, xmid, width)
  thr = 0.5 * CHANCE + 0.5 * fine_true.min()
  planted_gam = smooth.x_G[np.argmax(fine_true <= thr)]
  assert planted_gam == pytest.approx(planted_sig, abs=0.01)
  aoa = cv.aoa_gam(smooth.fine_TxG, smooth.x_G, CHANCE)
  np.testing.assert_allclose(aoa, planted_gam, atol=0.02)
  # A later planted midpoint moves the AoA by the same amount.
  shifted = with_step0(logistic_surprisal(X_D, hi, lo, xmid + 0.7, width))
  res2 = cv.aoa_sigmoid(shifted, STEPS_C, CHANCE)
  assert res2.aoa_T[0] == pytest.approx(planted_sig + 0.7, abs=0.01)


def test_aoa_edge_rules_follow_reference():
  rng = np.random.default_rng(5)
  never = np.full(X_D.size, CHANCE + 1.0) + rng.normal(0, 0.05, X_D.size)  # above chance
  worse = logistic_surprisal(X_D, 4.0, 12.0, 4.0, 0.3)  # gets worse: decreasing sigmoid
  curves = with_step0(np.stack([never, worse]))
  res = cv.aoa_sigmoid(curves, STEPS_C, CHANCE)
  np.testing.assert_allclose(res.aoa_T, X_D[-1])
  smooth = cv.smooth_curves(curves, STEPS_C, fine_points=1000)
  aoa = cv.aoa_gam(smooth.fine_TxG, smooth.x_G, CHANCE)
  assert aoa[0] == X_D[-1]  # y* >= chance -> x_max
  assert aoa[1] == pytest.approx(X_D[0], abs=0.01)  # already below y* at the start
  # Threshold uses the best (minimum) smoothed surprisal, not the final one: learned
  # down to 3 at x = 4, then forgotten back up to 8.
  dip = np.where(X_D < 4.0, 12.0 - 9.0 * (X_D - X_D[0]) / (4.0 - X_D[0]), 3.0 + 5.0 * (X_D - 4.0) / (X_D[-1] - 4.0))
  sm_dip = cv.smooth_curves(with_step0(dip), STEPS_C, fine_points=1000)
  thr_best = 0.5 * CHANCE + 0.5 * 3.0
  planted = X_D[0] + (12.0 - thr_best) / 9.0 * (4.0 - X_D[0])
  aoa_dip, thr = cv.aoa_gam(sm_dip.fine_TxG, sm_dip.x_G, CHANCE, return_threshold=True)
  assert aoa_dip[0] == pytest.approx(planted, abs=0.03)
  assert thr[0] == pytest.approx(thr_best, abs=0.05)
  # Hand-built sigmoid params: threshold below the whole sigmoid -> x_min.
  params = np.array([[-3.0, -2.0, 4.0, 0.5]])
  aoa_min, thr = cv.sigmoid_aoa_from_params(params, np.array([-2.0]), CHANCE, 2.0, 6.0)
  assert aoa_min[0] == 2.0 and np.isnan(thr[0])


# ------------------------------------------------------------ simple Chang metrics


def test_final_surprisal_and_variability_match_hand_computation():
  curves_TxC = np.arange(2 * 15, dtype=np.float32).reshape(2, 15) ** 1.5
  steps_C = np.array([0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140])
  last = curves_TxC[:, -11:].astype(np.float64)
  np.testing.assert_allclose(cv.final_surprisal(curves_TxC), last.mean(1), rtol=1e-12)
  hand_sd = np.sqrt(((last - last.mean(1, keepdims=True)) ** 2).mean(1))
  np.testing.assert_allclose(cv.within_run_variability(curves_TxC), hand_sd, rtol=1e-10)
  # last_frac=0.25 of 140 steps: steps >= 105 -> the last 4 checkpoints.
  np.testing.assert_allclose(
    cv.final_surprisal(curves_TxC, steps_C=steps_C, last_frac=0.25),
    curves_TxC[:, -4:].astype(np.float64).mean(1),
    rtol=1e-12,
  )
  assert np.all(np.isnan(cv.final_surprisal(curves_TxC[:, :5], last_n=11)))


def test_forgettability_zero_for_monotone_and_planted_rise_for_v_shape():
  assert cv.forgettability(np.array([[5.0, 4.0, 4.0, 2.0, 1.0]]))[0] == 0.0
  assert cv.forgettability(np.array([[5.0, 4.0, 6.0, 2.0, 3.5]]))[0] == pytest.approx(3.5)
  line = with_step0(12.0 - 1.5 * X_D)  # decreasing line: the smoother keeps it exactly
  smooth = cv.smooth_curves(line, STEPS_C)
  assert cv.forgettability(smooth.smooth_TxD)[0] == pytest.approx(0.0, abs=1e-9)
  rng = np.random.default_rng(6)
  kink, rise = 4.0, 3.0
  v_D = np.where(X_D < kink, 4 + 6 * (kink - X_D) / (kink - X_D[0]), 4 + rise * (X_D - kink) / (X_D[-1] - kink))
  smooth = cv.smooth_curves(with_step0(v_D + rng.normal(0, 0.02, X_D.size)), STEPS_C)
  assert cv.forgettability(smooth.smooth_TxD)[0] == pytest.approx(rise, abs=0.15)


# ------------------------------------------------------------------- cross-run


def test_crossrun_variability_zero_for_identical_runs_and_planted_offset():
  rng = np.random.default_rng(7)
  base_TxC = rng.normal(5, 1, (30, 40))
  same = np.stack([base_TxC] * 4)
  np.testing.assert_array_equal(cv.crossrun_variability(same), 0.0)
  shifted = np.stack([base_TxC, base_TxC + 0.5, base_TxC + 1.0])
  # Pairs differ by 0.5, 1.0, 0.5 everywhere: mean of squared = (0.25 + 1 + 0.25) / 3.
  np.testing.assert_allclose(cv.crossrun_variability(shifted), 0.5, rtol=1e-12)
  var_T, dist_TxP = cv.crossrun_variability(shifted, return_pairs=True)
  np.testing.assert_allclose(dist_TxP[0], [0.25, 1.0, 0.25])
  assert np.isnan(cv.crossrun_variability(same[:1])).all()


def test_rank_similarity_identical_zero_shuffled_larger_and_brute_force():
  rng = np.random.default_rng(8)
  curves_TxC = rng.normal(0, 1, (300, 20)).cumsum(1)
  same = np.stack([curves_TxC, curves_TxC])
  res = cv.crossrun_rank_similarity(same, n_sub=None)
  np.testing.assert_array_equal(res.rank_PxS, 0)
  perm = rng.permutation(300)
  shuffled = np.stack([curves_TxC, curves_TxC[perm]])
  res2 = cv.crossrun_rank_similarity(shuffled, n_sub=None)
  assert res2.rank_PxS.mean() > 50  # random partner: about (S - 1) / 2 on average
  noisy = np.stack([curves_TxC, curves_TxC + rng.normal(0, 0.5, curves_TxC.shape)])
  res3 = cv.crossrun_rank_similarity(noisy, n_sub=None)
  d = ((noisy[0][:, None, :] - noisy[1][None, :, :]) ** 2).mean(-1)
  brute = (d < np.diag(d)[:, None]).sum(1)
  np.testing.assert_array_equal(res3.rank_PxS[0], brute)
  sub = cv.crossrun_rank_similarity(noisy, n_sub=100, seed=3)
  assert sub.idx_S.size == 100 and sub.rank_PxS.max() <= 99


def test_crossrun_correlation_of_metrics():
  rng = np.random.default_rng(9)
  m = rng.normal(size=500)
  mean, sd, r = cv.crossrun_correlation(np.stack([m, m, m]))
  assert mean == pytest.approx(1.0) and sd == pytest.approx(0.0, abs=1e-12) and r.size == 3
  noisy = np.stack([m, m + rng.normal(0, 1, 500)])
  mean2, _, r2 = cv.crossrun_correlation(noisy)
  assert mean2 == pytest.approx(np.corrcoef(noisy)[0, 1]) and 0.5 < mean2 < 0.85


# ------------------------------------------------------------------- Xia trends


def test_trend_classes_planted_and_match_statsmodels():
  rng = np.random.default_rng(10)
  steps_C = np.arange(1, 41) * 1000
  ln = np.log(steps_C)
  # Flat + small noise with its ln(step) slope projected out over the OLS window
  # (checkpoints 8k..40k); unprojected, 5% of flat tokens are "significant" by
  # chance, which the classifier rightly reports.
  noise = rng.normal(0, 0.003, (5, 40))
  ln_w = ln[7:] - ln[7:].mean()
  noise[:, 7:] -= np.outer(noise[:, 7:] @ ln_w / (ln_w @ ln_w), ln_w)
  flat = 20 * (1 + noise)
  up = 20 * np.exp(0.4 * (ln - ln[0]))[None] * np.exp(rng.normal(0, 0.01, (5, 40)))
  down = 20 * np.exp(-0.4 * (ln - ln[0]))[None] * np.exp(rng.normal(0, 0.01, (5, 40)))
  # Geometric mean 20 = first = last, no trend, but var(ppl) >> m: not stagnated.
  wild = np.where(np.arange(40) % 2 == 0, 10.0, 40.0)
  wild[[0, 7, 39]] = 20.0
  ppl_TxC = np.concatenate([flat, up, down, wild[None]])
  res = cv.trend_classes(ppl_TxC, steps_C, window_frac=0.2)
  assert res.class_T[15] == cv.TREND_OTHER and res.p_T[15] > 0.05
  assert res.gmean_T[15] == pytest.approx(20.0, rel=0.05)
  ppl_TxC, res.class_T = ppl_TxC[:15], res.class_T[:15]
  np.testing.assert_array_equal(res.class_T[:5], cv.TREND_STAGNATED)
  np.testing.assert_array_equal(res.class_T[5:10], cv.TREND_UPWARD)
  np.testing.assert_array_equal(res.class_T[10:], cv.TREND_DOWNWARD)
  start = res.ols_start
  assert steps_C[start] == 8000  # nearest to 0.2 * 40000
  for i in (0, 3, 7, 12):
    y = ppl_TxC[i, start:] / ppl_TxC[i, start]
    fit = sm.OLS(y, sm.add_constant(ln[start:])).fit()
    assert res.slope_T[i] == pytest.approx(fit.params[1], rel=1e-6)
    assert res.p_T[i] == pytest.approx(fit.pvalues[1], rel=1e-6)
    assert res.t_T[i] == pytest.approx(fit.tvalues[1], rel=1e-6)
  frac = cv.class_fractions(res.class_T)
  assert frac["stagnated"] == pytest.approx(5 / 15) and frac["other"] == 0.0


def test_trend_nan_points_dropped_like_xia_and_surprisal_input():
  rng = np.random.default_rng(11)
  steps_C = np.arange(1, 31) * 100
  surpr_TxC = 5 + rng.normal(0, 0.2, (3, 30))  # nats
  surpr_TxC[1, [10, 20, 25]] = np.nan
  res = cv.trend_classes(surpr_TxC, steps_C, kind="surprisal", unit="nats")
  res_ppl = cv.trend_classes(np.exp(surpr_TxC), steps_C)
  np.testing.assert_allclose(res.p_T, res_ppl.p_T, rtol=1e-12)
  start = res.ols_start
  y = np.exp(surpr_TxC[1, start:] - surpr_TxC[1, start])
  ok = np.isfinite(y)
  fit = sm.OLS(y[ok], sm.add_constant(np.log(steps_C[start:])[ok])).fit()
  assert res.p_T[1] == pytest.approx(fit.pvalues[1], rel=1e-6)
  assert res.n_T[1] == ok.sum()
  bits = cv.trend_classes(surpr_TxC, steps_C, kind="surprisal", unit="bits")
  assert not np.allclose(bits.slope_T[[0, 2]], res.slope_T[[0, 2]])  # unit matters


def test_trend_window_modes_differ_on_uneven_schedule():
  steps_C = cv.chang_checkpoint_steps()
  by_steps = cv.trend_windows(steps_C, 222, 0.2, "steps")
  by_ckpt = cv.trend_windows(steps_C, 222, 0.2, "checkpoints")
  xia = cv.trend_windows(steps_C, 222, 0.2, "xia")
  assert by_steps[0] == by_steps[1] == int(np.argmin(np.abs(steps_C - int(0.2 * 981536))))
  assert by_ckpt == (44, 44)
  assert xia == (by_steps[0], 44) and by_steps[0] != 44


def test_align_to_ppl_recovers_known_function():
  val_C = np.array([300.0, 120.0, 80.0, 50.0, 40.0, 33.0, 30.0])
  metric_RxC = np.stack([2.0 - 3.0 * np.log(val_C), 1.0 + 0.5 * np.log(val_C)])
  target_Q = np.array([35.0, 60.0, 100.0, 250.0])
  got = cv.align_to_ppl(metric_RxC, val_C, target_Q)
  want = np.stack([2.0 - 3.0 * np.log(target_Q), 1.0 + 0.5 * np.log(target_Q)])
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert np.isnan(cv.align_to_ppl(metric_RxC, val_C, [20.0, 400.0])).all()
  # A ppl spike is skipped: the metric is read at the first time ppl was reached.
  spiky = np.array([300.0, 120.0, 80.0, 150.0, 50.0, 40.0])
  metric = np.log(spiky) * 2
  metric[3] = 999.0
  np.testing.assert_allclose(cv.align_to_ppl(metric, spiky, [100.0, 60.0]), 2 * np.log([100.0, 60.0]), rtol=1e-12)
  with pytest.raises(ValueError):
    cv.align_to_ppl(metric, spiky, [100.0], monotone="strict")
  # Runs/model sizes with different checkpoint counts.
  outs = cv.align_to_ppl([np.log(val_C), np.log(val_C[:4])], [val_C, val_C[:4]], [60.0])
  np.testing.assert_allclose(np.asarray(outs)[:, 0], np.log(60.0), rtol=1e-12)


# ------------------------------------------------------------------ token_metrics


def _small_runs(rng, n_runs=3, n_tok=40):
  xmid_T = rng.uniform(2.5, 5.5, n_tok)
  curves = []
  for _ in range(n_runs):
    d = logistic_surprisal(X_D[None], CHANCE, rng.uniform(2, 6, (n_tok, 1)), xmid_T[:, None], 0.3) + rng.normal(
      0, 0.3, (n_tok, X_D.size)
    )
    curves.append(with_step0(d))
  return np.stack(curves).astype(np.float32)


def test_token_metrics_agrees_with_standalone_functions():
  rng = np.random.default_rng(12)
  surpr_RxTxC = _small_runs(rng)
  df = cv.token_metrics(surpr_RxTxC, STEPS_C, CHANCE, per_run=True, rank_subsample=None)
  assert len(df) == 40 and (df["flags"] == 0).all()
  np.testing.assert_allclose(df["final_surprisal"], cv.final_surprisal(surpr_RxTxC).mean(0), rtol=1e-10)
  np.testing.assert_allclose(df["var_steps"], cv.within_run_variability(surpr_RxTxC).mean(0), rtol=1e-10)
  smooth = [cv.smooth_curves(s, STEPS_C, fine_points=1000) for s in surpr_RxTxC]
  aoa_R = np.stack([cv.aoa_gam(s.fine_TxG, s.x_G, CHANCE) for s in smooth])
  np.testing.assert_allclose(df["aoa_gam"], aoa_R.mean(0), atol=1e-6)
  sm_RxTxD = np.stack([s.smooth_TxD for s in smooth])
  np.testing.assert_allclose(df["var_runs"], cv.crossrun_variability(sm_RxTxD), rtol=1e-4)
  np.testing.assert_allclose(df["var_runs_raw"], cv.crossrun_variability(surpr_RxTxC), rtol=1e-6)
  np.testing.assert_allclose(
    df["forgettability"],
    np.mean([cv.forgettability(s.smooth_TxD) for s in smooth], 0),
    rtol=1e-4,
    atol=1e-5,
  )
  sig = cv.aoa_sigmoid(surpr_RxTxC[1], STEPS_C, CHANCE)
  np.testing.assert_allclose(df["aoa_sigmoid_r1"], sig.aoa_T, atol=1e-3)
  rank = cv.crossrun_rank_similarity(surpr_RxTxC, n_sub=None)
  np.testing.assert_allclose(df["rank_similarity"], rank.mean_rank_S)
  tr = cv.trend_classes(surpr_RxTxC[0], STEPS_C, kind="surprisal", unit="bits")
  np.testing.assert_array_equal(df["trend_class"], tr.class_T)
  mat = cv.per_run_matrix(df, "aoa_gam")
  assert mat.shape == (3, 40)
  assert cv.crossrun_correlation(mat)[0] > 0.9  # shared planted midpoints


def test_too_few_checkpoints_gives_nan_and_flags_not_exceptions():
  rng = np.random.default_rng(13)
  steps_C = np.array([0, 100, 200, 400])  # 3 positive steps: < 4 for the spline
  surpr = rng.normal(8, 1, (2, 5, 4)).astype(np.float32)
  df = cv.token_metrics(surpr, steps_C, CHANCE)
  for col in ("aoa_gam", "forgettability", "var_runs", "aoa_sigmoid", "final_surprisal"):
    assert df[col].isna().all(), col
  flags = int(df["flags"].iloc[0])
  assert flags & cv.FLAG_FEW_GAM_POINTS and flags & cv.FLAG_FEW_FINAL_POINTS
  assert flags & cv.FLAG_FEW_SIGMOID_POINTS
  assert set(cv.describe_flags(flags)) >= {"few_gam_points", "few_final_points"}
  assert df["var_runs_raw"].notna().all()  # raw metrics still computable
  single = cv.token_metrics(surpr[:1], steps_C, CHANCE, last_n=2)
  assert single["var_runs_raw"].isna().all() and (single["flags"] & cv.FLAG_SINGLE_RUN).all()
  assert single["final_surprisal"].notna().all()
  res = cv.smooth_curves(surpr[0], steps_C)
  assert not res.ok and np.isnan(res.smooth_TxD).all()


def test_nonfinite_curve_flagged_and_nan_only_for_that_token():
  rng = np.random.default_rng(14)
  surpr = _small_runs(rng, n_runs=2, n_tok=6)
  surpr[1, 2, 50] = np.nan
  df = cv.token_metrics(surpr, STEPS_C, CHANCE, sigmoid=False, rank_subsample=None)
  assert df["flags"].iloc[2] & cv.FLAG_NONFINITE
  assert np.isnan(df["aoa_gam"].iloc[2]) and np.isfinite(df["aoa_gam"].drop(index=2)).all()
  assert (df["flags"].drop(index=2) == 0).all()


# -------------------------------------------------------------------- stats.py


def test_ols_lrt_vif_residualize_match_statsmodels():
  rng = np.random.default_rng(15)
  n = 400
  a = rng.normal(size=n)
  b = 0.6 * a + rng.normal(size=n)
  c = rng.normal(size=n)
  y = 1.0 + 2.0 * a - 0.5 * b + rng.normal(size=n)
  X = np.column_stack([a, b, c])
  ours = st.ols(y, X, ["a", "b", "c"])
  ref = sm.OLS(y, sm.add_constant(X)).fit()
  np.testing.assert_allclose(ours["params"].to_numpy(), ref.params, rtol=1e-10)
  np.testing.assert_allclose(ours["se"].to_numpy(), ref.bse, rtol=1e-10)
  np.testing.assert_allclose(ours["p"].to_numpy(), ref.pvalues, rtol=1e-8)
  assert ours["r2"] == pytest.approx(ref.rsquared, rel=1e-12)
  assert ours["adj_r2"] == pytest.approx(ref.rsquared_adj, rel=1e-12)
  assert ours["llf"] == pytest.approx(ref.llf, rel=1e-12)
  small = sm.OLS(y, sm.add_constant(X[:, :1])).fit()
  stat, p = st.lrt(small.llf, ref.llf, 2)
  ref_stat, ref_p, _ = ref.compare_lr_test(small)
  assert stat == pytest.approx(ref_stat) and p == pytest.approx(ref_p)
  exog = sm.add_constant(X)
  want = [variance_inflation_factor(exog, j) for j in range(1, 4)]
  np.testing.assert_allclose(st.vif(pd.DataFrame(X, columns=list("abc"))), want, rtol=1e-10)
  np.testing.assert_allclose(st.residualize(b, a), sm.OLS(b, sm.add_constant(a)).fit().resid)
  seq = st.sequential_lrt(y, [("a", a), ("bc", X[:, 1:])])
  assert list(seq["block"]) == ["intercept", "a", "bc"]
  assert seq["p"].iloc[1] < 1e-10 and seq["df"].iloc[2] == 2
  assert seq["llf"].iloc[2] == pytest.approx(ref.llf, rel=1e-12)
  inter, names = st.interaction_block({"a": a, "b": b, "c": c})
  assert names == ["a:b", "a:c", "b:c"] and np.allclose(inter[:, 0], a * b)


def test_cluster_bootstrap_resamples_whole_clusters():
  """A CI over clusters is wider than one over rows when rows within a cluster are copies (the probe
  tokens of one type), and both cover the true mean of a planted population."""
  rng = np.random.default_rng(0)
  vals = rng.normal(0.0, 1.0, 40)
  x = np.repeat(vals, 25)  # 40 clusters of 25 identical rows
  clusters = np.repeat(np.arange(40), 25)
  lo_r, hi_r = st.cluster_bootstrap(lambda i: x[i].mean(), len(x), n_boot=400)
  lo_c, hi_c = st.cluster_bootstrap(lambda i: x[i].mean(), len(x), clusters=clusters, n_boot=400)
  assert lo_c <= 0.0 <= hi_c
  assert (hi_c - lo_c) > 3 * (hi_r - lo_r)  # cluster CI ~ 1/sqrt(40); row CI ~ 1/sqrt(1000)
  # one-row clusters = the ordinary bootstrap, same draws
  assert st.cluster_bootstrap(lambda i: x[i].mean(), len(x), clusters=np.arange(len(x)), n_boot=50) == st.cluster_bootstrap(
    lambda i: x[i].mean(), len(x), n_boot=50
  )
