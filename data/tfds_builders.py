"""TFDS builders (array_record, no TensorFlow needed) for lmtrace's synthetic languages, and
readers for any prepared TFDS dataset.

A synthetic dataset is identified by its spec (kind + language parameters + split sizes); its TFDS
config name is `<kind>_<hash of spec>`, so the same spec is built once per data_dir and reused.
Features: tokens int32 [n] (framed, model ids), true_logprob float32 [n-1] (exact log p of each
target; present on validation/test, empty on train to save build time), and `label` int32 (−1 except
on downstream-task splits). Downstream splits (`n_downstream` sentences each, sampled independently):
PCFG `task_A`, `task_B`, `task_C` (Liu et al.'s released-code definitions: root child of the whole
sentence / best non-terminal of the first 4 / first 2 tokens, sentences with 4 < n < 32) and
`task_span8` (the paper's definition: most probable non-terminal of the span [0, 8)); HMM
`task_state6`, `task_state10` (hidden state at 1-based position 6 / 10). Dataset metadata records the
spec and the optimal loss (entropy rate) estimate.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import time
from typing import Any

import numpy as np

from data import vocab
from data.languages import downstream_tasks, language, synthetic_examples
from data.types import DataError, Group

DEFAULT_SIZES = {"n_train": 50_000, "n_validation": 1_000, "n_test": 1_000, "n_downstream": 2_000}


def default_data_dir() -> str:
  return os.environ.get("LMTRACE_DATA_DIR", os.path.expanduser("~/.cache/lmtrace/tfds"))


def spec_name(spec: dict) -> str:
  clean = {k: spec[k] for k in sorted(spec) if k not in ("name", "data_dir")}
  h = hashlib.sha1(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:10]
  return f"{spec['kind']}_{h}"


def log_building(builder) -> None:
  """Replaces TFDS's "Downloading and preparing dataset Unknown size ..." line: nothing is downloaded.
  Off a terminal, TFDS's progress bars are turned off too (their escape codes would fill log files)."""
  if not sys.stderr.isatty():
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
  builder._lmtrace_t0 = time.perf_counter()
  print(f"lmtrace: building dataset {builder.builder_config.name} in {builder.data_dir} (generated locally)...", flush=True)


def log_built(builder) -> None:
  dt = time.perf_counter() - getattr(builder, "_lmtrace_t0", time.perf_counter())
  print(f"lmtrace: built {builder.builder_config.name} in {dt:.1f} s; later runs reuse it", flush=True)


def _builder_cls():
  import tensorflow_datasets as tfds

  class SyntheticConfig(tfds.core.BuilderConfig):
    def __init__(self, spec: dict, **kw):
      super().__init__(name=spec_name(spec), description=json.dumps(spec, sort_keys=True, default=str), **kw)
      self.spec = spec

  class LmtraceSynthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Sentences of a random PCFG / HMM / bigram language with exact per-token log-probs."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "downstream-task splits and the label feature"}
    _log_download_bytes, _log_download_done = log_building, log_built  # TFDS's own lines speak of downloads

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "true_logprob": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "label": tfds.features.Scalar(dtype=np.int32),
          }
        ),
        metadata=tfds.core.MetadataDict(),
      )

    def _split_generators(self, dl_manager):
      spec = self.builder_config.spec
      lang = language(spec)
      sizes = {k: int(spec.get(k, v)) for k, v in DEFAULT_SIZES.items()}
      # Distinct sampling seeds per split so splits share no sampling stream; `sample_seed` (default 0)
      # offsets all three: two groups of the same language with different sentences.
      off = int(spec.get("sample_seed", 0))
      val = synthetic_examples(lang, sizes["n_validation"], 1_000_001 + off, with_true=True)
      test = synthetic_examples(lang, sizes["n_test"], 2_000_002 + off, with_true=True)
      nll = -np.concatenate([e["true_logprob"] for e in val]).astype(np.float64)
      per_sent = np.array([-e["true_logprob"].sum() for e in val])
      lens = np.array([len(e["true_logprob"]) for e in val], np.float64)
      mean = nll.mean()
      # Ratio estimator over iid sentences; delta-method standard error.
      resid = per_sent - mean * lens
      se = float(np.sqrt(np.sum(resid**2) / (len(val) * (len(val) - 1))) / lens.mean()) if len(val) > 1 else float("nan")
      self.info.metadata.update(
        {
          "spec": json.dumps(spec, sort_keys=True, default=str),
          "optimal_loss": float(mean),
          "optimal_loss_stderr": se,
          "vocab_size": vocab.vocab_size(lang.n_terminals),
          "mean_tokens": float(lens.mean()),
        }
      )
      tasks = downstream_tasks(lang, sizes["n_downstream"], 3_000_003)
      self.info.metadata["tasks"] = json.dumps({k: len(v) for k, v in tasks.items()})
      return {
        "train": self._generate_examples(("train", lang, sizes["n_train"], off)),
        "validation": self._generate_examples(("list", val)),
        "test": self._generate_examples(("list", test)),
        **{k: self._generate_examples(("list", v)) for k, v in tasks.items()},
      }

    def _generate_examples(self, what):
      empty = np.zeros(0, np.float32)
      if what[0] == "list":
        for i, e in enumerate(what[1]):
          yield i, {"tokens": e["tokens"], "true_logprob": e.get("true_logprob", empty), "label": e.get("label", -1)}
        return
      _, lang, n, off = what
      for i, e in enumerate(synthetic_examples(lang, n, off, with_true=False)):
        yield i, {"tokens": e["tokens"], "true_logprob": empty, "label": -1}

  return LmtraceSynthetic, SyntheticConfig


