"""What a single run (train.py) and a seed-vectorised group (train_group.py) share: the run's setup
(mesh, data groups, model, optimizer, state shardings and init, pipelines, held-out batches), the
workdir's identity check, the held-out evals, and the trainer's own hooks on the step loop
(lib/trainloop.py), registered in one place (`standard_hooks`): the validation eval, the mixing
controller's update, the in-training probes and the end-of-run test-split rows.

Both Runs objects (train.SingleRun, train_group.GroupRuns) offer what these hooks use:
`eval_runs(params, batches=None) -> [metrics per run]` (None: the validation sets),
`write(step, rows, show=False)` (one dict for every run, or one per run) and `tokens_seen(step)`.
Lives beside train.py because it needs data/ and analysis/ (lib/ may not import them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from data import pipeline as dp
from data import sources
from lib import ckpt as C
from lib import mixture, optim, sharding, steps
from lib import model as M
from lib.trainloop import Hook, Loop, StepInfo, timed

IDENTITY_SECTIONS = ("model", "data", "seed")  # must match to resume in an existing workdir
INFORMATIONAL_KEYS = ("preset", "num_threads", "data_dir")  # may differ on resume
EXECUTION_KEYS = ("remat", "scan_layers", "loss_chunk", "attn_chunk")  # model keys that change memory and time, not the function


def model_changes(old: dict, new: dict) -> list[str]:
  """The model keys whose values differ between two runs' configs, leaving out what may differ: keys that
  only trade memory for time (EXECUTION_KEYS) and informational ones. A field added to ModelConfig since
  `old` was written counts as its default (the value that keeps the old model)."""
  old = {f.name: f.default for f in dataclasses.fields(M.ModelConfig) if f.name in new} | old
  skip = INFORMATIONAL_KEYS + EXECUTION_KEYS
  return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in skip]


def check_workdir(workdir: str, cfg_dict: dict) -> None:
  """Refuses to resume a run whose model, data or seed differ from this config's. Model keys that only trade
  memory for time (remat, chunking) may change on resume, e.g. after running out of memory."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  old = C.read_json(path, "the run's config as trained")
  if not isinstance(old, dict):
    raise C.CheckpointError(f"{path} (the run's config as trained) is damaged: a {type(old).__name__}, not a JSON object")
  diffs = []
  for sec in IDENTITY_SECTIONS:
    a, b = old.get(sec), cfg_dict.get(sec)
    if isinstance(a, dict) and isinstance(b, dict):
      changed = model_changes(a, b) if sec == "model" else [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
      diffs += [f"{sec}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed if k not in INFORMATIONAL_KEYS]
    elif a != b:
      diffs.append(f"{sec}: {a!r} -> {b!r}")
  if diffs:
    raise C.CheckpointError(
      f"workdir {workdir} holds a run with a different {', '.join(sorted({d.split('.')[0].split(':')[0] for d in diffs}))} "
      f"({'; '.join(diffs[:6])}). Use a new --workdir, or delete {workdir} to start over."
    )


def claim_workdir(workdir: str, cfg_dict: dict) -> dict | None:
  """Refuses a workdir of another run; writes config.json into a new one. Returns the old config (None: new)."""
  check_workdir(workdir, cfg_dict)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    return C.read_config(workdir)
  if jax.process_index() == 0:
    C.save_json(path, cfg_dict)
  return None


def state_shardings(model, tx, mesh):
  """Abstract train state and its shardings (optimizer moments follow their parameters)."""
  params_sh = M.param_shardings(model, mesh)
  shapes, _ = M.abstract_params(model)
  opt_shapes = jax.eval_shape(tx.init, shapes)
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(
    tx, lambda o, p, s: s if o.shape == p.shape else repl, opt_shapes, shapes, params_sh, transform_non_params=lambda _: repl
  )
  state_sh = {"params": params_sh, "opt_state": opt_sh, "step": repl, "rng": repl}
  return state_sh


@dataclasses.dataclass
class Setup:
  """The parts of a run that do not depend on its workdir or seed (`build`), and their constructors."""

  cfg: object
  mesh: object
  groups: list
  mcfg: M.ModelConfig
  model: object
  tx: object
  sched: object
  controller: mixture.Controller
  state_sh: dict
  cfg_dict: dict  # the run card as config.json records it (the model section resolved)

  @classmethod
  def build(cls, cfg, *, mixture_seed: int = 0) -> Setup:
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(mesh, cfg.train.batch_size, "train.batch_size")
    sharding.check_batch(mesh, cfg.eval.batch_size, "eval.batch_size")
    # Data: groups of random-access sources; the batch at step s is a pure function of (seed, s, p).
    with timed("open_data"):
      groups = sources.make_groups(cfg.data)
    mcfg = M.ModelConfig.for_run(cfg, groups[0].vocab_size)
    model = M.make(mcfg)
    cfg_dict = json.loads(cfg.to_json_best_effort())
    cfg_dict["model"] = dict(vars(mcfg), preset=cfg.model.get("preset", ""))
    tx, sched = optim.make_optimizer(cfg.opt, cfg.train.steps)
    controller = mixture.make(cfg.mixture, [g.name for g in groups], seed=mixture_seed)
    state_sh = state_shardings(model, tx, mesh)
    state_sh["mixture"] = jax.tree.map(lambda _: sharding.replicated(mesh), controller.init())
    return cls(cfg, mesh, groups, mcfg, model, tx, sched, controller, state_sh, cfg_dict)

  @property
  def names(self) -> list[str]:
    return [g.name for g in self.groups]

  def init_state(self, key):
    """The fresh train state of the run with seed s (key = PRNGKey(s)); unjitted, unsharded."""
    dummy = M.dummy_batch(self.mcfg, 1, 8)
    params = nn.unbox(self.model.init(key, *(dummy[k] for k in ("inputs", "positions", "segment_ids")))["params"])
    return {
      "params": params,
      "opt_state": self.tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.fold_in(key, 1),
      "mixture": jax.tree.map(jnp.asarray, self.controller.init()),
    }

  def restore_target(self):
    """One run's state as sharded ShapeDtypeStructs (what a checkpoint restores into)."""
    abstract = jax.eval_shape(self.init_state, jax.random.PRNGKey(0))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.state_sh)

  def pipeline(self, seed: int, train_sources=None) -> dp.Pipeline:
    """This process's rows of the training batches in data order `seed` (`train_sources`: another
    pipeline's, so several orders read one decoded split)."""
    cfg = self.cfg
    lo, hi = sharding.local_rows(self.mesh, cfg.train.batch_size)
    with timed("pipeline"):
      return dp.Pipeline(
        train_sources or [sources.select_split(g, "train") for g in self.groups],
        seed=seed,
        global_batch=cfg.train.batch_size,
        seq_len=cfg.data.seq_len,
        rows=(lo, hi),
        docs_per_row=cfg.data.docs_per_row if cfg.data.packing else 1,
        objective=cfg.data.objective,
        vocab_size=self.groups[0].vocab_size,
        group_names=self.names,
        cache_tokens=cfg.data.cache_tokens,
        group_rows=cfg.mixture.get("rows", "exact"),
      )

  def held_out(self, split: str) -> list:
    """The global eval batches of `split` ('validation' or 'test')."""
    return dp.held_out_batches(self.groups, split, self.cfg, self.mesh)

  def loop(self, stop_requested, hooks) -> Loop:
    """The step loop of this run card (train.steps, train.stop_at, train.log_every) with `hooks`."""
    t = self.cfg.train
    loop = Loop(total=t.steps, log_every=t.log_every, stop=min(t.steps, t.stop_at or t.steps), stop_requested=stop_requested)
    for h in hooks:
      loop.add_hook(h)
    return loop


def run_eval(p_eval, params, eval_sets, names, extra=None) -> dict:
  """Validation metrics over `eval_sets`; `extra(params) -> dict` adds more (e.g. Liu's exact MLM loss)."""
  total = None
  for batch in eval_sets:
    s = jax.tree.map(np.asarray, p_eval(params, batch))
    if total is None:
      total = s
    else:  # groups without exact log-probs (text) drop the optimum for the whole set
      total = {k: total[k] + s[k] for k in total.keys() & s.keys()}
  m = steps.finish_eval(total, names)
  if extra is not None:
    m.update(extra(params))
  return m


def test_metrics(em: dict, names) -> dict:
  """The test-split row from the eval metrics `em` of the test batches. test/avg_ppl is the unweighted
  mean of the groups' perplexities."""
  out = {"test/" + k.removeprefix("eval/"): v for k, v in em.items()}
  ppl = [float(np.exp(out.get(f"test/{n}/loss", out["test/loss"]))) for n in names]
  out.update({f"test/{n}/ppl": v for n, v in zip(names, ppl)})
  out["test/ppl"], out["test/avg_ppl"] = float(np.exp(out["test/loss"])), float(np.mean(ppl))
  return out


# ----------------------------------------------------------------------------------------------
# The trainer's hooks


def validation(info: StepInfo) -> list[dict]:
  """Every run's validation metrics at this step, computed once per step (the eval row and a mixing
  controller share them) and written as the step's eval rows."""
  if "eval" not in info.cache:
    info.cache["eval"] = info.runs.eval_runs(info.params)
    info.runs.write(info.step, info.cache["eval"], show=True)
  return info.cache["eval"]


def observe_mixture(mix: mixture.MixtureRunner, info: StepInfo):
  """The mixing controller's update from this step's validation eval; returns the state with the new
  mixture state (a single run's: the group trains static mixtures only)."""
  return mix.observe(info.step, validation(info)[0], info.state)


def test_rows(setup: Setup, info: StepInfo) -> None:
  """Per-group TEST-split loss and perplexity of every run at the end of training (controllers only ever
  see the validation split; the test split is what is reported, as in the Aioli paper)."""
  ems = info.runs.eval_runs(info.params, setup.held_out("test"))
  info.write([test_metrics(em, setup.names) for em in ems])


def standard_hooks(setup: Setup, *, mix: mixture.MixtureRunner | None = None, workdir: str | None = None) -> list[Hook]:
  """The trainer's hooks in firing order: the validation eval (every eval.every steps and at the last
  step), the mixing controller's update (`mix`: at the steps it asks for), the in-training probes
  (probes.enabled: a single run in `workdir`), the test-split rows (at the last step, if eval.test_at_end
  and every data group has a test split; a rerun of a finished run writes no second row)."""
  cfg, hooks = setup.cfg, []
  if cfg.eval.every:
    hooks.append(Hook(validation, every=cfg.eval.every, at_total=True, row_first=True, name="eval"))
  if mix is not None and mix.multi:
    hooks.append(
      Hook(functools.partial(observe_mixture, mix), when=mix.wants_eval, row_first=True, updates_state=True, name="mixture")
    )
  if cfg.probes.enabled:
    from analysis import probes

    rec = probes.ProbeHook(workdir, cfg, setup.model, setup.mesh, cfg.train.steps)
    hooks.append(Hook(lambda i: rec.maybe_record(i.step, i.params, i.runs.tokens_seen(i.step)), every=1, name="probes"))
  if cfg.eval.test_at_end and all("test" in g.splits for g in setup.groups):
    hooks.append(Hook(functools.partial(test_rows, setup), at_total=True, row_first=True, name="test"))
  return hooks
