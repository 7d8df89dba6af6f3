"""Per-file checksums of a committed checkpoint directory: seal after the commit, verify before reading.

Why files and not arrays: with async saves the arrays are written by Orbax's background threads
and, on several hosts, each process writes only its own shards (`ocdbt.process_<i>/`); hashing the
committed files once the step is final covers every byte any reader will ever see (array chunks,
tree metadata, sharding, the JSON `meta`), needs no gather of sharded arrays, and is independent of
the mesh the checkpoint is later restored onto. Process 0 seals (the checkpoint lives on a file
system every host sees, as Orbax requires); every reader verifies the items it is about to read.

Manifest `lmtrace_manifest.json`: {"format": 1, "algorithm": "crc32", "files": {relpath: [size, crc32]}}.
CRC32 detects every single-bit flip and every burst up to 32 bits, and runs at several GB/s
(it guards against storage corruption, not against an adversary); the size catches truncation.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

from lib import errors
from lib import io as lio

MANIFEST = "lmtrace_manifest.json"
FORMAT = 1
_CHUNK = 16 << 20


def _crc(path: str) -> tuple[int, int]:
  """(size, crc32) of a file, read in chunks into one reused buffer (plain reads, not mmap: a file
  truncated under an mmap kills the reader with SIGBUS)."""
  buf = bytearray(_CHUNK)
  view = memoryview(buf)
  crc, size = 0, 0
  with open(path, "rb", buffering=0) as f:
    while n := f.readinto(buf):
      crc = zlib.crc32(view[:n], crc)  # releases the GIL: threads hash files in parallel
      size += n
  return size, crc


def _files(step_dir: str, items=None) -> list[str]:
  out = []
  for root, _, files in os.walk(step_dir):
    for f in files:
      rel = os.path.relpath(os.path.join(root, f), step_dir)
      if rel == MANIFEST or (items is not None and rel.split(os.sep)[0] not in items):
        continue
      out.append(rel)
  return sorted(out)


def _hash_all(step_dir: str, rels: list[str]) -> dict[str, tuple[int, int]]:
  with ThreadPoolExecutor(max_workers=min(8, max(1, len(rels)))) as ex:
    return dict(zip(rels, ex.map(lambda r: _crc(os.path.join(step_dir, r)), rels)))


def seal(step_dir: str) -> None:
  """Writes the manifest of the committed checkpoint `step_dir` (atomically)."""
  sums = _hash_all(step_dir, _files(step_dir))
  lio.atomic_json(
    os.path.join(step_dir, MANIFEST),
    {"format": FORMAT, "algorithm": "crc32", "files": {r: list(v) for r, v in sums.items()}},
  )


def _promised(step_dir: str) -> bool:
  """The checkpoint's meta says a manifest would follow its commit."""
  try:
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
      return "integrity" in json.load(f)
  except (OSError, ValueError):
    return False


def sealed_or_legacy(step_dir: str) -> bool:
  """Readable as far as sealing goes: sealed, or written before manifests existed."""
  return os.path.exists(os.path.join(step_dir, MANIFEST)) or not _promised(step_dir)


def verify(step_dir: str, items=None) -> str:
  """'ok' if every file of `items` (top-level entries; None = all) matches the manifest, 'legacy' if
  the checkpoint predates manifests; otherwise CheckpointError naming the first problems found."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    if _promised(step_dir):
      raise errors.CheckpointError(f"{step_dir} was never sealed (its writer stopped before the integrity manifest)")
    return "legacy"
  try:
    with open(path) as f:
      man = json.load(f)
    files = {r: tuple(v) for r, v in man["files"].items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise errors.CheckpointError(f"{step_dir}: integrity manifest unreadable ({type(e).__name__}: {e})") from None
  if items is not None:
    files = {r: v for r, v in files.items() if r.split("/")[0] in items}
  on_disk = set(_files(step_dir, items))
  problems = [f"{r} missing" for r in sorted(set(files) - on_disk)]
  problems += [f"{r} not in the manifest" for r in sorted(on_disk - set(files))]
  got = _hash_all(step_dir, sorted(on_disk & set(files)))
  for r, (size, crc) in got.items():
    want_size, want_crc = files[r]
    if size != want_size:
      problems.append(f"{r} has {size} bytes, {want_size} when saved")
    elif crc != want_crc:
      problems.append(f"{r} fails its checksum (crc32 {crc:08x}, {want_crc:08x} when saved)")
  if problems:
    more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
    raise errors.CheckpointError(f"{step_dir} is damaged: {'; '.join(problems[:3])}{more}")
  return "ok"


def read_verified(step_dir: str, items, read):
  """(read(), verdict): `read` runs while the files of `items` are verified beside it in a thread;
  its result is returned only if they pass (else the CheckpointError naming the damage, whatever
  `read` did with the damaged bytes). The verification's wall time hides behind the read's."""
  with ThreadPoolExecutor(max_workers=1) as ex:
    fut = ex.submit(verify, step_dir, items)
    try:
      out, err = read(), None
    except Exception as e:  # noqa: BLE001 - re-raised below, once the verdict on the files is known
      out, err = None, e
    verdict = fut.result()  # raises CheckpointError for damaged files
  if err is not None:
    raise err
  return out, verdict
