"""The trajectory store format: probe sets and per-checkpoint surprisal records on disk (a leaf module).

Both the engine that writes stores (`analysis.probes`) and the loaders that read them
(`analysis.load`) import this module; it imports neither, so the two never import each other.

Store (resumable; one file per checkpoint, each written atomically by tmp + rename):
  W/analysis/trajectories/probes.npz      probe set: per token row/position (+ exact true_logprob on
                                          synthetic data), per document its tokens as one row
                                          (row_* arrays [S, L], one document per row, zero-filled)
  W/analysis/trajectories/probes.json     probe spec, vocabulary, fingerprint (and its parts)
  W/analysis/trajectories/steps/<step>.json   the checkpoint's row (run, seed, n_params, step,
                                          tokens_seen, flops = 6·N·D, probe_loss/ppl, source, ...)
  W/analysis/trajectories/steps/<step>.npy    surprisal float32 [T] in nats (present = this file exists)
  W/analysis/trajectories/steps/<step>.invalid.json   a checkpoint that could not be measured (its
                                          restore failed or its surprisals were not finite): step,
                                          reason, source, time. Not a result: a rerun retries it, and a
                                          success removes the marker.

The store keeps one document per row (the logical layout, what the fingerprint hashes); the model sees
the documents *packed* several to a row (`ProbeSet.packed`), which is recomputed from the stored rows,
so stores written before packing existed read and extend unchanged.

Shape legend: T probe tokens, S probe documents, L row length (data.seq_len), P packed rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os

import numpy as np

from lib import errors

STORE = "trajectories"
PROBES_NPZ, PROBES_JSON, STEPS_DIR = "probes.npz", "probes.json", "steps"
INVALID_SUFFIX = ".invalid.json"
METRICS_FILE = "token_metrics.parquet"
ROW_FIELDS = ("inputs", "targets", "mask", "segment_ids", "positions")  # what the model sees


class IncompatibleProbes(errors.AnalysisError):
  """Runs (or a run and an existing store) whose probe sets cannot be combined; says why."""


def atomic_write(path: str, data: bytes) -> None:
  """tmp + rename: a reader (or a rerun after a kill) sees the old file or the new one, never half."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _json_bytes(obj) -> bytes:
  return json.dumps(obj, indent=1, sort_keys=True, default=lambda o: o.item() if hasattr(o, "item") else str(o)).encode()


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


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """The probe documents packed several to a row, as training packs them (data/pipeline.py): each
  document keeps its own segment id and positions 0..n-1, so attention never crosses documents and
  every surprisal equals the one-document-per-row value. Document s starts at (row_S[s], col_S[s])."""

  rows: dict[str, np.ndarray]  # ROW_FIELDS, each int32 [P, L]
  row_S: np.ndarray  # packed row of each document
  col_S: np.ndarray  # its first column there

  @property
  def num_rows(self) -> int:
    return int(self.rows["inputs"].shape[0])


def pack_rows(rows: dict[str, np.ndarray]) -> PackedRows:
  """Next-fit packing of one-document rows [S, L] into as few rows [P, L] as document order allows
  (documents stay in order; a document that does not fit starts a new row)."""
  mask_SxL = rows["mask"]
  S, L = mask_SxL.shape
  n_S = mask_SxL.sum(1).astype(np.int64)
  row_S, col_S, ord_S = np.zeros(S, np.int64), np.zeros(S, np.int64), np.zeros(S, np.int64)
  r, c, k = 0, 0, 0
  for s, n in enumerate(n_S.tolist()):
    if c + n > L and c > 0:
      r, c, k = r + 1, 0, 0
    row_S[s], col_S[s], ord_S[s] = r, c, k
    c, k = c + n, k + 1
  P = r + 1 if S else 0
  s_Q = np.repeat(np.arange(S), n_S)  # Q: every real position of every document
  j_Q = np.arange(s_Q.size) - np.repeat(np.cumsum(n_S) - n_S, n_S)
  dst = (row_S[s_Q], col_S[s_Q] + j_Q)
  out = {k: np.zeros((P, L), np.int32) for k in ROW_FIELDS}
  for k in ("inputs", "targets", "mask"):
    out[k][dst] = rows[k][s_Q, j_Q]
  out["segment_ids"][dst] = ord_S[s_Q] + 1
  out["positions"][dst] = rows["positions"][s_Q, j_Q]
  return PackedRows(out, row_S, col_S)


