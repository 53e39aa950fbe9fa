"""Faults of the disk under a running job: it fills up, turns read-only, or a store the job reads
changes; and checkpoints that know the data they were trained on.

The disks are real: a tmpfs of a few MiB (`small_disk`) fills up for real and a read-only
remount refuses writes even to root. The faults are done at a job's N-th step by
`tests/kill_at.py` (fill:N, fill-at-save:N, edit:N, truncate:N). What each job must do is
the Reliability table (docs/security_and_reliability.md): one line that names the path and what to
do, nothing committed lost, and a rerun after the fault is mended that goes on from where the job
stopped.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import (
  REPO,
  TINY_OVERRIDES,
  TRAIN_CONFIG,
  killable,
  make_tiny_stores,
  one_line_error,
  subprocess_env,
  train_command,
)

STEPS = ("--config.train.num_steps=12", "--config.train.checkpoint_every=5")
ONE_DEVICE = subprocess_env(
  1
)  # the faults are not about the mesh: one device starts and saves fastest


def _run(cmd):
  return subprocess.run(cmd, env=ONE_DEVICE, capture_output=True, text=True, cwd=REPO)


def _one_line(cmd):
  return one_line_error(cmd, ONE_DEVICE)


def _checkpoints(workdir):
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def _resumes_from(cmd, step):
  out = _run(cmd)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from step {step}" in out.stderr, out.stderr[-3000:]
  assert "trained to step 12" in out.stdout


def test_a_failed_write_is_told_by_its_errno_or_by_what_the_library_says(tmp_path):
  """The kinds of failure as the C library numbers them (errno) and as the libraries that wrap
  them word them (TensorStore's os_error_code, numpy's short write, ScaNN's "I/O error")."""
  import errno
  from rdm_jax import errors

  full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.npy"))
  line = errors.io_error_line(full)
  assert line.startswith(f"{tmp_path}/x.npy: the disk is full (") and " free there" in line, line
  wrapped = ValueError(
    f'RESOURCE_EXHAUSTED: Error writing local file "{tmp_path}/ck/_sharding": Failed to write '
    "8705 bytes to file 16: No space left on device [os_error_code='28']"
  )
  line = errors.io_error_line(wrapped)
  assert (
    line.startswith(f"{tmp_path}/ck/_sharding: the disk is full")
    and "a write of 8.5 KiB did not fit" in line
  )
  short = OSError("100000 requested and 992 written")
  assert errors.io_failure(short) == "a write came up short (the disk is full?)"
  try:
    try:
      raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out")
    except OSError as e:
      raise RuntimeError("writing failed") from e
  except RuntimeError as e:
    assert errors.io_error_line(e) == "/mnt/ro/out: the filesystem is read-only"
    assert "writable filesystem" in errors.io_remedy(e)
  assert errors.io_failure(ValueError("shapes (3,) and (4,) differ")) is None
  assert errors.io_failure(OSError(errno.EIO, "Input/output error")).startswith("an I/O error")


@pytest.fixture
def data_dir(tmp_path):
  path = str(tmp_path / "data")
  make_tiny_stores(path)
  return path


@pytest.mark.slow
def test_a_disk_that_fills_during_training_stops_it_in_one_line_before_it_writes(
  data_dir, small_disk
):
  disk = small_disk("64m")  # room for the run's 4 checkpoints of ~15 MiB at start
  workdir = os.path.join(disk, "run")
  filler = os.path.join(disk, "filler")
  cmd = train_command(data_dir, workdir, *STEPS)
  line = _one_line(killable(cmd, f"fill:7:{filler}"))  # after step 7, all but 4 KiB taken
  assert f"{workdir}/checkpoints: the disk is full" in line and "Checkpoints intact: 5" in line, (
    line
  )
  assert _checkpoints(workdir) == [5]
  os.remove(filler)
  _resumes_from(cmd, 5)


@pytest.mark.slow
def test_a_failed_checkpoint_write_stops_training_at_once(data_dir, small_disk):
  """The disk fills as orbax starts writing checkpoint 10 (after the run's own look at the free
  space): the run stops with the failure in its last line, not at the next save; checkpoint 5
  stays and the rerun resumes it."""
  disk = small_disk("64m")
  workdir = os.path.join(disk, "run")
  filler = os.path.join(disk, "filler")
  cmd = train_command(data_dir, workdir, *STEPS, "--config.train.log_every=100")
  out = _run(killable(cmd, f"fill-at-save:10:{filler}"))
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: writing ") and "the disk is full" in last, last
  assert "Intact checkpoints: 5;" in last, last
  assert _checkpoints(workdir) == [5]
  os.remove(filler)
  _resumes_from(cmd, 5)


@pytest.mark.slow
def test_a_run_whose_checkpoints_cannot_fit_is_refused_before_training(data_dir, small_disk):
  disk = small_disk("40m")  # one checkpoint fits, the four the run keeps at once do not
  line = _one_line(train_command(data_dir, os.path.join(disk, "run"), *STEPS))
  assert "the run's checkpoints need about" in line and "keep_checkpoints" in line, line
  assert _checkpoints(os.path.join(disk, "run")) == []


@pytest.mark.slow  # CI's budget: see docs/development.md, Tests
def test_a_store_written_to_during_training_stops_it_before_any_checkpoint_of_it(data_dir):
  """Latents zeroed in place through a memory map after step 7: the run stops in one line before
  checkpoint 10; the changed store is then refused by its checksum; with the original back (a
  copy: another inode and time), the checkpoint's record makes the run check it and resume."""
  latents = os.path.join(data_dir, "latents_train", "latents.npy")
  original = latents + ".orig"
  shutil.copy(latents, original)
  workdir = os.path.join(os.path.dirname(data_dir), "run")
  cmd = train_command(data_dir, workdir, *STEPS)
  line = _one_line(killable(cmd, f"edit:7:{latents}"))
  assert f"{latents} was written to" in line and "while training read it" in line, line
  assert _checkpoints(workdir) == [5]
  line = _one_line(cmd)
  assert "does not match the checksum in its manifest" in line, line
  shutil.copy(original, latents)
  os.remove(original)
  _resumes_from(cmd, 5)


@pytest.mark.slow
def test_a_store_truncated_during_training_is_one_line_not_sigbus(data_dir):
  neighbours = os.path.join(data_dir, "neighbors_train", "neighbor_ids.npy")
  workdir = os.path.join(os.path.dirname(data_dir), "run")
  line = _one_line(killable(train_command(data_dir, workdir, *STEPS), f"truncate:7:{neighbours}"))
  assert f"{neighbours} is" in line and "when it was opened (truncated or extended)" in line, line
  assert _checkpoints(workdir) == [5]


@pytest.mark.slow
def test_resuming_on_a_rebuilt_store_is_refused(data_dir):
  workdir = os.path.join(os.path.dirname(data_dir), "run")
  cmd = train_command(data_dir, workdir, *STEPS)
  first = _run(
    train_command(
      data_dir, workdir, "--config.train.num_steps=5", "--config.train.checkpoint_every=5"
    )
  )
  assert first.returncode == 0, first.stderr[-3000:]
  shutil.rmtree(os.path.join(data_dir, "latents_train"))
  make_tiny_stores(data_dir + "_other", seed=1)
  shutil.copytree(
    os.path.join(data_dir + "_other", "latents_train"), os.path.join(data_dir, "latents_train")
  )
  line = _one_line(cmd)
  assert (
    "checkpoint 5" in line
    and "was trained on the latents store" in line
    and "new --workdir" in line
  ), line


# ------------------------------------------------------------------ every job on a full disk
SMALL_DATA = os.path.isdir("/usr/share/datasets/fashion-mnist")


def _free_all_but(disk, leave):
  """Fills `disk` but for `leave` bytes (a file `filler`, removed to free the space again)."""
  filler = os.path.join(disk, "filler")
  with open(filler, "wb") as f:
    os.posix_fallocate(f.fileno(), 0, max(1, shutil.disk_usage(disk).free - leave))
  return filler


def _one_line_or(out):
  """The `error: ` line of a job that failed as it must (exit 2, one line, no traceback)."""
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, out.stderr[-3000:]
  return lines[0]


@pytest.mark.slow
@pytest.mark.skipif(not SMALL_DATA, reason="needs dataset-fashion-mnist (make data)")
def test_every_data_job_on_a_full_disk_is_one_line_and_resumes_to_the_reference(
  small_disk, tmp_path
):
  """encode, embed, index and neighbours, each with half its output's room on a real tmpfs: one
  line naming a path on that disk and what to do; with the room back, the rerun writes what an
  uninterrupted run on a large disk wrote (test_kill_jobs' comparison)."""
  from tests.jobs.conftest import PIPELINE, SMALL, assert_same_files, run

  disk = small_disk("16m")
  data = os.path.join(disk, "data")  # one path for every run: manifests and input digests hold it
  args = [f"--config.data_dir={data}", *SMALL]
  for i, (module, outputs) in enumerate(PIPELINE):
    before, after = str(tmp_path / f"before_{i}"), str(tmp_path / f"after_{i}")
    if os.path.isdir(data):
      shutil.copytree(data, before)
    out = run(module, args)  # the reference, with room
    assert out.returncode == 0, out.stderr[-3000:]
    for name in outputs:
      shutil.copytree(os.path.join(data, name), os.path.join(after, name))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(after) for f in fs)
    shutil.rmtree(data)
    if os.path.isdir(before):
      shutil.copytree(before, data)
    filler = _free_all_but(disk, size // 2)
    line = _one_line_or(run(module, args))
    assert f"{disk}/" in line and ("the disk is full" in line or "the disk is too small" in line), (
      module,
      line,
    )
    assert "rerun" in line, line
    os.remove(filler)
    again = run(module, args)
    assert again.returncode == 0, (module, again.stderr[-3000:])
    for name in outputs:
      assert_same_files(data, os.path.join(data, name), data, os.path.join(after, name))


@pytest.mark.slow
def test_sample_and_evaluate_on_a_full_disk_are_one_line_and_resume(trained, small_disk, tmp_path):
  data_dir, workdir = trained
  np.savez(
    tmp_path / "ref.npz",
    images=np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), dtype=np.uint8),
  )
  disk = small_disk("8m")
  config = [
    f"--config={TRAIN_CONFIG}",
    f"--workdir={workdir}",
    f"--config.data_dir={data_dir}",
    *TINY_OVERRIDES,
  ]
  sample = [
    sys.executable,
    "-m",
    "rdm_jax.sample",
    *config,
    "--config.sample.num_images=8",
    "--config.sample.batch_size=4",
    "--config.sample.num_steps=2",
    "--config.sample.shard_size=2",
    f"--out={disk}/samples",
  ]
  filler = _free_all_but(
    disk, 2 << 20
  )  # below the job's estimate of what it writes: refused before sampling
  line = _one_line_or(_run(sample))
  assert f"{disk}/samples/shard-00000-of-00004.npz: the disk is full" in line, line
  os.remove(filler)
  out = _run(sample)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "the model was trained on latents " in out.stdout, out.stdout
  evaluate = [
    sys.executable,
    "-m",
    "rdm_jax.evaluate",
    *config,
    f"--samples={disk}/samples",
    "--config.eval.image_size=32",
    f"--config.eval.reference={tmp_path}/ref.npz",
    "--config.eval.baseline_part=",
    "--config.eval.kid_subsets=3",
    f"--out={disk}/eval",
  ]
  filler = _free_all_but(disk, 64 << 10)
  line = _one_line_or(_run(evaluate))  # refused before it computes anything
  assert f"{disk}/eval: the disk is full" in line, line
  os.remove(filler)
  out = _run(evaluate)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "of a model trained on latents " in out.stdout, out.stdout


