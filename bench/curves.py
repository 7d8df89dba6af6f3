"""Benchmark: every Chang and Xia learning-curve metric on synthetic per-token curves.

Shapes: R runs, T tokens, C checkpoints (Chang's 222-step exponential schedule,
step 0 included), N tokens of one generated chunk.

  python -m bench.curves                      # 1M tokens x 222 checkpoints x 5 runs
  python -m bench.curves --tokens 20000       # quick mode

Curves are generated lazily chunk by chunk (``SyntheticCurves``), so the 4.4 GB
surprisal tensor of the full size is never materialised; generation time is reported
separately ("read") and excluded from the metric total.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from analysis import curves as cv  # noqa: E402

CHANCE_BITS = float(-np.log2(1.0 / 50_004))  # Chang's chance surprisal, 15.61 bits


class SyntheticCurves:
  """Lazy R x T x C float32 surprisal array (bits) with realistic curve shapes.

  Per token: a sigmoid drop from ~chance to a learned level (random midpoint and
  width in log10 steps), plus for some tokens a forgetting bump, a late rise, or no
  learning at all; runs share the token's shape with small per-run shifts; noise sd
  varies per token. Only ``x[:, a:b, :]`` indexing is supported, which is all
  ``token_metrics`` needs; a chunk is reproducible from (seed, a, b).
  """

  def __init__(self, n_runs: int, n_tokens: int, steps_C: np.ndarray, seed: int = 0) -> None:
    self.shape = (n_runs, n_tokens, len(steps_C))
    self.steps_C = np.asarray(steps_C)
    self.seed = seed
    self.gen_seconds = 0.0

  def __getitem__(self, key: tuple) -> np.ndarray:
    t0 = time.perf_counter()
    runs, toks, ckpts = key
    if runs != slice(None) or ckpts != slice(None) or not isinstance(toks, slice):
      raise IndexError("SyntheticCurves only supports x[:, a:b, :]")
    a, b, _ = toks.indices(self.shape[1])
    out = self._generate(a, b)
    self.gen_seconds += time.perf_counter() - t0
    return out

  def _generate(self, a: int, b: int) -> np.ndarray:
    n_runs, _, n_c = self.shape
    n = b - a
    rng = np.random.default_rng([self.seed, a, b])
    x_C = np.log10(np.maximum(self.steps_C, 1)).astype(np.float32)
    hi_N = CHANCE_BITS - np.abs(rng.normal(0, 0.5, n))
    lo_N = rng.uniform(1.0, 10.0, n)
    lo_N = np.where(rng.random(n) < 0.1, hi_N - rng.uniform(0, 1.5, n), lo_N)  # unlearned
    xmid_N = rng.uniform(2.3, 5.5, n)
    width_N = rng.uniform(0.05, 0.6, n)
    bump_N = np.where(rng.random(n) < 0.15, rng.uniform(0.5, 3.0, n), 0.0)  # forgetting
    bump_at_N = rng.uniform(3.5, 5.8, n)
    late_N = np.where(rng.random(n) < 0.1, rng.uniform(0.5, 2.0, n), 0.0)  # late rise
    noise_N = rng.uniform(0.2, 1.5, n)
    out = np.empty((n_runs, n, n_c), np.float32)
    for r in range(n_runs):
      xm = (xmid_N + rng.normal(0, 0.1, n))[:, None]
      lo = (lo_N + rng.normal(0, 0.3, n))[:, None]
      z = (x_C[None, :] - xm) / width_N[:, None]
      curve = hi_N[:, None] + (lo - hi_N[:, None]) / (1.0 + np.exp(-z))
      curve += bump_N[:, None] * np.exp(-0.5 * ((x_C[None, :] - bump_at_N[:, None]) / 0.2) ** 2)
      curve += late_N[:, None] * np.clip(x_C[None, :] - 5.3, 0, None)
      curve += noise_N[:, None] * rng.standard_normal((n, n_c), dtype=np.float32)
      out[r] = np.clip(curve, 0.0, None)
    return out


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--tokens", type=int, default=1_000_000)
  ap.add_argument("--checkpoints", type=int, default=222)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--chunk", type=int, default=cv.CHUNK)
  ap.add_argument("--rank-subsample", type=int, default=10_000)
  ap.add_argument("--no-sigmoid", action="store_true", help="skip the sigmoid AoA fits")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)

  steps_C = cv.chang_checkpoint_steps(args.checkpoints)
  data = SyntheticCurves(args.runs, args.tokens, steps_C, args.seed)
  n_curves = args.runs * args.tokens
  print(
    f"lmtrace curve metrics: R={args.runs} runs x T={args.tokens:,} tokens x "
    f"C={args.checkpoints} checkpoints (steps {steps_C[0]}..{steps_C[-1]}), "
    f"chunk={args.chunk:,}, rank subsample={args.rank_subsample:,}, cpus={os.cpu_count()}"
  )
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  df = cv.token_metrics(
    data,
    steps_C,
    CHANCE_BITS,
    unit="bits",
    sigmoid=not args.no_sigmoid,
    rank_subsample=args.rank_subsample,
    chunk=args.chunk,
    seed=args.seed,
    timings=timings,
  )
  wall = time.perf_counter() - t0
  gen = data.gen_seconds
  total = wall - gen
  print("\nper-metric wall time (s):")
  labels = {
    "final_and_var": "final surprisal + within-run variability",
    "gam_fit": "GAM smoothing, GCV over 11 lambdas per curve",
    "aoa_gam": "GAM AoA (1000-point grid)",
    "forgettability": "forgettability",
    "aoa_sigmoid": "sigmoid AoA (batched LM)",
    "trend": "Xia trend classes (OLS + stagnation)",
    "crossrun_var": "cross-run variability (GAM + raw)",
    "rank_similarity": f"rank similarity (S={min(args.rank_subsample, args.tokens):,}, all pairs)",
    "frame": "DataFrame assembly",
  }
  for key, label in labels.items():
    if key in timings:
      print(f"  {label:<52s} {timings[key]:9.2f}")
  print(f"  {'synthetic data generation (excluded)':<52s} {gen:9.2f}")
  other = total - sum(v for k, v in timings.items() if k != "read")
  print(f"  {'other (chunk reads, bookkeeping)':<52s} {other:9.2f}")
  print(f"\ntotal (excluding data generation): {total:.1f} s = {total / 60:.2f} min")
  print(f"throughput: {args.tokens / total:,.0f} tokens/s, {n_curves / total:,.0f} curves/s")
  if "aoa_sigmoid" in timings:
    print(f"sigmoid fits: {n_curves / timings['aoa_sigmoid']:,.0f} curves/s")
  print(
    f"\nreference cost: Chang's code fits one pyGAM LinearGAM gridsearch (11 PIRLS fits) "
    f"per curve in a Python loop, twice (get_gam_curves and get_gam_aoas), plus one scipy "
    f"curve_fit per curve: {n_curves:,} curves -> {2 * n_curves:,} pyGAM gridsearches and "
    f"{n_curves:,} curve_fits; Xia's fits one statsmodels OLS per token per threshold. "
    f"Not measured here (pyGAM is not installed)."
  )
  cls = df["trend_class"].to_numpy()
  print("\nsanity: trend class fractions (run 0):", cv.class_fractions(cls))
  print(
    "sanity: median final surprisal {:.2f}, median AoA gam {:.2f} / sigmoid {:.2f} log10 steps, flagged rows {}".format(
      np.nanmedian(df["final_surprisal"]),
      np.nanmedian(df["aoa_gam"]),
      np.nanmedian(df["aoa_sigmoid"]),
      int((df["flags"] != 0).sum()),
    )
  )


if __name__ == "__main__":
  main()
