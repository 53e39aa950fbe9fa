"""The neighbour job: exact results, self-exclusion, resume, several processes, own .npy, bad
input."""

import os
import subprocess
import sys

import numpy as np
import pytest
from tests.conftest import REPO, make_tiny_stores, subprocess_env, tiny_config

from rdm_jax import conditioning, config_base
from rdm_jax.data import pipeline, store
from rdm_jax.errors import UserError
from rdm_jax.jobs import index as index_job
from rdm_jax.jobs import neighbors
from rdm_jax.retrieval import index


def unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_neighbors(queries, database, k, exclude_self=False):
  """numpy brute force on normalised embeddings; optionally without the query's own row."""
  sims = unit(np.asarray(queries, np.float64)) @ unit(np.asarray(database, np.float64)).T
  if exclude_self:
    np.fill_diagonal(sims, -np.inf)
  return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def setup(data_dir, k=6, chunk=16, **index_overrides):
  make_tiny_stores(data_dir, n_train=64, n_db=40, k=k)
  c = tiny_config(data_dir)
  c.retrieval.num_neighbors = k
  c.retrieval.chunk_size = chunk
  c.retrieval.index.update(index_overrides)
  paths = config_base.paths(c)
  db = store.read(paths["database"], "database", hint="")
  idx = index.ensure(db, c.retrieval.index, k, paths["index"])
  return c, paths, db, idx


def test_recall_at_k_hand_worked():
  approx = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
  truth = np.array([[3, 2, 0], [0, 10, 11], [9, 8, 7]])  # order within a row does not matter
  assert neighbors.recall_at_k(approx, truth) == pytest.approx((2 / 3 + 0 + 1) / 3)


def test_recorded_recall_is_measured_on_an_index_that_misses(tmp_path, monkeypatch):
  """An index whose last neighbour is always the database's worst match: recall@6 = 5/6 exactly."""
  c, paths, db, idx = setup(str(tmp_path / "data"))
  c.retrieval.recall_sample = 40  # of 64 queries
  true_search = idx.search

  def missing_search(q, k):
    scores, rows = true_search(q, k)
    worst = np.argmin(q @ unit(db["embeddings"]).T, axis=1)
    rows[:, -1] = worst
    return scores, rows

  monkeypatch.setattr(idx, "search", missing_search)
  queries = store.read(paths["embeddings_train"], "embeddings", hint="")
  out = neighbors.find_neighbors(c, queries, db, idx, paths["neighbors_train"])
  truth = reference_neighbors(queries["embeddings"], db["embeddings"], 6)
  np.testing.assert_array_equal(out["neighbor_ids"][:, :5], truth[:, :5])
  assert not (
    out["neighbor_ids"][:, 5:] == truth
  ).any()  # the worst match is never among a row's top 6
  assert out.manifest["recall_at_k"] == pytest.approx(5 / 6, abs=1e-6)
  assert out.manifest["recall_sample"] == 40


def test_job_finds_exact_neighbours_and_training_reads_them(tmp_path):
  c, paths, db, idx = setup(str(tmp_path / "data"))
  queries = store.read(paths["embeddings_train"], "embeddings", hint="")
  out = neighbors.find_neighbors(c, queries, db, idx, paths["neighbors_train"])
  np.testing.assert_array_equal(
    out["neighbor_ids"], reference_neighbors(queries["embeddings"], db["embeddings"], 6)
  )
  np.testing.assert_array_equal(out["query_ids"], queries["ids"])
  assert out.manifest["recall_at_k"] == 1.0 and out.manifest["exclusion"]["by_source_id"] is False
  p = neighbors.write_proposal(c, out, db, paths["proposal"])
  assert p.manifest["k"] == c.k_train and p["probs"].sum() == pytest.approx(1.0)
  data = pipeline.load_retrieval_data(c, "train")
  _, context = pipeline.load_batch(data, np.arange(4), c.k_train, "first")
  np.testing.assert_array_equal(context, db["embeddings"][out["neighbor_ids"][:4, : c.k_train]])
  # unconditional sampling: pseudo-queries from the top 10% of p_D, then their neighbours in D
  c.sample.top_m = 0.1
  cond = conditioning.proposal_conditioning(c, 8, c.k_train, np.random.default_rng(0))
  assert set(cond.query_rows) <= set(p["rows"][:4])
  np.testing.assert_array_equal(
    cond.neighbor_rows,
    reference_neighbors(db["embeddings"][cond.query_rows], db["embeddings"], c.k_train),
  )
  np.testing.assert_array_equal(cond.context, db["embeddings"][cond.neighbor_rows])


def test_overlapping_database_excludes_the_query_itself(tmp_path):
  c, paths, db, idx = setup(str(tmp_path / "data"))
  same = store.read(paths["database"], "database", hint="")  # D = X: query the database itself
  out = neighbors.find_neighbors(c, same, db, idx, str(tmp_path / "self"))
  assert out.manifest["exclusion"] == {
    "by_source_id": True,
    "duplicate_score": c.retrieval.duplicate_score,
  }
  assert not (out["neighbor_ids"] == np.arange(40)[:, None]).any()
  np.testing.assert_array_equal(
    out["neighbor_ids"], reference_neighbors(db["embeddings"], db["embeddings"], 6, True)
  )


