"""Neighbour job: top-K database neighbours of every query (train / test part), exact search.

Writes `neighbor_ids [N, K]` (int32 rows of the database store), `scores [N, K]`
(cosine similarity) and `query_ids [N]`, aligned with the query part's examples, plus
the database's fingerprint so training can check it retrieves from the same database.

  python -m rdm_jax.jobs.neighbors --config=configs/fashion_mnist_rdm.py [--parts=train,test]
"""

from __future__ import annotations

from absl import flags

from rdm_jax import config_base
from rdm_jax.data import store
from rdm_jax.jobs import cli
from rdm_jax.retrieval import encoders, exact

_PARTS = flags.DEFINE_list("parts", ["train", "test"], "Query parts to search for.")

EMBED_HINT = "python -m rdm_jax.jobs.embed --config=..."


def neighbors_part(config, part: str) -> store.Store:
  paths = config_base.paths(config)
  out = paths[f"neighbors_{part}"]
  database = store.read(paths["database"], "database", hint=EMBED_HINT + " --parts=database")
  done = store.reusable(out, "neighbors", "rdm_jax.jobs.neighbors", database_fingerprint=database.fingerprint,
                        num_neighbors=config.retrieval.num_neighbors)
  if done is not None:
    return done
  queries = store.read(paths[f"embeddings_{part}"], "embeddings", hint=f"{EMBED_HINT} --parts={part}")
  encoders.check_same_encoder(queries.manifest["encoder"], database.manifest["encoder"],
                              f"queries {queries.path}", f"database {database.path}",
                              "re-embed both with the same config.retrieval")
  k = config.retrieval.num_neighbors
  db = exact.l2_normalize(database["embeddings"], f"database {database.path}")
  q_all = queries["embeddings"]

  def search(a, b):
    q = exact.l2_normalize(q_all[a:b], f"queries {queries.path}")
    scores, ids = exact.exact_search(q, db, k)
    return {"neighbor_ids": ids, "scores": scores, "query_ids": queries["ids"][a:b]}

  result = store.write_chunked(
      out, "neighbors", len(q_all), chunk_size=config.retrieval.chunk_size, compute=search,
      num_neighbors=k, search="exact", database_path=database.path,
      database_fingerprint=database.fingerprint, database_size=len(db),
      encoder=database.manifest["encoder"], query_source=queries.manifest["source"],
      made_by="rdm_jax.jobs.neighbors")
  print(f"wrote {out}: neighbor_ids {result['neighbor_ids'].shape}")
  return result


def main(argv):
  del argv
  config = cli.CONFIG.value
  for part in _PARTS.value:
    neighbors_part(config, part)


if __name__ == "__main__":
  cli.run(main)
