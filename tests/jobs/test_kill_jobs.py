"""kill -9 every job at seeded commit points, rerun it, and get what an uninterrupted run writes.

The jobs run on small parts of the real Fashion-MNIST (encode, embed, index, neighbours) or on
the shared tiny training run (sample, evaluate), under `tests/kill_at.py`, which SIGKILLs the
process just before its N-th commit (`os.replace` or `os.rename`). N is drawn with a fixed seed from
the commit points an uninterrupted run goes through. After the kill the job is run again, and
every file it writes must equal, byte for byte, the uninterrupted run's (manifests compared
with the run's own directory written as ROOT); nothing half-written may be read on the way.
Training, killed at seeded commits too (checkpoints, digests), must resume to the uninterrupted
run's final state. Slow (about 45 subprocess runs): `-m slow`.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tests.jobs.conftest import PIPELINE, SMALL, assert_same_files, run
from tests.conftest import (
  rarm_final_state,
  tiny_run_state,
  tiny_token_run,
  REPO,
  TINY_OVERRIDES,
  assert_same_state,
  killable,
  subprocess_env,
)

from rdm_jax.retrieval import index

pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"),
    reason="needs dataset-fashion-mnist (make data)",
  ),
]

POINTS_PER_JOB = int(
  os.environ.get("KILL_POINTS_PER_JOB", "2")
)  # a large number: every commit point


def _json(path, root):
  """A JSON file with the run's directory written as ROOT and the measured times left out."""
  return index.without_timings(json.loads(open(path).read().replace(root, "ROOT")))


def kill_points(count: int, seed: int) -> list[int]:
  """POINTS_PER_JOB distinct commit points in [1, count], drawn with a fixed seed."""
  return sorted(
    np.random.default_rng(seed)
    .choice(np.arange(1, count + 1), min(POINTS_PER_JOB, count), replace=False)
    .tolist()
  )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The data pipeline run uninterrupted in one directory: (that data
  dir, snapshots, {job: commits}).

  Every run of this module uses the same data directory (manifests record absolute paths, and
  the neighbour job's inputs include the index's), restored from the snapshot taken before
  the job: `before_<i>`; `after_<i>` holds the job's outputs as the uninterrupted run wrote them.
  """
  root = tmp_path_factory.mktemp("kill_jobs")
  data = str(root / "work" / "data")
  commits = {}
  for i, (module, outputs) in enumerate(PIPELINE):
    if os.path.isdir(data):
      shutil.copytree(data, str(root / f"before_{i}"))
    count_file = str(root / f"count_{i}")
    out = run(module, [f"--config.data_dir={data}", *SMALL], count_file=count_file)
    assert out.returncode == 0, out.stderr[-3000:]
    commits[module] = int(open(count_file).read())
    for name in outputs:
      shutil.copytree(os.path.join(data, name), str(root / f"after_{i}" / name))
  return data, str(root), commits


@pytest.mark.parametrize("step", range(len(PIPELINE)), ids=[m.split(".")[-1] for m, _ in PIPELINE])
def test_data_jobs_killed_at_seeded_commits_then_rerun_equal_uninterrupted(reference, step):
  data, root, commits = reference
  module, outputs = PIPELINE[step]
  for n in kill_points(commits[module], seed=step):
    shutil.rmtree(data, ignore_errors=True)
    if step:
      shutil.copytree(os.path.join(root, f"before_{step}"), data)
    args = [f"--config.data_dir={data}", *SMALL]
    killed = run(module, args, kill_at=n)
    assert killed.returncode == -9, (n, killed.stderr[-2000:])
    again = run(module, args)
    assert again.returncode == 0, (n, again.stderr[-3000:])
    for name in outputs:
      assert_same_files(
        data, os.path.join(data, name), data, os.path.join(root, f"after_{step}", name)
      )


def test_sample_and_evaluate_killed_at_seeded_commits_then_rerun_equal_uninterrupted(
  trained, tmp_path
):
  data_dir, original = trained
  ref_images = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)
  np.savez(tmp_path / "ref.npz", images=ref_images)

  def fresh(name, samples_from=None):
    """A copy of the trained run and of its data (the evaluate job caches features in the data
    dir)."""
    shutil.copytree(original, str(tmp_path / name / "run"))
    shutil.copytree(data_dir, str(tmp_path / name / "data"))
    if samples_from:
      shutil.copytree(
        os.path.join(samples_from, "run", "samples"),
        str(tmp_path / name / "run" / "samples"),
        dirs_exist_ok=True,
      )
    return str(tmp_path / name)

  def args(module, base):
    common = [f"--workdir={base}/run", f"--config.data_dir={base}/data", *TINY_OVERRIDES]
    if module == "rdm_jax.sample":
      return common + [
        "--config.sample.num_images=5",
        "--config.sample.batch_size=2",
        "--config.sample.num_steps=3",
        "--config.sample.shard_size=2",
      ]
    return common + [
      f"--samples={base}/run/samples/exemplar",
      "--config.eval.image_size=32",
      f"--config.eval.reference={tmp_path}/ref.npz",
      "--config.eval.baseline_part=",
      "--config.eval.kid_subsets=3",
    ]

  straight = fresh("straight")
  counts = {}
  for module in ("rdm_jax.sample", "rdm_jax.evaluate"):
    out = run(module, args(module, straight), count_file=str(tmp_path / "count"))
    assert out.returncode == 0, out.stderr[-3000:]
    counts[module] = int(open(tmp_path / "count").read())

  for seed, module in enumerate(("rdm_jax.sample", "rdm_jax.evaluate")):
    for n in kill_points(counts[module], seed=10 + seed):
      base = fresh(
        f"{module.split('.')[-1]}_{n}",
        samples_from=straight if module == "rdm_jax.evaluate" else None,
      )
      killed = run(module, args(module, base), kill_at=n)
      assert killed.returncode == -9, (module, n, killed.stderr[-2000:])
      again = run(module, args(module, base))
      assert again.returncode == 0, (module, n, again.stderr[-3000:])
      for name in (
        ("run/samples",) if module == "rdm_jax.sample" else ("run/eval", "data/eval_cache")
      ):
        assert_same_files(base, os.path.join(base, name), straight, os.path.join(straight, name))


def killed_trainings_resume(train, final, tmp_path, steps: int, seed: int) -> None:
  """train(workdir, kill_at=0, count_file="") runs the train job; final(workdir) is its state at
  `steps`. An uninterrupted run, then runs killed at seeded commit points and rerun: each ends
  in the uninterrupted run's state, bit for bit."""
  straight = str(tmp_path / "straight")
  out = train(straight, count_file=str(tmp_path / "count"))
  assert out.returncode == 0, out.stderr[-3000:]
  want = final(straight)
  for n in kill_points(int(open(tmp_path / "count").read()), seed=seed):
    workdir = str(tmp_path / f"killed_{n}")
    killed = train(workdir, kill_at=n)
    assert killed.returncode == -9, (n, killed.stderr[-2000:])
    again = train(workdir)
    assert again.returncode == 0, (n, again.stderr[-3000:])
    assert_same_state(final(workdir), want, steps)


