"""Multi-host training emulated by two local processes (4 CPU devices each, gloo collectives):
each process feeds its own slice of the global batch, and the global losses equal those of one
process driving all 8 devices on the same (data=4, fsdp=2) mesh: the shared `trained` run."""

import os
import re
import socket
import subprocess

import numpy as np

from conftest import TRAINED_STEPS, subprocess_env, train_command, trained_log



def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(make_cmd, num_processes: int, env: dict, tries: int = 3) -> list[tuple[subprocess.Popen, str]]:
  """Runs `make_cmd(port, process_id)` for every process; (process, stderr) of each.

  A port found free can be taken by someone else before the coordinator (process 0) binds
  it; the coordinator then dies with "Failed to add port". That attempt is stopped and run
  again on another port, so the test never depends on what else runs on the machine.
  """
  for _ in range(tries):
    port = _free_port()
    procs = [subprocess.Popen(make_cmd(port, i), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    _, err0 = procs[0].communicate(timeout=600)
    if procs[0].returncode != 0 and "Failed to add port" in err0:
      for p in procs[1:]:
        p.kill()
        p.communicate()
      continue
    return [(procs[0], err0)] + [(p, p.communicate(timeout=600)[1]) for p in procs[1:]]
  raise AssertionError(f"no free port for the coordinator in {tries} tries")


def _losses(log: str) -> list[float]:
  return [float(x) for x in re.findall(r"step \d+ loss ([0-9.]+)", log)]


def test_two_processes_equal_one(trained, tmp_path):
  data_dir, single = trained
  outs = run_processes(lambda port, i: train_command(
      data_dir, str(tmp_path / "multi"), *TRAINED_STEPS, "--distributed", f"--coordinator_address=localhost:{port}",
      "--num_processes=2", f"--process_id={i}"), 2, subprocess_env(4))
  for p, err in outs:
    assert p.returncode == 0, err[-3000:]
    assert "over 8 devices, 2 processes" in err
  want = _losses(trained_log(single))
  assert len(want) == 4
  for _, err in outs:
    np.testing.assert_allclose(_losses(err), want, rtol=1e-4)
  assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "4")
