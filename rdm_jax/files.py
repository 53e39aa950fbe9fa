"""The one file layer: local paths and bucket URIs (gs://, s3://;
etils.epath over tf.io.gfile) alike.

Run directories go through it: --workdir (checkpoints, config.json, model_info.json, TensorBoard
logs, training-time sample grids), sample sets and evaluation outputs, so that on TPU VMs they
may live in a bucket (`--workdir=gs://bucket/runs/imagenet_rdm`). Stores (`config.data_dir`,
`config.database`, indexes) need a POSIX filesystem (memory-mapped reads, atomic renames, lock
files): `rdm_jax.data.store` refuses a URI and says to mount the bucket (gcsfuse) or use a
shared filesystem.

Writes are all-or-nothing either way: a local file is written under a temporary name
(`<name>.<8 hex>.tmp`) and renamed into place; an object in a bucket appears whole when its
upload completes, so it is written under its final name. Nothing here deletes what it did not
write, except `remove_own_temporaries` (a killed write's leftovers) and `move`.
"""

from __future__ import annotations

import glob as glob_lib
import hashlib
import io
import os
import re
import uuid
from typing import Any, Callable, IO

import numpy as np

from rdm_jax import errors, untrusted
from rdm_jax.errors import UserError, fail

_URI = re.compile(
  r"^[A-Za-z][A-Za-z0-9+.-]*:/"
)  # gs://b/x, and gs:/b/x as os.path.normpath leaves it


def is_uri(path: Any) -> bool:
  """Whether `path` names an object store (gs://...) rather than a local file."""
  return bool(_URI.match(str(path)))


def _epath(path: Any):
  from etils import epath

  return epath.Path(str(path))


def _reachable(fn: Callable) -> Callable:
  """Turns a bucket that cannot be reached (no network, no credentials, no such bucket) into one
  line naming the path: the object-store client raises its own error types for these."""
  import functools

  @functools.wraps(fn)
  def wrapped(path, *args, **kwargs):
    if not is_uri(path):
      return fn(path, *args, **kwargs)
    try:
      return fn(path, *args, **kwargs)
    except (UserError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError):
      raise
    except Exception as e:  # noqa: BLE001  tf.errors.*, google.auth, etils: no common base
      if type(e).__name__ == "NotFoundError":
        raise FileNotFoundError(str(path)) from None
      fail(
        f"{path}: cannot be reached ({type(e).__name__}: {' '.join(str(e).split())[:200]}); check "
        "the bucket name, the network and the credentials, or use a local path"
      )

  return wrapped


def normpath(path: str) -> str:
  """The canonical spelling: os.path.normpath for local paths; a URI with one `//` after its scheme
  and no trailing `/` (os.path.normpath would turn gs://b into gs:/b)."""
  path = str(path)
  if not is_uri(path):
    # `~/runs` given quoted means the home directory
    return os.path.normpath(os.path.expanduser(path))
  scheme, rest = path.split(":", 1)
  rest = "/".join(p for p in rest.split("/") if p not in ("", "."))
  return f"{scheme}://{rest}"


def filesystem_path(path: str, why: str) -> str:
  """`normpath` of a path that must be on a filesystem (memory-mapped, renamed into place or
  locked): an empty path or a bucket URI is one line, the latter ending with `why`."""
  if not path or not str(path).strip():
    fail("an output path is empty; name a directory")
  if is_uri(path):
    fail(f"{path}: {why}")
  return normpath(str(path))


