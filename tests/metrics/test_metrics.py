"""rdm_jax.metrics against the reference implementations and hand-worked cases.

References: pytorch-fid's calculate_frechet_distance; torch-fidelity's Inception Score, KID
and precision/recall; the official precision/recall code (Kynkaanniemi et al. 2019) written
out in numpy below.
"""

import warnings

import numpy as np
import pytest
from tests.torch_references import reference

from rdm_jax import metrics
from rdm_jax.errors import UserError


def official_precision_recall(real, fake, k=3):
  """The official ManifoldEstimator, unbatched: float32 distance expansion, np.partition, `<=`."""

  def dists(u, v):
    nu = np.sum(np.square(u), 1).reshape(-1, 1)
    nv = np.sum(np.square(v), 1).reshape(1, -1)
    return np.maximum(nu - 2 * np.matmul(u, v.T) + nv, 0.0)

  def radii(f):
    return np.partition(dists(f, f), np.arange(k + 1), axis=1)[:, k]

  def inside(e, ref):
    return float(np.mean(np.any(dists(e, ref) <= radii(ref)[None, :], axis=1)))

  real, fake = real.astype(np.float32), fake.astype(np.float32)
  return inside(fake, real), inside(real, fake)


def stats(f):
  return np.mean(f, axis=0), np.cov(f, rowvar=False)


def test_frechet_distance_hand_worked_and_against_pytorch_fid():
  # diagonal: |(0,0) - (1,0)|^2 + tr(I) + tr(diag(4, 9)) - 2 tr(diag(2, 3)) = 1 + 2 + 13 - 10 = 6
  assert metrics.frechet_distance(
    np.zeros(2), np.eye(2), np.array([1.0, 0.0]), np.diag([4.0, 9.0])
  ) == pytest.approx(6.0, rel=1e-12)
  fid = reference("pytorch_fid.fid_score").calculate_frechet_distance
  rng = np.random.default_rng(0)
  a = rng.normal(size=(200, 16))
  b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
  cases = {
    "random": (stats(a), stats(b)),
    "identical sets": (stats(a), stats(a)),
    "rank-deficient (10 samples, 16-d)": (stats(a[:10]), stats(b[:10])),
    "rank-deficient, 5 samples each": (stats(a[:5]), stats(b[:5])),
  }
  for name, ((m1, s1), (m2, s2)) in cases.items():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      want = fid(m1, s1, m2, s2)
      got = metrics.frechet_distance(m1, s1, m2, s2)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9), name
  assert abs(metrics.frechet_distance(*stats(a), *stats(a))) < 1e-9
  # A product of covariances with a negative eigenvalue (round-off on badly conditioned real
  # statistics; planted here, so the case does not hang on one BLAS's rounding):
  # sqrt(diag(1, -4)) = diag(1, 2i), an imaginary diagonal of 2. pytorch-fid raises, so do we.
  bad = (np.zeros(2), np.diag([1.0, -4.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="Imaginary component 2"), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fid(*bad)
  with pytest.raises(UserError, match="imaginary component 2"), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    metrics.frechet_distance(*bad)
  with pytest.warns(UserWarning, match="singular"):
    metrics.feature_statistics(a[:10])
  with pytest.raises(UserError, match="widths"):
    metrics.frechet_distance(*stats(a), *stats(a[:, :8]))


@pytest.mark.parametrize("case", ["random", "identical", "duplicates", "shifted"])
def test_precision_recall_against_official_code_and_torch_fidelity(case):
  rng = np.random.default_rng(1)
  real = rng.normal(size=(300, 8)).astype(np.float32)
  fake = {
    "random": rng.normal(size=(250, 8)),
    "identical": real,
    "duplicates": np.repeat(real[:50], 5, axis=0),  # each fake 5 times: rank-deficient, zero radii
    "shifted": rng.normal(size=(250, 8)) + 1.5,
  }[case].astype(np.float32)
  got = metrics.precision_recall(real, fake, k=3)
  assert got == official_precision_recall(real, fake)
  batched = metrics.precision_recall(real, fake, k=3, row_batch=37, col_batch=53)
  assert batched == got
  import torch

  prc = reference("torch_fidelity.metric_prc")
  want = prc.calculate_precision_recall_full(
    torch.from_numpy(fake), torch.from_numpy(real), 3, 10000
  )
  assert got == pytest.approx(want, abs=1e-6)
  if case == "identical":
    assert got == (1.0, 1.0)


def test_precision_recall_hand_worked():
  # reals at 0, 1, 2, 3, 10 on a line: 3rd-neighbour squared radii 9, 4, 4, 9, 81 (10 -> 1..3: 81)
  real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]], np.float32)
  fake = np.array([[-3.0], [5.0], [30.0], [2.5]], np.float32)
  # -3 is at squared distance 9 from 0 (radius 9: inside, `<=`); 5 is inside 10's ball (25 <= 81)
  # and 3's (4 <= 9); 30 is outside all; 2.5 inside. precision = 3/4
  precision, _ = metrics.precision_recall(real, fake, k=3)
  assert precision == 0.75


def test_inception_score_against_torch_fidelity():
  import torch

  isc = reference("torch_fidelity.metric_isc").isc_features_to_metric
  rng = np.random.default_rng(2)
  for logits in (rng.normal(size=(1000, 10)) * 3, rng.normal(size=(57, 1008))):
    want = isc(torch.from_numpy(logits), splits=10)
    got = metrics.inception_score(logits, splits=10)
    assert got[0] == pytest.approx(want["inception_score_mean"], rel=1e-6)
    assert got[1] == pytest.approx(want["inception_score_std"], rel=1e-6, abs=1e-12)
  # hand-worked: identical predictions -> KL 0 -> IS 1; confident, balanced over 10 classes -> IS 10
  assert metrics.inception_score(np.zeros((100, 5)))[0] == pytest.approx(1.0)
  confident = np.eye(10)[np.arange(1000) % 10] * 100.0
  assert metrics.inception_score(confident, shuffle=False)[0] == pytest.approx(10.0, rel=1e-6)


def test_kid_against_torch_fidelity():
  import torch

  kid = reference("torch_fidelity.metric_kid").kid_features_to_metric
  rng = np.random.default_rng(3)
  real = rng.normal(size=(400, 32))
  fake = rng.normal(size=(350, 32)) * 1.1 + 0.1
  want = kid(
    torch.from_numpy(fake),
    torch.from_numpy(real),
    kid_subsets=20,
    kid_subset_size=100,
    rng_seed=2020,
    verbose=False,
  )
  got = metrics.kernel_inception_distance(real, fake, subsets=20, subset_size=100)
  assert got[0] == pytest.approx(want["kernel_inception_distance_mean"], rel=1e-6)
  assert got[1] == pytest.approx(want["kernel_inception_distance_std"], rel=1e-6)


def test_metrics_refuse_bad_features():
  good = np.ones((10, 4))
  with pytest.raises(UserError, match="NaN"):
    metrics.feature_statistics(np.full((10, 4), np.nan))
  with pytest.raises(UserError, match="4-d, fake 3-d"):
    metrics.precision_recall(good, np.ones((10, 3)))
  with pytest.raises(UserError, match="more than 3 samples"):
    metrics.precision_recall(good[:3], good)
  with pytest.raises(UserError, match="subsets of 1000 need"):
    metrics.kernel_inception_distance(good, good)
