"""The LMO framework's own measurement: fit the dynamic mixing law on branches forked from a checkpoint,
and compare a method's implied A with it (Chen et al. 2024, Aioli: the fidelity sim(Ã, A⋆) of §4 and Fig. 3).

  python -m experiments.aioli_fidelity --workdir=RUN --step=T [--branch_steps=20] [--out=fid.json]

From RUN's full checkpoint at step T (params + optimizer state), K branches each train
`--branch_steps` steps on their own static mixture p^(k) (m=2: p1 = 0, 0.1, ..., 1 as the paper; m>2:
the m one-hots plus a Dirichlet cover, 11 in all), all at once (vmap inside scan over copies of the
state, `lib/mixing_laws.run_branches`). Their per-group validation losses give A⋆ by
`fit_dynamic_law` (L-BFGS + Huber). Every method whose update implies LMO parameters logs them as
`mixture/A/<i>/<j>` (lib/mixing_laws.implied_A: Aioli's Â, DoReMi's diag(excess), DoGE's gradient
inner products with the validation gradient, Skill-It's graph times its windowed losses); the fidelity
sim(Ã, A⋆) of the last Ã logged at or before T is reported, with the run's method. Writes a JSON with
A⋆, the fit's MSE/R², the branch losses and the fidelity.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import ml_collections as mlc
import numpy as np

from lib import ckpt as C
from lib import mixing_laws, optim, sharding, steps
from lib import model as M
from lib.errors import LmtraceError


def branch_mixtures(m: int, seed: int = 0) -> np.ndarray:
  """The paper's 11 mixtures for m=2; for m>2 the one-hots plus a Dirichlet cover (11 in all)."""
  if m == 2:
    x = np.linspace(0.0, 1.0, 11)
    return np.stack([x, 1 - x], 1)
  return np.vstack([np.eye(m), mixing_laws.dirichlet_cover(m, max(11 - m, 1), seed=seed)])


def _restore(workdir: str, step: int, model, tx):
  import orbax.checkpoint as ocp

  shapes, _ = M.abstract_params(model)
  opt_shapes = jax.eval_shape(tx.init, shapes)
  for sub in (C.ANALYSIS_DIR, C.RESUME_DIR):
    d = os.path.join(os.path.abspath(workdir), sub, str(step))
    if os.path.isdir(os.path.join(d, "opt_state")):
      mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), sub))
      out = mngr.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(shapes), opt_state=ocp.args.StandardRestore(opt_shapes))
      )
      mngr.close()
      one = jax.devices()[0]  # branches and their evaluation run on one device, whatever the run's mesh
      return jax.device_put(out["params"], one), jax.device_put(out["opt_state"], one)
  raise LmtraceError(
    f"{workdir} has no full checkpoint (params + optimizer state) at step {step}; steps: {sorted(C.available_steps(workdir))}"
  )


def branch_sweep(workdir: str, step: int, branch_steps: int, mixtures=None, vectorise: bool = True) -> dict:
  """Forks K branches from `workdir`'s checkpoint at `step`; returns ℓ, P, L and the dynamic-law fit."""
  import train
  from data import pipeline as dp
  from data import sources

  cfg = mlc.ConfigDict(C.read_config(workdir))
  groups = sources.make_groups(cfg.data)
  names, m = [g.name for g in groups], len(groups)
  if m < 2:
    raise LmtraceError(f"{workdir} trains on one data group; a mixing law needs at least two")
  mcfg = M.ModelConfig(**{k: v for k, v in cfg.model.items() if k != "preset"})
  model = M.make(mcfg)
  tx, sched = optim.make_optimizer(cfg.opt, cfg.train.steps)
  params, opt_state = _restore(workdir, step, model, tx)
  mesh = sharding.single_device_mesh()
  B, L = cfg.train.batch_size, cfg.data.seq_len
  pipe = dp.Pipeline(
    [sources.select_split(g, "train") for g in groups],
    seed=cfg.data.seed if cfg.data.seed >= 0 else cfg.seed,
    global_batch=B,
    seq_len=L,
    rows=(0, B),
    docs_per_row=cfg.data.docs_per_row if cfg.data.packing else 1,
    objective=cfg.data.objective,
    vocab_size=groups[0].vocab_size,
    group_names=names,
  )
  P = np.asarray(mixtures if mixtures is not None else branch_mixtures(m, cfg.seed), np.float64)
  batches = [[pipe.batch(step + s, P[k]) for k in range(len(P))] for s in range(branch_steps)]
  batches = jax.tree.map(lambda *x: np.stack(x), *[jax.tree.map(lambda *y: np.stack(y), *row) for row in batches])
  state = {
    "params": params,
    "opt_state": opt_state,
    "step": np.asarray(step, np.int32),
    "rng": jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1),
    "mixture": {},
  }
  fn = functools.partial(steps.train_step, model=model, tx=tx, schedule=sched, num_groups=m)
  out, _ = mixing_laws.run_branches(fn, state, batches, vectorise=vectorise)
  eval_sets = dp.held_out_batches(groups, "validation", cfg, mesh)
  p_eval = jax.jit(functools.partial(steps.eval_step, model=model, num_groups=m))

  def losses(p):
    em = train.run_eval(p_eval, p, eval_sets, names)
    return np.array([em[f"eval/{n}/loss"] for n in names])

  ell = losses(params)
  Lk = np.stack([losses(jax.tree.map(lambda x, k=k: x[k], out["params"])) for k in range(len(P))])
  fit = mixing_laws.fit_dynamic_law(ell, P, Lk)
  return {"groups": names, "step": step, "branch_steps": branch_steps, "ell": ell, "P": P, "L": Lk, **fit}


def logged_A(workdir: str, step: int, names) -> np.ndarray | None:
  """The last implied A (Aioli's Â, DoReMi's, DoGE's, Skill-It's) logged at or before `step` (None if the run logged none)."""
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  key = f"mixture/A/{names[0]}/{names[0]}"
  rows = [r for r in rows if key in r and r["step"] <= step]
  if not rows:
    return None
  return np.array([[rows[-1][f"mixture/A/{a}/{b}"] for b in names] for a in names])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--step", type=int, required=True, help="checkpoint step to branch from (needs a full checkpoint)")
  ap.add_argument("--branch_steps", type=int, default=20)
  ap.add_argument("--out", default="", help="JSON output path (default: print only)")
  a = ap.parse_args(argv)
  try:
    res = branch_sweep(a.workdir, a.step, a.branch_steps)
  except LmtraceError as e:
    print(f"aioli_fidelity: error: {e}", file=sys.stderr)
    return 2
  A_hat = logged_A(a.workdir, a.step, res["groups"])
  res["fidelity"] = mixing_laws.fidelity(A_hat, res["A"]) if A_hat is not None else None
  res["A_method"] = A_hat
  res["method"] = C.read_config(a.workdir).get("mixture", {}).get("method", "")
  text = json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in res.items()}, indent=1)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
