"""Synthetic-language speed: sampling and exact likelihoods of the default PCFG and HMM (timing lives
here, not in tests; the suite's old wall-clock bounds are printed beside each row for reference).

  python -m bench.languages
  python -m bench.languages --repeats=5

Rows (median of --repeats, after one warm-up call): PCFG.sample of 100k sentences (old test bound
10 s), PCFG.token_logprobs_batch of 20 sentences (old bound 3 s), PCFG.token_logprobs_batch of 200,
HMM.sample of 100k and HMM.token_logprobs of 1000 sentences. Prints the load average: on a shared
machine the numbers are upper bounds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from data.hmm import HMM
from data.pcfg import PCFG


def _time(fn, repeats: int) -> float:
  fn()
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  with open("/proc/loadavg") as f:
    print(f"load average: {' '.join(f.read().split()[:3])}", flush=True)
  pcfg, hmm = PCFG.random(seed=0), HMM.random(seed=0)
  s20, s200 = pcfg.sample(20, seed=7), pcfg.sample(200, seed=7)
  h1000 = hmm.sample(1000, seed=7)[0]
  rows = [
    ("PCFG.sample(100_000)", lambda: pcfg.sample(100_000, seed=0), 10.0),
    ("PCFG.token_logprobs_batch(20 sentences)", lambda: pcfg.token_logprobs_batch(s20), 3.0),
    ("PCFG.token_logprobs_batch(200 sentences)", lambda: pcfg.token_logprobs_batch(s200), None),
    ("HMM.sample(100_000)", lambda: hmm.sample(100_000, seed=0), None),
    ("HMM.token_logprobs(1000 sentences)", lambda: hmm.token_logprobs(h1000), None),
  ]
  for name, fn, bound in rows:
    t = _time(fn, args.repeats)
    old = f"  (old test bound {bound:g} s)" if bound else ""
    print(f"{name:45s} {t * 1e3:10.1f} ms{old}", flush=True)


if __name__ == "__main__":
  main()
