"""Index job: the nearest-neighbour index of the database store (exact or ScaNN, sharded).

  python -m rdm_jax.jobs.index --config=configs/fashion_mnist_rdm.py [--database=emb.npy]

The recipe is chosen by database size (see rdm_jax/retrieval/index.py) and every knob is
`--config.retrieval.index.*`. The build resumes shard by shard after an interruption, and
an index built for another database (or other knobs) is rebuilt. Build the index once,
before the neighbour job and before sampling; both refuse an index of another database.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from absl import flags

from rdm_jax import config_base
from rdm_jax.data import pipeline, store
from rdm_jax.jobs import cli
from rdm_jax.retrieval import index

_DATABASE = cli.define_once(
  flags.DEFINE_string,
  "database",
  None,
  "Database store directory or an [N, d] float .npy file (bring-your-own embeddings); "
  "default: config.database.",
)

EMBED_HINT = f"{pipeline.EMBED_HINT} --parts=database"


def open_embeddings(config, path: str, kind: str, hint: str) -> store.Store:
  """A database / embeddings store, or a user's .npy file wrapped as one (under
  data_dir/imported)."""
  if path.endswith(".npy"):
    real = os.path.realpath(path)
    name = f"{kind}_{os.path.basename(real)[:-4]}_{hashlib.sha256(real.encode()).hexdigest()[:8]}"
    return store.link_npy(
      real, os.path.join(config.data_dir, "imported", name), kind, hint=f"(import of {real})"
    )
  return store.read(path, kind, hint=hint)


def database_and_index_paths(config) -> tuple[store.Store, str]:
  """The database the config (or --database) names, and where its index lives."""
  if _DATABASE.value:
    database = open_embeddings(config, _DATABASE.value, "database", EMBED_HINT)
    return database, store.normalize(config.retrieval.index.path or database.path + "_index")
  paths = config_base.paths(config)
  return store.read(paths["database"], "database", hint=EMBED_HINT), paths["index"]


def build(config: Any) -> index.Index:
  """The index over config.database (built, or the one there when it is current)."""
  database, path = database_and_index_paths(config)
  built = index.ensure(database, config.retrieval.index, config.retrieval.num_neighbors, path)
  print(
    f"index {built.path}: {built.size} vectors in {len(built.shards)} shard(s), "
    + ", ".join(sorted({s["recipe"]["kind"] for s in built.shards}))
  )
  return built


def main(argv):
  del argv
  build(cli.CONFIG.value)


if __name__ == "__main__":
  cli.run(main)