class TfdsSource:
  """Random-access view of one TFDS split that names the files when reading fails."""

  def __init__(self, data_source, where: str, token_key: str = "tokens"):
    self.ds, self.where, self.key = data_source, where, token_key

  def __len__(self) -> int:
    return len(self.ds)

  def __getitem__(self, i: int) -> dict:
    return self.__getitems__([int(i)])[0]

  def __getitems__(self, ids) -> list[dict]:
    try:
      exs = self.ds.__getitems__(list(ids))
    except Exception as e:  # corrupted shard: say which files
      raise DataError(f"failed to read examples {list(ids)[:5]}... of {self.where}: {type(e).__name__}: {e}") from e
    return [self._convert(ex) for ex in exs]

  def _convert(self, ex) -> dict:
    out = {"tokens": np.asarray(ex[self.key], np.int32)}
    tl = ex.get("true_logprob")
    if tl is not None and len(tl) == len(out["tokens"]) - 1 and len(tl):
      out["true_logprob"] = np.asarray(tl, np.float32)
    if int(ex.get("label", -1)) >= 0:
      out["label"] = int(ex["label"])
    return out


def _check_files(builder, split: str) -> None:
  info = builder.info.splits[split]
  expected = len(info.shard_lengths)
  pattern = os.path.join(builder.data_dir, f"{builder.name}-{split}.array_record-*")
  files = sorted(glob.glob(pattern))
  if len(files) != expected:
    raise DataError(
      f"{builder.data_dir}: split {split!r} should have {expected} array_record shard(s), "
      f"found {len(files)} ({[os.path.basename(f) for f in files]}); delete the directory to rebuild it"
    )
  for f in files:
    if os.path.getsize(f) == 0:
      raise DataError(f"data shard {f} is empty (corrupted); delete {builder.data_dir} to rebuild it")


def open_splits(builder, name: str) -> dict[str, TfdsSource]:
  """Every split of a prepared builder as a checked random-access source."""
  splits = {}
  sources = builder.as_data_source()
  for split in builder.info.splits:
    _check_files(builder, split)
    splits[split] = TfdsSource(sources[split], f"{name}/{split} in {builder.data_dir}")
  return splits


def _prepare_once(make, data_dir: str, spec: dict):
  """Builds under an exclusive file lock, so independent jobs that need the same language at once (two
  experiments, a sweep's array tasks) build it once: TFDS alone makes the second builder's final rename
  fail with FileExistsError. Returns a builder made after the build, which sees the finished files."""
  import fcntl

  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".{spec_name(spec)}.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      make().download_and_prepare()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return make()


