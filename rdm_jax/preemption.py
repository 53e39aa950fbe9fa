"""Preemption: SIGTERM, what TPU VMs, SLURM and Kubernetes send before they take a machine away.

A job calls `install()` at start and `reached(i)` at each of its safe points (a train step, a
sample shard, a chunk of a store). After a SIGTERM, `reached` turns True at one safe point; the
job saves what it has there and raises `Preempted`, which `errors.run_main` turns into a line
on stderr and exit status `EXIT_STATUS` (75, sysexits' EX_TEMPFAIL: try again), so a wrapper
script or scheduler can tell "rerun to resume" from a failure.

One process: our own handler sets a flag. Several processes (`jax.distributed`): JAX's
preemption sync manager listens for SIGTERM on every process, and
`multihost_utils.reached_preemption_sync_point` turns True on all processes at the same step,
the first one past every process's current step (Orbax's `reached_preemption` is the same
call); every process must then call `reached` at every safe point, in the same order.
"""

from __future__ import annotations

import logging
import signal
import threading

EXIT_STATUS = 75
_requested = threading.Event()
_state = {"mode": None}


class Preempted(Exception):
  """The job stopped at a safe point after SIGTERM; rerunning the command resumes it."""


def _on_sigterm(signum, frame) -> None:
  del frame
  _requested.set()
  logging.warning("signal %d (SIGTERM): stopping at the next safe point, after saving", signum)


def _multi_process() -> bool:
  import jax
  from jax._src import distributed

  return jax.process_count() > 1 and distributed.global_state.client is not None


def install() -> str:
  """Arms the SIGTERM watch for this job (after jax.distributed.initialize, if any); returns how:
  "signal" (one process: our handler), "sync" (JAX's preemption sync manager) or "none" (several
  processes without the sync manager: SIGTERM is left to end them, as by default)."""
  if _state["mode"] is None:
    if not _multi_process():
      signal.signal(signal.SIGTERM, _on_sigterm)
      _state["mode"] = "signal"
    else:
      from jax._src import distributed

      _state["mode"] = (
        "sync" if distributed.global_state.preemption_sync_manager is not None else "none"
      )
      if _state["mode"] == "none":
        logging.warning(
          "jax_enable_preemption_service is off: a SIGTERM ends this job without a last save"
        )
  return _state["mode"]


def requested() -> bool:
  """Whether this process got SIGTERM (jobs whose processes work independently: store chunks)."""
  return _requested.is_set()


def reached(index: int) -> bool:
  """Whether the job should save and stop at its safe point `index` (increasing, the same on
  every process)."""
  mode = _state["mode"]
  if mode == "signal":
    return _requested.is_set()
  if mode == "sync":
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(int(index))
  return False


def stop(what: str) -> None:
  """Raises Preempted with `what` was saved (call after saving)."""
  raise Preempted(f"preempted (SIGTERM): {what}; rerun the same command to resume")
