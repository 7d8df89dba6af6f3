"""External (Hugging Face) tokenizers as first-class lmtrace vocabularies.

lmtrace's own languages reserve ids 0-3 (PAD, BOS, EOS, MASK; data/vocab.py) and shift their terminals
past them. An imported model keeps its *own* ids: a local `tokenizer.json` (the `tokenizers` library,
nothing downloaded) encodes text to the model's ids unshifted, and the model's own special ids frame a
document as [bos, ids..., eos]. `Tokenizer.frame` is the one place that framing happens.

The special ids come from, in order: the HF `config.json` next to the tokenizer (bos_token_id,
eos_token_id, pad_token_id), `special_tokens_map.json` / `tokenizer_config.json` token strings looked
up in the vocabulary, else `<|endoftext|>` / `</s>` when present.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lib.errors import DataError

TOKENIZER_JSON = "tokenizer.json"


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"cannot read {path}: {e}") from e


def _token_str(v) -> str | None:
  if isinstance(v, dict):
    return v.get("content")
  return v if isinstance(v, str) else None


class HFTokenizer:
  """A local tokenizer.json with the model's special ids. Ids are the model's own (not shifted)."""

  kind = "hf"

  def __init__(self, path: str):
    path = os.path.expanduser(path)
    file = os.path.join(path, TOKENIZER_JSON) if os.path.isdir(path) else path
    if not os.path.exists(file):
      raise DataError(f"no {TOKENIZER_JSON} at {path}")
    try:
      import tokenizers
    except ImportError as e:  # pragma: no cover - tokenizers is in requirements.txt
      raise DataError("the `tokenizers` package is needed for Hugging Face tokenizers (pip install tokenizers)") from e
    try:
      self.tk = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # noqa: BLE001 - a malformed file is one clear line
      raise DataError(f"cannot read tokenizer {file}: {str(e)[:200]}") from e
    self.path = os.path.abspath(file)
    d = os.path.dirname(self.path)
    hf_cfg = _read_json(os.path.join(d, "config.json"))
    names = {**_read_json(os.path.join(d, "tokenizer_config.json")), **_read_json(os.path.join(d, "special_tokens_map.json"))}
    self.n = int(self.tk.get_vocab_size(with_added_tokens=True))
    ids = {}
    for role in ("bos", "eos", "pad"):
      v = hf_cfg.get(f"{role}_token_id")
      if v is None and _token_str(names.get(f"{role}_token")) is not None:
        v = self.tk.token_to_id(_token_str(names[f"{role}_token"]))
      ids[role] = v
    fallback = next((self.tk.token_to_id(t) for t in ("<|endoftext|>", "</s>") if self.tk.token_to_id(t) is not None), None)
    self.eos_id = int(ids["eos"] if ids["eos"] is not None else (fallback if fallback is not None else 0))
    self.bos_id = int(ids["bos"] if ids["bos"] is not None else self.eos_id)
    self.pad_id = int(ids["pad"] if ids["pad"] is not None else self.eos_id)

  @property
  def vocab_size(self) -> int:
    """Tokens the tokenizer can emit (the model's embedding may have more rows, e.g. Pythia's padding)."""
    return self.n

  def special_ids(self) -> dict:
    return {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}

  def encode(self, text: str) -> np.ndarray:
    """Model ids of `text`, without special tokens."""
    return np.asarray(self.tk.encode(text, add_special_tokens=False).ids, np.int32)

  def frame(self, ids) -> np.ndarray:
    return np.concatenate([[self.bos_id], np.asarray(ids, np.int32), [self.eos_id]]).astype(np.int32)

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in (self.bos_id, self.eos_id, self.pad_id)]
    return self.tk.decode(ids)

  def check_model_vocab(self, model_vocab: int, where: str = "") -> None:
    """Refuses a tokenizer that can emit ids the embedding does not have."""
    if self.n > model_vocab:
      raise DataError(
        f"tokenizer {self.path} has {self.n} tokens but the model{where} embeds only {model_vocab}: not this model's tokenizer"
      )
    for role, i in self.special_ids().items():
      if not 0 <= i < model_vocab:
        raise DataError(f"tokenizer {self.path}: {role} id {i} is outside the model's vocabulary of {model_vocab}")
