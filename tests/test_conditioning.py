"""Conditioning sources for sampling: class pools from labels (Sec. 3.3) worked by hand, and
query embeddings from a .npy against the exemplar path on the same vectors."""

import os
import shutil

import numpy as np
import pytest
from tests.conftest import make_tiny_stores, tiny_config

from rdm_jax import conditioning, config_base
from rdm_jax.data import store
from rdm_jax.errors import UserError


def _labelled_database(data_dir):
  """Six entries, labels 0 1 0 1 0 1. Class 0's unit vectors [1,0], [.8,.6], [0,1] have the mean
  [.6, .5333]; their cosines to it are .747, .997, .664: pool order rows 2, 0, 4."""
  make_tiny_stores(data_dir, d=2)
  emb = np.array([[1, 0], [0, 1], [0.8, 0.6], [0, 2], [0, 1], [1, 1]], np.float32)
  old = store.read(os.path.join(data_dir, "database"), "database", hint="")
  path = os.path.join(data_dir, "database")
  shutil.rmtree(path)
  store.write(
    path,
    "database",
    {"embeddings": emb, "ids": np.arange(6), "labels": np.array([0, 1, 0, 1, 0, 1])},
    encoder=old.manifest["encoder"],
    source=old.manifest["source"],
  )
  config = tiny_config(data_dir)
  config.retrieval.embed_dim = 2
  return config, emb


def test_class_pool_by_hand(tmp_path):
  config, emb = _labelled_database(str(tmp_path / "data"))
  db = store.read(config_base.paths(config)["database"], "database", hint="")
  np.testing.assert_array_equal(conditioning.class_pool(db, 0, 3), [2, 0, 4])
  np.testing.assert_array_equal(conditioning.class_pool(db, 0, 2), [2, 0])

  config.sample.classes, config.sample.class_pool_size = "0", 3
  cond = conditioning.class_conditioning(config, 200, 2, np.random.default_rng(0))
  windows = {tuple(r) for r in cond.neighbor_rows}
  assert windows == {
    (2, 0),
    (0, 4),
  }  # k = 2 adjacent entries of the pool [2, 0, 4], both offsets drawn
  np.testing.assert_array_equal(cond.context, emb[cond.neighbor_rows])
  assert (cond.query_rows == 0).all()

  config.sample.classes = "1,T-shirt/top"  # a label and a Fashion-MNIST class name (label 0)
  cond = conditioning.class_conditioning(config, 4, 3, np.random.default_rng(0))
  np.testing.assert_array_equal(cond.query_rows, [1, 0, 1, 0])
  assert set(cond.neighbor_rows[0]) == {1, 3, 5} and set(cond.neighbor_rows[1]) == {0, 2, 4}

  for classes, size, message in (
    ("Dragon", 3, "unknown class 'Dragon'.*0 T-shirt/top"),
    ("7", 3, "label 7.*no entry"),
    ("0", 4, "fewer than sample.class_pool_size"),
    ("0", 1, "at least k=2"),
  ):
    config.sample.classes, config.sample.class_pool_size = classes, size
    with pytest.raises(UserError, match=message):
      conditioning.class_conditioning(config, 2, 2, np.random.default_rng(0))


def test_embeddings_from_a_npy_condition_as_the_same_exemplars_do(tiny_data, tmp_path):
  config = tiny_config(tiny_data["data_dir"])
  queries = store.read(config_base.paths(config)["embeddings_test"], "embeddings", hint="")[
    "embeddings"
  ]
  database = conditioning.open_database(config)
  path = str(tmp_path / "q.npy")
  np.save(path, np.asarray(queries[:5]))
  for include in (False, True):
    got = conditioning.embeddings_conditioning(
      config, conditioning.load_query_embeddings(path, database), 4, include_query=include
    )
    want = conditioning.exemplar_conditioning(config, 5, 4, "test", include_query=include)
    np.testing.assert_array_equal(got.neighbor_rows, want.neighbor_rows)
    np.testing.assert_array_equal(got.context, want.context)
  np.save(path, np.asarray(queries[:6])[:, :3])
  with pytest.raises(UserError, match=r"expected float \[N, 16\]"):
    conditioning.load_query_embeddings(path, database)
  np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
  with pytest.raises(UserError, match="embeddings_path"):  # an object array needs pickle: refused
    conditioning.load_query_embeddings(path, database)
  with pytest.raises(UserError, match=r"expected \[N, 16\]"):
    conditioning.embeddings_conditioning(config, np.zeros((2, 3)), 4)
