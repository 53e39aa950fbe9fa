"""One exception type for problems the user can fix, and the wrapper that prints it.

Jobs raise `UserError` for bad input (missing files, mismatched manifests, impossible
configs). `run_main` turns it into one readable line on stderr and exit status 2, so a
user sees what to do next instead of a traceback; a job stopped by SIGTERM after saving
(`preemption.Preempted`) exits with status 75 and a line that says to rerun.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

from rdm_jax import preemption


class UserError(Exception):
  """An error the user can fix; the message says how."""


def fail(message: str) -> NoReturn:
  raise UserError(message)


def checked_by_process_0(check: Callable[[], object]) -> None:
  """Runs `check` on process 0 alone, for every process of a multi-process job: a `UserError`
  it raises fails every process with its message. It is also a barrier: no process goes on (to
  write where process 0 is looking) before process 0 has checked. With one process, runs `check`."""
  import jax

  if jax.process_count() == 1:
    check()
    return
  import numpy as np
  from jax.experimental import multihost_utils

  message = np.zeros(4096, np.uint8)  # [0]: failed; then the message, UTF-8
  if jax.process_index() == 0:
    try:
      check()
    except UserError as e:
      encoded = str(e).encode("utf-8")[:message.size - 1]
      message[0] = 1
      message[1:1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  message = np.asarray(multihost_utils.broadcast_one_to_all(message))
  if message[0]:
    fail(bytes(message[1:]).rstrip(b"\0").decode("utf-8", "replace"))


def run_main(main: Callable[..., object], verbose: Callable[[], bool] = lambda: False) -> Callable[..., None]:
  """Wraps an absl `main` so a `UserError` exits with a one-line message (a traceback when
  `verbose()`)."""

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

  return wrapped
