"""The proposal distribution p_D over database entries (paper Eq. 5) and top-m sampling.

  p_D(x~) = |{x in X : x~ in xi_k(x, D)}| / (k |X|),   x~ in D

counts how often each database entry is among the k neighbours of a training example.
Pseudo-queries x~ for unconditional sampling are drawn from the fraction m of D with the
highest p_D (top-m sampling, Sec. 3.3 / D.1), uniformly or weighted by p_D.

The proposal store holds every database row sorted by p_D (descending, ties by row):
`rows [N] int64`, `counts [N] int64`, `probs [N] float64`.
"""

from __future__ import annotations

import math

import numpy as np

from rdm_jax.data import store
from rdm_jax.errors import fail

KIND = "proposal"


def proposal_counts(
  neighbor_ids: np.ndarray, k: int, database_size: int, chunk: int = 1 << 20
) -> np.ndarray:
  """|{x : row in xi_k(x, D)}| for every database row, from stored neighbours [|X|, K]."""
  if not 1 <= k <= neighbor_ids.shape[1]:
    fail(f"p_D needs 1 <= k <= K={neighbor_ids.shape[1]} stored neighbours, got k={k}")
  counts = np.zeros(database_size, np.int64)
  for a in range(0, len(neighbor_ids), chunk):
    counts += np.bincount(
      np.asarray(neighbor_ids[a : a + chunk, :k]).ravel(), minlength=database_size
    )
  return counts


def write_proposal(path: str, neighbors: store.Store, database: store.Store, k: int) -> store.Store:
  """Computes p_D from a neighbours store of the training part and writes the proposal store."""
  n = len(database["embeddings"])
  counts = proposal_counts(neighbors["neighbor_ids"], k, n)
  order = np.argsort(-counts, kind="stable")
  total = k * len(neighbors["neighbor_ids"])
  return store.write(
    path,
    KIND,
    {"rows": order.astype(np.int64), "counts": counts[order], "probs": counts[order] / total},
    k=k,
    num_queries=len(neighbors["neighbor_ids"]),
    database_path=database.path,
    database_fingerprint=database.fingerprint,
    neighbors_fingerprint=neighbors.fingerprint,
    made_by="rdm_jax.jobs.neighbors",
  )


TOP_M_OF = ("database", "retrieved")


def draw(
  proposal: store.Store,
  n: int,
  rng: np.random.Generator,
  top_m: float = 1.0,
  top_count: int = 0,
  weighted: bool = False,
  top_m_of: str = "database",
) -> np.ndarray:
  """n database rows drawn (with replacement) from the top of p_D.

  The candidates are the `top_count` most likely rows if given, else a fraction `top_m` of
    "database":  all of D: ceil(m |D|) rows (at least one), as Sec. 3.3 defines m;
    "retrieved": the entries with p_D > 0 only: int(m |supp p_D|) rows (at least one), as the
                 original's `get_qids` reads m (memsize times its nn_memory, which holds the
                 entries retrieved at least once, most frequent first;
                 rdm/models/diffusion/ddpm.py).
  Rows with p_D = 0 are never drawn. `weighted` draws proportionally to p_D within the
  candidates, otherwise uniformly.
  """
  counts = np.asarray(proposal["counts"])
  support = int(np.count_nonzero(counts))
  if support == 0:
    fail(f"proposal {proposal.path} has no database entry with p_D > 0")
  if top_count:
    size = top_count
  else:
    if not 0 < top_m <= 1:
      fail(
        f"config.sample.top_m={top_m}: choose a fraction in (0, 1] (or a row count with "
        "sample.top_count)"
      )
    if top_m_of == "database":
      size = max(1, math.ceil(top_m * len(counts)))
    elif top_m_of == "retrieved":
      size = max(1, int(top_m * support))
    else:
      fail(f"config.sample.top_m_of={top_m_of!r}; use one of {', '.join(TOP_M_OF)}")
  size = min(size, support)
  rows = np.asarray(proposal["rows"][:size])
  p = counts[:size] / counts[:size].sum() if weighted else None
  return rows[rng.choice(size, size=n, replace=True, p=p)]
