"""The train job end to end on tiny stores: kill-and-resume equals an uninterrupted run, and bad
input stops with one line that says what to do (no traceback)."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import one_line_error, subprocess_env, tiny_config, train_command
from rdm_jax import checkpoint, training
from rdm_jax.parallel import mesh as mesh_lib



def _train_cmd(data_dir, workdir, steps, *extra):
  return train_command(data_dir, workdir, f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=3",
                       "--config.train.keep_checkpoints=100", *extra)


def _final_state(data_dir, workdir, step):
  config = tiny_config(data_dir)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  rules = [tuple(r) for r in config.sharding_rules]
  model, tx = training.make_model(config), training.make_optimizer(config)
  inputs = training.example_inputs(config, 1, (8, 8, 1), config.k_train)
  abstract, sh = training.state_shardings(model, tx, inputs, mesh, rules)
  mngr = checkpoint.manager(workdir, create=False)
  return checkpoint.restore(mngr, abstract, sh, step)


@pytest.mark.timeout(600)
def test_kill_and_resume_equals_uninterrupted(tiny_data, tmp_path):
  data_dir = tiny_data["data_dir"]
  steps = 18  # 6 checkpoints; the killed run is stopped within a step or two of its first
  straight = str(tmp_path / "straight")
  subprocess.run(_train_cmd(data_dir, straight, steps), env=subprocess_env(), check=True, capture_output=True)

  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(_train_cmd(data_dir, killed, 100000), env=subprocess_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt3 = os.path.join(killed, "checkpoints", "3")
  deadline = time.time() + 300
  while not os.path.isdir(ckpt3) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # no chance to clean up: a real crash / preemption
  proc.wait()
  assert os.path.isdir(ckpt3), "the run never wrote its first checkpoint"
  done = sorted(int(d) for d in os.listdir(os.path.join(killed, "checkpoints")) if d.isdigit())
  assert done[-1] < steps, f"killed too late ({done})"
  out = subprocess.run(_train_cmd(data_dir, killed, steps), env=subprocess_env(), check=True, capture_output=True, text=True)
  assert "resumed from step" in out.stderr

  a, b = _final_state(data_dir, straight, steps), _final_state(data_dir, killed, steps)
  assert int(a.step) == int(b.step) == steps
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_imagenet_without_latents_names_the_job_to_run(tmp_path):
  line = one_line_error([sys.executable, "-m", "rdm_jax.train", "--config=configs/imagenet_rdm.py",
                          f"--workdir={tmp_path / 'x'}", f"--config.data_dir={tmp_path / 'nothing'}"])
  assert "python -m rdm_jax.jobs.encode" in line and "latents" in line


def test_bad_train_inputs_are_one_line_errors(tiny_data, tmp_path):
  base = _train_cmd(tiny_data["data_dir"], str(tmp_path / "w"), 3)
  assert "K=6" in one_line_error(base + ["--config.k_train=9"])
  assert "does not divide 8 devices" in one_line_error(base + ["--config.mesh.fsdp=3"])
  np.save(os.path.join(tiny_data["data_dir"], "latents_train", "latents.npy"), np.zeros((3, 8, 8, 1), np.float32))
  assert "manifest says" in one_line_error(base)
