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
