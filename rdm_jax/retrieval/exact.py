"""Exact maximum-inner-product search on L2-normalised embeddings, in JAX.

The ground truth for approximate indices, and the search used for small databases.
Cosine similarity = dot product of L2-normalised vectors (the RDM search metric).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax.errors import fail


def l2_normalize(x: np.ndarray, what: str = "embeddings", copy: bool = True) -> np.ndarray:
  """Row-normalised float32 x; NaN/inf or zero rows are an error (they cannot be searched).

  Normalises a copy, or x itself when it is a float32 array and copy=False; no other
  full-size temporary (a 1M x 512 shard needs its 2 GB and no more).
  """
  x = np.array(x, np.float32, copy=True if copy else None)
  norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # NaN/inf anywhere in a row -> NaN/inf here
  bad = ~np.isfinite(norms[:, 0])
  if bad.any():
    fail(
      f"{what}: {int(bad.sum())} rows contain NaN or inf (first at row {int(np.argmax(bad))}); "
      "recompute them"
    )
  if (norms == 0).any():
    fail(
      f"{what}: {int((norms == 0).sum())} rows have zero norm (first at row "
      f"{int(np.argmax(norms[:, 0] == 0))}); they have no direction to search with"
    )
  x /= norms
  return x


@functools.partial(jax.jit, static_argnames=("k",))
def _chunk_topk(q: jax.Array, db: jax.Array, offset: jax.Array, k: int):
  scores, ids = jax.lax.top_k(q @ db.T, k)
  return scores, ids + offset


@functools.partial(jax.jit, static_argnames=("k",))
def _merge(s1, i1, s2, i2, k: int):
  s = jnp.concatenate([s1, s2], axis=1)
  i = jnp.concatenate([i1, i2], axis=1)
  top, pos = jax.lax.top_k(s, k)
  return top, jnp.take_along_axis(i, pos, axis=1)


def exact_search(
  queries: np.ndarray,
  database: np.ndarray,
  k: int,
  query_batch: int = 1024,
  database_chunk: int = 1 << 18,
  normalize_database: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k by inner product. queries [Q, d] (normalised), database [N, d].

  The database is used as given, or L2-normalised chunk by chunk with
  `normalize_database` (so a memory-mapped store is never copied whole into RAM).
  Returns (scores [Q, k] float32 descending, ids [Q, k] int32). Memory is bounded by
  query_batch x database_chunk scores at a time.
  """
  if queries.shape[1] != database.shape[1]:
    fail(
      f"query width {queries.shape[1]} differs from database width {database.shape[1]}: "
      "queries and database must come from the same encoder"
    )
  if k > database.shape[0]:
    fail(f"asked for K={k} neighbours but the database has only {database.shape[0]} entries")
  chunks = range(0, len(database), database_chunk)

  def prepare(da):
    db = database[da : da + database_chunk]
    return jnp.asarray(l2_normalize(db, "database") if normalize_database else db)

  whole = prepare(0) if len(chunks) == 1 else None  # one chunk: prepared once for every query batch
  out_s, out_i = [], []
  for qa in range(0, len(queries), query_batch):
    q = jnp.asarray(queries[qa : qa + query_batch])
    best = None
    for da in chunks:
      db = whole if whole is not None else prepare(da)
      kk = min(k, db.shape[0])
      s, i = _chunk_topk(q, db, jnp.int32(da), kk)
      best = (s, i) if best is None else _merge(*best, s, i, k)
    out_s.append(np.asarray(best[0]))
    out_i.append(np.asarray(best[1]))
  return np.concatenate(out_s), np.concatenate(out_i).astype(np.int32)
