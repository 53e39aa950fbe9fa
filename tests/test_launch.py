"""The launch scripts' dry-run mode prints, per host or task, the exact command it would run."""

import os
import shlex
import subprocess

from tests.conftest import REPO


def _dry(script, *args, **env):
  out = subprocess.run(
    ["bash", os.path.join(REPO, "launch", script), *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
    env={**os.environ, "DRY_RUN": "1", **env},
  )
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


TRAIN = ".venv/bin/python -m rdm_jax.train --config=configs/imagenet_rdm.py"


def test_tpu_pod_dry_run():
  lines = _dry(
    "tpu_pod.sh",
    "--config.mesh.fsdp=8",
    TPU="my-v5e-64",
    ZONE="us-west4-a",
    WORKDIR="gs://b/runs/x",
    WORKERS="16",
  )
  gcloud = shlex.split(lines[0])
  assert gcloud[:8] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "my-v5e-64",
    "--zone=us-west4-a",
    "--worker=all",
  ]
  worker = f"cd rdm_jax && {TRAIN} --workdir=gs://b/runs/x --distributed --config.mesh.fsdp=8"
  assert gcloud[8] == "--command=" + worker
  assert lines[1:] == [f"worker {w}: {worker}" for w in range(16)]


def test_slurm_dry_runs():
  lines = _dry(
    "slurm_gpu.sbatch", "configs/imagenet_rdm.py", "/shared/run", "--config.mesh.fsdp=8", NODES="2"
  )
  task = f"{TRAIN} --workdir=/shared/run --distributed --config.mesh.fsdp=8"
  assert lines == [f"srun {task}"] + [
    f"task {t} (SLURM_PROCID={t}, all GPUs of node {t}): {task}" for t in range(2)
  ]
  lines = _dry(
    "neighbors_slurm.sbatch", "configs/imagenet_rdm.py", "--config.k_train=4", NTASKS="3"
  )
  assert [ln.split(": ", 1)[1] for ln in lines[1:]] == [
    f".venv/bin/python -m rdm_jax.jobs.neighbors --config=configs/imagenet_rdm.py --process_id={t} "
    "--num_processes=3 --config.k_train=4"
    for t in range(3)
  ]


def test_local_multiprocess_dry_run():
  lines = _dry(
    "local_multiprocess.sh",
    "2",
    "configs/fashion_mnist_rdm.py",
    "runs/mp",
    "--config.train.num_steps=20",
  )
  assert [shlex.split(ln)[-2:] for ln in lines] == [
    ["--process_id=0", "--config.train.num_steps=20"],
    ["--process_id=1", "--config.train.num_steps=20"],
  ]
  assert all("--coordinator_address=localhost:12355 --num_processes=2" in ln for ln in lines)
