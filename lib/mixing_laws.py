"""Mixing laws of the Aioli paper's LMO framework (Chen et al. 2024, arXiv:2411.05735): fitting, choosing p, fidelity.

Legend: m groups, N runs (static sweep), K branches (dynamic sweep), S steps.

  static (log-linear) law   L_i(p) = c_i + b_i·exp(−Σ_j A_ij p_j)           (DML's law, one per group)
  dynamic (linear) law      L_i^{t+1}(p) = L_i^t − Σ_j A_ij^t p_j          (online methods)

Both are fitted by L-BFGS on a Huber loss (δ = 0.02 by default, as the released analysis/law.py);
`fidelity` is the paper's sim(Ã, A⋆) = ½·cos(1ᵀA⋆, 1ᵀÃ) + ½·Spearman(1ᵀA⋆, 1ᵀÃ) on column sums.
`dirichlet_cover` gives grid search's points; `choose_p` minimises a fitted static law's average loss.
`run_branches` trains K copies of one state on K mixtures at once (vmap inside scan) for the sweeps.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import scipy.stats

from lib.errors import AnalysisError


def huber(r, delta: float):
  """Huber loss of residuals r and its derivative."""
  a = np.abs(r)
  quad = a <= delta
  loss = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
  grad = np.where(quad, r, delta * np.sign(r))
  return loss, grad


def dirichlet_cover(m: int, n: int, alpha: float = 1.0, seed: int = 0, oversample: int = 16) -> np.ndarray:
  """[n, m] points covering the simplex (grid search's runs, as the released dirichlet_cover.py):
  draw n·oversample points from Dirichlet(α), then greedily merge the closest pair into its mean
  until n remain."""
  if m < 2 or n < 1:
    raise AnalysisError(f"dirichlet_cover needs m >= 2 groups and n >= 1 points, got m={m}, n={n}")
  X = np.random.default_rng(seed).dirichlet(np.full(m, float(alpha)), size=n * oversample)
  w = np.ones(len(X))  # how many draws each point stands for (merge = weighted mean)
  alive = np.ones(len(X), bool)
  D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
  np.fill_diagonal(D, np.inf)
  for _ in range(len(X) - n):
    i, j = np.unravel_index(np.argmin(D), D.shape)
    X[i] = (w[i] * X[i] + w[j] * X[j]) / (w[i] + w[j])
    w[i] += w[j]
    alive[j] = False
    D[j, :] = D[:, j] = np.inf
    d = ((X - X[i]) ** 2).sum(-1)
    d[~alive] = np.inf
    d[i] = np.inf
    D[i, :] = D[:, i] = d
  out = X[alive]
  return out / out.sum(1, keepdims=True)


def static_law(P_Nxm, c_m, b_m, A_mxm) -> np.ndarray:
  """Predicted losses [N, m] of the static law at mixtures P."""
  P = np.atleast_2d(np.asarray(P_Nxm, np.float64))
  return np.asarray(c_m)[None, :] + np.asarray(b_m)[None, :] * np.exp(-P @ np.asarray(A_mxm).T)


def fit_static_law(P_Nxm, L_Nxm, delta: float = 0.02, restarts: int = 8, seed: int = 0) -> dict:
  """Fits L_i(p) = c_i + b_i·exp(−Σ_j A_ij p_j) for every group i by L-BFGS on a Huber loss.

  b_i = exp(β_i) > 0 and c_i < min_n L_ni are free; the best of `restarts` initialisations is kept.
  Since Σ_j p_j = 1, a constant added to row i of A is absorbed into b_i: compare A's rows after
  centring (`centre_rows`), predictions, or c. Returns {"c", "b", "A", "mse", "r2"}.
  """
  P, L = np.asarray(P_Nxm, np.float64), np.asarray(L_Nxm, np.float64)
  N, m = P.shape
  if L.shape != (N, m) or N < m + 2:
    raise AnalysisError(f"fit_static_law needs [N, m] losses for N >= m+2 runs, got P {P.shape}, L {L.shape}")
  rng = np.random.default_rng(seed)
  c, b, A = np.zeros(m), np.zeros(m), np.zeros((m, m))
  for i in range(m):
    y = L[:, i]

    def obj(theta):
      ci, beta, a = theta[0], theta[1], theta[2:]
      e = np.exp(beta - P @ a)
      r = ci + e - y
      h, dh = huber(r, delta)
      return h.sum(), np.concatenate([[dh.sum()], [(dh * e).sum()], -(dh * e) @ P])

    best = None
    for k in range(restarts):
      c0 = y.min() - (0.05 + 0.5 * k / restarts) * max(y.max() - y.min(), 1e-3) * 4
      a0 = rng.normal(0, 1.0, m) if k else np.zeros(m)
      b0 = np.log(max(y.mean() - c0, 1e-6)) + (P @ a0).mean()
      res = scipy.optimize.minimize(obj, np.concatenate([[c0, b0], a0]), jac=True, method="L-BFGS-B", options={"maxiter": 2000})
      if best is None or res.fun < best.fun:
        best = res
    c[i], b[i], A[i] = best.x[0], np.exp(best.x[1]), best.x[2:]
  pred = static_law(P, c, b, A)
  mse = float(((pred - L) ** 2).mean())
  r2 = float(1 - ((pred - L) ** 2).sum() / max(((L - L.mean(0)) ** 2).sum(), 1e-30))
  return {"c": c, "b": b, "A": A, "mse": mse, "r2": r2}


def centre_rows(A) -> np.ndarray:
  """A with each row's mean removed (the identifiable part of a static law's A, since Σp = 1)."""
  A = np.asarray(A, np.float64)
  return A - A.mean(1, keepdims=True)


def choose_p(law: dict, restarts: int = 16, seed: int = 0) -> np.ndarray:
  """argmin_p (1/m)·Σ_i L_i(p) over the simplex for a fitted static law (p = softmax(y), L-BFGS)."""
  c, b, A = law["c"], law["b"], law["A"]
  m = len(c)
  rng = np.random.default_rng(seed)

  def obj(y):
    p = np.exp(y - y.max())
    p /= p.sum()
    e = b * np.exp(-A @ p)  # [m]
    f = (c + e).mean()
    dp = -(e @ A) / m  # df/dp
    return f, p * (dp - (p * dp).sum())  # chain rule through softmax

  best = None
  for k in range(restarts):
    y0 = np.zeros(m) if k == 0 else rng.normal(0, 2.0, m)
    res = scipy.optimize.minimize(obj, y0, jac=True, method="L-BFGS-B")
    if best is None or res.fun < best.fun:
      best = res
  p = np.exp(best.x - best.x.max())
  return p / p.sum()


def fit_dynamic_law(ell_m, P_Kxm, L_Kxm, delta: float = 0.02) -> dict:
  """Fits L_i^{t+1}(p) = ℓ_i − Σ_j A_ij p_j from K branches forked from one state (losses ℓ before,
  mixtures P, losses after L) by L-BFGS on a Huber loss, started from least squares. Returns
  {"A", "mse", "r2"}."""
  ell, P, L = np.asarray(ell_m, np.float64), np.asarray(P_Kxm, np.float64), np.asarray(L_Kxm, np.float64)
  K, m = P.shape
  if L.shape != (K, m) or ell.shape != (m,) or K < m:
    raise AnalysisError(
      f"fit_dynamic_law needs ℓ [m], P and L [K, m] with K >= m branches; got {ell.shape}, {P.shape}, {L.shape}"
    )
  D = ell[None, :] - L  # [K, m] loss drops
  A0 = np.linalg.lstsq(P, D, rcond=None)[0].T  # [m, m]
  A = np.zeros((m, m))
  for i in range(m):

    def obj(a, i=i):
      h, dh = huber(P @ a - D[:, i], delta)
      return h.sum(), P.T @ dh

    A[i] = scipy.optimize.minimize(obj, A0[i], jac=True, method="L-BFGS-B").x
  pred = ell[None, :] - P @ A.T
  mse = float(((pred - L) ** 2).mean())
  r2 = float(1 - ((pred - L) ** 2).sum() / max(((L - L.mean(0)) ** 2).sum(), 1e-30))
  return {"A": A, "mse": mse, "r2": r2}


def fidelity(A_method, A_true) -> float:
  """The paper's sim(Ã, A⋆) = ½·cos(1ᵀA⋆, 1ᵀÃ) + ½·Spearman(1ᵀA⋆, 1ᵀÃ) (column sums)."""
  a, t = np.asarray(A_method, np.float64).sum(0), np.asarray(A_true, np.float64).sum(0)
  cos = float(a @ t / max(np.linalg.norm(a) * np.linalg.norm(t), 1e-30))
  rho = scipy.stats.spearmanr(a, t).statistic if len(a) > 2 or (np.ptp(a) > 0 and np.ptp(t) > 0) else 1.0
  return 0.5 * cos + 0.5 * float(np.nan_to_num(rho, nan=0.0))


