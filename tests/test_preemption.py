"""Preemption: a real SIGTERM (tests/kill_at.py term:N sends it to the job itself at a chosen
safe point) makes the train, sample and chunked store jobs save what they have and exit with
status 75; rerun, each ends where an uninterrupted run ends. Two training processes stop at
the same step, agreed through JAX's preemption sync manager.

References: the uninterrupted runs (the shared `trained` run, a sample set made straight
through) and, for the store chunks, x = i**2 by hand.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import (
  processes_said,
  run_processes,
  REPO,
  TINY_OVERRIDES,
  TRAIN_CONFIG,
  TRAINED_ARGS,
  TRAINED_MESH,
  assert_same_state,
  final_state,
  killable,
  subprocess_env,
  tiny_config,
  train_command,
)
from rdm_jax import checkpoint, preemption


def _run(cmd, devices=None):
  return subprocess.run(
    cmd, env=subprocess_env(devices), capture_output=True, text=True, cwd=REPO, timeout=600
  )


def _state(data_dir, workdir, step=None):
  return final_state(tiny_config(data_dir), workdir, (8, 8, 1), step)


@pytest.mark.slow  # CI's budget: see docs/development.md, Tests
def test_sigterm_saves_the_step_exits_75_and_the_rerun_ends_as_the_uninterrupted_run(
  trained, tmp_path
):
  data_dir, straight = trained
  workdir = str(tmp_path / "run")
  cmd = train_command(data_dir, workdir, *TRAINED_ARGS)
  stopped = _run(killable(cmd, "term:1"))  # SIGTERM during step 1
  assert stopped.returncode == preemption.EXIT_STATUS, stopped.stderr[-3000:]
  assert stopped.stderr.strip().splitlines()[-1] == (
    f"preempted (SIGTERM): saved step 1 of 4 in {workdir}; rerun the same command to resume"
  )
  assert checkpoint.steps(checkpoint.manager(workdir, create=False)) == [1]
  again = _run(cmd)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step 1" in again.stderr
  assert_same_state(_state(data_dir, workdir), _state(data_dir, straight), 4)


# four processes compiling: 80 s alone, over 200 s beside the rest of the suite on 2 cores
@pytest.mark.slow
def test_two_processes_stop_at_one_step_on_a_sigterm_to_either(trained, tmp_path):
  """SIGTERM to process 1 only, at its step 2: JAX's sync manager tells both processes the same
  step to stop at; both save it (one Orbax checkpoint) and exit 75; rerun on two processes, the
  run ends where the single-process `trained` run ended (to float rounding: two programs)."""
  data_dir, straight = trained
  workdir = str(tmp_path / "multi")

  def cmd(port, i, term):
    c = train_command(
      data_dir,
      workdir,
      *TRAINED_ARGS,
      "--distributed",
      f"--coordinator_address=localhost:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    )
    # both processes wait 0.5 s at each look at the signal, so the run cannot end before JAX's sync
    # manager has agreed on the step to stop at (in a background thread, in milliseconds); process 1
    # gets the SIGTERM at its second look
    return killable(c, f"term:{2 if i == 1 else 0}:0.5") if term else c

  outs = run_processes(lambda port, i: cmd(port, i, True), 2, subprocess_env(4))
  lines = []
  assert all(p.returncode == preemption.EXIT_STATUS for p, _ in outs), processes_said(outs)
  for p, err in outs:
    lines.append(err.strip().splitlines()[-1])
  assert lines[0] == lines[1] and lines[0].startswith("preempted (SIGTERM): saved step "), lines
  step = int(lines[0].split("saved step ")[1].split()[0])
  assert 2 <= step < 4 and checkpoint.steps(checkpoint.manager(workdir, create=False))[-1] == step
  outs = run_processes(lambda port, i: cmd(port, i, False), 2, subprocess_env(4))
  assert all(p.returncode == 0 for p, _ in outs), processes_said(outs)
  for p, err in outs:
    assert f"resumed from step {step}" in err
  got, want = _state(data_dir, workdir), _state(data_dir, straight)
  assert int(got.step) == int(want.step) == 4
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_sample_job_stops_after_its_shard_and_the_rerun_writes_the_rest(trained, tmp_path):
  data_dir, workdir = trained

  def cmd(out):
    return [
      sys.executable,
      "-m",
      "rdm_jax.sample",
      f"--config={TRAIN_CONFIG}",
      f"--workdir={workdir}",
      f"--config.data_dir={data_dir}",
      *TINY_OVERRIDES,
      *TRAINED_MESH,
      f"--out={tmp_path / out}",
      "--config.sample.num_images=6",
      "--config.sample.shard_size=4",
      "--config.sample.batch_size=4",
      "--config.sample.num_steps=2",
      "--config.sample.eta=1.0",
    ]

  straight = _run(cmd("straight"), 8)
  assert straight.returncode == 0, straight.stderr[-3000:]
  stopped = _run(killable(cmd("stopped"), "term:1"), 8)  # SIGTERM when shard 0 is written
  assert stopped.returncode == preemption.EXIT_STATUS, stopped.stderr[-3000:]
  assert "preempted (SIGTERM): 1 of 2 shards are in" in stopped.stderr.strip().splitlines()[-1]
  assert sorted(f for f in os.listdir(tmp_path / "stopped") if f.endswith(".npz")) == [
    "shard-00000-of-00002.npz"
  ]
  again = _run(cmd("stopped"), 8)
  assert again.returncode == 0 and "resuming: 1 of 2 shards are done" in again.stdout, again.stderr[
    -3000:
  ]
  for i in range(2):
    name = f"shard-0000{i}-of-00002.npz"
    with np.load(tmp_path / "stopped" / name) as got, np.load(tmp_path / "straight" / name) as want:
      for k in want.files:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")


CHUNKED = """
import sys
import numpy as np
from rdm_jax import errors, preemption
from rdm_jax.data import chunked, store

def compute(start, stop):
  return {"x": np.arange(start, stop, dtype=np.int64) ** 2}

def main(argv):
  preemption.install()
  chunked.write_chunked(sys.argv[1], "test_rows", 10, chunk_size=3, compute=compute, log=print)
  print("finished")

errors.run_main(main)(sys.argv)
"""


def test_a_chunked_store_job_keeps_its_chunks_on_sigterm(tmp_path):
  """write_chunked over 10 rows in chunks of 3: SIGTERM at the look after the second chunk stops
  the job with chunks 0:3 and 3:6 kept; the rerun computes only 6:9 and 9:10 and the store holds
  x = i**2 for every row."""
  out = str(tmp_path / "rows")
  env = subprocess_env()
  env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
  (tmp_path / "chunked_job.py").write_text(CHUNKED)
  stopped = subprocess.run(
    killable([sys.executable, "-m", "chunked_job", out], "term:2"),
    env=env,
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert stopped.returncode == preemption.EXIT_STATUS, stopped.stderr[-3000:]
  assert "rows 3:6 done" in stopped.stdout and "rows 6:9" not in stopped.stdout
  assert (
    stopped.stderr.strip().splitlines()[-1].startswith(f"preempted (SIGTERM): {out}: rows to 6 ")
  )
  again = subprocess.run(
    [sys.executable, "-m", "chunked_job", out],
    env=env,
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert again.returncode == 0, again.stderr[-3000:]
  assert (
    "rows 0:3 done" not in again.stdout
    and "rows 6:9 done" in again.stdout
    and "finished" in again.stdout
  )
  from rdm_jax.data import store

  np.testing.assert_array_equal(
    np.asarray(store.read(out, "test_rows", hint="")["x"]), np.arange(10) ** 2
  )
