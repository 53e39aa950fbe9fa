"""Array stores on disk: a directory of `.npy` files described by `manifest.json`.

Every offline job writes one store. Writing goes to `<dir>.partial/` (chunk files, each
written under a temporary name and renamed when complete, so an interrupted job resumes
from its last finished chunk); the store appears under its final name only once every
array and the manifest are complete. Readers validate the manifest (kind, array names,
shapes and dtypes, file sizes, and the arrays' sha256 for stores up to `VERIFY_BELOW_BYTES`
or with `--verify`) before they trust the data.

What a job may write or delete (nothing the user owns is ever removed):
- output paths are normalised (`normalize`: a trailing slash names the same store);
- a job refuses, before computing anything, an output path that holds anything but a store
  of the kind it writes, and a `<dir>.partial` that is not a partial store (`check_output`);
- one process at a time publishes a store (`Lock`: `<dir>.lock` holds pid, host and process
  start time, and its holder touches it every `lock.HEARTBEAT_S`; a lock whose process is gone,
  or on another host not refreshed for `lock.STALE_S`, is broken: rdm_jax/data/lock.py); a
  single-process job holds it from start to end, so a second copy of the same job waits and then
  reuses the first one's result;
- publishing renames the old store aside, moves the new one in, then deletes the old one
  (a crash in between leaves both on disk);
- a job deletes only files it can prove it wrote (`remove_own`): a store's manifest names its
  files, a `<dir>.partial` holds only the names our jobs give their records, chunks and
  shards; a directory holding anything else is refused with one line naming those files;
- chunk files carry the hash of the inputs they were computed from, so a process started
  with another config can never contribute to a store.

Manifest layout::

  {"kind": "database", "format_version": 1, "count": N, "inputs_sha256": "...",
   "arrays": {"embeddings": {"shape": [N, d], "dtype": "float32", "sha256": "..."}, ...},
   "encoder": {...}, "source": {...}, "made_by": "rdm_jax.jobs.embed", ...}
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rdm_jax import files, untrusted
from rdm_jax.data.lock import Lock
from rdm_jax.errors import UserError, fail

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INPUTS = "inputs.json"  # in <store>.partial/: what the chunks there were computed from
ARRAY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
VERIFY_BELOW_BYTES = (
  1 << 30
)  # stores up to this size are checksummed whenever they are read (~0.6 s/GiB)
_verify_all = False


def verify_all_stores(enabled: bool = True) -> None:
  """Checksum every store read from now on, whatever its size (the jobs' --verify flag)."""
  global _verify_all
  _verify_all = enabled


def normalize(path: str) -> str:
  """The canonical spelling of a store path (`out/` and `out/.` name the store `out`); a bucket URI
  is refused: stores are memory-mapped, renamed into place and locked, which needs a filesystem."""
  return files.filesystem_path(
    path,
    "stores (config.data_dir, config.database, indexes) need a filesystem, not a bucket (they are "
    "memory-mapped, renamed into place and locked): mount the bucket with gcsfuse or use a shared "
    "filesystem (NFS, Filestore) and give its path; run directories (--workdir) may be gs://",
  )


# atomic writes and digests: the one file layer's (local paths here:
# stores are on POSIX filesystems)
_tmp_name, _tmp_pattern = files.tmp_name, files.tmp_pattern
remove_own_temporaries, atomic_savez, atomic_write_text = (
  files.remove_own_temporaries,
  files.atomic_savez,
  files.atomic_write_text,
)
file_sha256 = files.sha256


def save_npy(path: str, array: np.ndarray) -> None:
  files.atomic_write(
    path, lambda f: np.save(f, array), size=array.nbytes + 4096
  )  # + the .npy header


def inputs_digest(inputs: Mapping[str, Any]) -> str:
  """16 hex digits of sha256 over what a store is computed from (its chunk files carry it)."""
  return hashlib.sha256(json.dumps(dict(inputs), sort_keys=True, default=str).encode()).hexdigest()[
    :16
  ]


def checksum(array: np.ndarray, block_bytes: int = 1 << 26) -> str:
  """sha256 (16 hex digits) of an array's bytes, read in blocks (memory-mapped arrays stay on disk).

  Part of every manifest, so the fingerprint of a store changes with its content.
  """
  h = hashlib.sha256()
  flat = array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)
  rows = max(1, block_bytes // max(1, flat[:1].nbytes))
  for a in range(0, len(flat), rows):
    h.update(np.ascontiguousarray(flat[a : a + rows]).data)
  return h.hexdigest()[:16]


def fingerprint(manifest: Mapping[str, Any]) -> str:
  """A short stable hash of a manifest (which holds the arrays' checksums): identifies the
  exact store a job consumed."""
  blob = json.dumps(manifest, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def file_state(path: str) -> list[int]:
  """[inode, size, mtime in ns] of a file: any write changes the time (through a memory map too, at
  the first write to each clean page), a truncation the size, a replacement the inode."""
  st = os.stat(path)
  return [st.st_ino, st.st_size, st.st_mtime_ns]


@dataclass(frozen=True)
class Store:
  """A validated store: its directory, manifest and memory-mapped arrays, and the state of its
  array files when they were validated (`changed` compares them with the files now)."""

  path: str
  manifest: dict[str, Any]
  arrays: dict[str, np.ndarray]
  states: dict[str, list[int]] = field(default_factory=dict)

  @property
  def fingerprint(self) -> str:
    return fingerprint(self.manifest)

  def __getitem__(self, name: str) -> np.ndarray:
    return self.arrays[name]

  def changed(self) -> str | None:
    """How an array file differs from when the store was opened (truncated, replaced, written to);
    None when none does. A few `stat` calls: cheap enough before every batch."""
    for name, (ino, size, mtime) in self.states.items():
      file = os.path.join(self.path, name + ".npy")
      try:
        now_ino, now_size, now_mtime = file_state(file)
      except OSError as e:
        return f"{file} is gone ({e.strerror or e})"
      if now_ino != ino:
        return f"{file} was replaced by another file"
      if now_size != size:
        return f"{file} is {now_size} bytes, {size} when it was opened (truncated or extended)"
      if now_mtime != mtime:
        return f"{file} was written to (modified {time.ctime(now_mtime / 1e9)})"
    return None


def describe_stores(record: Any) -> str:
  """'latents PATH (fingerprint), neighbors ..., database ...' of a model_info.json's or a sample
  set's `trained_on`; '' when there is none (imported weights, runs from before the record)."""
  if not isinstance(record, dict):
    return ""
  return ", ".join(
    f"{part} {r.get('path')} ({r.get('fingerprint')})"
    for part, r in record.items()
    if isinstance(r, dict)
  )


def read_rows(s: Store, name: str, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) of an array as a fresh in-memory array, read with file I/O.

  Unlike slicing the memory map, this leaves no mapped file pages behind in the process
  (they count towards its resident memory while a large shard is being indexed).
  """
  arr = s.arrays[name]
  start, stop = max(0, start), min(stop, len(arr))
  row_items = int(np.prod(arr.shape[1:], dtype=np.int64))
  with untrusted.open_regular(os.path.join(s.path, name + ".npy")) as f:
    _, fortran_order, _ = untrusted.npy_header(f)  # leaves f at the first element
    if fortran_order:
      return np.array(arr[start:stop])
    f.seek(start * row_items * arr.dtype.itemsize, os.SEEK_CUR)
    out = np.fromfile(f, dtype=arr.dtype, count=(stop - start) * row_items)
  if out.size != (stop - start) * row_items:
    fail(
      f"{os.path.join(s.path, name + '.npy')} ends before row {stop} of the {len(arr)} its "
      f"manifest says: it was truncated while this job read it; rebuild {s.path} and rerun"
    )
  return out.reshape((stop - start,) + arr.shape[1:])


def exists(path: str) -> bool:
  """Whether a complete store (one with a manifest) is at `path`."""
  return os.path.isfile(os.path.join(path, MANIFEST))


def manifest_kind(path: str) -> str | None:
  """The kind named by the manifest at `path`, or None if there is no readable manifest."""
  try:
    manifest = untrusted.read_json(os.path.join(path, MANIFEST))
  except (OSError, UserError):
    return None
  return manifest.get("kind") if isinstance(manifest, dict) else None


_TMP = r"(\.[0-9a-f]{8}\.tmp)?"  # files.tmp_name's suffix
# What our jobs write into `<dir>.partial/`: the inputs record, chunks, merged arrays, the manifest,
# an index's per-shard search settings; and index shard directories holding ScaNN's files.
_PARTIAL_FILE = re.compile(
  r"(inputs\.json|manifest\.json|chunk_[0-9a-f]{16}_\d{12}(_[A-Za-z_]\w{0,63}\.npy|\.done)"
  r"|[A-Za-z_]\w{0,63}\.npy|shard_\d{5}\.search\.json)" + _TMP
)
_SHARD_DIR = re.compile(r"shard_\d{5}(\.tmp)?")
_SHARD_FILE = re.compile(r"[a-z0-9_]{1,64}\.(pb|pbtxt|npy)")


def _unknown_files(directory: str, manifest: Mapping[str, Any] | None) -> list[str]:
  """The entries of a store (`manifest` given: the files it names) or of a `<dir>.partial`
  (None: the names our jobs write there) that no job of ours wrote, as relative paths."""
  if manifest is not None:
    arrays = manifest.get("arrays") if isinstance(manifest.get("arrays"), dict) else {}
    shard_files = (
      manifest.get("shard_files") if isinstance(manifest.get("shard_files"), dict) else {}
    )
    own_file = lambda n: n in (MANIFEST, INPUTS) or (n.endswith(".npy") and n[:-4] in arrays)
    own_dir = lambda d: d in shard_files and isinstance(shard_files[d], dict)
    own_inner = lambda d, n: n in shard_files[d]
  else:
    own_file = lambda n: bool(_PARTIAL_FILE.fullmatch(n))
    own_dir = lambda d: bool(_SHARD_DIR.fullmatch(d))
    own_inner = lambda d, n: bool(_SHARD_FILE.fullmatch(n))
  unknown = []
  for entry in os.scandir(directory):
    if not entry.is_dir(follow_symlinks=False):
      if not own_file(entry.name):
        unknown.append(entry.name)
    elif not own_dir(entry.name):
      unknown.append(entry.name + "/")
    else:
      unknown += [
        f"{entry.name}/{e.name}"
        for e in os.scandir(entry.path)
        if e.is_dir(follow_symlinks=False) or not own_inner(entry.name, e.name)
      ]
  return sorted(unknown)


def _store_manifest(path: str) -> dict:
  try:
    manifest = untrusted.read_json(os.path.join(path, MANIFEST))
  except (OSError, UserError):
    return {}
  return manifest if isinstance(manifest, dict) else {}


def check_own(directory: str, store: bool = True) -> None:
  """Refuses (one line naming them) a store directory (`store`) or a `<dir>.partial` that holds
  files no job of ours wrote there: they are the user's, and a job must not delete them."""
  unknown = _unknown_files(directory, _store_manifest(directory) if store else None)
  if unknown:
    fail(
      f"{directory} holds files no job of ours wrote ({', '.join(unknown[:5])}"
      f"{', ...' if len(unknown) > 5 else ''}); refusing to replace or delete it: move them away "
      "or choose another output path"
    )


def remove_shard_dir(path: str) -> None:
  """Deletes an index shard directory inside a `<dir>.partial` (ScaNN's files only, else
  refused)."""
  unknown = [
    e.name
    for e in os.scandir(path)
    if e.is_dir(follow_symlinks=False) or not _SHARD_FILE.fullmatch(e.name)
  ]
  if unknown:
    fail(
      f"{path} holds files ScaNN does not write ({', '.join(sorted(unknown)[:5])}); refusing to "
      "delete it: move them away"
    )
  _remove_flat_dir(path)


def _remove_flat_dir(path: str) -> None:
  """Removes a directory of files (links removed, not followed), checked to be ours by the
  caller."""
  for entry in os.scandir(path):
    os.remove(entry.path)
  os.rmdir(path)


def remove_own(directory: str, store: bool = True) -> None:
  """Deletes a store directory (`store`: the files its manifest names) or a `<dir>.partial` that
  a job of ours wrote, after `check_own`; links are removed, never followed."""
  check_own(directory, store)
  for entry in os.scandir(directory):
    if entry.is_dir(follow_symlinks=False):
      _remove_flat_dir(entry.path)
    else:
      os.remove(entry.path)
  os.rmdir(directory)


_INPUTS_TMP = _tmp_pattern(INPUTS)


def _is_partial_store(partial: str) -> bool:
  """A `<store>.partial` a job of ours made: a real directory, empty, holding our inputs record, or
  holding nothing but the temporary of that record (a job killed while writing it)."""
  if os.path.islink(partial) or not os.path.isdir(partial):
    return False
  names = os.listdir(partial)
  return (
    all(_INPUTS_TMP.fullmatch(n) for n in names)
    or os.path.isfile(os.path.join(partial, INPUTS))
    or exists(partial)
  ) and not _unknown_files(partial, None)


def check_output(path: str, kind: str) -> str:
  """The normalised `path`, once it is safe for a job to write a `kind` store there.

  Refuses (one line, before any work) a path that holds anything but a store of this kind
  (or a store that holds files its manifest does not name), and a `<path>.partial` or
  `<path>.lock` that a job of ours did not make: a job replaces only what an earlier run of
  the same kind of job wrote.
  """
  path = normalize(path)
  if os.path.lexists(path) and manifest_kind(path) != kind:
    what = (
      f"a {manifest_kind(path)!r} store" if manifest_kind(path) else "files that are not a store"
    )
    fail(
      f"{path} holds {what}, not a {kind!r} store; refusing to replace it: choose another output "
      "path (or move it away)"
    )
  if os.path.lexists(path):
    check_own(path)
  partial = path + ".partial"
  if os.path.lexists(partial) and not _is_partial_store(partial):
    unknown = (
      _unknown_files(partial, None)
      if os.path.isdir(partial) and not os.path.islink(partial)
      else []
    )
    holds = (
      f" (it holds {', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''})"
      if unknown
      else ""
    )
    fail(
      f"{partial} exists but is not an unfinished {kind!r} store{holds}; refusing to touch it: "
      "move it away or choose another output path"
    )
  lock = path + ".lock"
  if os.path.lexists(lock) and Lock.holder(lock) is None:
    fail(f"{lock} exists but is not a lock of ours; move it away or choose another output path")
  return path


def read_if_current(path: str, kind: str, hint: str, **expected: Any) -> Store | None:
  """The complete store at `path` if its manifest matches `expected`, else None (recompute).

  Lets a rerun job skip finished work, but never reuse a store made from other inputs
  (another encoder, source range or first stage than the config now asks for). Refuses an
  output path that holds anything but a store of this kind (`check_output`).
  """
  path = check_output(path, kind)
  if not exists(path):
    return None
  existing = read(path, kind, hint=hint, verify=False)
  stale = [k for k, v in expected.items() if existing.manifest.get(k) != v]
  if stale:
    print(f"{path} was made with other {', '.join(stale)}; recomputing")
    return None
  if _should_verify(existing.arrays, None) and (changed := changed_array(existing)):
    print(f"{path}: {changed}.npy no longer matches its manifest's checksum; recomputing")
    return None
  print(f"{path} exists and matches the config; skipping (delete it to recompute)")
  return existing


def read(path: str, kind: str, hint: str, mmap: bool = True, verify: bool | None = None) -> Store:
  """Opens and validates the store at `path`.

  Args:
    path: store directory.
    kind: the `kind` the manifest must carry (e.g. "database").
    hint: the command that makes this store, quoted in errors.
    mmap: memory-map arrays instead of reading them into RAM.
    verify: compare every array's sha256 with the manifest; None = for stores up to
      VERIFY_BELOW_BYTES, or for all after `verify_all_stores()`.
  """
  path = normalize(path)
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path):
    partial = (
      " (an interrupted run left " + path + ".partial; rerun to resume)"
      if os.path.isdir(path + ".partial")
      else ""
    )
    fail(f"no {kind} store at {path}{partial}: run `{hint}` first")
  try:
    manifest = untrusted.read_json(manifest_path)
  except UserError as e:
    fail(f"{e}; delete {path} and rerun `{hint}`")
  if not isinstance(manifest, dict) or not isinstance(manifest.get("arrays"), dict):
    fail(f"{manifest_path} is not a store manifest; delete {path} and rerun `{hint}`")
  if manifest.get("kind") != kind:
    fail(
      f"{path} holds a {manifest.get('kind')!r} store, expected {kind!r}; check the path or "
      f"rerun `{hint}`"
    )
  if manifest.get("format_version") != FORMAT_VERSION:
    fail(
      f"{path} has store format {manifest.get('format_version')}, this code reads "
      f"{FORMAT_VERSION}; rerun `{hint}`"
    )
  arrays, states = {}, {}
  for name, spec in manifest["arrays"].items():
    if not ARRAY_NAME.fullmatch(name) or not isinstance(spec, dict):
      fail(
        f"{manifest_path} names an array {name[:80]!r}; array names are letters, digits and '_'. "
        f"Delete {path} and rerun `{hint}`"
      )
    file = os.path.join(path, name + ".npy")
    if not os.path.lexists(file):
      fail(f"{file} is missing; delete {path} and rerun `{hint}`")
    try:
      arr = untrusted.load_npy(file, mmap=mmap)
    except UserError as e:
      fail(f"{e}; delete {path} and rerun `{hint}`")
    if list(arr.shape) != list(spec.get("shape", [])) or str(arr.dtype) != spec.get("dtype"):
      fail(
        f"{file} is {arr.dtype}{list(arr.shape)} but the manifest says "
        f"{spec.get('dtype')}{spec.get('shape')}; delete {path} and rerun `{hint}`"
      )
    arrays[name] = arr
    states[name] = file_state(file)
  s = Store(path=path, manifest=manifest, arrays=arrays, states=states)
  if _should_verify(arrays, verify) and (changed := changed_array(s)):
    fail(
      f"{os.path.join(path, changed + '.npy')} does not match the checksum in its manifest: it "
      f"changed after it was written; delete {path} and rerun `{hint}`"
    )
  return s


def _should_verify(arrays: Mapping[str, np.ndarray], verify: bool | None) -> bool:
  if verify is not None:
    return verify
  return _verify_all or sum(a.nbytes for a in arrays.values()) <= VERIFY_BELOW_BYTES


def changed_array(s: Store) -> str | None:
  """The first array whose content no longer matches the manifest's sha256, or None."""
  for name, arr in s.arrays.items():
    if checksum(arr) != s.manifest["arrays"][name].get("sha256"):
      return name
  return None


def check_array_names(names) -> None:
  bad = [n for n in names if not ARRAY_NAME.fullmatch(n)]
  if bad:
    raise ValueError(f"array names {bad}: use letters, digits and '_'")


def write(path: str, kind: str, arrays: Mapping[str, np.ndarray], **manifest_fields: Any) -> Store:
  """Writes a complete store atomically (all arrays, then the manifest, then rename)."""
  path = check_output(path, kind)
  check_array_names(arrays)
  inputs = {"kind": kind, **manifest_fields}
  with Lock(path):
    partial = open_partial(path, inputs)
    for name, arr in arrays.items():
      save_npy(os.path.join(partial, name + ".npy"), np.asarray(arr))
    return seal(path, kind, list(arrays), manifest_fields, inputs_digest(inputs))


def publish(partial: str, path: str, kind: str) -> None:
  """Moves a completed `<path>.partial` directory to `path`, replacing an older store of `kind`.

  The old store is renamed aside before the new one moves in and deleted after, so a crash
  never loses both; anything at `path` that is not a `kind` store is refused, never removed.
  Call it holding the path's `Lock`.
  """
  path = normalize(path)
  for old in glob.glob(
    glob.escape(path) + ".replaced-*"
  ):  # left by a crash between the renames below
    if re.fullmatch(r"\.replaced-[0-9a-f]{8}", old[len(path) :]) and manifest_kind(old) == kind:
      _remove_aside(old)
  if not os.path.lexists(path):
    os.replace(partial, path)
    return
  check_output(path, kind)
  if os.path.islink(path):
    fail(
      f"{path} is a symbolic link; refusing to replace it (the new store is complete in "
      f"{partial}): remove the link or choose another output path"
    )
  aside = f"{path}.replaced-{uuid.uuid4().hex[:8]}"
  os.replace(path, aside)
  os.replace(partial, path)
  _remove_aside(aside)


def _remove_aside(aside: str) -> None:
  """Deletes a replaced store of ours; one that gained files of the user's meanwhile is kept, and
  said."""
  try:
    remove_own(aside)
  except UserError as e:
    print(f"kept the replaced store: {e}")


def seal(
  path: str, kind: str, names: Sequence[str], fields: Mapping[str, Any], digest: str
) -> Store:
  """Writes the manifest of `<path>.partial` (checksums read back from its files) and publishes
  it."""
  partial = path + ".partial"
  arrays = {n: untrusted.load_npy(os.path.join(partial, n + ".npy"), mmap=True) for n in names}
  manifest = dict(kind=kind, format_version=FORMAT_VERSION, **fields)
  manifest["count"] = int(len(next(iter(arrays.values()))))
  manifest["inputs_sha256"] = digest
  manifest["arrays"] = {
    n: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": checksum(a)}
    for n, a in arrays.items()
  }
  del arrays
  atomic_write_text(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
  for leftover in os.listdir(partial):
    if _PARTIAL_FILE.fullmatch(leftover) and (
      leftover.startswith("chunk_") or leftover.endswith(".tmp")
    ):
      os.remove(os.path.join(partial, leftover))
  publish(partial, path, kind)
  return read(path, kind, hint="(just written)", verify=False)


def open_partial(
  path: str,
  inputs: Mapping[str, Any],
  log: Callable[[str], None] = print,
  owner: bool = True,
  wait_s: float = 600.0,
) -> str:
  """Prepares `<path>.partial/` for a resumable job whose work depends on `inputs`.

  Work left there by a run with the same inputs is kept (resume); work from other inputs is
  never mixed in: the owner (process 0) clears it, other processes wait for the owner.
  """
  path = normalize(path)
  partial = path + ".partial"
  text = json.dumps(dict(inputs), sort_keys=True, default=str)
  inputs_path = os.path.join(partial, INPUTS)

  def current():
    try:
      with untrusted.open_regular(inputs_path, "r", encoding="utf-8") as f:
        return f.read(untrusted.MAX_JSON_BYTES)
    except FileNotFoundError:
      return None
    except (UserError, UnicodeDecodeError) as e:
      fail(f"{inputs_path} is not a record of ours ({e}); move {partial} away")

  if not owner:
    deadline = time.monotonic() + wait_s
    while current() != text:
      if time.monotonic() > deadline:
        fail(
          f"{partial} was not prepared for these inputs by process 0 within {wait_s:.0f} s; "
          "start process 0 with the same config and flags"
        )
      time.sleep(0.5)
    return partial
  if os.path.lexists(partial) and not _is_partial_store(partial):
    fail(f"{partial} exists but is not an unfinished store; refusing to touch it: move it away")
  if os.path.isdir(partial) and current() != text:
    log(f"{partial} holds work made from other inputs; starting over")
    remove_own(partial, store=False)
  os.makedirs(partial, exist_ok=True)
  remove_own_temporaries(inputs_path)  # of a run killed while writing the record
  if current() != text:
    atomic_write_text(inputs_path, text)
  return partial


def link_npy(npy_path: str, path: str, kind: str, hint: str, **manifest_fields: Any) -> Store:
  """A store around a user's [N, d] float `.npy` file (bring-your-own embeddings), without a copy.

  `embeddings.npy` is a symbolic link to the file, `ids` are its row numbers, and the
  source records the file's path, size and modification time: if the file changes, the
  store (and so every index or neighbour set made from it) is recognised as stale.
  """
  real = os.path.realpath(npy_path)
  if not os.path.isfile(real):
    fail(f"{npy_path} does not exist")
  emb = untrusted.load_npy(real, mmap=True)
  if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
    fail(
      f"{npy_path} holds {emb.dtype}{list(emb.shape)}; embeddings must be a 2-D float array [N, d]"
    )
  st = os.stat(real)
  source = {"file": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
  done = read_if_current(path, kind, hint, source=source)
  if done is not None:
    return done
  path = normalize(path)
  fields = {
    "source": source,
    "encoder": {"name": "external", "embed_dim": int(emb.shape[1])},
    **manifest_fields,
  }
  inputs = {"kind": kind, **fields}
  with Lock(path):
    partial = open_partial(path, inputs)
    link = os.path.join(partial, "embeddings.npy")
    if os.path.lexists(link):
      os.remove(link)
    os.symlink(real, link)
    save_npy(os.path.join(partial, "ids.npy"), np.arange(len(emb), dtype=np.int64))
    return seal(path, kind, ["embeddings", "ids"], fields, inputs_digest(inputs))
