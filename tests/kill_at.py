"""Runs a job module and SIGKILLs it at its N-th commit: the N-th call of `os.replace` or `os.rename`.

  python tests/kill_at.py N COUNT_FILE MODULE [ARGS...]
  python tests/kill_at.py path:TEXT COUNT_FILE MODULE [ARGS...]   (the first commit to a path with TEXT)
  python tests/kill_at.py term:N COUNT_FILE MODULE [ARGS...]      (SIGTERM, see below)

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

  preemption.reached, preemption.requested = counted(preemption.reached), counted(preemption.requested)


def main() -> None:
  when, count_file, module = sys.argv[1], sys.argv[2], sys.argv[3]
  if when.startswith("term:"):
    n, _, wait = when[5:].partition(":")
    _terminate_at(int(n), float(wait or 0))
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
