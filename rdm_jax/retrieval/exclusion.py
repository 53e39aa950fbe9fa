"""Excluding the query itself and its near-duplicates from its neighbours.

When the database D and the queries X come from the same source (D = X, or overlapping
ranges of one split), a query's nearest neighbour is itself: training on it teaches the
model to copy its context. A neighbour is excluded when it has the query's source id, or
its cosine similarity reaches `duplicate_score` (near-duplicate images).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from rdm_jax.errors import fail

MODES = ("auto", "always", "never")


def sources_overlap(query_source: Mapping[str, Any], database_source: Mapping[str, Any]) -> bool:
  """Whether two store sources can share examples (same dataset split with intersecting
  ranges, or the same embeddings file)."""
  if query_source.get("file") or database_source.get("file"):
    return query_source.get("file") == database_source.get("file")
  if query_source.get("dataset") != database_source.get("dataset") or query_source.get(
    "split"
  ) != database_source.get("split"):
    return False
  if query_source.get("file_list_sha256") != database_source.get("file_list_sha256"):
    return False  # one folder under two file lists: ids are positions in each list, not comparable
  try:
    return max(query_source["start"], database_source["start"]) < min(
      query_source["stop"], database_source["stop"]
    )
  except KeyError:
    return True  # no ranges recorded: assume they overlap


@dataclasses.dataclass(frozen=True)
class Exclusion:
  """What to drop from each query's candidates. Disabled when both fields are off."""

  by_source_id: bool = False
  duplicate_score: float | None = None

  @property
  def active(self) -> bool:
    return self.by_source_id or self.duplicate_score is not None

  def describe(self) -> dict[str, Any]:
    return {"by_source_id": self.by_source_id, "duplicate_score": self.duplicate_score}


def exclusion_for(
  mode: str,
  duplicate_score: float,
  query_source: Mapping[str, Any],
  database_source: Mapping[str, Any],
) -> Exclusion:
  """config.retrieval.exclude ('auto': only when the sources overlap) -> Exclusion."""
  if mode not in MODES:
    fail(f"config.retrieval.exclude={mode!r}; use one of {', '.join(MODES)}")
  on = mode == "always" or (mode == "auto" and sources_overlap(query_source, database_source))
  if not on:
    return Exclusion()
  return Exclusion(
    by_source_id=True, duplicate_score=duplicate_score if duplicate_score > 0 else None
  )


def search_excluding(
  search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
  queries: np.ndarray,
  k: int,
  exclusion: Exclusion,
  query_ids: np.ndarray,
  database_ids: np.ndarray,
  margin: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Top-k (scores, rows) of `search(queries, n)` after dropping excluded candidates.

  Asks for k + margin candidates; rows that keep fewer than k are searched again with
  twice as many, up to the whole database.
  """
  n_db = len(database_ids)
  if not exclusion.active:
    return search(queries, k)
  want = min(n_db, k + (margin if margin is not None else 1 + k // 4))
  out_s = np.empty((len(queries), k), np.float32)
  out_r = np.empty((len(queries), k), np.int64)
  todo = np.arange(len(queries))
  while len(todo):
    scores, rows = search(queries[todo], want)
    keep = np.ones(rows.shape, bool)
    if exclusion.by_source_id:
      keep &= np.asarray(database_ids)[rows] != np.asarray(query_ids)[todo, None]
    if exclusion.duplicate_score is not None:
      keep &= scores < exclusion.duplicate_score
    enough = keep.sum(axis=1) >= k
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept candidates first, in score order
    done = todo[enough]
    out_s[done] = np.take_along_axis(scores, order, axis=1)[enough]
    out_r[done] = np.take_along_axis(rows, order, axis=1)[enough]
    todo = todo[~enough]
    if len(todo) and want == n_db:
      fail(
        f"{len(todo)} queries have fewer than K={k} neighbours left after excluding "
        f"{exclusion.describe()} from a database of {n_db}; lower K or raise "
        "config.retrieval.duplicate_score"
      )
    want = min(n_db, 2 * want)
  return out_s, out_r
