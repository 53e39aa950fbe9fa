"""configs/imagenet_rdm.py:in-db (RDM-IN) on mock ImageNet: the database is the train split itself
(the RDM chain's assets and commands, tests/chains/conftest.py; its own file so that it runs
on another worker)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tests.conftest import REPO, subprocess_env

torch = pytest.importorskip("torch")
pytest.importorskip("taming.modules.diffusionmodules.model")

from tests.chains.conftest import MOCK, N_MOCK, overrides  # noqa: E402

from rdm_jax.data import store  # noqa: E402


@pytest.mark.slow  # 50 s of five jobs; make test's 20 minutes on 2 cores have no room left for it
def test_the_in_db_preset_retrieves_from_its_own_training_images(assets):
  """encode, embed, index, neighbours and train run unchanged with D = ImageNet train; as the
  original (which filters nothing out of its searcher's results), every training image's nearest
  entry is itself; `retrieval.exclude=auto`, ours, would drop it."""
  from rdm_jax.retrieval import exclusion

  root, _, _ = assets
  data = f"{root}/data_in_db"
  args = [
    o
    for o in overrides(root)
    if not o.startswith(
      (
        "--config.data_dir",
        "--config.dataset.parts.database",
        "--config.database_build",
        "--config.optim.warmup_steps",
      )
    )
  ]
  args += [f"--config.data_dir={data}", f"--config.dataset.parts.database.stop={N_MOCK}"]

  def run(module, *extra):
    cmd = [
      sys.executable,
      MOCK,
      str(N_MOCK),
      module,
      f"--config={REPO}/configs/imagenet_rdm.py:in-db",
      *args,
      *extra,
    ]
    out = subprocess.run(
      cmd, env=subprocess_env(devices=8), capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, f"{module}: {out.stderr[-4000:]}"
    return out

  run("rdm_jax.jobs.encode", "--parts=train")
  run("rdm_jax.jobs.embed", "--parts=database,train")
  db = store.read(f"{data}/database", "database", hint="")
  queries = store.read(f"{data}/embeddings_train", "embeddings", hint="")
  assert db.manifest["source"]["split"] == queries.manifest["source"]["split"] == "train"
  np.testing.assert_array_equal(db["ids"], queries["ids"])  # the same 24 images
  run("rdm_jax.jobs.index")
  run("rdm_jax.jobs.neighbors", "--parts=train")
  nb = store.read(f"{data}/neighbors_train", "neighbors", hint="")
  assert nb["neighbor_ids"].shape == (N_MOCK, 8)
  np.testing.assert_array_equal(np.asarray(db["ids"])[nb["neighbor_ids"][:, 0]], nb["query_ids"])
  assert not exclusion.exclusion_for(
    "never", 0.995, queries.manifest["source"], db.manifest["source"]
  ).active
  ours = exclusion.exclusion_for("auto", 0.995, queries.manifest["source"], db.manifest["source"])
  assert ours.active and ours.by_source_id
  out = run("rdm_jax.train", f"--workdir={root}/run_in_db")
  assert "after 10000 warm-up steps" in out.stderr, out.stderr[-2000:]