def test_interrupted_job_resumes_to_identical_output(tmp_path, monkeypatch):
  c, paths, db, idx = setup(str(tmp_path / "data"))
  queries = store.read(paths["embeddings_train"], "embeddings", hint="")
  whole = neighbors.find_neighbors(c, queries, db, idx, str(tmp_path / "whole"))
  calls = []
  real_search = idx.search

  def dying_search(q, k):
    calls.append(len(q))
    if len(calls) == 3:
      raise KeyboardInterrupt  # killed during the third of four chunks
    return real_search(q, k)

  monkeypatch.setattr(idx, "search", dying_search)
  with pytest.raises(KeyboardInterrupt):
    neighbors.find_neighbors(c, queries, db, idx, str(tmp_path / "resumed"))
  assert not store.exists(str(tmp_path / "resumed"))
  calls.clear()
  resumed = neighbors.find_neighbors(c, queries, db, idx, str(tmp_path / "resumed"))
  assert len(calls) == 2  # only the two unfinished chunks were searched again
  for name in ("neighbor_ids", "scores", "query_ids"):
    np.testing.assert_array_equal(resumed[name], whole[name])


def test_processes_split_queries_and_merge(tmp_path):
  """Two local processes (ScaNN brute force, two index shards) give what one process gives."""
  data_dir = str(tmp_path / "data")
  c, paths, db, idx = setup(data_dir, kind="brute", shard_size=25)
  assert len(idx.shards) == 2
  queries = store.read(paths["embeddings_train"], "embeddings", hint="")
  single = neighbors.find_neighbors(c, queries, db, idx, str(tmp_path / "single"))
  cmd = [
    sys.executable,
    "-m",
    "rdm_jax.jobs.neighbors",
    f"--config={REPO}/configs/fashion_mnist_rdm.py",
    f"--config.data_dir={data_dir}",
    "--config.retrieval.num_neighbors=6",
    "--config.retrieval.chunk_size=16",
    "--config.retrieval.index.kind=brute",
    "--config.retrieval.index.shard_size=25",
    "--parts=train",
    "--num_processes=2",
  ]
  procs = [
    subprocess.Popen(
      cmd + [f"--process_id={i}"],
      env=subprocess_env(devices=1),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  assert sum("recall@6" in log for log in logs) == 1  # exactly one process merged
  merged = store.read(paths["neighbors_train"], "neighbors", hint="")
  for name in ("neighbor_ids", "scores", "query_ids"):
    np.testing.assert_array_equal(merged[name], single[name])
  assert store.exists(paths["proposal"])


def test_bring_your_own_npy(tmp_path):
  c = tiny_config(str(tmp_path / "data"))
  c.retrieval.num_neighbors = 5
  rng = np.random.default_rng(3)
  emb = rng.normal(size=(120, 12)).astype(np.float32)
  np.save(tmp_path / "emb.npy", emb)
  db = index_job.open_embeddings(c, str(tmp_path / "emb.npy"), "database", "")
  idx = index.ensure(db, c.retrieval.index, 5, db.path + "_index")
  queries = index_job.open_embeddings(c, str(tmp_path / "emb.npy"), "embeddings", "")
  out = neighbors.find_neighbors(
    c, queries, db, idx, str(tmp_path / "nbrs")
  )  # same file: self excluded
  np.testing.assert_array_equal(
    out["neighbor_ids"], reference_neighbors(emb, emb, 5, exclude_self=True)
  )
  emb[0] *= -1  # the user's file changes: the old index no longer fits
  np.save(tmp_path / "emb.npy", emb)
  os.utime(tmp_path / "emb.npy", ns=(1, 1))
  changed = index_job.open_embeddings(c, str(tmp_path / "emb.npy"), "database", "")
  with pytest.raises(UserError, match="another database"):
    index.load(db.path + "_index", changed, c.retrieval.index)
  np.save(tmp_path / "ints.npy", np.zeros((4, 3), np.int32))
  with pytest.raises(UserError, match="2-D float"):
    index_job.open_embeddings(c, str(tmp_path / "ints.npy"), "database", "")


def test_bad_queries_fail_before_anything_is_written(tmp_path):
  c, paths, db, idx = setup(str(tmp_path / "data"))
  good = store.read(paths["embeddings_train"], "embeddings", hint="")
  for name, emb, message in [
    ("nan", np.where(np.arange(64)[:, None] == 40, np.nan, good["embeddings"]), "NaN"),
    ("zero", np.where(np.arange(64)[:, None] == 5, 0.0, good["embeddings"]), "zero norm"),
    ("narrow", good["embeddings"][:, :8], "8-d but database"),
  ]:
    bad = store.write(
      str(tmp_path / name),
      "embeddings",
      {"embeddings": emb.astype(np.float32), "ids": good["ids"]},
      encoder=good.manifest["encoder"],
      source=good.manifest["source"],
    )
    with pytest.raises(UserError, match=message):
      neighbors.find_neighbors(c, bad, db, idx, str(tmp_path / f"out_{name}"))
    assert not os.path.exists(str(tmp_path / f"out_{name}"))
    assert (
      not any(f.startswith("chunk_") for f in os.listdir(str(tmp_path / f"out_{name}.partial")))
      if os.path.exists(str(tmp_path / f"out_{name}.partial"))
      else True
    )
  c.retrieval.num_neighbors = 41
  with pytest.raises(UserError, match="only 40 entries"):
    neighbors.find_neighbors(c, good, db, idx, str(tmp_path / "big_k"))
