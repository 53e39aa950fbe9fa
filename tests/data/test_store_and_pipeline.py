"""Stores (atomic, resumable, validated) and the input pipeline (order, per-process split,
gather)."""

import json
import os

import numpy as np
import pytest

from rdm_jax.data import chunked, pipeline, store
from rdm_jax.errors import UserError
from tests.conftest import tiny_config


def test_write_chunked_is_atomic_and_resumes(tmp_path):
  out = str(tmp_path / "s")
  calls = []

  def compute(a, b, fail_at=None):
    calls.append(a)
    if a == fail_at:
      raise KeyboardInterrupt  # the job is killed in the middle
    return {"x": np.arange(a, b, dtype=np.float32)[:, None] * 2}

  with pytest.raises(KeyboardInterrupt):
    chunked.write_chunked(
      out, "thing", 10, 3, lambda a, b: compute(a, b, fail_at=6), log=lambda m: None
    )
  assert not os.path.exists(out)  # nothing half-written under the final name
  assert os.path.isdir(out + ".partial")
  calls.clear()
  s = chunked.write_chunked(out, "thing", 10, 3, compute, log=lambda m: None)
  assert calls == [6, 9]  # resumed: chunks 0 and 3 were not recomputed
  np.testing.assert_array_equal(s["x"][:, 0], np.arange(10) * 2)
  assert s.manifest["count"] == 10 and not os.path.exists(out + ".partial")


def test_truncated_and_missing_files_are_clear_errors(tmp_path):
  out = str(tmp_path / "s")
  store.write(out, "thing", {"x": np.zeros((100, 8), np.float32)})
  path = os.path.join(out, "x.npy")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(UserError, match="truncated or corrupt"):
    store.read(out, "thing", hint="make it")
  os.remove(path)
  with pytest.raises(UserError, match="missing"):
    store.read(out, "thing", hint="make it")
  with pytest.raises(UserError, match="run `make it` first"):
    store.read(str(tmp_path / "nope"), "thing", hint="make it")
  with pytest.raises(UserError, match="holds a 'thing' store"):
    store.write(out, "thing", {"x": np.zeros(3)})
    store.read(out, "database", hint="make it")


def test_example_order_is_a_function_of_step_and_covers_each_epoch():
  n, b = 50, 8
  seen = np.concatenate([pipeline.example_indices(3, s, b, n) for s in range(25)])  # 200 = 4 epochs
  for e in range(4):
    assert sorted(seen[e * n : (e + 1) * n]) == list(range(n))
  again = pipeline.example_indices(3, 7, b, n)
  np.testing.assert_array_equal(again, seen[56:64])
  # processes split the global batch into disjoint, contiguous blocks
  parts = [pipeline.example_indices(3, 7, b, n, True, p, 4) for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), again)


def _chi2_uniform(counts: np.ndarray) -> tuple[float, float]:
  """Pearson's chi-squared statistic of counts against a uniform law, and its 99.9% quantile."""
  from scipy.stats import chi2

  expected = counts.sum() / counts.size
  return float(((counts - expected) ** 2 / expected).sum()), float(chi2.ppf(0.999, counts.size - 1))


def test_shuffled_epochs_are_uniform_random_permutations():
  """Over 1600 seeds, each of 8 examples sits at each of the 8 positions equally often (chi-squared,
  fixed seeds: the check is deterministic), and an epoch's order is not the previous epoch's."""
  n = 8
  counts = np.zeros((n, n))
  for seed in range(1600):
    counts[np.arange(n), pipeline.example_indices(seed, 0, n, n)] += 1
  stat, limit = _chi2_uniform(counts)
  assert stat < limit, (stat, limit)
  e0, e1 = pipeline.example_indices(5, 0, 64, 64), pipeline.example_indices(5, 1, 64, 64)
  assert sorted(e0) == sorted(e1) == list(range(64))
  assert np.mean(e0 == e1) < 0.1 and np.mean(e0 == np.arange(64)) < 0.1


def test_random_neighbour_selection_is_uniform_over_subsets():
  """k=3 of K=6: each of the 20 subsets equally likely, and the first pick uniform over the 6."""
  from itertools import combinations

  ids = np.tile(np.arange(6), (6000, 1))
  got = pipeline.select_neighbors(ids, 3, "random", np.random.default_rng(0))
  subsets = {s: i for i, s in enumerate(combinations(range(6), 3))}
  subset_counts = np.bincount([subsets[tuple(sorted(r))] for r in got], minlength=20)
  stat, limit = _chi2_uniform(subset_counts)
  assert stat < limit, (stat, limit)
  stat, limit = _chi2_uniform(np.bincount(got[:, 0], minlength=6))
  assert stat < limit, (stat, limit)


