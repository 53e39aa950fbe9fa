"""Conditioning for sampling: query embeddings -> neighbours in a database D -> context [B, k, d].

Two query sources: exemplars (embedded held-out images) and pseudo-queries drawn from
the proposal p_D with top-m truncation (unconditional sampling, paper Eq. 5-6). A query
retrieves its k nearest neighbours from D (through D's index when one is built), whose
raw embeddings condition the model. D is read from
`config.database` at sampling time, so a model can sample with another database than
the one it was trained with, provided the same encoder embedded it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rdm_jax import config_base
from rdm_jax.data import sources, store, visualize
from rdm_jax.errors import fail
from rdm_jax.retrieval import exact, index, proposal


@dataclass(frozen=True)
class Conditioning:
  context: np.ndarray        # [B, k, d] raw embeddings
  neighbor_rows: np.ndarray  # [B, k] rows of the database store; -1: the query's own embedding
  query_rows: np.ndarray     # [B] rows of the query store
  database: store.Store
  queries: store.Store       # the query store (the database itself for proposal pseudo-queries)


def open_search(config: Any, database: store.Store):
  """search(queries_normalised, k) -> (scores, rows) over `database`: its index when one is
  built (rdm_jax.jobs.index), else exact search."""
  path = config_base.paths(config)["index"]
  if store.exists(path):
    return index.load(path, database, config.retrieval.index).search
  emb = database["embeddings"]
  return lambda q, k: exact.exact_search(q, emb, k, normalize_database=True)


def _open_database(config: Any, encoder: dict | None) -> store.Store:
  database = store.read(config_base.paths(config)["database"], "database",
                        hint="python -m rdm_jax.jobs.embed --config=... --parts=database")
  if encoder is not None and database.manifest["encoder"] != encoder:
    fail(f"database {database.path} was embedded by {database.manifest['encoder']} but the model was "
         f"trained with {encoder}; embed this database with the model's encoder")
  return database


def _retrieve(config: Any, database: store.Store, query_store: store.Store, query_rows: np.ndarray, k: int,
              include_query: bool = False) -> Conditioning:
  """The k nearest database rows of each query as context; with include_query, the query's own
  embedding first and its k-1 nearest after it (the original's `omit_query=False`)."""
  queries = np.asarray(query_store["embeddings"][query_rows], np.float32)
  n_search = k - 1 if include_query else k
  ids = np.zeros((len(query_rows), 0), np.int64)
  if n_search:
    _, ids = open_search(config, database)(exact.l2_normalize(queries, f"queries {query_store.path}"), n_search)
    ids = np.asarray(ids)
  d = database["embeddings"].shape[1]
  context = np.asarray(database["embeddings"][ids.reshape(-1)], np.float32).reshape(ids.shape + (d,))
  if include_query:
    context = np.concatenate([queries[:, None], context], axis=1)
    ids = np.concatenate([np.full((len(ids), 1), -1, ids.dtype), ids], axis=1)
  return Conditioning(context=context, neighbor_rows=ids, query_rows=query_rows, database=database,
                      queries=query_store)


def exemplar_conditioning(config: Any, n: int, k: int, part: str = "test",
                          encoder: dict | None = None, include_query: bool = False) -> Conditioning:
  """The first n embedded images of `part` as queries (exemplar-conditional sampling); their k
  nearest database entries condition, or (include_query) the query itself and its k-1 nearest."""
  database = _open_database(config, encoder)
  queries = store.read(config_base.paths(config)[f"embeddings_{part}"], "embeddings",
                       hint=f"python -m rdm_jax.jobs.embed --config=... --parts={part}")
  if queries.manifest["encoder"] != database.manifest["encoder"]:
    fail(f"queries {queries.path} and database {database.path} come from different encoders")
  if n > len(queries["embeddings"]):
    fail(f"asked for {n} samples but {queries.path} has {len(queries['embeddings'])} queries")
  return _retrieve(config, database, queries, np.arange(n), k, include_query)


def proposal_conditioning(config: Any, n: int, k: int, rng: np.random.Generator,
                          encoder: dict | None = None) -> Conditioning:
  """Unconditional sampling (Eq. 6): pseudo-queries x~ ~ p_D (top-m), then their k neighbours in D.

  `query_rows` are the pseudo-queries' database rows.
  """
  database = _open_database(config, encoder)
  p = store.read(config_base.paths(config)["proposal"], proposal.KIND,
                 hint="python -m rdm_jax.jobs.neighbors --config=... --parts=train")
  if p.manifest["database_fingerprint"] != database.fingerprint:
    fail(f"proposal {p.path} was computed for another database than {database.path}; rerun the neighbour "
         "job for this database, or sample with --config.sample.condition=exemplar")
  s = config.sample
  rows = proposal.draw(p, n, rng, top_m=s.top_m, top_count=s.top_count, weighted=s.proposal_weighted,
                       top_m_of=s.top_m_of)
  return _retrieve(config, database, database, rows, k)


def database_images(database: store.Store, dataset: Any, rows: np.ndarray) -> np.ndarray:
  """Pixels of a store's rows (database entries, queries) through the store's source metadata."""
  src = database.manifest["source"]
  if src.get("dataset") != dataset.name:
    fail(f"{database.path} comes from {src.get('dataset')!r}; no image loader configured for it")
  images, _ = sources.load_source_split(dataset, src["split"])
  ids = np.asarray(database["ids"])[rows.reshape(-1)]
  return images[ids].reshape(rows.shape + images.shape[1:])


def context_images(cond: Conditioning, dataset: Any, n: int | None = None) -> np.ndarray:
  """Pixels of the first n rows' context entries [n, k, h, w, c]: database rows through the
  database's source, the query's own slot (row -1) through the query store's, resized to the
  database's images."""
  rows = cond.neighbor_rows[:n]
  own = rows < 0
  images = database_images(cond.database, dataset, np.where(own, 0, rows))
  if own.any():
    query = database_images(cond.queries, dataset, cond.query_rows[:n])
    images[own] = visualize.resize_like(query, images.shape[2:4], images.shape[-1])[np.nonzero(own)[0]]
  return images
