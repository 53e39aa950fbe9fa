"""What the job tests share: the data pipeline's jobs and their stores, run as a user runs them."""

from __future__ import annotations

import filecmp
import json as _json
import os
import subprocess
import sys

import numpy as np
from tests.conftest import REPO, TRAIN_CONFIG, killable, subprocess_env


SMALL = [  # 96 train, 40 test, 80 database images: several chunks and a padded last batch
  "--config.dataset.parts.train.stop=96",
  "--config.dataset.parts.test.stop=40",
  "--config.dataset.parts.database.start=40000",
  "--config.dataset.parts.database.stop=40080",
  "--config.retrieval.batch_size=32",
  "--config.retrieval.chunk_size=40",
  "--config.retrieval.image_size=48",
  "--config.retrieval.recall_sample=20",
  "--config.retrieval.index.kind=brute",
  "--config.retrieval.index.shard_size=32",  # 3 ScaNN shards
  "--config.retrieval.index.tune_queries=20",
]


PIPELINE = [  # (job, the stores it writes)
  ("rdm_jax.jobs.encode", ["latents_train", "latents_test"]),
  ("rdm_jax.jobs.embed", ["database", "embeddings_train", "embeddings_test"]),
  ("rdm_jax.jobs.index", ["database_index"]),
  ("rdm_jax.jobs.neighbors", ["neighbors_train", "neighbors_test", "proposal"]),
]


def run(module, args, kill_at=0, count_file=""):
  cmd = killable(
    [sys.executable, "-m", module, f"--config={TRAIN_CONFIG}", *args], kill_at, count_file
  )
  return subprocess.run(
    cmd, env=subprocess_env(devices=2), capture_output=True, text=True, cwd=REPO, timeout=600
  )


def assert_same_files(got_root, got, want_root, want):
  """Every file under `want` is under `got` with the same bytes; JSON with ROOT for the run's
  directory and without measured times (an index manifest's build time and ms per query); .npz
  by its arrays (zip members carry the time they were written)."""
  for dirpath, _, files in os.walk(want):
    for name in files:
      a = os.path.join(got, os.path.relpath(os.path.join(dirpath, name), want))
      b = os.path.join(dirpath, name)
      assert os.path.isfile(a), f"{a} missing after the rerun"
      if name.endswith(".json"):
        assert _json(a, got_root) == _json(b, want_root), a
      elif name.endswith(".npz"):
        with np.load(a) as x, np.load(b) as y:
          assert sorted(x.files) == sorted(y.files), a
          for key in x.files:
            assert np.array_equal(x[key], y[key]) or str(x[key]).replace(got_root, "ROOT") == str(
              y[key]
            ).replace(want_root, "ROOT"), (a, key)
      else:
        assert filecmp.cmp(a, b, shallow=False), f"{a} differs from the uninterrupted run's"
  leftovers = [f for _, _, fs in os.walk(got) for f in fs if ".tmp" in f or ".partial" in f]
  assert not leftovers, leftovers
