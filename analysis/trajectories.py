"""Per-token loss trajectories: the surprisal of fixed probe tokens at every checkpoint of a run.

  python -m analysis.trajectories --workdir=runs/a [--workdir=runs/b ...] [--steps=all|0,100,...]
      [--sequences=N --positions=K --probe_seed=S] [--batch_size=64] [--mesh=data,fsdp,tensor]
      [--metrics [--unit=nats|bits]]

Chang et al. 2023 (seeds) and Xia et al. 2022 (sizes) track -log p(w_t | w_<t) of a fixed set of
held-out tokens over many checkpoints. Here a *probe set* is a list of (document, position) pairs
from the run's validation split, one framed document [BOS w_1 .. w_n EOS] per row (never packed, so
a probe's context is exactly its own document). Position p is the p-th *target* of the row:
position 0 predicts w_1 from BOS alone, position n predicts EOS; a probe at position p has context
length p + 1 (BOS included). With `positions=K > 0`, K distinct positions per document are drawn
from 1..n (Chang's "never position 0": the first word, conditioned on nothing but BOS, is skipped),
seeded by (seed, group, document) so a larger `sequences` keeps the earlier probes; documents with
at most K such positions contribute all of them. `positions=0` takes every position, 0 included.
Documents longer than `data.seq_len` targets are cut there (as in training).

Store (resumable; one file per checkpoint, each written atomically by tmp + rename):
  W/analysis/trajectories/probes.npz      probe set: per token doc/position/token/context_len/group/
                                          row (+ exact true_logprob on synthetic data), per row tokens
  W/analysis/trajectories/probes.json     probe spec, vocabulary, fingerprint (and its parts)
  W/analysis/trajectories/steps/<step>.json   the checkpoint's row (run, seed, n_params, step,
                                          tokens_seen, flops = 6·N·D, probe_loss/ppl, source, ...)
  W/analysis/trajectories/steps/<step>.npy    surprisal float32 [T] in nats (present = this file exists)
`analysis.load.load_trajectories` consolidates them into an xarray DataArray [run, step, token].

The offline job and the in-training `ProbeHook` share `build_probe_set` and `SurprisalFn` (one
jitted per_token_loss over the same row layout), so both routes give the same numbers.

Shape legend: C checkpoints, T probe tokens, R runs, S probe rows (documents), L row length
(data.seq_len), B rows per batch, V vocabulary.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import sys
import time
from typing import Any, Iterable, Sequence

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from data import pipeline as dp
from data import sources
from lib import ckpt as C
from lib import errors, schedules, sharding
from lib import metrics as MX
from lib import model as M

STORE = "trajectories"
PROBES_NPZ, PROBES_JSON, STEPS_DIR = "probes.npz", "probes.json", "steps"
METRICS_FILE = "token_metrics.parquet"
DEFAULT_BATCH = 64
ROW_FIELDS = ("inputs", "targets", "mask", "segment_ids", "positions")  # what the model sees


class IncompatibleProbes(errors.AnalysisError):
  """Runs (or a run and an existing store) whose probe sets cannot be combined; says why."""


# ----------------------------------------------------------------------------------------------
# Probe sets


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
  """Which probes: the first `sequences` validation documents (per group), `positions` random
  target positions per document (0 = all), drawn with `seed`."""

  sequences: int = 64
  positions: int = 0
  seed: int = 0

  @classmethod
  def from_config(cls, probes_cfg, **overrides) -> "ProbeSpec":
    d = {k: int(probes_cfg[k]) for k in ("sequences", "positions", "seed")}
    d.update({k: int(v) for k, v in overrides.items() if v is not None})
    return cls(**d)


@dataclasses.dataclass
class ProbeSet:
  """The probe tokens of a run's data: rows (one document each) and the (row, position) pairs."""

  spec: ProbeSpec
  rows: dict[str, np.ndarray]  # ROW_FIELDS, each int32 [S, L]
  doc_S: np.ndarray  # document index in its group's validation split
  group_S: np.ndarray  # group index
  row_T: np.ndarray  # probe -> row
  position_T: np.ndarray  # probe -> target position in the row (0 = first word after BOS)
  true_logprob_T: np.ndarray  # exact log p(target) in nats (NaN when the data has none)
  vocab_size: int
  tokenizer: list[dict]
  group_names: list[str]

  @property
  def num_tokens(self) -> int:
    return int(self.row_T.size)

  @property
  def seq_len(self) -> int:
    return int(self.rows["inputs"].shape[1])

  def token_columns(self) -> dict[str, np.ndarray]:
    """Per-probe descriptors (what the loaders put on the token axis)."""
    return {
      "doc": self.doc_S[self.row_T],
      "group": self.group_S[self.row_T],
      "row": self.row_T,
      "position": self.position_T,
      "context_len": self.position_T + 1,
      "token": self.rows["targets"][self.row_T, self.position_T],
      "true_logprob": self.true_logprob_T,
    }

  def hashes(self) -> dict[str, str]:
    """Fingerprint parts, compared one by one to say *why* two probe sets differ."""
    h = lambda *parts: hashlib.sha256(b"|".join(parts)).hexdigest()[:16]  # noqa: E731
    i64 = lambda a: np.ascontiguousarray(a, np.int64).tobytes()  # noqa: E731
    # pack() zero-fills past each document, so whole rows hash the documents and their cut at L
    data = [i64(self.rows["inputs"].shape), i64(self.group_S), i64(self.doc_S)]
    data += [i64(self.rows[k]) for k in ("mask", "inputs", "targets")]
    vocab = json.dumps({"vocab_size": self.vocab_size, "tokenizer": self.tokenizer}, sort_keys=True).encode()
    spec = json.dumps(dataclasses.asdict(self.spec), sort_keys=True).encode()
    return {"vocab": h(vocab), "spec": h(spec), "data": h(*data), "probes": h(i64(self.row_T), i64(self.position_T))}

  def meta(self) -> dict:
    """probes.json: spec, vocabulary and fingerprint (cached: hashing 1M probes takes a while)."""
    if "_meta" not in self.__dict__:
      self.__dict__["_meta"] = self._meta()
    return self.__dict__["_meta"]

  def _meta(self) -> dict:
    parts = self.hashes()
    return {
      "spec": dataclasses.asdict(self.spec),
      "vocab_size": self.vocab_size,
      "tokenizer": self.tokenizer,
      "groups": self.group_names,
      "seq_len": self.seq_len,
      "num_tokens": self.num_tokens,
      "num_rows": int(self.doc_S.size),
      "hashes": parts,
      "fingerprint": hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16],
    }

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    arrays = {f"row_{k}": v for k, v in self.rows.items()}
    arrays.update(
      doc_S=self.doc_S, group_S=self.group_S, row_T=self.row_T, position_T=self.position_T, true_logprob_T=self.true_logprob_T
    )
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    _atomic_write(os.path.join(directory, PROBES_NPZ), buf.getvalue())
    C.save_json(os.path.join(directory, PROBES_JSON), self.meta())

  @classmethod
  def load(cls, directory: str) -> "ProbeSet":
    meta = read_probe_meta(directory)
    with np.load(os.path.join(directory, PROBES_NPZ)) as z:
      rows = {k: z[f"row_{k}"] for k in ROW_FIELDS}
      return cls(
        ProbeSpec(**meta["spec"]),
        rows,
        z["doc_S"],
        z["group_S"],
        z["row_T"],
        z["position_T"],
        z["true_logprob_T"],
        int(meta["vocab_size"]),
        meta["tokenizer"],
        list(meta["groups"]),
      )