def join(base: str, *parts: str) -> str:
  return f"{normpath(base)}/{'/'.join(parts)}" if is_uri(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
  return normpath(path).rsplit("/", 1)[0] if is_uri(path) else os.path.dirname(path)


def basename(path: str) -> str:
  return normpath(path).rsplit("/", 1)[-1] if is_uri(path) else os.path.basename(path)


def abspath(path: str) -> str:
  return normpath(path) if is_uri(path) else os.path.abspath(path)


@_reachable
def exists(path: str) -> bool:
  """Whether anything is at `path` (locally a dangling link counts: it is not ours to replace)."""
  return _epath(path).exists() if is_uri(path) else os.path.lexists(path)


@_reachable
def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_uri(path) else os.path.isdir(path)


@_reachable
def isfile(path: str) -> bool:
  if is_uri(path):
    p = _epath(path)
    return p.exists() and not p.is_dir()
  return os.path.isfile(path)


@_reachable
def listdir(path: str) -> list[str]:
  return sorted(p.name for p in _epath(path).iterdir()) if is_uri(path) else os.listdir(path)


@_reachable
def makedirs(path: str) -> None:
  if is_uri(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path or ".", exist_ok=True)


def prepare_output_dir(path: str, what: str, create: bool = True) -> None:
  """Checks, before any work, that the output directory `path` can be written: a path under a
  regular file, a read-only filesystem or a missing permission is one line. With `create` the
  directory is made now; without, nothing is written (the nearest existing folder is checked)."""
  try:
    if create:
      makedirs(path)
    if is_uri(path):
      return
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise NotADirectoryError(f"{existing} is not a directory")
    if existing != os.path.abspath(path):
      if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        raise PermissionError(
          f"{existing} is on a read-only filesystem" if read_only else f"{existing} is not writable"
        )
      return
    probe = tmp_name(os.path.join(path, ".write-check"))
    with open(probe, "wb"):
      pass
    os.remove(probe)
  except OSError as e:
    fail(
      f"{what} {path} cannot be written ({e.strerror or e}); choose another path or fix its "
      "permissions"
    )


@_reachable
def remove(path: str) -> None:
  if is_uri(path):
    _epath(path).unlink()
  else:
    os.remove(path)


@_reachable
def open_file(path: str, mode: str = "r") -> IO:
  """A file opened in `mode`; a local file read must be a regular file
  (`untrusted.open_regular`)."""
  if is_uri(path):
    return _epath(path).open(mode)
  if any(c in mode for c in "wax+"):
    return open(path, mode)
  return untrusted.open_regular(path, mode, encoding=None if "b" in mode else "utf-8")


def read_text(path: str, max_bytes: int = untrusted.MAX_JSON_BYTES) -> str:
  """A text file of at most `max_bytes` (records and settings; larger: one line), as UTF-8."""
  with open_file(path, "rb") as f:
    data = f.read(max_bytes + 1)
  if len(data) > max_bytes:
    fail(f"{path} is larger than {max_bytes >> 20} MiB; it is not a file this code wrote")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    fail(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})")


def read_json(path: str) -> Any:
  """The JSON in a record or settings file (local or in a bucket); anything malformed is one
  line."""
  return untrusted.parse_json(read_text(path), path)


@_reachable
def glob(folder: str, pattern: str) -> list[str]:
  """Sorted paths of the entries of `folder` whose names match `pattern` (a shell pattern)."""
  if is_uri(folder):
    return sorted(join(folder, p.name) for p in _epath(folder).glob(pattern))
  return sorted(glob_lib.glob(os.path.join(glob_lib.escape(folder), pattern)))


@_reachable
def walk_sizes(folder: str) -> dict[str, int]:
  """{relative path: size} of every file under `folder`."""
  if is_uri(folder):  # listed level by level: object stores refuse recursive globs
    out: dict[str, int] = {}

    def visit(p, rel: str) -> None:
      for child in p.iterdir():
        if child.is_dir():
          visit(child, f"{rel}{child.name}/")
        else:
          out[f"{rel}{child.name}"] = child.stat().length

    visit(_epath(folder), "")
    return out
  return {
    os.path.relpath(os.path.join(d, n), folder): os.path.getsize(os.path.join(d, n))
    for d, _, names in os.walk(folder)
    for n in names
  }


