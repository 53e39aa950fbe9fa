"""The original's published retrieval databases (`.npz` parts of DatasetBuilder.save_datapool:
`embedding`, `img_id`, `patch_coords`) import as our database store, in file-name order, and
serve conditioning without pixels; bad parts are refused in one line before anything is written."""

from __future__ import annotations

import os

import numpy as np
import pytest
from tests.conftest import tiny_config

from rdm_jax import conditioning
from rdm_jax.data import store
from rdm_jax.retrieval import original_database
from rdm_jax.errors import UserError
from rdm_jax.retrieval import encoders


def _parts(root, d=16, sizes=(7, 12)):
  """Two parts as the original writes them (the second np.savez_compressed), the rows the store must
  hold."""
  rng = np.random.default_rng(0)
  want = {"embedding": [], "img_id": [], "patch_coords": []}
  os.makedirs(root, exist_ok=True)
  for i, n in enumerate(sizes):
    part = {
      "embedding": rng.normal(size=(n, d)).astype(np.float32),
      "img_id": rng.integers(0, 10**6, n).astype(np.int64),
      "patch_coords": rng.integers(0, 1200, (n, 4)).astype(np.int32),
    }
    (np.savez_compressed if i else np.savez)(
      os.path.join(root, f"{n * (i + 1)}x{d}-part_{i + 1}.npz"), **part
    )
    for k, v in part.items():
      want[k].append(v)
  return {k: np.concatenate(v) for k, v in want.items()}


def test_parts_import_in_file_order_as_a_database_store(tmp_path):
  config = tiny_config(str(tmp_path / "data"))
  config.retrieval.chunk_size = 5  # chunks straddle the two parts
  config.database_build.embeddings_dtype = "float16"
  want = _parts(str(tmp_path / "oi"))
  db = original_database.import_database(config, [str(tmp_path / "oi")])
  assert db.path == os.path.normpath(str(tmp_path / "data" / "database"))
  np.testing.assert_array_equal(db["embeddings"], want["embedding"].astype(np.float16))
  np.testing.assert_array_equal(db["ids"], want["img_id"])
  np.testing.assert_array_equal(db["patch_coords"], want["patch_coords"])
  assert db.manifest["encoder"] == encoders.encoder_identity(config.retrieval)
  assert [p["rows"] for p in db.manifest["source"]["imported_npz"]] == [7, 12]
  # read back as jobs read it; conditioning shows grey where a neighbour has no pixels
  db = store.read(db.path, "database", hint="")
  grey = conditioning.database_images(db, config.dataset, np.array([[0, 18]]))
  assert grey.shape[:2] == (1, 2) and (grey == 128).all()
  # a rerun reuses the store
  again = original_database.import_database(config, [str(tmp_path / "oi")])
  assert again.fingerprint == db.fingerprint


@pytest.mark.parametrize(
  "bad, says",
  [
    (
      dict(embedding=np.zeros((3, 8), np.float32)),
      r"embedding is float32\[3, 8\]; expected float \[N, 16\]",
    ),
    (dict(img_id=np.zeros(2, np.int64)), r"img_id is int64\[2\]; expected integers with 3 rows"),
    (dict(patch_coords=None), r"has no array 'patch_coords'"),
    (dict(img_id=np.array([None, 1, 2], object)), r"img_id declares object"),
  ],
)
def test_bad_parts_are_refused_in_one_line_before_anything_is_written(tmp_path, bad, says):
  config = tiny_config(str(tmp_path / "data"))
  part = {
    "embedding": np.zeros((3, 16), np.float32),
    "img_id": np.arange(3),
    "patch_coords": np.zeros((3, 4), int),
  }
  part.update(bad)
  np.savez(tmp_path / "part_1.npz", **{k: v for k, v in part.items() if v is not None})
  with pytest.raises(UserError, match=says) as e:
    original_database.import_database(config, [str(tmp_path / "part_1.npz")])
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "data")