def _tokenizer_id(group: sources.Group, spec) -> dict:
  spec = dict(spec) if spec is not None else {}
  return {
    "group": group.name,
    "kind": spec.get("kind", group.info.get("kind", "")),
    "tokenizer": str(spec.get("tokenizer", "")),
    "vocab_size": int(group.vocab_size),
  }


def _read_docs(source, n: int) -> list[dict]:
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
    raise ValueError(f"per-token trajectories need a causal LM objective, not data.objective={data_cfg.objective!r}")
  L = int(seq_len or data_cfg.seq_len)
  groups = sources.make_groups(data_cfg)
  group_cfg = data_cfg.get("groups") or {}
  specs = dict(group_cfg) if len(group_cfg) else {"main": data_cfg.source}
  rows, doc_S, group_S, row_T, pos_T, true_T = [], [], [], [], [], []
  for gi, g in enumerate(groups):
    for di, d in enumerate(_read_docs(sources.select_split(g, "validation"), spec.sequences)):
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


def read_probe_meta(directory: str) -> dict:
  path = os.path.join(directory, PROBES_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} holds no probe set ({PROBES_JSON}); run python -m analysis.trajectories first")
  with open(path) as f:
    return json.load(f)


def incompatibility(a: dict, b: dict) -> str | None:
  """Why probe sets with metas a and b cannot be combined (None if they can)."""
  ha, hb = a["hashes"], b["hashes"]
  if ha["vocab"] != hb["vocab"]:
    return (
      f"different vocabulary/tokenizer (vocab_size {a['vocab_size']} vs {b['vocab_size']}; {a['tokenizer']} vs {b['tokenizer']})"
    )
  if ha["spec"] != hb["spec"]:
    return f"different probe spec (sequences/positions/seed {a['spec']} vs {b['spec']})"
  if ha["data"] != hb["data"]:
    return (
      "different validation data (the probe documents' tokens differ: another language, data seed or "
      f"seq_len; seq_len {a['seq_len']} vs {b['seq_len']})"
    )
  if ha["probes"] != hb["probes"]:
    return "different probe positions for the same spec and data (made by another version of this code)"
  return None