def test_select_neighbors():
  ids = np.arange(24).reshape(3, 8)
  np.testing.assert_array_equal(pipeline.select_neighbors(ids, 3, "first", None), ids[:, :3])
  got = pipeline.select_neighbors(ids, 5, "random", np.random.default_rng(0))
  assert got.shape == (3, 5)
  for row, orig in zip(got, ids):
    assert len(set(row)) == 5 and set(row) <= set(orig)


def test_load_batch_gathers_database_rows(tiny_data):
  config = tiny_config(tiny_data["data_dir"])
  data = pipeline.load_retrieval_data(config, "train", encoder=tiny_data["encoder"])
  rows = np.array([5, 0, 17])
  z0, ctx = pipeline.load_batch(data, rows, 4, "first")
  np.testing.assert_array_equal(z0, data.latents[rows])
  for i, r in enumerate(rows):
    for j in range(4):
      np.testing.assert_array_equal(ctx[i, j], data.database[data.neighbor_ids[r, j]])


def _rewrite_manifest(path, **changes):
  mpath = os.path.join(path, "manifest.json")
  with open(mpath) as f:
    m = json.load(f)
  m.update(changes)
  with open(mpath, "w") as f:
    json.dump(m, f)


def test_mismatched_stores_are_refused(tiny_data):
  config = tiny_config(tiny_data["data_dir"])
  d = tiny_data["data_dir"]
  config.k_train = 7  # K = 6 stored
  with pytest.raises(UserError, match="larger than the K=6"):
    pipeline.load_retrieval_data(config, "train")
  config.k_train = 4
  other = dict(tiny_data["encoder"], name="clip_vit_b32")
  with pytest.raises(UserError, match="embedded by"):
    pipeline.load_retrieval_data(config, "train", encoder=other)
  # neighbour ids outside the database
  ids_path = os.path.join(d, "neighbors_train", "neighbor_ids.npy")
  ids = np.load(ids_path)
  ids[3, 2] = 40  # database has 40 rows
  np.save(ids_path, ids)
  with pytest.raises(UserError, match="does not match the checksum in its manifest"):
    pipeline.load_retrieval_data(config, "train")
  # ... and when a faulty job wrote them with a consistent manifest, the id range still catches it
  with open(os.path.join(d, "neighbors_train", "manifest.json")) as f:
    arrays = json.load(f)["arrays"]
  arrays["neighbor_ids"]["sha256"] = store.checksum(ids)
  _rewrite_manifest(os.path.join(d, "neighbors_train"), arrays=arrays)
  with pytest.raises(UserError, match=r"neighbour ids in \[0, 40\] but the database has 40"):
    pipeline.load_retrieval_data(config, "train")
  # neighbours computed against another database
  _rewrite_manifest(os.path.join(d, "database"), source={"other": 1})
  with pytest.raises(UserError, match="another database"):
    pipeline.load_retrieval_data(config, "train")


def test_train_iterator_yields_the_batches_of_each_step(tiny_data):
  config = tiny_config(tiny_data["data_dir"])
  config.train.num_steps = 6
  data = pipeline.load_retrieval_data(config, "train")
  it = pipeline.train_iterator(data, config, start_step=3)
  batches = list(it)
  assert len(batches) == 3
  for step, (z0, ctx) in zip(range(3, 6), batches):
    rows = pipeline.example_indices(config.train.seed, step, 8, data.num_examples)
    want_z, want_c = pipeline.load_batch(data, rows, 4, "first")
    np.testing.assert_array_equal(z0, want_z)
    np.testing.assert_array_equal(ctx, want_c)


def test_resume_never_mixes_chunks_of_other_inputs(tmp_path):
  out = str(tmp_path / "s")
  with pytest.raises(KeyboardInterrupt):

    def boom(a, b):
      if a == 4:
        raise KeyboardInterrupt
      return {"x": np.full((b - a, 1), 1.0)}

    chunked.write_chunked(out, "thing", 8, 4, boom, log=lambda m: None, encoder={"name": "old"})
  s = chunked.write_chunked(
    out,
    "thing",
    8,
    4,
    lambda a, b: {"x": np.full((b - a, 1), 2.0)},
    log=lambda m: None,
    encoder={"name": "new"},
  )
  np.testing.assert_array_equal(s["x"][:, 0], 2.0)  # the old encoder's chunk was not reused
  assert store.read_if_current(out, "thing", "h", encoder={"name": "new"}) is not None
  assert store.read_if_current(out, "thing", "h", encoder={"name": "other"}) is None


def test_read_rows_equals_the_memory_mapped_slice(tmp_path):
  x = np.arange(7 * 3 * 2, dtype=np.float32).reshape(7, 3, 2)
  s = store.write(str(tmp_path / "s"), "things", {"x": x, "ids": np.arange(7)})
  for a, b in [(0, 7), (2, 5), (6, 7), (3, 3), (5, 99)]:
    np.testing.assert_array_equal(store.read_rows(s, "x", a, b), x[a:b])
  np.testing.assert_array_equal(store.read_rows(s, "ids", 1, 4), [1, 2, 3])