@pytest.mark.slow
@pytest.mark.skipif(not SMALL_DATA, reason="needs dataset-fashion-mnist (make data)")
def test_every_output_on_a_read_only_filesystem_is_one_line(trained, small_disk, tmp_path):
  """All eight outputs (encode, embed, index, neighbours into config.data_dir; train's and import's
  --workdir; sample's and evaluate's --out) on a tmpfs mounted read-only: one line each that says
  so, and nothing computed first."""
  from tests.jobs.conftest import PIPELINE, SMALL, run

  data_dir, workdir = trained
  disk = small_disk("16m")
  args = [f"--config.data_dir={disk}/data", *SMALL]
  for (
    module,
    _,
  ) in PIPELINE:  # every job's inputs, then each job's outputs taken away, last job first
    assert run(module, args).returncode == 0
  for module, outputs in PIPELINE[::-1]:
    small_disk.read_only(disk, False)
    for name in outputs:
      shutil.rmtree(os.path.join(disk, "data", name))
    small_disk.read_only(disk)
    line = _one_line_or(run(module, args))
    assert "read-only" in line.lower() and disk in line, (module, line)
  base = [sys.executable, "-m"]
  config = [f"--config={TRAIN_CONFIG}", f"--config.data_dir={data_dir}", *TINY_OVERRIDES]
  for cmd in (
    [*base, "rdm_jax.train", *config, f"--workdir={disk}/run"],
    [
      *base,
      "rdm_jax.jobs.import_checkpoint",
      *config,
      f"--checkpoint={tmp_path}/x.ckpt",
      f"--workdir={disk}/run",
    ],
    [*base, "rdm_jax.sample", *config, f"--workdir={workdir}", f"--out={disk}/samples"],
    [*base, "rdm_jax.evaluate", *config, f"--samples={tmp_path}/x.npz", f"--out={disk}/eval"],
  ):
    line = _one_line_or(_run(cmd))
    assert disk in line and "read-only" in line.lower(), (cmd[2], line)