# ----------------------------------------------------------------------------------------------
# The shared surprisal computation


def _loss(model, params, batch):
  return M.per_token_loss(model, params, batch)


class SurprisalFn:
  """surprisal_T (float32 nats) of a probe set for params on `mesh`: one jitted per_token_loss over
  batches placed on the mesh once, so successive checkpoints never recompile or re-transfer data."""

  def __init__(self, model, probes: ProbeSet, mesh, batch_size: int = DEFAULT_BATCH):
    self.model, self.probes, self.mesh = model, probes, mesh
    n_dp = sharding.batch_size_per_shard(mesh)
    S = probes.rows["inputs"].shape[0]
    self.B = B = max(n_dp, -(-min(int(batch_size), S) // n_dp) * n_dp)
    S_pad = -(-S // B) * B
    padded = {k: np.concatenate([v, np.zeros((S_pad - S, v.shape[1]), v.dtype)]) for k, v in probes.rows.items()}
    sh = sharding.batch_sharding(mesh)
    self.batches = []
    for a in range(0, S_pad, B):
      self.batches.append(
        {k: jax.make_array_from_callback((B, v.shape[1]), sh, lambda idx, x=v[a : a + B]: x[idx]) for k, v in padded.items()}
      )
    self.fn = jax.jit(functools.partial(_loss, model), out_shardings=sharding.replicated(mesh))

  def __call__(self, params) -> np.ndarray:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
      outs = [self.fn(params, b) for b in self.batches]  # dispatch all, then fetch
      loss_SxL = np.concatenate([np.asarray(o) for o in outs])
    return loss_SxL[self.probes.row_T, self.probes.position_T].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The store


def _atomic_write(path: str, data: bytes) -> None:
  """tmp + rename: a reader (or a rerun after a kill) sees the old file or the new one, never half."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def store_dir(workdir: str, store: str = STORE) -> str:
  return os.path.join(workdir, "analysis", store)


class Store:
  """W/analysis/<store>/: the probe set and one surprisal vector + metadata row per checkpoint."""

  def __init__(self, directory: str):
    self.dir = directory
    self.steps_dir = os.path.join(directory, STEPS_DIR)

  @classmethod
  def of(cls, workdir: str, store: str = STORE) -> "Store":
    return cls(store_dir(workdir, store))

  def probe_meta(self) -> dict | None:
    return read_probe_meta(self.dir) if os.path.exists(os.path.join(self.dir, PROBES_JSON)) else None

  def init_probes(self, probes: ProbeSet, write: bool = True) -> None:
    """Records the probe set, or refuses one that differs from the store's."""
    old = self.probe_meta()
    if old is not None:
      why = incompatibility(old, probes.meta())
      if why:
        raise IncompatibleProbes(
          f"the store {self.dir} was made with another probe set: {why}. Use another "
          f"--store name, or delete {self.dir} to start over."
        )
      return
    if write:
      probes.save(self.dir)

  def steps(self) -> list[int]:
    """Checkpoints with a finished record (the .npy is written last, so its presence means done)."""
    if not os.path.isdir(self.steps_dir):
      return []
    names = os.listdir(self.steps_dir)
    return sorted(int(n[:-4]) for n in names if n.endswith(".npy") and n[:-4].isdigit() and f"{n[:-4]}.json" in names)

  def has(self, step: int) -> bool:
    return os.path.exists(os.path.join(self.steps_dir, f"{int(step)}.npy")) and os.path.exists(
      os.path.join(self.steps_dir, f"{int(step)}.json")
    )

  def write(self, step: int, surprisal_T: np.ndarray, row: dict) -> None:
    os.makedirs(self.steps_dir, exist_ok=True)
    text = json.dumps(row, indent=1, sort_keys=True, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    _atomic_write(os.path.join(self.steps_dir, f"{int(step)}.json"), text.encode())
    buf = io.BytesIO()
    np.save(buf, np.asarray(surprisal_T, np.float32))
    _atomic_write(os.path.join(self.steps_dir, f"{int(step)}.npy"), buf.getvalue())

  def read(self, step: int, mmap: bool = False) -> np.ndarray:
    return np.load(os.path.join(self.steps_dir, f"{int(step)}.npy"), mmap_mode="r" if mmap else None)

  def row(self, step: int) -> dict:
    with open(os.path.join(self.steps_dir, f"{int(step)}.json")) as f:
      return json.load(f)


# ----------------------------------------------------------------------------------------------
# Shared record metadata


def _run_info(workdir: str, run_cfg: dict, model, name: str | None) -> dict:
  return {
    "run": name or os.path.basename(os.path.abspath(workdir).rstrip("/")),
    "workdir": os.path.abspath(workdir),
    "seed": int(run_cfg.get("seed", 0)),
    "n_params": int(M.param_count(model)),
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


# ----------------------------------------------------------------------------------------------
# In-training hook


class ProbeHook:
  """Records probe surprisals during training at the steps of `probes.schedule` (source='hook').

  train.py calls `maybe_record(step, params, tokens_seen)` after every step (step 0 = init) with the
  params sharded on the training mesh; recorded steps are skipped, so a resumed run adds only new ones.
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
      self.store.write(step, s_T, _record(self.info, step, tokens_seen, s_T, "hook", self.fingerprint, self.mesh, self.fn.B))
    return True


# ----------------------------------------------------------------------------------------------
# Offline extraction


@dataclasses.dataclass
class Report:
  """What `extract` did: newly computed steps, steps already stored, and skipped (step, reason)."""

  workdirs: dict[str, str] = dataclasses.field(default_factory=dict)  # run name -> workdir
  computed: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  present: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  skipped: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
  setup_s: float = 0.0  # opening runs, building and checking probe sets
  loop_s: float = 0.0  # per run: placing probe batches, compiling once, then restore -> compute -> write


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
  """Params of successive checkpoints with one checkpointer and one abstract target (no re-trace,
  same shardings every time, so the surprisal function never recompiles)."""

  def __init__(self, workdir: str, model, mesh):
    import orbax.checkpoint as ocp

    self.workdir = os.path.abspath(workdir)
    shapes, _ = M.abstract_params(model)
    self.target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, M.param_shardings(model, mesh)
    )
    self.new = ocp.StandardCheckpointer
    self.ckptr = self.new()

  def __call__(self, step: int, sub: str):
    path = os.path.join(self.workdir, sub, str(step), "params")
    try:
      params = self.ckptr.restore(path, self.target)
      jax.block_until_ready(params)
      return params
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped and reported
      self.ckptr.close()  # a failed read can leave orbax's event loop half-closed: start afresh
      self.ckptr = self.new()
      raise C.CheckpointError(f"cannot restore params from {path}: {type(e).__name__}: {str(e)[:300]}") from e

  def close(self) -> None:
    self.ckptr.close()


def parse_steps(text: str | Iterable[int] | None) -> list[int] | None:
  """'all' / None -> None (every analysis checkpoint); '0,100,200' -> [0, 100, 200]."""
  if text is None or (isinstance(text, str) and text.strip() in ("", "all")):
    return None
  if isinstance(text, str):
    return sorted({int(s) for s in text.split(",") if s.strip()})
  return sorted({int(s) for s in text})


def parse_mesh(text: str | None):
  """'2,2,2' -> a (data, fsdp, tensor) mesh; None/'' -> one device."""
  if not text:
    return sharding.single_device_mesh()
  sizes = [int(x) for x in text.split(",")]
  if len(sizes) != 3:
    raise ValueError(f"--mesh takes data,fsdp,tensor sizes (one may be -1), got {text!r}")
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, sizes)))


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
) -> Report:
  """Surprisal of the shared probe set at the checkpoints of each workdir, into its store.

  Streams checkpoint by checkpoint (restoring the next while the current one computes); steps
  already stored are skipped, missing or unreadable checkpoints are listed in the report.
  `spec` overrides probe spec fields (sequences, positions, seed) of each run's store or config.
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
  plans = []
  for r in runs:
    st = Store.of(r.workdir, store)
    st.init_probes(r.probes)
    avail = C.available_steps(r.workdir)
    # 'all' = the analysis checkpoints (the run's kept schedule); resume ones come and go
    want = (sorted(s for s, sub in avail.items() if sub == C.ANALYSIS_DIR) or sorted(avail)) if wanted is None else wanted
    done = set(st.steps())
    report.present[r.name] = sorted(done & set(want))
    for s in want:
      if s not in avail:
        near = sorted(avail, key=lambda a: abs(a - s))[:3]
        report.skipped.append((r.workdir, s, f"no checkpoint (nearest: {sorted(near)})"))
    plans.append((r, st, [s for s in want if s in avail and s not in done], avail))
  bar = tqdm(total=sum(len(p[2]) for p in plans), disable=not progress, unit="ckpt", desc="probe surprisal")
  for r, st, todo, avail in plans:
    report.computed[r.name] = []
    if not todo:
      continue
    bar.set_postfix_str(r.name)
    fn = SurprisalFn(r.model, r.probes, mesh, batch_size)
    restore = _Restorer(r.workdir, r.model, mesh)
    info = _run_info(r.workdir, r.cfg, r.model, r.name)
    fingerprint = r.probes.meta()["fingerprint"]
    B, L = r.cfg["train"]["batch_size"], r.cfg["data"]["seq_len"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      nxt = pool.submit(restore, todo[0], avail[todo[0]])
      for i, s in enumerate(todo):
        try:
          params = nxt.result()
        except C.CheckpointError as e:
          params = None
          report.skipped.append((r.workdir, s, str(e)))
        if i + 1 < len(todo):  # overlap the next restore with this checkpoint's compute
          nxt = pool.submit(restore, todo[i + 1], avail[todo[i + 1]])
        if params is not None:
          s_T = fn(params)
          del params
          tokens = int(C.read_meta(r.workdir, s).get("tokens_seen", s * B * L))
          st.write(s, s_T, _record(info, s, tokens, s_T, "offline", fingerprint, mesh, fn.B))
          report.computed[r.name].append(s)
        bar.update(1)
    restore.close()
  bar.close()
  report.loop_s = time.time() - t_loop
  return report


# ----------------------------------------------------------------------------------------------
# Metrics step (the math lives in analysis/curves.py)


def unigram_counts(data_cfg, max_docs: int = 100_000) -> np.ndarray:
  """Counts [V] of each target token over the first `max_docs` training documents of every group."""
  groups = sources.make_groups(data_cfg)
  counts = np.zeros(groups[0].vocab_size, np.int64)
  for g in groups:
    for d in _read_docs(sources.select_split(g, "train"), max_docs):
      counts += np.bincount(np.asarray(d["tokens"][1:]), minlength=counts.size)[: counts.size]
  return counts


def write_token_metrics(
  workdirs: str | Sequence[str],
  *,
  unit: str = "nats",
  store: str = STORE,
  out: str | None = None,
  freq_docs: int = 100_000,
  **metric_kw,
):
  """curves.token_metrics over the runs' common checkpoints -> W/analysis/token_metrics.parquet.

  One row per probe token: the probe descriptors, `log_freq` (log10 add-one unigram frequency of
  the target in the training data of the first run), every Chang/Xia metric (per-run columns
  `<metric>_r<i>`), and `trend_name`. Too few checkpoints give NaN + `flags` (curves' job).
  """
  from analysis import curves
  from analysis import load as LD

  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  da = LD.load_trajectories(workdirs, unit=unit, store=store)
  ok_C = np.isfinite(da.values).all(axis=(0, 2))  # checkpoints every run has
  if not ok_C.any():
    raise ValueError(f"the runs {list(da.run.values)} share no checkpoint in their stores")
  steps_C = da.step.values[ok_C]
  chance = math.log(da.attrs["vocab_size"]) / (math.log(2.0) if unit == "bits" else 1.0)
  y_RxTxC = np.ascontiguousarray(np.transpose(da.values[:, ok_C, :], (0, 2, 1)))
  kw = dict(unit=unit, per_run=True)
  kw.update(metric_kw)
  df = curves.token_metrics(y_RxTxC, steps_C, chance, **kw)
  df.insert(0, "token_index", np.arange(da.sizes["token"]))
  for i, col in enumerate(("doc", "group", "position", "context_len", "token_id")):
    df.insert(1 + i, col.replace("token_id", "token"), da[col].values)
  counts_V = unigram_counts(ml_collections.ConfigDict(C.read_config(workdirs[0])).data, freq_docs)
  df.insert(6, "log_freq", np.log10((counts_V[df["token"].to_numpy()] + 1.0) / (counts_V.sum() + counts_V.size)))
  if "trend_class" in df:
    df["trend_name"] = df["trend_class"].map(curves.TREND_NAMES)
  path = out or os.path.join(workdirs[0], "analysis", METRICS_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  df.to_parquet(tmp, index=False)
  os.replace(tmp, path)
  C.save_json(
    os.path.splitext(path)[0] + ".json",
    {
      "runs": list(map(str, da.run.values)),
      "workdirs": workdirs,
      "steps": steps_C.tolist(),
      "unit": unit,
      "chance": chance,
      "fingerprint": da.attrs["fingerprint"],
    },
  )
  return df, path


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m analysis.trajectories", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", action="append", required=True, help="run directory (repeat for several runs)")
  p.add_argument("--name", action="append", help="run name per --workdir (default: the workdir's basename)")
  p.add_argument("--steps", default="all", help="'all' or comma-separated steps")
  p.add_argument("--sequences", type=int, help="probe documents per group (default: the run's probes.sequences)")
  p.add_argument("--positions", type=int, help="random positions per document, 0 = all (default: probes.positions)")
  p.add_argument("--probe_seed", type=int, help="probe selection seed (default: probes.seed)")
  p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH, help="rows per forward pass")
  p.add_argument("--mesh", default="", help="data,fsdp,tensor sizes (default: one device)")
  p.add_argument("--store", default=STORE, help="store name under W/analysis/")
  p.add_argument("--metrics", action="store_true", help="also write W/analysis/token_metrics.parquet (first W)")
  p.add_argument("--unit", choices=("nats", "bits"), default="nats", help="unit of the printed losses and metrics")
  p.add_argument("--freq_docs", type=int, default=100_000, help="training documents counted for log_freq")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  a = p.parse_args(argv)
  MX.quiet_logs()  # orbax and tfds log every read at INFO
  sharding.enable_compilation_cache()
  try:
    spec = {"sequences": a.sequences, "positions": a.positions, "seed": a.probe_seed}
    rep = extract(
      a.workdir,
      steps=a.steps,
      spec=spec,
      batch_size=a.batch_size,
      mesh=parse_mesh(a.mesh),
      names=a.name,
      store=a.store,
      progress=not a.quiet,
    )
    scale = 1.0 / math.log(2.0) if a.unit == "bits" else 1.0
    for name, w in rep.workdirs.items():
      st = Store.of(w, a.store)
      rows = [st.row(s) for s in st.steps()]
      last = f", last step {rows[-1]['step']}: probe loss {rows[-1]['probe_loss'] * scale:.4f} {a.unit}" if rows else ""
      print(f"{name}: {len(rows)} checkpoints stored ({len(rep.computed[name])} new){last} -> {st.dir}")
    if rep.skipped:
      print(f"skipped {len(rep.skipped)} checkpoint(s):")
      for w, s, why in rep.skipped:
        print(f"  {w} step {s}: {why}")
    if a.metrics:
      df, path = write_token_metrics(a.workdir, unit=a.unit, store=a.store, freq_docs=a.freq_docs)
      print(f"token metrics for {len(df)} probe tokens -> {path}")
  except (IncompatibleProbes, C.CheckpointError, dp.DataError, sharding.ShardingError, ValueError, FileNotFoundError) as e:
    print(f"lmtrace trajectories: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
