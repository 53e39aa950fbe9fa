"""Array stores on disk: a directory of `.npy` files described by `manifest.json`.

Every offline job writes one store. Writing goes to `<dir>.partial/` (chunk files, each
written under a temporary name and renamed when complete, so an interrupted job resumes
from its last finished chunk); the store appears under its final name only once every
array and the manifest are complete (`os.replace` of the directory). Readers validate
the manifest (kind, array shapes and dtypes, file sizes) before they trust the data.

Manifest layout::

  {"kind": "database", "format_version": 1, "count": N,
   "arrays": {"embeddings": {"shape": [N, d], "dtype": "float32"}, ...},
   "encoder": {...}, "source": {...}, "made_by": "rdm_jax.jobs.embed", ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from rdm_jax.errors import fail

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _atomic_save_npy(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.save(f, array)
  os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def fingerprint(manifest: Mapping[str, Any]) -> str:
  """A short stable hash of a manifest: identifies the exact store a job consumed."""
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


def _finish(path: str, kind: str, arrays: Mapping[str, np.ndarray], fields: Mapping[str, Any]) -> Store:
  partial = path + ".partial"
  manifest = dict(kind=kind, format_version=FORMAT_VERSION, **fields)
  manifest["count"] = int(len(next(iter(arrays.values()))))
  manifest["arrays"] = {n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in arrays.items()}
  _atomic_write_text(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
  for leftover in os.listdir(partial):
    if leftover.startswith("chunk_") or leftover == "inputs.json":
      os.remove(os.path.join(partial, leftover))
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(partial, path)
  return read(path, kind, hint="(just written)")


def write_chunked(path: str, kind: str, count: int, chunk_size: int,
                  compute: Callable[[int, int], Mapping[str, np.ndarray]],
                  log: Callable[[str], None] = print, **manifest_fields: Any) -> Store:
  """Runs `compute(start, stop)` over [0, count) in chunks and writes a store, resumably.

  Each finished chunk is saved under `<path>.partial/chunk_<start>_<name>.npy`; a rerun
  after an interruption skips the chunks that exist. The chunks are concatenated along
  axis 0 into the final arrays when all are done.
  """
  if count <= 0:
    fail(f"nothing to write for {path}: the input has {count} examples")
  partial = path + ".partial"
  inputs = json.dumps({"count": count, "chunk_size": chunk_size, **manifest_fields}, sort_keys=True, default=str)
  inputs_path = os.path.join(partial, "inputs.json")
  if os.path.isdir(partial):
    previous = None
    if os.path.isfile(inputs_path):
      with open(inputs_path) as f:
        previous = f.read()
    if previous != inputs:  # chunks of another job configuration: never mix them in
      log(f"{partial} holds chunks made from other inputs; starting over")
      shutil.rmtree(partial)
  os.makedirs(partial, exist_ok=True)
  _atomic_write_text(inputs_path, inputs)
  starts = list(range(0, count, chunk_size))
  for start in starts:
    stop = min(start + chunk_size, count)
    done_marker = os.path.join(partial, f"chunk_{start:012d}.done")
    if os.path.exists(done_marker):
      continue
    out = compute(start, stop)
    for name, arr in out.items():
      arr = np.asarray(arr)
      if arr.shape[0] != stop - start:
        raise ValueError(f"chunk {start}:{stop} of {name} has {arr.shape[0]} rows")
      _atomic_save_npy(os.path.join(partial, f"chunk_{start:012d}_{name}.npy"), arr)
    _atomic_write_text(done_marker, ",".join(out))
    log(f"{path}: {stop}/{count} done")
  with open(os.path.join(partial, f"chunk_{starts[0]:012d}.done")) as f:
    names = f.read().split(",")
  arrays = {}
  for name in names:
    parts = [np.load(os.path.join(partial, f"chunk_{s:012d}_{name}.npy")) for s in starts]
    arrays[name] = np.concatenate(parts, axis=0)
    _atomic_save_npy(os.path.join(partial, name + ".npy"), arrays[name])
  return _finish(path, kind, arrays, manifest_fields)
