r"""Neighbour job: the top-K database neighbours of every query, and p_D for top-m sampling.

For each query part (train / test embeddings, or a bring-your-own .npy), searches the
database index built by `rdm_jax.jobs.index` and writes a neighbours store aligned with the
queries: `neighbor_ids [N, K]` (int32 database rows), `scores [N, K]` (cosine similarity,
descending), `query_ids [N]` (and `query_variants [N]` for an augmented train part: every crop
its own neighbours). When database and queries overlap (same dataset split, same
file), each query's own entry and its near-duplicates are excluded (config.retrieval.exclude,
.duplicate_score). The manifest records recall@K against exact search on a random sample
of the queries. For the train part it also writes the proposal store p_D (paper Eq. 5).

Processes or hosts sharing the output filesystem split the queries by range: run one with
each --process_id in [0, --num_processes); every process resumes its own chunks, and the
one that finishes last merges.

  python -m rdm_jax.jobs.index     --config=configs/fashion_mnist_rdm.py
  python -m rdm_jax.jobs.neighbors --config=configs/fashion_mnist_rdm.py [--parts=train,test]
  # bring your own embeddings:
  python -m rdm_jax.jobs.index     --config=... --database=db.npy
  python -m rdm_jax.jobs.neighbors --config=... --database=db.npy --queries=x.npy --out=nbrs
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from absl import flags

from rdm_jax import config_base, preemption
from rdm_jax.data import chunked, pipeline, store
from rdm_jax.errors import fail
from rdm_jax.jobs import cli
from rdm_jax.jobs import index as index_job
from rdm_jax.retrieval import encoders, exact, exclusion, index, proposal

_PARTS = cli.define_once(
  flags.DEFINE_list, "parts", ["train", "test"], "Query parts to search for."
)
_QUERIES = cli.define_once(
  flags.DEFINE_string,
  "queries",
  None,
  "Query embeddings (store directory or [N, d] .npy) instead of the config's parts; needs --out.",
)
_OUT = cli.define_once(flags.DEFINE_string, "out", None, "Output store for --queries.")
_PROCESS_ID = cli.define_once(
  flags.DEFINE_integer, "process_id", 0, "This process's index in [0, --num_processes)."
)
_NUM_PROCESSES = cli.define_once(
  flags.DEFINE_integer, "num_processes", 1, "Processes splitting the queries by range."
)

NEIGHBORS_HINT = "python -m rdm_jax.jobs.neighbors --config=<this config>"


def recall_at_k(approx: np.ndarray, truth: np.ndarray) -> float:
  """Mean fraction of the true top-K found in the approximate top-K (rows aligned)."""
  k = truth.shape[1]
  return float(np.mean([len(np.intersect1d(a, t)) / k for a, t in zip(approx, truth)]))


def find_neighbors(
  config,
  queries: store.Store,
  database: store.Store,
  idx: index.Index,
  out: str,
  process_index: int = 0,
  process_count: int = 1,
) -> store.Store | None:
  """Searches `idx` for every query and writes the neighbours store `out` (resumable).

  Returns the store, or None when another process merges the result.
  """
  r = config.retrieval
  k = r.num_neighbors
  encoders.check_same_encoder(
    queries.manifest["encoder"],
    database.manifest["encoder"],
    f"queries {queries.path}",
    f"database {database.path}",
    "embed both with the same config.retrieval",
  )
  q_emb, db_emb = queries["embeddings"], database["embeddings"]
  if q_emb.shape[1] != db_emb.shape[1]:
    fail(
      f"queries {queries.path} are {q_emb.shape[1]}-d but database {database.path} is "
      f"{db_emb.shape[1]}-d: embed both with the same encoder"
    )
  if k > len(db_emb):
    fail(
      f"config.retrieval.num_neighbors={k} but database {database.path} has only {len(db_emb)} "
      "entries; lower K"
    )
  if idx.manifest["num_neighbors"] < k:
    fail(
      f"index {idx.path} was built for K={idx.manifest['num_neighbors']} < {k}; rebuild it: "
      f"`{index.INDEX_HINT}`"
    )
  excl = exclusion.exclusion_for(
    r.exclude, r.duplicate_score, queries.manifest["source"], database.manifest["source"]
  )
  inputs = dict(
    database_fingerprint=database.fingerprint,
    index_fingerprint=idx.fingerprint,
    queries_fingerprint=queries.fingerprint,
    num_neighbors=k,
    exclusion=excl.describe(),
  )
  done = store.read_if_current(out, "neighbors", NEIGHBORS_HINT, **inputs)
  if done is not None:
    return done
  q_ids, db_ids = queries["ids"], database["ids"]
  starts = chunked.process_block(range(0, len(q_emb), r.chunk_size), process_index, process_count)
  if len(starts):  # validate this process's queries before any work is saved
    index.check_embeddings(queries, f"queries {queries.path}", starts[0], starts[-1] + r.chunk_size)
  if excl.active:
    print(f"{out}: database and queries overlap; excluding {excl.describe()}")
  scann_shards = sum(bool(s["dir"]) for s in idx.shards)
  if idx.shards_in_memory < scann_shards:
    print(
      f"{out}: {idx.shards_in_memory} of {scann_shards} index shards fit in "
      f"{idx.budget / 2**30:g} GiB (retrieval.index.search_memory_gb, else max_memory_gb) at "
      f"once, so every chunk of {r.chunk_size} queries reloads shards; a larger "
      "retrieval.chunk_size amortises that"
    )

  def search(a, b):
    q = exact.l2_normalize(
      store.read_rows(queries, "embeddings", a, b), f"queries {queries.path}", copy=False
    )
    scores, rows = exclusion.search_excluding(idx.search, q, k, excl, q_ids[a:b], db_ids)
    out_rows = {
      "neighbor_ids": rows.astype(np.int32),
      "scores": scores,
      "query_ids": np.asarray(q_ids[a:b]),
    }
    if "variants" in queries.arrays:  # augmented train part: each crop has its own neighbours
      out_rows["query_variants"] = np.asarray(queries["variants"][a:b])
    return out_rows

  def check_recall(arrays):
    n = min(r.recall_sample, len(q_emb))
    if n <= 0:
      return {}
    rows = np.sort(np.random.default_rng(0).choice(len(q_emb), n, replace=False))
    q = exact.l2_normalize(q_emb[rows], f"queries {queries.path}")
    exact_search = lambda qq, kk: exact.exact_search(qq, db_emb, kk, normalize_database=True)
    _, truth = exclusion.search_excluding(exact_search, q, k, excl, np.asarray(q_ids)[rows], db_ids)
    recall = recall_at_k(np.asarray(arrays["neighbor_ids"][rows]), truth)
    print(f"{out}: recall@{k} against exact search on {n} random queries: {recall:.4f}")
    return {"recall_at_k": round(recall, 6), "recall_sample": n}

  return chunked.write_chunked(
    out,
    "neighbors",
    len(q_emb),
    chunk_size=r.chunk_size,
    compute=search,
    process_index=process_index,
    process_count=process_count,
    finalize=check_recall,
    search=sorted({s["recipe"]["kind"] for s in idx.shards}),
    index_path=os.path.abspath(idx.path),
    database_path=database.path,
    database_size=len(db_emb),
    encoder=database.manifest["encoder"],
    query_source=queries.manifest["source"],
    made_by="rdm_jax.jobs.neighbors",
    **inputs,
  )


def write_proposal(config, neighbors: store.Store, database: store.Store, path: str) -> store.Store:
  """p_D of the training part's neighbours (k = config.retrieval.proposal_k or k_train)."""
  k = config.retrieval.proposal_k or config.k_train
  done = store.read_if_current(
    path, proposal.KIND, NEIGHBORS_HINT, neighbors_fingerprint=neighbors.fingerprint, k=k
  )
  if done is not None:
    return done
  result = proposal.write_proposal(path, neighbors, database, k)
  top = result["probs"]
  print(
    f"wrote {path}: p_D over {len(top)} database entries (k={k}); {int(np.count_nonzero(top))} "
    f"have p_D > 0, the top 1% hold {top[: max(1, len(top) // 100)].sum():.3f} of the mass"
  )
  return result


