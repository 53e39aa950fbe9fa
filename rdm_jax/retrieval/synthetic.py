"""Clustered unit vectors: a stand-in for image embeddings in recall tests and benchmarks.

Uniform noise on the sphere has no neighbour structure worth finding (every point is
nearly equidistant from every other in 512-d); real embeddings cluster. Here each point is
a cluster centre plus isotropic Gaussian noise, L2-normalised; cluster sizes vary (Zipf-like).
With `noise` 0.6 a point's cosine to its own centre is ~0.85 and to other centres ~0,
while within a cluster neighbours are only mildly closer than the rest: a hard case for
quantised search, so recall measured on it is conservative.
"""

from __future__ import annotations

import numpy as np


def clustered_unit_vectors(
  n: int,
  d: int,
  num_clusters: int | None = None,
  noise: float = 0.6,
  seed: int = 0,
  chunk: int = 1 << 17,
) -> np.ndarray:
  """[n, d] float32 unit vectors in `num_clusters` (default n // 500) clusters."""
  rng = np.random.default_rng(seed)
  num_clusters = num_clusters or max(1, n // 500)
  centers = rng.standard_normal((num_clusters, d), dtype=np.float32)
  weights = 1.0 / np.arange(1, num_clusters + 1) ** 0.5
  assign = rng.choice(num_clusters, size=n, p=weights / weights.sum())
  out = np.empty((n, d), np.float32)
  for a in range(0, n, chunk):
    b = min(a + chunk, n)
    out[a:b] = centers[assign[a:b]] + noise * rng.standard_normal((b - a, d), dtype=np.float32)
  out /= np.linalg.norm(out, axis=1, keepdims=True)
  return out


def perturbed_queries(
  database: np.ndarray, n: int, scale: float = 0.3, seed: int = 1
) -> np.ndarray:
  """n queries near random database points (not equal to them), unit norm."""
  rng = np.random.default_rng(seed)
  q = database[rng.choice(len(database), n, replace=False)]
  q = q + scale / np.sqrt(database.shape[1]) * rng.standard_normal(q.shape, dtype=np.float32)
  return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
