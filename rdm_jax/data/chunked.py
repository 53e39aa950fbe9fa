"""Writing a store in resumable chunks, from one process or many (`write_chunked`).

Each chunk of rows is saved in `<store>.partial/` under a name carrying the digest of the
inputs it was computed from, so a rerun skips the finished chunks and a process started with
other inputs never contributes; the process that finds every chunk done merges them into the
store's arrays and publishes it (`store.seal`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rdm_jax import files, preemption, untrusted
from rdm_jax.data import store
from rdm_jax.data.lock import Lock
from rdm_jax.errors import fail


def process_block(items: Sequence[int], process_index: int, process_count: int) -> Sequence[int]:
  """The `process_index`-th of `process_count` contiguous blocks of `items`."""
  if not 0 <= process_index < process_count:
    fail(f"process index {process_index} is outside [0, {process_count})")
  n = len(items)
  return items[process_index * n // process_count : (process_index + 1) * n // process_count]


def _complete_store(path: str, kind: str, digest: str) -> store.Store | None:
  """The store at `path` if it is complete and was made from the inputs with this digest."""
  if store.exists(path) and store.manifest_kind(path) == kind:
    s = store.read(path, kind, hint="(this job)", verify=False)
    if s.manifest.get("inputs_sha256") == digest:
      return s
  return None


def write_chunked(
  path: str,
  kind: str,
  count: int,
  chunk_size: int,
  compute: Callable[[int, int], Mapping[str, np.ndarray]],
  log: Callable[[str], None] = print,
  process_index: int = 0,
  process_count: int = 1,
  finalize: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]] | None = None,
  variable_rows: bool = False,
  **manifest_fields: Any,
) -> store.Store | None:
  """Runs `compute(start, stop)` over [0, count) in chunks and writes a store, resumably.

  Each finished chunk is saved under `<path>.partial/chunk_<inputs digest>_<start>_<name>.npy`;
  a rerun after an interruption skips the chunks that exist. With `process_count` > 1
  (processes or hosts sharing the filesystem), process p computes the p-th contiguous block of
  chunks, and the process that finds every chunk done merges them (under the store's lock)
  into the final arrays, streaming through memory-mapped files so RAM stays at one chunk;
  `finalize(arrays)` may then add manifest fields (e.g. a quality check of the merged result).
  With `variable_rows`, a chunk of inputs [start, stop) may give any number of rows (the same
  for all its arrays; e.g. several crops per image, none for an unreadable one).
  A single process holds the lock throughout, so a second copy of the job waits and reuses
  its result. It returns the Store; a process that leaves the merge to another returns None.
  """
  if count <= 0:
    fail(f"nothing to write for {path}: the input has {count} examples")
  path = store.check_output(path, kind)
  inputs = {"count": count, "chunk_size": chunk_size, **manifest_fields}
  digest = store.inputs_digest(inputs)
  alone = process_count == 1
  lock = Lock(path, log)
  if alone:
    lock.acquire()
  try:
    if alone and (done := _complete_store(path, kind, digest)) is not None:
      log(f"{path} was written by another run from the same inputs; reusing it")
      return done
    partial = store.open_partial(path, inputs, log, owner=process_index == 0)
    if (
      alone and store.exists(partial) and store.manifest_kind(partial) == kind
    ):  # finished, not yet published (crash)
      store.publish(partial, path, kind)
      return store.read(path, kind, hint="(this job)")
    starts = range(0, count, chunk_size)

    def chunk(start, name=None):
      return os.path.join(
        partial, f"chunk_{digest}_{start:012d}" + (f"_{name}.npy" if name else ".done")
      )

    todo = [
      s for s in process_block(starts, process_index, process_count) if not os.path.exists(chunk(s))
    ]
    for start in todo:
      stop = min(start + chunk_size, count)
      out = compute(start, stop)
      store.check_array_names(out)
      rows = {np.shape(arr)[0] for arr in out.values()}
      for name, arr in out.items():
        arr = np.asarray(arr)
        if (arr.shape[0] != stop - start and not variable_rows) or len(rows) > 1:
          raise ValueError(f"chunk {start}:{stop} of {name} has {arr.shape[0]} rows")
        store.save_npy(chunk(start, name), arr)
      files.atomic_write_text(chunk(start), ",".join(out))
      if (
        start == todo[0]
      ):  # the first chunk computed tells the size of a row: is there room for the rest?
        _need_room_for_rest(
          partial,
          out,
          stop - start,
          sum(min(s + chunk_size, count) - s for s in todo[1:]) + (count if alone else 0),
        )
      lock.refresh()
      log(f"{path}: rows {start}:{stop} done ({stop - start} of {count})")
      if (
        preemption.requested()
      ):  # SIGTERM (jobs arm it: preemption.install); the chunks so far are kept
        preemption.stop(f"{path}: rows to {stop} of this process's block are saved in {partial}")
    missing = [s for s in starts if not os.path.exists(chunk(s))]
    if missing:
      log(
        f"{path}: {len(starts) - len(missing)}/{len(starts)} chunks done; the process that "
        "finishes the last chunk merges them"
      )
      return None
    if not alone:
      lock.acquire()
      if _complete_store(path, kind, digest) is not None or not os.path.exists(chunk(starts[0])):
        log(f"{path}: another process merged the chunks")
        return None
    with untrusted.open_regular(chunk(starts[0]), "r", encoding="utf-8") as f:
      names = f.read(1 << 16).split(",")
    store.check_array_names(names)
    arrays = {}
    sizes = [untrusted.load_npy(chunk(s, names[0]), mmap=True).shape[0] for s in starts]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    if offsets[-1] == 0:
      fail(f"nothing to write for {path}: no input gave a row")
    for name in names:
      first = untrusted.load_npy(chunk(starts[0], name), mmap=True)
      final = os.path.join(partial, name + ".npy")
      tmp = files.tmp_name(final)
      merged = _preallocated_npy(tmp, final, first.dtype, (int(offsets[-1]),) + first.shape[1:])
      for i, start in enumerate(starts):
        merged[offsets[i] : offsets[i + 1]] = untrusted.load_npy(chunk(start, name), mmap=True)
      merged.flush()
      del merged
      os.replace(tmp, final)
      arrays[name] = untrusted.load_npy(final, mmap=True)
      lock.refresh()
    extra = dict(finalize(arrays)) if finalize else {}
    del arrays
    return store.seal(path, kind, names, {**manifest_fields, **extra}, digest)
  finally:
    lock.release()


def _need_room_for_rest(
  partial: str, first: Mapping[str, np.ndarray], first_rows: int, rows_left: int
) -> None:
  """Stops a store job in one line, after its first chunk and before the others, when the rows it
  still has to write (its chunks, then the merged arrays) will not fit on the disk."""
  row_bytes = sum(np.asarray(a).nbytes for a in first.values()) / max(1, first_rows)
  files.need_room(
    partial,
    int(row_bytes * rows_left) + (1 << 20),
    "the rest of this store (its chunks, then the merged arrays)",
  )


def _preallocated_npy(path: str, final: str, dtype: np.dtype, shape: tuple) -> np.ndarray:
  """A writable memory-mapped .npy at `path` (to be renamed `final`) whose blocks are allocated on
  disk first: on a full disk that is one line here, where writing through the map of a sparse file
  would end the process (SIGBUS)."""
  files.need_room(final, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize + 4096)
  np.lib.format.open_memmap(
    path, mode="w+", dtype=dtype, shape=shape
  ).flush()  # the header, a sparse body
  try:
    with open(path, "r+b") as f:
      os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
  except OSError as e:
    os.remove(path)
    files.write_failed(e, final)
  return np.lib.format.open_memmap(path, mode="r+")
