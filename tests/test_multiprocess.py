"""Multi-host training emulated by two local processes (4 CPU devices each, gloo collectives):
each process feeds its own slice of the global batch, and the global losses equal those of one
process driving all 8 devices on the same (data=4, fsdp=2) mesh."""

import os
import re
import socket
import subprocess

import numpy as np

from conftest import subprocess_env, train_command



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


def _cmd(data_dir, workdir, *extra):
  return train_command(data_dir, workdir, "--config.train.num_steps=3", "--config.train.checkpoint_every=3",
                       "--config.mesh.data=4", "--config.mesh.fsdp=2", *extra)


def _losses(log: str) -> list[float]:
  return [float(x) for x in re.findall(r"step \d+ loss ([0-9.]+)", log)]


def test_two_processes_equal_one(tiny_data, tmp_path):
  data_dir = tiny_data["data_dir"]
  single = subprocess.run(_cmd(data_dir, str(tmp_path / "single")), env=subprocess_env(8), capture_output=True,
                          text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  outs = run_processes(lambda port, i: _cmd(data_dir, str(tmp_path / "multi"), "--distributed",
                                            f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                            f"--process_id={i}"), 2, subprocess_env(4))
  for p, err in outs:
    assert p.returncode == 0, err[-3000:]
    assert "over 8 devices, 2 processes" in err
  want = _losses(single.stderr)
  assert len(want) == 3
  for _, err in outs:
    np.testing.assert_allclose(_losses(err), want, rtol=1e-4)
  assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "3")
