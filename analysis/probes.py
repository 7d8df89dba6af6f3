"""The probe engine: probe sets of a run's data, their surprisal at a checkpoint, the in-training
`ProbeHook` and offline extraction over a run's checkpoints into its store.

Chang et al. 2023 (seeds) and Xia et al. 2022 (sizes) track -log p(w_t | w_<t) of a fixed set of
held-out tokens over many checkpoints. Here a *probe set* is a list of (document, position) pairs
from the run's validation split. Position p is the p-th *target* of a framed document
[BOS w_1 .. w_n EOS]: position 0 predicts w_1 from BOS alone, position n predicts EOS; a probe at
position p has context length p + 1 (BOS included). With `positions=K > 0`, K distinct positions per
document are drawn from 1..n (Chang's "never position 0": the first word, conditioned on nothing but
BOS, is skipped), seeded by (seed, group, document) so a larger `sequences` keeps the earlier probes;
documents with at most K such positions contribute all of them. `positions=0` takes every position,
0 included. Documents longer than `data.seq_len` targets are cut there (as in training).

The forward pass runs over the documents *packed* several to a row with segment ids and per-document
positions (`ProbeSet.packed`, as training packs them), so a probe's context is still exactly its own
document while few positions are padding; the surprisals equal the one-document-per-row ones.

The offline job and the in-training `ProbeHook` share `build_probe_set` and `SurprisalFn` (one jitted
per_token_loss over the same rows), so both routes give the same numbers. A checkpoint that cannot be
restored (`lib.errors.CheckpointError`) or whose surprisals are not finite is recorded as invalid with
its reason (`Store.invalid`), never stored as a result, and retried by the next run.

Shape legend: T probe tokens, S probe documents, P packed rows, L row length (data.seq_len),
B rows per batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Iterable, Sequence

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from analysis.probe_store import ROW_FIELDS, STORE, IncompatibleProbes, ProbeSet, ProbeSpec, Store, incompatibility
from data import pipeline as dp
from data import sources
from lib import ckpt as C
from lib import errors, schedules, sharding
from lib import model as M

DEFAULT_BATCH = 64


# ----------------------------------------------------------------------------------------------
# Probe sets


def _tokenizer_id(group: sources.Group, spec) -> dict:
  spec = dict(spec) if spec is not None else {}
  return {
    "group": group.name,
    "kind": spec.get("kind", group.info.get("kind", "")),
    "tokenizer": str(spec.get("tokenizer", "")),
    "vocab_size": int(group.vocab_size),
  }


def read_docs(source, n: int) -> list[dict]:
  """The first n documents, in batched reads where the source supports them (40x faster on TFDS)."""
  n = min(n, len(source))
  if hasattr(source, "__getitems__"):
    out = []
    for a in range(0, n, 1024):
      out += source.__getitems__(list(range(a, min(a + 1024, n))))
    return out
  return [source[i] for i in range(n)]


def build_probe_set(data_cfg, spec: ProbeSpec, seq_len: int | None = None) -> ProbeSet:
  """The probe set of a run's `data` config section (rebuilds or opens its TFDS data)."""
  if data_cfg.get("objective", "clm") != "clm":
    raise errors.ConfigError(f"per-token trajectories need a causal LM objective, not data.objective={data_cfg.objective!r}")
  L = int(seq_len or data_cfg.seq_len)
  groups = sources.make_groups(data_cfg)
  group_cfg = data_cfg.get("groups") or {}
  specs = dict(group_cfg) if len(group_cfg) else {"main": data_cfg.source}
  rows, doc_S, group_S, row_T, pos_T, true_T = [], [], [], [], [], []
  for gi, g in enumerate(groups):
    for di, d in enumerate(read_docs(sources.select_split(g, "validation"), spec.sequences)):
      row, _ = dp.pack([d], L)
      n = int(row["mask"].sum())
      if spec.positions > 0:
        cand = np.arange(1, n)
        if cand.size > spec.positions:
          rng = np.random.default_rng([spec.seed, gi, di, 0x9B0E])
          cand = np.sort(rng.choice(cand, spec.positions, replace=False))
      else:
        cand = np.arange(n)
      s = len(rows)
      rows.append(row)
      doc_S.append(di)
      group_S.append(gi)
      row_T.append(np.full(cand.size, s, np.int32))
      pos_T.append(cand.astype(np.int32))
      tl = row.get("true_logprob")
      true_T.append(tl[cand].astype(np.float32) if tl is not None else np.full(cand.size, np.nan, np.float32))
  if not rows:
    raise dp.DataError("the validation split is empty: no probe documents")
  stacked = {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in ROW_FIELDS}
  return ProbeSet(
    spec,
    stacked,
    np.asarray(doc_S, np.int32),
    np.asarray(group_S, np.int32),
    np.concatenate(row_T),
    np.concatenate(pos_T),
    np.concatenate(true_T),
    int(groups[0].vocab_size),
    [_tokenizer_id(g, specs.get(g.name)) for g in groups],
    [g.name for g in groups],
  )


