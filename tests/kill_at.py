"""Runs a job module and SIGKILLs it at its N-th commit: the N-th call of
`os.replace` or `os.rename`.

  python tests/kill_at.py N COUNT_FILE MODULE [ARGS...]
  python tests/kill_at.py path:TEXT COUNT_FILE MODULE [ARGS...]  (the first commit to a path
                                                                  with TEXT)
  python tests/kill_at.py term:N COUNT_FILE MODULE [ARGS...]     (SIGTERM, see below)

Every file the jobs commit goes through one of the two (our stores, index shards, sample
sets, metrics and checkpoint digests through `os.replace`; Orbax's checkpoint directories
through `os.rename`, from its commit thread), so the N-th call is the moment just before the
N-th commit: everything before it is on disk, the N-th is written under its temporary name,
and nothing else runs (no `finally`, no atexit: what a preemption or an OOM kill leaves).
N = 0 never kills; the number of calls is then written to COUNT_FILE, so a test can choose N
among the real commit points of an uninterrupted run.

term:N sends the process a real SIGTERM (what a scheduler sends before it takes the machine)
just before the job's N-th look at it (`rdm_jax.preemption.reached` at a train step or sample
shard, `requested` after a store chunk), and lets the job handle it (N = 0: never).
term:N:S also waits S seconds before each look: on several processes JAX's preemption sync
manager agrees on the step to stop at in a background thread, and a run of a few tiny steps
could otherwise end before it has.

Faults of the disk at the N-th look instead of a signal (the job goes on and must notice):
  fill:N:PATH      fills the filesystem holding PATH (a file PATH, all but 4 KiB of what is free)
                   once no checkpoint is being written beside PATH
  edit:N:FILE      writes zeros over the first row of the .npy FILE through a memory map, in place
  truncate:N:FILE  truncates FILE to half its size
  fill-at-save:N:PATH  fills it as orbax starts saving the checkpoint of step N, after the job's own
                   look at the free space (another job filled the disk meanwhile): the writes fail
"""

import atexit
import os
import runpy
import signal
import sys
import time


def _terminate_at(n: int, wait: float = 0.0) -> None:
  from rdm_jax import preemption

  looks = 0

  def counted(real):
    def look(*args):
      nonlocal looks
      looks += 1
      time.sleep(wait)
      if looks == n:
        os.kill(os.getpid(), signal.SIGTERM)
      return real(*args)

    return look

  preemption.reached, preemption.requested = (
    counted(preemption.reached),
    counted(preemption.requested),
  )


def _wait_for_commits(folder: str, timeout: float = 120.0) -> None:
  """Until no checkpoint is being written under `folder` (orbax writes
  `<step>.orbax-checkpoint-tmp`)."""
  deadline = time.monotonic() + timeout
  while any(".orbax-checkpoint-tmp" in name for _, dirs, _ in os.walk(folder) for name in dirs):
    if time.monotonic() > deadline:
      raise TimeoutError(f"a checkpoint under {folder} is still being written after {timeout} s")
    time.sleep(0.05)


def _fault(what: str, path: str) -> None:
  import shutil

  import numpy as np

  if what == "fill":
    _wait_for_commits(os.path.dirname(path))
    free = shutil.disk_usage(os.path.dirname(path)).free
    with open(path, "wb") as f:
      os.posix_fallocate(f.fileno(), 0, max(1, free - 4096))
  elif what == "edit":
    rows = np.load(path, mmap_mode="r+")
    rows[0] = 0
    rows.flush()
  else:
    os.truncate(path, os.path.getsize(path) // 2)


def _fault_at(n: int, what: str, path: str) -> None:
  from rdm_jax import preemption

  looks = 0
  if what == "fill-at-save":
    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
      if step == n:
        _fault("fill", path)
      saved = real_save(self, step, *args, **kwargs)
      if step == n:
        time.sleep(
          3.0
        )  # the background writes fail meanwhile: the job must notice at its next step
      return saved

    ocp.CheckpointManager.save = save
    return

  def counted(real):
    def look(*args):
      nonlocal looks
      looks += 1
      if looks == n:
        _fault(what, path)
      return real(*args)

    return look

  preemption.reached, preemption.requested = (
    counted(preemption.reached),
    counted(preemption.requested),
  )


def main() -> None:
  when, count_file, module = sys.argv[1], sys.argv[2], sys.argv[3]
  if when.startswith("term:"):
    n, _, wait = when[5:].partition(":")
    _terminate_at(int(n), float(wait or 0))
    when = "0"
  elif when.split(":")[0] in ("fill", "fill-at-save", "edit", "truncate"):
    what, n, path = when.split(":", 2)
    _fault_at(int(n), what, path)
    when = "0"
  kill_at = 0 if when.startswith("path:") else int(when)
  calls = 0

  def counted(real):
    def commit(src, dst, *args, **kwargs):
      nonlocal calls
      calls += 1
      if calls == kill_at or (when.startswith("path:") and when[5:] in os.fspath(dst)):
        os.kill(os.getpid(), signal.SIGKILL)
      return real(src, dst, *args, **kwargs)

    return commit

  os.replace, os.rename = counted(os.replace), counted(os.rename)
  if count_file:
    atexit.register(lambda: open(count_file, "w").write(str(calls)))
  sys.argv = [module] + sys.argv[4:]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
