"""A user's own text files as an lmtrace data group (TFDS array_record, no TensorFlow).

Source spec: {kind: 'text', path: a directory, a file or a glob ('corpus/*.txt'), tokenizer: 'bytes'
(default; vocab 256 + specials) | 'sentencepiece' (a unigram model trained on the training split,
`vocab_size` pieces, saved next to the dataset), doc_tokens: longest document in tokens (longer ones
are cut into consecutive chunks), validation_fraction / test_fraction (documents are assigned to
splits by a hash of their text, so adding files does not reshuffle old documents)}.

Documents are paragraphs (blank-line separated) of each file. Nothing is downloaded.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile

import numpy as np

from data import tfds_builders as tb
from data import vocab
from data.types import DataError, Group


def _files(path: str) -> list[str]:
  if not path:
    raise DataError("data source kind 'text' needs path= (a directory, file or glob of text files)")
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f))
  else:
    files = sorted(glob.glob(path))
  if not files:
    raise DataError(f"no text files match {path!r}")
  return files


def _documents(files: list[str]) -> list[str]:
  docs = []
  for f in files:
    try:
      text = open(f, encoding="utf-8", errors="replace").read()
    except OSError as e:
      raise DataError(f"cannot read text file {f}: {e}") from e
    docs += [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
  return docs


def _split_of(doc: str, val: float, test: float) -> str:
  u = int.from_bytes(hashlib.sha1(doc.encode()).digest()[:8], "little") / 2**64
  return "validation" if u < val else ("test" if u < val + test else "train")


def _chunks(ids: np.ndarray, n: int):
  for i in range(0, max(len(ids), 1), n):
    yield ids[i : i + n]


class Tokenizer:
  """bytes or a SentencePiece model; ids are shifted past lmtrace's special tokens."""

  def __init__(self, kind: str, model_path: str | None = None, model_vocab: int | None = None):
    self.kind = kind
    self.model_vocab = model_vocab
    if kind == "hf":  # a model's own tokenizer.json: its ids and special ids, NOT shifted (lib/tokenizer.py)
      from lib.tokenizer import HFTokenizer

      self.hf = HFTokenizer(model_path or "")
      self.n = self.hf.vocab_size
      self.hf.check_model_vocab(int(model_vocab or self.n))
    elif kind == "sentencepiece":
      import sentencepiece as spm

      self.sp = spm.SentencePieceProcessor(model_file=model_path)
      self.n = self.sp.get_piece_size()
    elif kind == "bytes":
      self.n = 256
    else:
      raise DataError(f"text tokenizer {kind!r} is not one of ('bytes', 'sentencepiece', 'hf')")

  @property
  def vocab_size(self) -> int:
    if self.kind == "hf":
      return int(self.model_vocab or self.n)
    return vocab.vocab_size(self.n)

  def frame(self, ids) -> np.ndarray:
    """[BOS, ids..., EOS] in model ids: lmtrace's shifted layout, or an external tokenizer's own ids."""
    return self.hf.frame(ids) if self.kind == "hf" else vocab.frame(ids)

  def encode(self, text: str) -> np.ndarray:
    if self.kind == "bytes":
      return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    if self.kind == "hf":
      return self.hf.encode(text)
    return np.asarray(self.sp.encode(text), np.int32)

  def decode(self, model_ids) -> str:
    if self.kind == "hf":
      return self.hf.decode(model_ids)
    raw = vocab.unframe(model_ids)
    if self.kind == "bytes":
      return bytes(raw.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
    return self.sp.decode(raw.tolist())


def train_sentencepiece(docs: list[str], vocab_size: int, out_prefix: str) -> str:
  import sentencepiece as spm

  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
    f.write("\n".join(d.replace("\n", " ") for d in docs))
    corpus = f.name
  try:
    spm.SentencePieceTrainer.train(
      input=corpus,
      model_prefix=out_prefix,
      vocab_size=vocab_size,
      model_type="unigram",
      bos_id=-1,
      eos_id=-1,
      pad_id=-1,
      unk_id=0,
      hard_vocab_limit=False,
      character_coverage=1.0,
      minloglevel=2,
    )
  finally:
    os.unlink(corpus)
  return out_prefix + ".model"


def _builder(spec: dict, files: list[str]):
  import tensorflow_datasets as tfds

  stamp = [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in files]
  key = hashlib.sha1(json.dumps([spec, stamp], sort_keys=True, default=str).encode()).hexdigest()[:10]

  class TextConfig(tfds.core.BuilderConfig):
    def __init__(self):
      super().__init__(name=f"text_{key}", description=json.dumps(spec, sort_keys=True, default=str))

  class LmtraceText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Documents of local text files, tokenised (bytes or SentencePiece) and framed."""

    VERSION = tfds.core.Version("1.0.0")
    _log_download_bytes, _log_download_done = tb.log_building, tb.log_built  # nothing is downloaded

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)}),
        metadata=tfds.core.MetadataDict(),
      )

    def _split_generators(self, dl_manager):
      docs = _documents(files)
      val, test = float(spec.get("validation_fraction", 0.05)), float(spec.get("test_fraction", 0.05))
      by_split = {"train": [], "validation": [], "test": []}
      for d in docs:
        by_split[_split_of(d, val, test)].append(d)
      if val >= 1.0:  # probe-only corpus (e.g. an imported model's probe text): every split holds all of it
        by_split = {s: list(docs) for s in by_split}
      for s, ds in by_split.items():
        if not ds:
          raise DataError(
            f"text corpus {spec.get('path')!r} gives no {s} documents ({len(docs)} documents in all); "
            "add text or change validation_fraction / test_fraction"
          )
      kind = spec.get("tokenizer", "bytes")
      model_path = None
      if kind == "sentencepiece":
        os.makedirs(self.data_dir, exist_ok=True)
        model_path = train_sentencepiece(
          by_split["train"], int(spec.get("vocab_size") or 1000), os.path.join(self._data_dir_root, f"spm_{key}")
        )
      if kind == "hf":
        model_path = spec.get("tokenizer_model") or ""
      tok = Tokenizer(kind, model_path, spec.get("vocab_size"))
      self.info.metadata.update(
        {
          "vocab_size": tok.vocab_size,
          "tokenizer": kind,
          "tokenizer_model": model_path or "",
          "n_documents": len(docs),
          "files": len(files),
        }
      )
      n = int(spec.get("doc_tokens", 512))
      return {s: self._generate_examples((tok, ds, n)) for s, ds in by_split.items()}

    def _generate_examples(self, what):
      tok, docs, n = what
      k = 0
      for d in docs:
        for c in _chunks(tok.encode(d), n):
          yield k, {"tokens": tok.frame(c)}
          k += 1

  return LmtraceText(config=TextConfig(), data_dir=spec["data_dir"], file_format="array_record")


def text_group(name: str, spec, data_dir: str | None) -> Group:
  import jax

  spec = dict(spec)
  spec["data_dir"] = spec.get("data_dir") or data_dir or tb.default_data_dir()
  files = _files(spec.get("path", ""))
  b = _builder(spec, files)
  if jax.process_index() == 0:
    b.download_and_prepare()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"lmtrace text {b.builder_config.name}")
    b = _builder(spec, files)
  md = b.info.metadata
  info = {"kind": "text", "tokenizer": md["tokenizer"], "tokenizer_model": md["tokenizer_model"], "tfds_dir": b.data_dir}
  return Group(name, tb.open_splits(b, name), int(md["vocab_size"]), info)


def tokenizer_for(group: Group) -> Tokenizer:
  return Tokenizer(group.info["tokenizer"], group.info.get("tokenizer_model") or None, group.vocab_size)
