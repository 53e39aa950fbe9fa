"""One exception type for problems the user can fix, and the wrapper that prints it.

Jobs raise `UserError` for bad input (missing files, mismatched manifests, impossible
configs). `run_main` turns it into one readable line on stderr and exit status 2, so a
user sees what to do next instead of a traceback; a job stopped by SIGTERM after saving
(`preemption.Preempted`) exits with status 75 and a line that says to rerun.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from typing import Callable, NoReturn, TypeVar

from rdm_jax import preemption

T = TypeVar("T")


class UserError(Exception):
  """An error the user can fix; the message says how."""


def fail(message: str) -> NoReturn:
  raise UserError(message)


def checked_by_process_0(check: Callable[[], T]) -> T | None:
  """Runs `check` on process 0 alone, for every process of a multi-process job: a `UserError`
  it raises fails every process with its message. It is also a barrier: no process goes on (to
  write where process 0 is looking) before process 0 has checked. With one process, runs `check`.
  Returns what `check` returned on process 0, None on the others."""
  import jax

  if jax.process_count() == 1:
    return check()
  import numpy as np
  from jax.experimental import multihost_utils

  message = np.zeros(4096, np.uint8)  # [0]: failed; then the message, UTF-8
  result = None
  if jax.process_index() == 0:
    try:
      result = check()
    except UserError as e:
      encoded = str(e).encode("utf-8")[: message.size - 1]
      message[0] = 1
      message[1 : 1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  message = np.asarray(multihost_utils.broadcast_one_to_all(message))
  if message[0]:
    fail(bytes(message[1:]).rstrip(b"\0").decode("utf-8", "replace"))
  return result


RESUME = (
  "free space (or point the job at a larger disk) and rerun: what is finished is kept and the "
  "job resumes"
)
# errno, what the libraries' messages say instead of an errno, what it means, what to do
_IO_KINDS = (
  (
    errno.ENOSPC,
    ("No space left on device", "os_error_code='28'", "os_error_code=28"),
    "the disk is full",
    RESUME,
  ),
  (
    errno.EDQUOT,
    ("Disk quota exceeded", "os_error_code='122'"),
    "the disk quota is used up",
    RESUME,
  ),
  (
    errno.EROFS,
    ("Read-only file system", "os_error_code='30'"),
    "the filesystem is read-only",
    "choose an output path on a writable filesystem (or remount it read-write) and rerun",
  ),
  (
    errno.EACCES,
    ("Permission denied", "os_error_code='13'"),
    "permission denied",
    "fix the permissions or choose another output path, and rerun",
  ),
  (
    errno.EIO,
    ("Input/output error", "I/O error", "os_error_code='5'"),
    "an I/O error (a failing disk or network filesystem)",
    "check the disk (dmesg) or the filesystem's server, then rerun: what is finished "
    "is kept and the job resumes",
  ),
)
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")  # numpy's tofile on a full disk
_WRITE_SIZE = re.compile(r"(?:Failed to write|write of) (\d+) bytes")
_QUOTED_PATH = re.compile(r"[\"'](/[^\"']+)[\"']")


def _chain(e: BaseException) -> list[BaseException]:
  out = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _io_kind(e: BaseException) -> tuple[str, str] | None:
  for link in _chain(e):
    text = str(link)
    for code, markers, what, remedy in _IO_KINDS:
      if getattr(link, "errno", None) == code or any(m in text for m in markers):
        return what, remedy
    if isinstance(link, OSError) and _SHORT_WRITE.search(text):
      return "a write came up short (the disk is full?)", RESUME
  return None


def io_failure(e: BaseException) -> str | None:
  """What an exception says about the filesystem (the disk is full, read-only, an I/O error), from
  its errno or, for libraries that wrap it (orbax, TensorStore, numpy, ScaNN), its message; None
  when it is not such a failure."""
  kind = _io_kind(e)
  return kind[0] if kind else None


def io_remedy(e: BaseException) -> str:
  """What to do about an `io_failure`."""
  kind = _io_kind(e)
  return kind[1] if kind else RESUME


def free_bytes(path: str) -> int | None:
  """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def size_text(n: float) -> str:
  for unit in ("bytes", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


OUTPUTS: list[
  str
] = []  # the job's output paths (`jobs.cli.hold_output`): named by a failure that names none


def io_error_line(e: BaseException, where: str = "") -> str:
  """One line for a failed read or write: the path (the exception's, a path quoted in its message,
  `where`, or else the job's outputs), what went wrong, and for a full disk how much is free and
  what did not fit."""
  what = io_failure(e) or f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
  path = where or (OUTPUTS[-1] if OUTPUTS else "")
  for link in _chain(e):
    found = getattr(link, "filename", None) or (
      m.group(1) if (m := _QUOTED_PATH.search(str(link))) else None
    )
    if found:
      path = str(found)
      break
  line = f"{path}: {what}" if path else what
  if "full" in what or "quota" in what or "short" in what:
    free = free_bytes(path) if path else None
    size = next(
      (
        m
        for link in _chain(e)
        for m in [_SHORT_WRITE.search(str(link)) or _WRITE_SIZE.search(str(link))]
        if m
      ),
      None,
    )
    if free is not None:
      line += f" ({size_text(free)} free there"
      line += f"; a write of {size_text(int(size.group(1)))} did not fit)" if size else ")"
  return line


def run_main(
  main: Callable[..., object], verbose: Callable[[], bool] = lambda: False
) -> Callable[..., None]:
  """Wraps an absl `main` so a `UserError` exits with a one-line message (a traceback when
  `verbose()`), and so does a failed read or write of the filesystem (a full disk, a read-only
  filesystem, an I/O error: `io_failure`), with the path and what to do."""

  def wrapped(argv):
    try:
      main(argv)
    except preemption.Preempted as e:
      print(str(e), file=sys.stderr)
      sys.exit(preemption.EXIT_STATUS)
    except UserError as e:
      if verbose():
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except Exception as e:  # only filesystem failures become one line; others propagate
      if verbose() or io_failure(e) is None:
        raise
      print(f"error: {io_error_line(e)}; {io_remedy(e)}", file=sys.stderr)
      sys.exit(2)

  return wrapped
