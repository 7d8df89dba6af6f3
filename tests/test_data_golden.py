"""Golden fingerprints of the data path, pinned from the code before the data/ restructuring
and before the vectorised packing: sampled sentences, exact log-probs, downstream-task
labels and packed training batches must stay bit-identical (sha256 of every array's dtype, shape and
bytes). A change here changes every cached TFDS build and every training run's data."""

import hashlib

import numpy as np
import pytest

from data import pipeline as dp
from data import sources, tfds_builders

SPECS = {
  "bigram": dict(kind="bigram", seed=3, n_terminals=12),
  "pcfg": dict(kind="pcfg", seed=2, n_nonterminals=25, n_roots=5, levels=3, n_terminals=40),
  "hmm": dict(kind="hmm", seed=4, n_states=12, n_tokens=40, length=10),
}


def _digest(obj) -> str:
  h = hashlib.sha256()

  def add(x):
    if isinstance(x, dict):
      for k in sorted(x):
        h.update(repr(k).encode())
        add(x[k])
    elif isinstance(x, (list, tuple)):
      h.update(f"[{len(x)}".encode())
      for v in x:
        add(v)
    else:
      a = np.asarray(x)
      h.update(f"{a.dtype.str}{a.shape}".encode())
      h.update(np.ascontiguousarray(a).tobytes())

  add(obj)
  return h.hexdigest()[:16]


def language_fingerprints() -> dict[str, str]:
  out = {}
  for kind, spec in SPECS.items():
    lang = sources.language(spec)
    out[f"{kind}/examples"] = _digest(sources.synthetic_examples(lang, 24, 7, with_true=True))
    out[f"{kind}/train_examples"] = _digest(sources.synthetic_examples(lang, 24, 0, with_true=False))
    out[f"{kind}/tasks"] = _digest(tfds_builders.downstream_tasks(lang, 80, 11))
  return out


@pytest.fixture(scope="module")
def group_sources():
  return [sources.ListSource(sources.synthetic_examples(sources.language(s), 300, 5, with_true=True)) for s in SPECS.values()]


def batch_fingerprints(srcs) -> dict[str, str]:
  out = {}
  p = (0.2, 0.3, 0.5)
  for name, kw, steps in (
    ("mix_cached", dict(), (0, 1, 7)),
    ("mix_uncached", dict(cache_tokens=0), (0, 7)),
    ("mix_rows3_11_k5", dict(rows=(3, 11), docs_per_row=5), (2, 40)),
    ("mix_mlm", dict(objective="mlm", vocab_size=44), (0, 3)),
  ):
    pipe = dp.Pipeline(srcs, seed=9, global_batch=16, seq_len=48, group_names=["a", "b", "c"], **kw)
    out[name] = _digest([pipe.batch(s, p) for s in steps])
  for i, s in enumerate(srcs):
    pipe = dp.Pipeline([s], seed=1, global_batch=8, seq_len=32)
    out[f"single_{i}"] = _digest([pipe.batch(t) for t in (0, 5)])
  return out


GOLDEN_LANGUAGES = {
  "bigram/examples": "f2ed7f7fa0b780e1",
  "bigram/tasks": "e3b0c44298fc1c14",  # no downstream tasks: the empty digest
  "bigram/train_examples": "5b3779dc866351e7",
  "hmm/examples": "5b85161c9dc2e6f8",
  "hmm/tasks": "371f37339f256d8d",
  "hmm/train_examples": "a2823db9ece589d8",
  "pcfg/examples": "f45b67aaef064823",
  "pcfg/tasks": "c56811d7162b2988",
  "pcfg/train_examples": "3dd66af69871e50d",
}
GOLDEN_BATCHES = {
  "mix_cached": "b8f4fe701948adfb",
  "mix_mlm": "1b9a13d0bae3525a",
  "mix_rows3_11_k5": "2aa32b2a5a5f1ffd",
  "mix_uncached": "e242105fd433b519",
  "single_0": "9dcc9c8c7901ec1b",
  "single_1": "758c5d8af4730ab2",
  "single_2": "f14935349c1c02ef",
}


def test_languages_are_bit_identical():
  assert language_fingerprints() == GOLDEN_LANGUAGES


def test_batches_are_bit_identical(group_sources):
  assert batch_fingerprints(group_sources) == GOLDEN_BATCHES


def test_every_language_implements_the_protocol():
  from data.types import Language

  for kind, spec in SPECS.items():
    lang = sources.language(spec)
    assert isinstance(lang, Language), kind
    sents = lang.sentences(5, 0)
    assert all(s.dtype == np.int32 and s.ndim == 1 for s in sents)
    assert [len(lp) for lp in lang.token_logprobs_batch(sents)] == [len(s) + 1 for s in sents]
  with pytest.raises(dp.DataError, match="not a synthetic language kind"):
    sources.language({"kind": "text"})
