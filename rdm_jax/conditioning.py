"""Conditioning for sampling: query embeddings -> neighbours in a database D -> context [B, k, d].

The exemplar mode of RDM: a query (here an embedded held-out image) retrieves its k
nearest neighbours from D, whose raw embeddings condition the model. D is read from
`config.database` at sampling time, so a model can sample with another database than
the one it was trained with, provided the same encoder embedded it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rdm_jax import config_base
from rdm_jax.data import sources, store
from rdm_jax.errors import fail
from rdm_jax.retrieval import exact


@dataclass(frozen=True)
class Conditioning:
  context: np.ndarray        # [B, k, d] raw database embeddings
  neighbor_rows: np.ndarray  # [B, k] rows of the database store
  query_rows: np.ndarray     # [B] rows of the query store
  database: store.Store


def exemplar_conditioning(config: Any, n: int, k: int, part: str = "test",
                          encoder: dict | None = None) -> Conditioning:
  paths = config_base.paths(config)
  database = store.read(paths["database"], "database",
                        hint="python -m rdm_jax.jobs.embed --config=... --parts=database")
  queries = store.read(paths[f"embeddings_{part}"], "embeddings",
                       hint=f"python -m rdm_jax.jobs.embed --config=... --parts={part}")
  if encoder is not None and database.manifest["encoder"] != encoder:
    fail(f"database {database.path} was embedded by {database.manifest['encoder']} but the model was "
         f"trained with {encoder}; embed this database with the model's encoder")
  if queries.manifest["encoder"] != database.manifest["encoder"]:
    fail(f"queries {queries.path} and database {database.path} come from different encoders")
  if n > len(queries["embeddings"]):
    fail(f"asked for {n} samples but {queries.path} has {len(queries['embeddings'])} queries")
  rows = np.arange(n)
  db = exact.l2_normalize(database["embeddings"], f"database {database.path}")
  q = exact.l2_normalize(queries["embeddings"][rows], f"queries {queries.path}")
  _, ids = exact.exact_search(q, db, k)
  context = np.asarray(database["embeddings"][ids.reshape(-1)], np.float32).reshape(ids.shape + (-1,))
  return Conditioning(context=context, neighbor_rows=ids, query_rows=rows, database=database)


def database_images(database: store.Store, dataset: Any, rows: np.ndarray) -> np.ndarray:
  """Pixels of database entries (neighbour provenance through the store's source metadata)."""
  src = database.manifest["source"]
  if src.get("dataset") != dataset.name:
    fail(f"database {database.path} comes from {src.get('dataset')!r}; no image loader configured for it")
  images, _ = sources.load_source_split(dataset, src["split"])
  ids = np.asarray(database["ids"])[rows.reshape(-1)]
  return images[ids].reshape(rows.shape + images.shape[1:])