def run(
  config: Any,
  parts: Sequence[str] = ("train", "test"),
  queries: str = "",
  out: str = "",
  process_id: int = 0,
  num_processes: int = 1,
) -> None:
  """The neighbours in config.database of each part's embeddings (and, for train, the proposal
  p_D), or of the embeddings store `queries` into the neighbours store `out`; process
  `process_id` of `num_processes` takes its block of every store's chunks."""
  database, index_path = index_job.database_and_index_paths(config)
  idx = index.load(
    index_path, database, config.retrieval.index
  )  # none there: says to run the index job
  if queries:
    out = store.normalize(out or fail("--queries needs --out (the neighbours store to write)"))
    jobs = [
      (
        index_job.open_embeddings(config, queries, "embeddings", "(your query embeddings)"),
        out,
        out + "_proposal",
      )
    ]
  else:
    paths = config_base.paths(config)
    jobs = [
      (
        store.read(
          paths[f"embeddings_{part}"], "embeddings", hint=f"{pipeline.EMBED_HINT} --parts={part}"
        ),
        paths[f"neighbors_{part}"],
        paths["proposal"] if part == "train" else None,
      )
      for part in parts
    ]
  for _, path, proposal_path in jobs:  # every output is safe to write before any work starts
    store.check_output(path, "neighbors")
    if proposal_path:
      store.check_output(proposal_path, proposal.KIND)
  for embeddings, path, proposal_path in jobs:
    result = find_neighbors(config, embeddings, database, idx, path, process_id, num_processes)
    if result is None:
      continue
    print(
      f"{path}: neighbor_ids {result['neighbor_ids'].shape}, recall@K "
      f"{result.manifest.get('recall_at_k', 'not checked')}"
    )
    if proposal_path:
      write_proposal(config, result, database, proposal_path)


def main(argv):
  del argv
  preemption.install()  # SIGTERM: the chunk under way is finished and kept, exit 75
  run(
    cli.CONFIG.value,
    _PARTS.value,
    _QUERIES.value or "",
    _OUT.value or "",
    _PROCESS_ID.value,
    _NUM_PROCESSES.value,
  )


if __name__ == "__main__":
  cli.run(main)
