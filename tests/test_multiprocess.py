"""Multi-host jobs emulated by two local processes (4 CPU devices each, gloo collectives) on the
same (data=4, fsdp=2) mesh as one process driving all 8 devices.

Training: each process feeds its own slice of the global batch, and the global losses equal
those of the shared `trained` run. Sampling: the shards two processes write equal, image for
image, those of one process, and those of a run killed after its first shard and rerun.
"""

import os
import re
import subprocess

import sys

import numpy as np
import pytest

from tests.conftest import (
  processes_said,
  run_processes,
  REPO,
  TINY_OVERRIDES,
  TRAIN_CONFIG,
  TRAINED_MESH,
  TRAINED_STEPS,
  killable,
  one_line_error,
  subprocess_env,
  train_command,
  trained_log,
)
from rdm_jax.data import lock
from rdm_jax.errors import UserError
from rdm_jax.metrics import sample_sets


def _losses(log: str) -> list[float]:
  return [float(x) for x in re.findall(r"step \d+ loss ([0-9.]+)", log)]


def test_two_processes_equal_one(trained, tmp_path):
  data_dir, single = trained
  outs = run_processes(
    lambda port, i: train_command(
      data_dir,
      str(tmp_path / "multi"),
      *TRAINED_STEPS,
      "--distributed",
      f"--coordinator_address=localhost:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    ),
    2,
    subprocess_env(4),
  )
  assert all(p.returncode == 0 for p, _ in outs), processes_said(outs)
  for p, err in outs:
    assert "over 8 devices, 2 processes" in err
  want = _losses(trained_log(single))
  assert len(want) == 4
  for _, err in outs:
    np.testing.assert_allclose(_losses(err), want, rtol=1e-4)
  assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "4")


_VERDICT_SCRIPT = """
import os, sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
from rdm_jax import checkpoint, errors
from rdm_jax.data import store
from rdm_jax.errors import UserError

def check(name, workdir):
  try:
    errors.checked_by_process_0(lambda: checkpoint.check_workdir(workdir))
    print("verdict", name, "ok", file=sys.stderr, flush=True)
  except UserError as e:
    print("verdict", name, "refused", e, file=sys.stderr, flush=True)

shared = os.path.join(root, "shared")
if pid == 0:
  time.sleep(1.0)  # process 1 is ahead
check("shared", shared)
if pid == 1:
  open(os.path.join(shared, "written-after-the-check"), "w").close()
check("p0-empty", os.path.join(root, ("empty", "stray")[pid]))
check("p0-stray", os.path.join(root, ("stray", "empty")[pid]))

from rdm_jax.jobs import cli
for name in ("free", "held"):  # the lock of one launch: process 0 takes it, every process follows
  try:
    cli.hold_output(os.path.join(root, name), "--workdir")
    print("verdict", name, "ok", file=sys.stderr, flush=True)
  except UserError as e:
    print("verdict", name, "refused", e, file=sys.stderr, flush=True)
"""


def test_every_process_follows_process_0s_workdir_verdict_given_before_any_writes(tmp_path):
  """The --workdir check is process 0's, and no process writes there before process 0 has
  looked: a process ahead of the others once saw another's write-check probe and refused."""
  for d in ("shared", "empty", "stray"):
    os.makedirs(tmp_path / d)
  (tmp_path / "stray" / "notes.txt").write_text("not a training run")
  held = lock.Lock(str(tmp_path / "held")).acquire(wait=False)  # another launch's, alive: this test
  outs = run_processes(
    lambda port, i: [sys.executable, "-c", _VERDICT_SCRIPT, str(port), str(i), str(tmp_path)],
    2,
    subprocess_env(1),
  )
  stray = tmp_path / "stray"
  assert all(p.returncode == 0 for p, _ in outs), processes_said(outs)
  for p, err in outs:
    verdicts = [line.split(" ", 1)[1] for line in err.splitlines() if line.startswith("verdict ")]
    assert verdicts[:2] == ["shared ok", "p0-empty ok"], err[-3000:]
    assert verdicts[2].startswith(
      f"p0-stray refused --workdir={stray} holds files but no training run"
    ), verdicts
    # process 0 holds free.lock for the launch (process 1 alone would have been refused by it);
    # held.lock is another launch's: every process refused, naming it
    assert verdicts[3] == "free ok", verdicts
    assert verdicts[4].startswith("held refused") and f"pid {os.getpid()} on" in verdicts[4], (
      verdicts
    )
    assert len(verdicts) == 5
  held.release()


def test_sampling_is_the_same_on_two_processes_and_after_a_kill(trained, tmp_path):
  """6 samples in shards of 4 (DDIM eta=1: fresh noise at every step), each batch sharded over 8
  devices: two processes write the same shards as one (to float rounding); a run SIGKILLed just
  before its second shard, rerun, keeps the first and writes the same second; other settings in that
  directory are refused; the evaluate job refuses an unfinished set."""
  data_dir, workdir = trained

  def cmd(out, *extra):
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
      *extra,
    ]

  def shards(out):
    return [dict(np.load(tmp_path / out / f"shard-0000{i}-of-00002.npz")) for i in range(2)]

  one = subprocess.run(cmd("one"), env=subprocess_env(8), capture_output=True, text=True, cwd=REPO)
  assert one.returncode == 0, one.stderr[-3000:]
  want = shards("one")
  assert [len(s["images"]) for s in want] == [4, 2]
  assert len({s["images"].tobytes() for s in want[0:1]} | {want[1]["images"][:1].tobytes()}) == 2

  outs = run_processes(
    lambda port, i: cmd(
      "two",
      "--distributed",
      f"--coordinator_address=localhost:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    ),
    2,
    subprocess_env(4),
  )
  assert all(p.returncode == 0 for p, _ in outs), processes_said(outs)
  for got, ref in zip(
    shards("two"), want
  ):  # two compiled programs: latents equal to float rounding
    assert got.keys() == ref.keys()
    for k in ref:
      if k == "latents":
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-6)
      elif k == "images":  # a rounding may flip a grey level
        diff = np.abs(got[k].astype(int) - ref[k])
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
      else:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)

  killed = subprocess.run(
    killable(cmd("killed"), "path:shard-00001"),
    env=subprocess_env(8),
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert sorted(f for f in os.listdir(tmp_path / "killed") if f.endswith(".npz")) == [
    "shard-00000-of-00002.npz"
  ]
  with pytest.raises(UserError, match="holds 1 of 2 shards: its sample run did not finish"):
    sample_sets.read_samples(str(tmp_path / "killed"))
  first = os.stat(tmp_path / "killed" / "shard-00000-of-00002.npz").st_mtime_ns
  rerun = subprocess.run(
    cmd("killed"), env=subprocess_env(8), capture_output=True, text=True, cwd=REPO
  )
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resuming: 1 of 2 shards are done" in rerun.stdout
  assert os.stat(tmp_path / "killed" / "shard-00000-of-00002.npz").st_mtime_ns == first
  assert not [f for f in os.listdir(tmp_path / "killed") if f.endswith(".tmp")]
  for got, ref in zip(shards("killed"), want):
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=k)

  error = one_line_error(cmd("one", "--config.sample.num_steps=3"))
  assert "holds samples made with other settings" in error and "choose another --out" in error
  assert re.search(r"sample\.num_steps: \d+ there, 3 now", error), (
    error
  )  # the field that differs, in full