def build_synthetic(spec: dict, data_dir: str | None = None):
  """Builds (once) and returns the TFDS builder of a synthetic language spec."""
  import jax

  cls, cfg_cls = _builder_cls()
  data_dir = data_dir or spec.get("data_dir") or default_data_dir()
  builder = cls(config=cfg_cls(spec), data_dir=data_dir, file_format="array_record")
  if jax.process_index() == 0:
    builder = _prepare_once(lambda: cls(config=cfg_cls(spec), data_dir=data_dir, file_format="array_record"), data_dir, spec)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"lmtrace data {spec_name(spec)}")
    builder = cls(config=cfg_cls(spec), data_dir=data_dir, file_format="array_record")
  return builder


def synthetic_group(name: str, spec, data_dir: str | None) -> Group:
  spec = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in dict(spec).items()}
  builder = build_synthetic(spec, data_dir)
  md = builder.info.metadata
  info = {
    "optimal_loss": float(md["optimal_loss"]),
    "optimal_loss_stderr": float(md["optimal_loss_stderr"]),
    "mean_tokens": float(md["mean_tokens"]),
    "kind": spec["kind"],
    "tfds_dir": builder.data_dir,
    "tasks": json.loads(md.get("tasks", "{}")),
  }
  return Group(name, open_splits(builder, name), int(md["vocab_size"]), info)


def catalog_group(name: str, spec, data_dir: str | None) -> Group:
  """Any prepared TFDS dataset (e.g. lm1b or c4 already in a bucket/data_dir), read by name.

  spec: {kind: 'tfds', name: 'lm1b' (or 'lm1b/config:1.0.0'), feature: key of the token ids
  (already tokenised, int) or of text (then byte-level tokenised), vocab_size}. Nothing is downloaded.
  """
  import tensorflow_datasets as tfds

  spec = dict(spec)
  ds_name = spec.get("name")
  if not ds_name:
    raise DataError(f"data group {name!r}: kind 'tfds' needs a dataset name (e.g. name='lm1b')")
  data_dir = spec.get("data_dir") or data_dir or default_data_dir()
  try:
    builder = tfds.builder(ds_name, data_dir=data_dir)
  except Exception as e:
    raise DataError(f"data group {name!r}: cannot open TFDS dataset {ds_name!r} in {data_dir}: {e}") from e
  if not builder.is_prepared():
    raise DataError(
      f"data group {name!r}: TFDS dataset {ds_name!r} is not prepared in {data_dir}; lmtrace never "
      "downloads at run time — prepare it (tfds build) or point data_dir at a prepared copy"
    )
  feature = spec.get("feature", "text")
  split_map = dict(spec.get("split_map") or {"train": "train", "validation": "validation", "test": "test"})
  srcs = builder.as_data_source()
  splits = {}
  for ours, theirs in split_map.items():
    if theirs in srcs:
      splits[ours] = _FeatureSource(srcs[theirs], feature, f"{ds_name}/{theirs} in {data_dir}")
  return Group(name, splits, int(spec.get("vocab_size") or vocab.vocab_size(256)), {"kind": "tfds"})


class _FeatureSource:
  """Reads one feature of a TFDS catalog dataset: int token ids, or text bytes (byte-level)."""

  def __init__(self, ds, feature: str, where: str):
    self.ds, self.feature, self.where = ds, feature, where

  def __len__(self):
    return len(self.ds)

  def __getitem__(self, i):
    try:
      v = self.ds[int(i)][self.feature]
    except KeyError:
      raise DataError(f"{self.where} has no feature {self.feature!r}") from None
    if isinstance(v, (bytes, str)):
      b = v.encode() if isinstance(v, str) else v
      return {"tokens": vocab.frame(np.frombuffer(b, np.uint8).astype(np.int32))}
    return {"tokens": np.concatenate([[vocab.BOS], np.asarray(v, np.int32), [vocab.EOS]]).astype(np.int32)}


def describe(group: Group) -> dict[str, Any]:
  return {"name": group.name, "vocab_size": group.vocab_size, **group.info, **{f"n_{k}": len(v) for k, v in group.splits.items()}}
