"""Array stores on disk: a directory of `.npy` files described by `manifest.json`.

Every offline job writes one store. Writing goes to `<dir>.partial/` (chunk files, each
written under a temporary name and renamed when complete, so an interrupted job resumes
from its last finished chunk); the store appears under its final name only once every
array and the manifest are complete (`os.replace` of the directory). Readers validate
the manifest (kind, array shapes and dtypes, file sizes) before they trust the data.

Manifest layout::

  {"kind": "database", "format_version": 1, "count": N,
   "arrays": {"embeddings": {"shape": [N, d], "dtype": "float32", "sha256": "..."}, ...},
   "encoder": {...}, "source": {...}, "made_by": "rdm_jax.jobs.embed", ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rdm_jax.errors import fail

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INPUTS = "inputs.json"    # in <store>.partial/: what the chunks there were computed from
MERGE_LOCK = "merging"    # in <store>.partial/: the directory a merging process holds


def _atomic_save_npy(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.save(f, array)
  os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
  """Writes a text file under a temporary name, then renames it into place."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def checksum(array: np.ndarray, block_bytes: int = 1 << 26) -> str:
  """sha256 (16 hex digits) of an array's bytes, read in blocks (memory-mapped arrays stay on disk).

  Part of every manifest, so the fingerprint of a store changes with its content.
  """
  h = hashlib.sha256()
  flat = array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)
  rows = max(1, block_bytes // max(1, flat[:1].nbytes))
  for a in range(0, len(flat), rows):
    h.update(np.ascontiguousarray(flat[a:a + rows]).data)
  return h.hexdigest()[:16]


def fingerprint(manifest: Mapping[str, Any]) -> str:
  """A short stable hash of a manifest (which holds the arrays' checksums): identifies the
  exact store a job consumed."""
  blob = json.dumps(manifest, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Store:
  """A validated store: its directory, manifest and memory-mapped arrays."""

  path: str
  manifest: dict[str, Any]
  arrays: dict[str, np.ndarray]

  @property
  def fingerprint(self) -> str:
    return fingerprint(self.manifest)

  def __getitem__(self, name: str) -> np.ndarray:
    return self.arrays[name]


def read_rows(s: Store, name: str, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) of an array as a fresh in-memory array, read with file I/O.

  Unlike slicing the memory map, this leaves no mapped file pages behind in the process
  (they count towards its resident memory while a large shard is being indexed).
  """
  arr = s.arrays[name]
  start, stop = max(0, start), min(stop, len(arr))
  row_items = int(np.prod(arr.shape[1:], dtype=np.int64))
  with open(os.path.join(s.path, name + ".npy"), "rb") as f:
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    _, fortran_order, _ = read_header(f)  # leaves f at the first element
    if fortran_order:
      return np.array(arr[start:stop])
    f.seek(start * row_items * arr.dtype.itemsize, os.SEEK_CUR)
    out = np.fromfile(f, dtype=arr.dtype, count=(stop - start) * row_items)
  return out.reshape((stop - start,) + arr.shape[1:])


def exists(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MANIFEST))


def reusable(path: str, kind: str, hint: str, **expected: Any) -> Store | None:
  """The complete store at `path` if its manifest matches `expected`, else None (recompute).

  Lets a rerun job skip finished work, but never reuse a store made from other inputs
  (another encoder, source range or first stage than the config now asks for).
  """
  if not exists(path):
    return None
  existing = read(path, kind, hint=hint)
  stale = [k for k, v in expected.items() if existing.manifest.get(k) != v]
  if stale:
    print(f"{path} was made with other {', '.join(stale)}; recomputing")
    return None
  print(f"{path} exists and matches the config; skipping (delete it to recompute)")
  return existing


def read(path: str, kind: str, hint: str, mmap: bool = True) -> Store:
  """Opens and validates the store at `path`.

  Args:
    path: store directory.
    kind: the `kind` the manifest must carry (e.g. "database").
    hint: the command that makes this store, quoted in errors.
    mmap: memory-map arrays instead of reading them into RAM.
  """
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path):
    partial = " (an interrupted run left " + path + ".partial; rerun to resume)" if os.path.isdir(
        path + ".partial") else ""
    fail(f"no {kind} store at {path}{partial}: run `{hint}` first")
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    fail(f"{manifest_path} is not valid JSON ({e}); delete {path} and rerun `{hint}`")
  if manifest.get("kind") != kind:
    fail(f"{path} holds a {manifest.get('kind')!r} store, expected {kind!r}; check the path or rerun `{hint}`")
  if manifest.get("format_version") != FORMAT_VERSION:
    fail(f"{path} has store format {manifest.get('format_version')}, this code reads {FORMAT_VERSION}; rerun `{hint}`")
  arrays = {}
  for name, spec in manifest["arrays"].items():
    file = os.path.join(path, name + ".npy")
    if not os.path.isfile(file):
      fail(f"{file} is missing; delete {path} and rerun `{hint}`")
    try:
      arr = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      fail(f"{file} is truncated or corrupt ({e}); delete {path} and rerun `{hint}`")
    if list(arr.shape) != list(spec["shape"]) or str(arr.dtype) != spec["dtype"]:
      fail(f"{file} is {arr.dtype}{list(arr.shape)} but the manifest says {spec['dtype']}{spec['shape']}; "
           f"delete {path} and rerun `{hint}`")
    arrays[name] = arr
  return Store(path=path, manifest=manifest, arrays=arrays)


def write(path: str, kind: str, arrays: Mapping[str, np.ndarray], **manifest_fields: Any) -> Store:
  """Writes a complete store atomically (all arrays, then the manifest, then rename)."""
  partial = path + ".partial"
  os.makedirs(partial, exist_ok=True)
  for name, arr in arrays.items():
    _atomic_save_npy(os.path.join(partial, name + ".npy"), np.asarray(arr))
  return _finish(path, kind, {k: np.asarray(v) for k, v in arrays.items()}, manifest_fields)


def publish(partial: str, path: str) -> None:
  """Moves a completed `<path>.partial` directory to `path` (replacing an older store)."""
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(partial, path)


def _finish(path: str, kind: str, arrays: Mapping[str, np.ndarray], fields: Mapping[str, Any]) -> Store:
  partial = path + ".partial"
  manifest = dict(kind=kind, format_version=FORMAT_VERSION, **fields)
  manifest["count"] = int(len(next(iter(arrays.values()))))
  manifest["arrays"] = {n: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": checksum(a)}
                        for n, a in arrays.items()}
  atomic_write_text(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
  for leftover in os.listdir(partial):
    if leftover.startswith("chunk_") or leftover == INPUTS:
      os.remove(os.path.join(partial, leftover))
    elif leftover == MERGE_LOCK:
      os.rmdir(os.path.join(partial, leftover))
  publish(partial, path)
  return read(path, kind, hint="(just written)")


def open_partial(path: str, inputs: Mapping[str, Any], log: Callable[[str], None] = print,
                 owner: bool = True, wait_s: float = 600.0) -> str:
  """Prepares `<path>.partial/` for a resumable job whose work depends on `inputs`.

  Work left there by a run with the same inputs is kept (resume); work from other inputs is
  never mixed in: the owner (process 0) clears it, other processes wait for the owner.
  """
  partial = path + ".partial"
  text = json.dumps(dict(inputs), sort_keys=True, default=str)
  inputs_path = os.path.join(partial, INPUTS)

  def current():
    try:
      with open(inputs_path) as f:
        return f.read()
    except FileNotFoundError:
      return None

  if not owner:
    deadline = time.monotonic() + wait_s
    while current() != text:
      if time.monotonic() > deadline:
        fail(f"{partial} was not prepared for these inputs by process 0 within {wait_s:.0f} s; "
             "start process 0 with the same config and flags")
      time.sleep(0.5)
    return partial
  if os.path.isdir(partial) and current() != text:
    log(f"{partial} holds work made from other inputs; starting over")
    shutil.rmtree(partial)
  os.makedirs(partial, exist_ok=True)
  atomic_write_text(inputs_path, text)
  return partial


def process_block(items: Sequence[int], process_index: int, process_count: int) -> Sequence[int]:
  """The `process_index`-th of `process_count` contiguous blocks of `items`."""
  if not 0 <= process_index < process_count:
    fail(f"process index {process_index} is outside [0, {process_count})")
  n = len(items)
  return items[process_index * n // process_count:(process_index + 1) * n // process_count]


def write_chunked(path: str, kind: str, count: int, chunk_size: int,
                  compute: Callable[[int, int], Mapping[str, np.ndarray]],
                  log: Callable[[str], None] = print, process_index: int = 0, process_count: int = 1,
                  finalize: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]] | None = None,
                  **manifest_fields: Any) -> Store | None:
  """Runs `compute(start, stop)` over [0, count) in chunks and writes a store, resumably.

  Each finished chunk is saved under `<path>.partial/chunk_<start>_<name>.npy`; a rerun
  after an interruption skips the chunks that exist. With `process_count` > 1 (processes
  or hosts sharing the filesystem), process p computes the p-th contiguous block of chunks.
  The process that finds every chunk done merges them into the final arrays, streaming
  through memory-mapped files so RAM stays at one chunk; `finalize(arrays)` may then add
  manifest fields (e.g. a quality check of the merged result). It returns the Store; a
  process that leaves the merge to another returns None.
  """
  if count <= 0:
    fail(f"nothing to write for {path}: the input has {count} examples")
  partial = open_partial(path, {"count": count, "chunk_size": chunk_size, **manifest_fields}, log,
                         owner=process_index == 0)
  starts = range(0, count, chunk_size)

  def marker(start):
    return os.path.join(partial, f"chunk_{start:012d}.done")

  for start in process_block(starts, process_index, process_count):
    stop = min(start + chunk_size, count)
    if os.path.exists(marker(start)):
      continue
    out = compute(start, stop)
    for name, arr in out.items():
      arr = np.asarray(arr)
      if arr.shape[0] != stop - start:
        raise ValueError(f"chunk {start}:{stop} of {name} has {arr.shape[0]} rows")
      _atomic_save_npy(os.path.join(partial, f"chunk_{start:012d}_{name}.npy"), arr)
    atomic_write_text(marker(start), ",".join(out))
    log(f"{path}: rows {start}:{stop} done ({stop - start} of {count})")
  missing = [s for s in starts if not os.path.exists(marker(s))]
  if missing:
    log(f"{path}: {len(starts) - len(missing)}/{len(starts)} chunks done; the process that "
        "finishes the last chunk merges them")
    return None
  try:
    os.makedirs(os.path.join(partial, MERGE_LOCK), exist_ok=process_count == 1)  # alone: a lock is stale
  except FileExistsError:
    log(f"{path}: another process is merging; if none is running, remove "
        f"{os.path.join(partial, MERGE_LOCK)} and rerun")
    return None
  with open(marker(starts[0])) as f:
    names = f.read().split(",")
  arrays = {}
  for name in names:
    first = np.load(os.path.join(partial, f"chunk_{starts[0]:012d}_{name}.npy"), mmap_mode="r")
    final = os.path.join(partial, name + ".npy")
    merged = np.lib.format.open_memmap(final + ".tmp", mode="w+", dtype=first.dtype,
                                       shape=(count,) + first.shape[1:])
    for start in starts:
      merged[start:start + chunk_size] = np.load(os.path.join(partial, f"chunk_{start:012d}_{name}.npy"))
    merged.flush()
    del merged
    os.replace(final + ".tmp", final)
    arrays[name] = np.load(final, mmap_mode="r")
  extra = dict(finalize(arrays)) if finalize else {}
  return _finish(path, kind, arrays, {**manifest_fields, **extra})


def link_npy(npy_path: str, path: str, kind: str, hint: str, **manifest_fields: Any) -> Store:
  """A store around a user's [N, d] float `.npy` file (bring-your-own embeddings), without a copy.

  `embeddings.npy` is a symbolic link to the file, `ids` are its row numbers, and the
  source records the file's path, size and modification time: if the file changes, the
  store (and so every index or neighbour set made from it) is recognised as stale.
  """
  real = os.path.realpath(npy_path)
  if not os.path.isfile(real):
    fail(f"{npy_path} does not exist")
  try:
    emb = np.load(real, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    fail(f"{npy_path} is not a readable .npy array ({e})")
  if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
    fail(f"{npy_path} holds {emb.dtype}{list(emb.shape)}; embeddings must be a 2-D float array [N, d]")
  st = os.stat(real)
  source = {"file": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
  done = reusable(path, kind, hint, source=source)
  if done is not None:
    return done
  partial = path + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  os.symlink(real, os.path.join(partial, "embeddings.npy"))
  ids = np.arange(len(emb), dtype=np.int64)
  _atomic_save_npy(os.path.join(partial, "ids.npy"), ids)
  return _finish(path, kind, {"embeddings": emb, "ids": ids},
                 {"source": source, "encoder": {"name": "external", "embed_dim": int(emb.shape[1])},
                  **manifest_fields})