def implied_A(method: str, *, A=None, excess=None, doge_score=None, graph=None, window_loss=None) -> np.ndarray:
  """The LMO parameters A^t [m, m] (rows: evaluated group i, columns: trained group j) that a method's
  update implies (the paper's table of methods written as linear mixing optimisation), from the
  quantities it computes at round t:

    aioli     A = Â (its own estimate)
    doremi    A = diag(excess), excess_i = max(ℓ_i − ℓ_i^ref, 0) (per token, averaged per group)
    doge      A_ij = ⟨∇ℓ_j^train, ∇ℓ_i^val⟩; the step logs only ⟨g_j, g_val⟩ with g_val the mean over
              validation groups, i.e. the column sums / m, so every row is set to that vector (fidelity
              reads column sums only)
    skillit   A_ji = graph[i, j]·Σ_{τ∈window} ℓ_j^τ (its update p_i ∝ exp(η Σ_j graph[i, j] S_j) = exp(η (1ᵀA)_i))
  """
  if method == "aioli":
    return np.asarray(A, np.float64)
  if method == "doremi":
    return np.diag(np.asarray(excess, np.float64))
  if method == "doge":
    s = np.asarray(doge_score, np.float64)
    return np.tile(s, (len(s), 1))
  if method == "skillit":
    return (np.asarray(graph, np.float64) * np.asarray(window_loss, np.float64)[None, :]).T
  raise AnalysisError(f"implied_A: {method!r} has no implied mixing-law parameters (aioli, doremi, doge, skillit do)")