@_reachable
def sha256(path: str) -> str:
  """sha256 (16 hex digits) of a file's bytes, read in blocks: identifies weights and checkpoint
  files."""
  h = hashlib.sha256()
  with open_file(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()[:16]


def tmp_name(path: str) -> str:
  return f"{path}.{uuid.uuid4().hex[:8]}.tmp"  # unique: two processes never write one temporary


def tmp_pattern(name: str) -> re.Pattern:
  """What `tmp_name` makes of a file called `name`."""
  return re.compile(re.escape(name) + r"\.[0-9a-f]{8}\.tmp")


def need_room(path: str, size: int, what: str = "this write", remedy: str = errors.RESUME) -> None:
  """Stops the job in one line, before it writes, when the disk that holds `path` has fewer than
  `size` bytes free for `what`; the line ends with `remedy` (local
  paths; a bucket is not checked)."""
  if is_uri(path):
    return
  free = errors.free_bytes(os.path.dirname(os.path.abspath(path)))
  if free is not None and free < size:
    fail(
      f"{path}: the disk is full ({errors.size_text(free)} free, {what} needs "
      f"{errors.size_text(size)}, {errors.size_text(size - free)} more); {remedy}"
    )


def write_failed(e: BaseException, path: str) -> None:
  """Re-raises a failed write of `path` (a full disk, a read-only filesystem, an I/O error) as one
  line that names it; other errors as they are."""
  if errors.io_failure(e) is None:
    raise e
  fail(f"writing {errors.io_error_line(e, path)}; {errors.io_remedy(e)}")


def atomic_write(
  path: str, write: Callable[[IO], Any], binary: bool = True, size: int | None = None
) -> None:
  """Calls write(f) on a file that appears at `path` only once complete (see the module docstring).
  With `size` (the bytes it will write) a disk without that room is one line before writing; a
  write that fails (full disk, I/O error) removes its temporary and is one line."""
  mode = "wb" if binary else "w"
  if is_uri(path):
    buffer = io.BytesIO() if binary else io.StringIO()
    write(buffer)  # serialised first: a failure leaves nothing behind
    with open_file(path, mode) as f:
      f.write(buffer.getvalue())
    return
  if size is not None:
    need_room(path, size)
  tmp = tmp_name(path)
  try:
    with open(tmp, mode) as f:
      write(f)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    write_failed(e, path)


def atomic_write_text(path: str, text: str) -> None:
  """Writes a text file whole or not at all."""
  atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_savez(path: str, **arrays: np.ndarray) -> None:
  """np.savez whole or not at all (locally under a temporary name not ending in .npz)."""
  atomic_write(path, lambda f: np.savez(f, **arrays))


@_reachable
def load_npz(path: str, budget: "untrusted.Budget | None" = None) -> untrusted.Npz:
  """An .npz read without pickle, every member checked before it is inflated, the arrays read
  charged to the job's `budget` (`untrusted.Npz`; from a bucket its bytes are read first)."""
  if is_uri(path):
    size = _epath(path).stat().length
    untrusted.Budget(f"reading {path}", budget.limit if budget else None).charge(size, path)
    with open_file(path, "rb") as f:
      return untrusted.Npz(io.BytesIO(f.read(size)), path, size, budget)
  f = untrusted.open_regular(path)
  try:
    return untrusted.Npz(f, path, os.fstat(f.fileno()).st_size, budget)
  except BaseException:
    f.close()
    raise


@_reachable
def remove_own_temporaries(path: str) -> None:
  """Removes `<path>.<8 hex>.tmp` files (what an atomic write leaves when killed before its rename)
  next to a file only this job writes."""
  if is_uri(path):
    return  # objects are written under their final names: there are no temporaries
  folder, name = os.path.split(path)
  pattern = tmp_pattern(name)
  for entry in os.listdir(folder or "."):
    if pattern.fullmatch(entry) and os.path.isfile(os.path.join(folder, entry)):
      os.remove(os.path.join(folder, entry))


def move(src: str, dst: str) -> None:
  """Moves a file or directory to a new name (in a bucket: copied object by object, then
  removed)."""
  if not is_uri(src):
    os.replace(src, dst)
    return
  source = _epath(src)
  if not source.is_dir():
    source.rename(_epath(dst))
    return
  for rel in walk_sizes(src):
    target = _epath(join(dst, rel))
    target.parent.mkdir(parents=True, exist_ok=True)
    _epath(join(src, rel)).copy(target)
  source.rmtree()
