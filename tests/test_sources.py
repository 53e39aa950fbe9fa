"""IDX reading of the real Fashion-MNIST files (Debian dataset-fashion-mnist) and bad-file errors."""

import gzip
import os

import numpy as np
import pytest

from rdm_jax.data import sources
from rdm_jax.errors import UserError

IDX_DIR = sources.FASHION_MNIST_IDX_DIR


@pytest.mark.skipif(not os.path.isdir(IDX_DIR), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_idx():
  images, labels = sources.load_idx_split(IDX_DIR, "test")
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
  assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced


def test_idx_by_hand_and_truncation(tmp_path):
  body = np.arange(2 * 3 * 4, dtype=np.uint8)
  raw = bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + body.tobytes()
  path = str(tmp_path / "x-idx3-ubyte.gz")
  with gzip.open(path, "wb") as f:
    f.write(raw)
  np.testing.assert_array_equal(sources.read_idx(path), body.reshape(2, 3, 4))
  with gzip.open(path, "wb") as f:
    f.write(raw[:-5])
  with pytest.raises(UserError, match="truncated"):
    sources.read_idx(path)
  with open(path, "wb") as f:
    f.write(b"\x01\x02")
  with pytest.raises(UserError):
    sources.read_idx(path)


def test_overlapping_parts_are_refused():
  import ml_collections as mlc
  ds = mlc.ConfigDict(dict(name="fashion_mnist", parts=dict(
      train=dict(split="train", start=0, stop=100), database=dict(split="train", start=50, stop=200),
      test=dict(split="test", start=0, stop=10))))
  with pytest.raises(UserError, match="overlap"):
    sources.check_disjoint(ds)
  ds.parts.database.start = 100
  sources.check_disjoint(ds)