def _sweep_impl(step_fn, states, batches):
  import jax

  return jax.lax.scan(lambda st, b: jax.vmap(step_fn)(st, b), states, batches)


def _sweep(step_fn, states, batches):
  """One compiled program per step function (jit with the function as a static argument)."""
  import jax

  global _SWEEP
  if _SWEEP is None:
    _SWEEP = jax.jit(_sweep_impl, static_argnums=0)
  return _SWEEP(step_fn, states, batches)


_SWEEP = None


def run_branches(step_fn, state, batches, *, vectorise: bool = True):
  """Trains K copies of `state`, copy k on batches[:, k], for S steps; returns (states [K, ...], metrics [S, K]).

  step_fn(state, batch) -> (state, metrics) is an unjitted pure step (e.g. lib/steps.train_step
  partial). batches: a pytree with leaves [S, K, ...]. vectorise=True runs all branches at once
  (vmap inside lax.scan, one compiled program); False runs them one after another (the released
  codes' way), for the benchmark and as the reference in tests.
  """
  import jax
  import jax.numpy as jnp

  K = jax.tree.leaves(batches)[0].shape[1]
  if vectorise:
    states = jax.tree.map(lambda x: jnp.broadcast_to(x, (K,) + jnp.shape(x)), state)
    return _sweep(step_fn, states, batches)
  step = jax.jit(step_fn)
  outs, mets = [], []
  for k in range(K):
    st, ms = state, []
    for s in range(jax.tree.leaves(batches)[0].shape[0]):
      st, mt = step(st, jax.tree.map(lambda x, s=s, k=k: x[s, k], batches))
      ms.append(mt)
    outs.append(st)
    mets.append(jax.tree.map(lambda *x: jnp.stack(x), *ms))
  return (
    jax.tree.map(lambda *x: jnp.stack(x), *outs),
    jax.tree.map(lambda *x: jnp.stack(x, axis=1), *mets),
  )