def test_training_killed_at_seeded_commits_resumes_to_the_uninterrupted_state(tiny_data, tmp_path):

  data_dir = tiny_data["data_dir"]
  args = [
    "--config.train.num_steps=6",
    "--config.train.checkpoint_every=2",
    "--config.train.keep_checkpoints=10",
    f"--config.data_dir={data_dir}",
    *TINY_OVERRIDES,
  ]
  killed_trainings_resume(
    lambda workdir, **kill: run("rdm_jax.train", [f"--workdir={workdir}", *args], **kill),
    lambda workdir: tiny_run_state(data_dir, workdir, 6),
    tmp_path,
    6,
    seed=20,
  )


def test_database_of_crops_killed_at_seeded_commits_then_rerun_equal_uninterrupted(tmp_path):
  """The database built from crops of an image folder (config.database_build), killed and rerun."""
  from PIL import Image

  rng = np.random.default_rng(0)
  for i in range(10):
    sub = tmp_path / "collection" / ("a" if i % 2 else "b")
    sub.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(sub / f"{i}.png")
  args = [
    "--parts=database",
    f"--config.dataset.parts.database.split=folder:{tmp_path}/collection",
    "--config.dataset.parts.database.start=0",
    "--config.dataset.parts.database.stop=0",
    "--config.dataset.folder.channels=3",
    "--config.database_build.crops_per_image=3",
    "--config.database_build.crop_size=16",
    "--config.retrieval.chunk_size=6",  # 2 images per chunk
    "--config.retrieval.batch_size=8",
    "--config.retrieval.image_size=48",
  ]
  want = str(tmp_path / "want" / "data")
  count_file = str(tmp_path / "count")
  out = run("rdm_jax.jobs.embed", [f"--config.data_dir={want}", *args], count_file=count_file)
  assert out.returncode == 0, out.stderr[-3000:]
  data = str(tmp_path / "run" / "data")
  for n in kill_points(int(open(count_file).read()), seed=11):
    shutil.rmtree(data, ignore_errors=True)
    killed = run("rdm_jax.jobs.embed", [f"--config.data_dir={data}", *args], kill_at=n)
    assert killed.returncode == -9, (n, killed.stderr[-2000:])
    again = run("rdm_jax.jobs.embed", [f"--config.data_dir={data}", *args])
    assert again.returncode == 0, (n, again.stderr[-3000:])
    assert_same_files(data, os.path.join(data, "database"), want, os.path.join(want, "database"))


def test_rarm_training_killed_at_seeded_commits_resumes_to_the_uninterrupted_state(tmp_path):
  """The tiny RARM run of tests/test_rarm_training.py, killed at seeded commit points."""

  args = [a for a in tiny_token_run(tmp_path) if not a.startswith("--config=")]
  args += ["--config.train.num_steps=6", "--config.train.keep_checkpoints=10"]
  rarm = [f"--config={REPO}/configs/fashion_mnist_rarm.py"]

  def train(workdir, **kill):
    cmd = killable(
      [sys.executable, "-m", "rdm_jax.train", *rarm, f"--workdir={workdir}", *args], **kill
    )
    return subprocess.run(
      cmd, env=subprocess_env(devices=8), capture_output=True, text=True, cwd=REPO, timeout=600
    )

  killed_trainings_resume(
    train, lambda workdir: rarm_final_state(args, workdir, 6), tmp_path, 6, seed=21
  )
