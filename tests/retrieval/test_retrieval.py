"""Exact search against a NumPy brute force; validation of embeddings."""

import numpy as np
import pytest

from rdm_jax.errors import UserError
from rdm_jax.retrieval import exact


def test_exact_search_matches_brute_force_across_chunks():
  rng = np.random.default_rng(0)
  db = exact.l2_normalize(rng.normal(size=(1000, 24)))
  q = exact.l2_normalize(rng.normal(size=(70, 24)))
  scores, ids = exact.exact_search(q, db, k=16, query_batch=32, database_chunk=300)
  sims = q @ db.T
  want_ids = np.argsort(-sims, axis=1)[:, :16]
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(scores, np.take_along_axis(sims, want_ids, 1), rtol=1e-5, atol=1e-6)


def test_bad_embeddings_are_refused():
  x = np.ones((4, 3), np.float32)
  x[2] = 0
  with pytest.raises(UserError, match="zero norm"):
    exact.l2_normalize(x)
  x[2] = np.nan
  with pytest.raises(UserError, match="NaN"):
    exact.l2_normalize(x)
  with pytest.raises(UserError, match="width"):
    exact.exact_search(np.ones((2, 3), np.float32), np.ones((5, 4), np.float32), 2)
  with pytest.raises(UserError, match="only 5 entries"):
    exact.exact_search(np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), 8)