@dataclasses.dataclass
class ProbeSet:
  """The probe tokens of a run's data: rows (one document each) and the (row, position) pairs."""

  spec: ProbeSpec
  rows: dict[str, np.ndarray]  # ROW_FIELDS, each int32 [S, L]: the logical layout, one document per row
  doc_S: np.ndarray  # document index in its group's validation split
  group_S: np.ndarray  # group index
  row_T: np.ndarray  # probe -> row (= document) of `rows`
  position_T: np.ndarray  # probe -> target position in its document (0 = first word after BOS)
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

  @property
  def packed(self) -> PackedRows:
    """The rows the model sees (cached): documents packed several to a row."""
    if "_packed" not in self.__dict__:
      self.__dict__["_packed"] = pack_rows(self.rows)
    return self.__dict__["_packed"]

  def packed_index(self) -> tuple[np.ndarray, np.ndarray]:
    """(packed row, column) of every probe's target in `packed.rows`."""
    p = self.packed
    return p.row_S[self.row_T], p.col_S[self.row_T] + self.position_T

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

  def documents(self) -> list[np.ndarray]:
    """Each probe document's framed tokens [BOS w_1 .. w_n EOS] (cut at L targets), as int64;
    probe t predicts token position_T[t] + 1 of document row_T[t]."""
    n_S = self.rows["mask"].sum(1)
    return [
      np.r_[self.rows["inputs"][s, :n], self.rows["targets"][s, n - 1 : n]].astype(np.int64) if n else np.zeros(0, np.int64)
      for s, n in enumerate(n_S.tolist())
    ]

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
    atomic_write(os.path.join(directory, PROBES_NPZ), buf.getvalue())
    atomic_write(os.path.join(directory, PROBES_JSON), _json_bytes(self.meta()))

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


def read_probe_meta(directory: str) -> dict:
  path = os.path.join(directory, PROBES_JSON)
  if not os.path.exists(path):
    raise errors.AnalysisError(f"{directory} holds no probe set ({PROBES_JSON}); run python -m analysis.trajectories first")
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
# The store


def store_dir(workdir: str, store: str = STORE) -> str:
  return os.path.join(workdir, "analysis", store)


class Store:
  """W/analysis/<store>/: the probe set and one surprisal vector + metadata row per checkpoint, or an
  invalid marker (with its reason) for a checkpoint that could not be measured."""

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
    atomic_write(os.path.join(self.steps_dir, f"{int(step)}.json"), _json_bytes(row))
    buf = io.BytesIO()
    np.save(buf, np.asarray(surprisal_T, np.float32))
    atomic_write(os.path.join(self.steps_dir, f"{int(step)}.npy"), buf.getvalue())
    self.clear_invalid(step)

  def read(self, step: int, mmap: bool = False) -> np.ndarray:
    return np.load(os.path.join(self.steps_dir, f"{int(step)}.npy"), mmap_mode="r" if mmap else None)

  def row(self, step: int) -> dict:
    with open(os.path.join(self.steps_dir, f"{int(step)}.json")) as f:
      return json.load(f)

  # invalid checkpoints: listed with their reason, retried by the next run

  def _invalid_path(self, step: int) -> str:
    return os.path.join(self.steps_dir, f"{int(step)}{INVALID_SUFFIX}")

  def write_invalid(self, step: int, reason: str, **info) -> None:
    os.makedirs(self.steps_dir, exist_ok=True)
    atomic_write(self._invalid_path(step), _json_bytes(dict(info, step=int(step), reason=str(reason))))

  def clear_invalid(self, step: int) -> None:
    if os.path.exists(self._invalid_path(step)):
      os.remove(self._invalid_path(step))

  def invalid(self) -> list[dict]:
    """The invalid markers ({step, reason, ...}) of checkpoints without a valid record, by step."""
    if not os.path.isdir(self.steps_dir):
      return []
    out = []
    for n in os.listdir(self.steps_dir):
      stem = n[: -len(INVALID_SUFFIX)]
      if n.endswith(INVALID_SUFFIX) and stem.isdigit() and not self.has(int(stem)):
        with open(os.path.join(self.steps_dir, n)) as f:
          out.append(json.load(f))
    return sorted(out, key=lambda r: r["step"])