# ----------------------------------------------------------------------------------------------
# The shared surprisal computation


def _loss(model, params, batch):
  return M.per_token_loss(model, params, batch)


class SurprisalFn:
  """surprisal_T (float32 nats) of a probe set for params on `mesh`: one jitted per_token_loss over
  batches placed on the mesh once, so successive checkpoints never recompile or re-transfer data.

  packed=True (default) runs the packed rows (several documents per row, `ProbeSet.packed`);
  packed=False the one-document-per-row layout (kept for the benchmark and the equality test)."""

  def __init__(self, model, probes: ProbeSet, mesh, batch_size: int = DEFAULT_BATCH, packed: bool = True):
    self.model, self.probes, self.mesh = model, probes, mesh
    rows = probes.packed.rows if packed else probes.rows
    self.index_T = probes.packed_index() if packed else (probes.row_T, probes.position_T)
    n_dp = sharding.batch_size_per_shard(mesh)
    S = rows["inputs"].shape[0]
    self.num_rows = S
    self.B = B = max(n_dp, -(-min(int(batch_size), S) // n_dp) * n_dp)
    S_pad = -(-S // B) * B
    padded = {k: np.concatenate([v, np.zeros((S_pad - S, v.shape[1]), v.dtype)]) for k, v in rows.items()}
    sh = sharding.batch_sharding(mesh)
    self.batches = []
    for a in range(0, S_pad, B):
      self.batches.append(
        {k: jax.make_array_from_callback((B, v.shape[1]), sh, lambda idx, x=v[a : a + B]: x[idx]) for k, v in padded.items()}
      )
    self.fn = jax.jit(functools.partial(_loss, model), out_shardings=sharding.replicated(mesh))
    self._compiled = None

  def compile_for(self, params_abstract) -> None:
    """Compiles ahead of time for params of exactly this abstract tree (shapes, dtypes, shardings;
    `lib.ckpt.params_target`), so the compile can run while the first checkpoint is restored. Params
    with other shardings must not be passed afterwards (the compiled program refuses them)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
      self._compiled = self.fn.lower(params_abstract, self.batches[0]).compile()

  def __call__(self, params) -> np.ndarray:
    fn = self._compiled or self.fn
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
      outs = [fn(params, b) for b in self.batches]  # dispatch all, then fetch them in one transfer
      loss_SxL = np.concatenate(jax.device_get(outs))
    return loss_SxL[self.index_T].astype(np.float32)


def nonfinite_reason(surprisal_T: np.ndarray) -> str | None:
  """Why a surprisal vector is not a valid result (None if every value is finite)."""
  bad = int(np.size(surprisal_T) - np.isfinite(surprisal_T).sum())
  return (
    f"{bad} of {np.size(surprisal_T)} probe surprisals are not finite (NaN/inf): the parameters are damaged or diverged"
    if bad
    else None
  )


# ----------------------------------------------------------------------------------------------
# Shared record metadata


def _run_info(workdir: str, run_cfg: dict, model, name: str | None) -> dict:
  return {
    "run": name or os.path.basename(os.path.abspath(workdir).rstrip("/")),
    "workdir": os.path.abspath(workdir),
    "seed": int(run_cfg.get("seed", 0)),
    "n_params": int(C.param_count(model.cfg)),  # = M.param_count(model), traced once per config
    "preset": run_cfg.get("model", {}).get("preset", ""),
  }


def _record(
  info: dict, step: int, tokens_seen: int, surprisal_T: np.ndarray, source: str, fingerprint: str, mesh, batch: int
) -> dict:
  loss = float(np.mean(surprisal_T, dtype=np.float64))
  return dict(
    info,
    step=int(step),
    tokens_seen=int(tokens_seen),
    flops=6.0 * info["n_params"] * float(tokens_seen),
    probe_loss=loss,
    probe_ppl=float(math.exp(loss)),
    source=source,
    fingerprint=fingerprint,
    mesh=dict(mesh.shape),
    batch_rows=int(batch),
    time=time.time(),
  )


def _call(fn, *args, **kw):
  return fn(*args, **kw)


def _store_result(st: Store, step: int, surprisal_T: np.ndarray, row: dict, submit=_call) -> str | None:
  """Writes a valid result, or an invalid marker when a surprisal is not finite; returns the reason.
  `submit` runs the write (default: now; extraction passes its background writer's)."""
  why = nonfinite_reason(surprisal_T)
  if why:
    submit(st.write_invalid, step, why, source=row["source"], time=time.time(), probe_loss=row["probe_loss"])
  else:
    submit(st.write, step, surprisal_T, row)
  return why


# ----------------------------------------------------------------------------------------------
# In-training hook


class ProbeHook:
  """Records probe surprisals during training at the steps of `probes.schedule` (source='hook').

  The trainer's probe hook (trainer.py) calls `maybe_record(step, params, tokens_seen)` after every step
  (step 0 = init) with the params sharded on the training mesh; recorded steps are skipped, so a resumed
  run adds only new ones.
  """

  def __init__(
    self,
    workdir: str,
    cfg,
    model,
    mesh,
    total_steps: int,
    *,
    store: str = STORE,
    batch_size: int = DEFAULT_BATCH,
    name: str | None = None,
  ):
    self.steps = set(schedules.analysis_steps(schedules.parse_schedules(cfg.probes.schedule), total_steps))
    self.probes = build_probe_set(cfg.data, ProbeSpec.from_config(cfg.probes))
    self.store = Store.of(workdir, store)
    self.store.init_probes(self.probes, write=jax.process_index() == 0)
    self.fingerprint = self.probes.meta()["fingerprint"]
    self.fn = SurprisalFn(model, self.probes, mesh, batch_size)
    self.info = _run_info(workdir, json.loads(cfg.to_json_best_effort()), model, name)
    self.mesh = mesh

  def maybe_record(self, step: int, params, tokens_seen: int) -> bool:
    step = int(step)
    # Multi-host: every process must take the same branch (the computation is collective), and only
    # process 0 may see the store, so skip recorded steps only on one host.
    if step not in self.steps or (jax.process_count() == 1 and self.store.has(step)):
      return False
    s_T = self.fn(params)
    if jax.process_index() == 0:
      row = _record(self.info, step, tokens_seen, s_T, "hook", self.fingerprint, self.mesh, self.fn.B)
      _store_result(self.store, step, s_T, row)
    return True


# ----------------------------------------------------------------------------------------------
# Offline extraction


@dataclasses.dataclass
class Report:
  """What `extract` did: newly computed steps, steps already stored, and skipped (workdir, step,
  reason): missing checkpoints, and invalid ones (also recorded in the store, retried next time)."""

  workdirs: dict[str, str] = dataclasses.field(default_factory=dict)  # run name -> workdir
  computed: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  present: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  skipped: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
  invalid: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # run name -> steps marked invalid now
  setup_s: float = 0.0  # opening runs, building and checking probe sets
  loop_s: float = 0.0  # per run: placing probe batches, compiling once, then restore -> compute -> write
  phases: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase of the loop (`_PHASES`)


_PHASES = {
  "list": "list checkpoints + store steps (once per run)",
  "place": "place probe batches on the mesh",
  "compile": "compile (beside the first restore)",
  "wait_restore": "wait for a restore (not hidden behind compute)",
  "forward": "forward + fetch surprisals",
  "record": "check finiteness, build the row, queue the write",
  "wait_write": "wait for the store writes at the end",
  "restore_thread": "restore + verify + read meta (restore thread, overlapped)",
  "write_thread": "atomic store writes (writer thread, overlapped)",
}


@dataclasses.dataclass
class _Run:
  workdir: str
  name: str
  model: Any
  cfg: dict
  probes: ProbeSet


def open_run(workdir: str, spec_overrides: dict | None = None, name: str | None = None, store: str = STORE) -> _Run:
  """Model, config and probe set of a workdir. The probe spec is the store's if it exists (so a plain
  rerun resumes), else the run config's `probes` section; `spec_overrides` fields replace either."""
  model, _, cfg = C.load_model(workdir)
  c = ml_collections.ConfigDict(cfg)
  stored = Store.of(workdir, store).probe_meta()
  probes_cfg = stored["spec"] if stored else (cfg.get("probes") or dataclasses.asdict(ProbeSpec()))
  spec = ProbeSpec.from_config(probes_cfg, **(spec_overrides or {}))
  probes = build_probe_set(c.data, spec)
  return _Run(workdir, name or os.path.basename(os.path.abspath(workdir).rstrip("/")), model, cfg, probes)


def check_runs(runs: Sequence[_Run]) -> None:
  """Refuses runs whose probe sets differ, naming the reason."""
  ref = runs[0].probes.meta()
  for r in runs[1:]:
    why = incompatibility(ref, r.probes.meta())
    if why:
      raise IncompatibleProbes(f"cannot combine {runs[0].workdir} and {r.workdir}: {why}")


class _Restorer:
  """Params of successive checkpoints on `mesh`, through the one restore path
  (`lib.ckpt.restore_params_at`: the files are verified against the checkpoint's manifest, and an
  unreadable or damaged checkpoint raises CheckpointError). Every restore has the same shardings
  (`lib.ckpt.params_target`), so the surprisal function never recompiles. The run's config is read
  once; a caller that listed the workdir passes each step's subdir, so nothing is listed per step."""

  def __init__(self, workdir: str, model, mesh):
    self.workdir, self.mesh, self.mcfg = os.path.abspath(workdir), mesh, model.cfg

  def step_dir(self, step: int, sub: str | None = None) -> str:
    """W/<sub>/<step>; sub None: found by listing the workdir (CheckpointError if there is none)."""
    if sub is None:
      step = C.resolve_step(self.workdir, step)
      sub = C.available_steps(self.workdir)[step]
    return os.path.join(self.workdir, sub, str(int(step)))

  def __call__(self, step: int, sub: str | None = None):
    params = C.restore_params_at(self.step_dir(step, sub), self.mcfg, self.mesh)
    jax.block_until_ready(params)
    return params

  def with_meta(self, step: int, sub: str | None = None) -> tuple[Any, dict, float]:
    """(params, the checkpoint's meta, seconds taken): one job of the restore thread."""
    t = time.perf_counter()
    params = self(step, sub)
    return params, C.read_meta_at(self.step_dir(step, sub)), time.perf_counter() - t

  def close(self) -> None:
    pass


class _Writer:
  """Store writes in one background thread, in submission order, so the atomic writes (tmp file,
  fsync, rename: lib/io.py) overlap the next checkpoint's compute. Each record is still written the
  same way, one atomic file at a time (row, then vector; a killed job resumes exactly as before);
  `drain` waits for all of them and raises the first failure."""

  def __init__(self):
    self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="probe-store")
    self.futures: list[concurrent.futures.Future] = []
    self.busy_s = 0.0

  def submit(self, fn, *args, **kw) -> None:
    def job():
      t = time.perf_counter()
      try:
        fn(*args, **kw)
      finally:
        self.busy_s += time.perf_counter() - t

    self.futures.append(self.pool.submit(job))

  def drain(self) -> None:
    try:
      for f in self.futures:
        f.result()
    finally:
      self.futures = []

  def close(self) -> None:
    self.pool.shutdown(wait=True)


def parse_steps(text: str | Iterable[int] | None) -> list[int] | None:
  """'all' / None -> None (every analysis checkpoint); '0,100,200' -> [0, 100, 200]."""
  if text is None or (isinstance(text, str) and text.strip() in ("", "all")):
    return None
  if isinstance(text, str):
    try:
      return sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
      raise errors.ConfigError(f"--steps takes 'all' or comma-separated integers, got {text!r}") from None
  return sorted({int(s) for s in text})


def extract(
  workdirs: str | Sequence[str],
  *,
  steps=None,
  spec: dict | None = None,
  batch_size: int = DEFAULT_BATCH,
  mesh=None,
  names: Sequence[str] | None = None,
  store: str = STORE,
  progress: bool = True,
  prefetch: int = 2,
) -> Report:
  """Surprisal of the shared probe set at the checkpoints of each workdir, into its store.

  Streams checkpoint by checkpoint (restoring the next ones while the current one computes); steps
  already stored are skipped; missing checkpoints are listed in the report; checkpoints that cannot
  be restored or give non-finite surprisals are listed and recorded invalid in the store (a rerun
  retries them). `spec` overrides probe spec fields (sequences, positions, seed) of each run's
  store or config. `prefetch` restores run ahead in threads (Orbax's restore is mostly Python
  waiting on its own I/O threads, so two overlap: 51-77 -> 32-40 ms/ckpt on the bench's run); each
  holds one more copy of the params in memory.
  """
  from tqdm.auto import tqdm

  t0 = time.time()
  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  names = list(names or [])
  report = Report()
  runs = [open_run(w, spec, names[i] if i < len(names) else None, store) for i, w in enumerate(workdirs)]
  check_runs(runs)
  report.workdirs = {r.name: r.workdir for r in runs}
  t_loop = time.time()
  report.setup_s = t_loop - t0
  mesh = mesh or sharding.single_device_mesh()
  wanted = parse_steps(steps)
  phases = dict.fromkeys(_PHASES, 0.0)
  plans = []
  avails = [C.available_steps(r.workdir) for r in runs]
  for r, avail in zip(runs, avails):  # a request no checkpoint matches is refused before anything is written
    if wanted is not None and not set(wanted) & set(avail):
      near = sorted(sorted(avail, key=lambda a: min(abs(a - w) for w in wanted))[:3])
      raise errors.CheckpointError(
        f"{r.workdir} has no checkpoint at step(s) {wanted[:6]}{' ...' if len(wanted) > 6 else ''} "
        f"(nearest: {near}; {len(avail)} available); nothing written"
      )
  for r, avail in zip(runs, avails):
    st = Store.of(r.workdir, store)
    st.init_probes(r.probes)
    # 'all' = the analysis checkpoints (the run's kept schedule); resume ones come and go
    want = (sorted(s for s, sub in avail.items() if sub == C.ANALYSIS_DIR) or sorted(avail)) if wanted is None else wanted
    done = set(st.steps())
    report.present[r.name] = sorted(done & set(want))
    for s in want:
      if s not in avail:
        near = sorted(avail, key=lambda a: abs(a - s))[:3]
        report.skipped.append((r.workdir, s, f"no checkpoint (nearest: {sorted(near)})"))
    plans.append((r, st, [s for s in want if s in avail and s not in done], avail))
  phases["list"] = time.time() - t_loop
  bar = tqdm(total=sum(len(p[2]) for p in plans), disable=None if progress else True, unit="ckpt", desc="probe surprisal")
  writer = _Writer()
  try:
    for r, st, todo, avail in plans:
      report.computed[r.name], report.invalid[r.name] = [], []
      if todo:
        bar.set_postfix_str(r.name)
        _extract_run(r, st, todo, avail, mesh, batch_size, prefetch, writer, report, phases, bar)
    t = time.perf_counter()
    writer.drain()
    phases["wait_write"] += time.perf_counter() - t
  finally:
    writer.close()
  bar.close()
  phases["write_thread"] = writer.busy_s
  report.phases = phases
  report.loop_s = time.time() - t_loop
  return report


def _extract_run(
  r: _Run, st: Store, todo: list[int], avail: dict, mesh, batch_size: int, prefetch: int, writer, report, phases, bar
) -> None:
  """One run's checkpoints `todo`: the next `prefetch` checkpoints are restored, verified and their
  meta read in threads while the current one computes (the first ones beside placing and compiling);
  store writes go to `writer`. Adds the seconds of each phase to `phases`."""
  t = time.perf_counter()

  def lap(key: str) -> None:
    nonlocal t
    now = time.perf_counter()
    phases[key] += now - t
    t = now

  restore = _Restorer(r.workdir, r.model, mesh)
  info = _run_info(r.workdir, r.cfg, r.model, r.name)
  fingerprint = r.probes.meta()["fingerprint"]
  B, L = r.cfg["train"]["batch_size"], r.cfg["data"]["seq_len"]
  depth = max(1, int(prefetch))
  with concurrent.futures.ThreadPoolExecutor(depth, thread_name_prefix="probe-restore") as pool:
    ahead = collections.deque(pool.submit(restore.with_meta, s, avail[s]) for s in todo[:depth])
    fn = SurprisalFn(r.model, r.probes, mesh, batch_size)
    lap("place")
    fn.compile_for(C.params_target(r.model.cfg, mesh))  # while the first checkpoints are read
    lap("compile")
    for i, s in enumerate(todo):
      try:
        params, meta, took = ahead.popleft().result()
        phases["restore_thread"] += took
      except errors.CheckpointError as e:
        params = None
        writer.submit(st.write_invalid, s, str(e), source="offline", time=time.time())
        report.skipped.append((r.workdir, s, str(e)))
        report.invalid[r.name].append(s)
      if i + depth < len(todo):  # keep `depth` restores in flight beside this checkpoint's compute
        ahead.append(pool.submit(restore.with_meta, todo[i + depth], avail[todo[i + depth]]))
      lap("wait_restore")
      if params is not None:
        s_T = fn(params)
        del params
        lap("forward")
        tokens = int(meta.get("tokens_seen", s * B * L))
        row = _record(info, s, tokens, s_T, "offline", fingerprint, mesh, fn.B)
        why = _store_result(st, s, s_T, row, writer.submit)
        if why:
          report.skipped.append((r.workdir, s, why))
          report.invalid[r.name].append(s)
        else:
          report.computed[r.name].append(s)
        lap("record")
      bar.update(1)
  restore.close()
