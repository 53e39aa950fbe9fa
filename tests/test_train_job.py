"""The train job end to end on tiny stores: kill-and-resume equals an uninterrupted run, and bad
input stops with one line that says what to do (no traceback)."""

import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import (
  tiny_run_state,
  REPO,
  TRAINED_STEPS,
  assert_same_state,
  killable,
  one_line_error,
  subprocess_env,
  tensorboard_events,
  train_command,
)
from rdm_jax import checkpoint


def test_tensorboard_has_the_loss_the_rate_the_grad_norm_and_the_sample_panels(trained):
  """The shared run's event files, read with TensorFlow's reader: each step's loss and gradient
  norm; the rate of that step's update, worked by hand from the demo's schedule as the tiny run
  sets it (2 warm-up steps from 1e-6 of lr = 1e-3, then a cosine to 0.1 lr at step 4); the samples
  and their neighbour panels at the sample steps 2 and 4."""
  scalars, images = tensorboard_events(trained[1])
  lr = 1e-3
  want = {
    1: lr * 1e-6,  # update 0: the warm-up's start
    2: lr * 1e-6 + (lr - lr * 1e-6) / 2,  # halfway
    3: lr,  # the cosine's start
    4: lr * (0.9 * 0.5 * (1 + math.cos(math.pi / 2)) + 0.1),  # halfway down the cosine
  }
  assert scalars["learning_rate"].keys() == want.keys()
  for step, rate in want.items():
    # float32 schedule arithmetic: 2 units in the last place of lr apart at most
    assert math.isclose(scalars["learning_rate"][step], rate, rel_tol=1e-6, abs_tol=2.5e-10), step
  for tag in ("loss", "grad_norm"):
    assert scalars[tag].keys() == want.keys() and all(v > 0 for v in scalars[tag].values())
  assert images["samples"] == images["neighbors_and_samples"] == {2, 4}


def _train_cmd(data_dir, workdir, steps, *extra):
  return train_command(
    data_dir,
    workdir,
    f"--config.train.num_steps={steps}",
    "--config.train.checkpoint_every=3",
    "--config.train.keep_checkpoints=100",
    *extra,
  )


@pytest.mark.slow  # CI's budget: test_rarm_training's kill while checkpointing, and test_faults'
# resume past a damaged checkpoint, keep a killed and resumed run in make test
def test_kill_and_resume_equals_uninterrupted(trained, tmp_path):
  """The shared run's training, without its sampling, killed (SIGKILL, no cleanup: a preemption)
  just as its last checkpoint is being committed, then rerun: it resumes from step 2 and ends in
  the uninterrupted run's state, bit for bit. (That run also sampled at steps 2 and 4, so
  sampling must not touch the training state or its random numbers.) Kill points everywhere in
  every job: tests/test_kill_jobs.py (slow)."""
  data_dir, original = trained
  workdir = str(tmp_path / "killed")
  cmd = train_command(data_dir, workdir, *TRAINED_STEPS)
  killed = subprocess.run(
    killable(cmd, kill_at="path:checkpoints/4"),
    env=subprocess_env(),
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert checkpoint.steps(checkpoint.manager(workdir, create=False)) == [2]
  out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 2" in out.stderr
  assert_same_state(tiny_run_state(data_dir, workdir, 4), tiny_run_state(data_dir, original, 4), 4)


def test_imagenet_without_latents_names_the_job_to_run(tmp_path):
  line = one_line_error(
    [
      sys.executable,
      "-m",
      "rdm_jax.train",
      "--config=configs/imagenet_rdm.py",
      f"--workdir={tmp_path / 'x'}",
      f"--config.data_dir={tmp_path / 'nothing'}",
    ]
  )
  assert "python -m rdm_jax.jobs.encode" in line and "latents" in line


def test_bad_train_inputs_are_one_line_errors(tiny_data, tmp_path):
  base = _train_cmd(tiny_data["data_dir"], str(tmp_path / "w"), 3)
  assert "K=6" in one_line_error(base + ["--config.k_train=9"])
  assert "does not divide 8 devices" in one_line_error(base + ["--config.mesh.fsdp=3"])
  np.save(
    os.path.join(tiny_data["data_dir"], "latents_train", "latents.npy"),
    np.zeros((3, 8, 8, 1), np.float32),
  )
  assert "manifest says" in one_line_error(base)


@pytest.mark.parametrize(
  "field,value",
  [
    ("checkpoint_every", 0),
    ("log_every", 0),
    ("num_steps", -1),
    ("keep_checkpoints", 0),
    ("log_every", True),
    ("sample_every", -1),
  ],
)
def test_train_counts_the_loop_cannot_divide_by_are_refused_before_any_work(field, value):
  """One line naming the field, not a ZeroDivisionError from `step % checkpoint_every`."""
  from rdm_jax import config_base, errors, train

  config = config_base.base_config()
  config.train[field] = value
  with pytest.raises(errors.UserError, match=rf"config\.train\.{field}={value!r} must be"):
    train.train_and_evaluate(config, "/nonexistent/never/written")


def test_zero_sample_grids_is_a_valid_count():
  from rdm_jax import config_base, train

  config = config_base.base_config()
  config.train.sample_every = 0
  train.check_train_counts(config.train)  # no error


@pytest.mark.parametrize("prediction,bound", [("eps", 1.0), ("v", 1.0), ("x0", -1.0)])
def test_a_censored_loss_without_x0_prediction_is_refused(prediction, bound):
  """diffusion.x0_bound censors x0 errors; with eps or v predictions (or a negative bound) it
  would mean nothing, so the train job names the field and the fix before any work. Sampling
  does not read it (it changes training, not what the weights compute)."""
  from rdm_jax import config_base, errors, train

  config = config_base.base_config()
  config.diffusion.update(prediction=prediction, x0_bound=bound)
  with pytest.raises(errors.UserError, match=r"config\.diffusion\.x0_bound=.*predict x0"):
    train.train_and_evaluate(config, "/nonexistent/never/written")
  config.diffusion.update(prediction="x0", x0_bound=1.0)
  train.check_x0_bound(config)  # no error
