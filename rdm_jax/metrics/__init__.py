"""Sample-quality metrics as pure functions on feature arrays, each matching a named reference.

- `frechet_distance`: pytorch-fid's `calculate_frechet_distance` (scipy sqrtm, eps on the
  diagonal when the product is singular, imaginary part dropped), on `feature_statistics`
  (mean, unbiased covariance as `np.cov(rowvar=False)`).
- `precision_recall`: Kynkaanniemi et al. 2019, official code: a sample is inside the
  manifold of a set when its squared Euclidean distance to some member is `<=` that
  member's distance to its k-th nearest neighbour (k=3, the member itself not counted).
  Precision: fakes inside the real manifold; recall: reals inside the fake manifold.
  Batched in rows and columns (bounded memory for 50k x 50k), jitted, rows over devices.
- `inception_score`: torch-fidelity's `isc_features_to_metric` (rows shuffled with
  RandomState(2020), float64 softmax, exp of the mean KL per split; mean and std).
- `kernel_inception_distance`: torch-fidelity's KID (cubic polynomial kernel, unbiased
  MMD^2 over 100 random subsets of 1000, RandomState(2020)); mean and std.
- `clip_score`: the mean cosine similarity of paired CLIP image and text embeddings, as the
  RDM paper reports it (other papers scale it: 100 x, or CLIPScore's 2.5 x max(cos, 0)).

Features are whatever an extractor produced (Inception pool3, CLIP, EfficientNet-Lite0);
the metric's name in reports always carries the extractor's name.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from rdm_jax.errors import fail


def _features(x: np.ndarray, what: str, dtype=np.float64) -> np.ndarray:
  x = np.asarray(x, dtype)
  if x.ndim != 2:
    fail(f"{what}: expected features [N, d], got shape {list(x.shape)}")
  if not np.isfinite(x).all():
    fail(f"{what}: features contain NaN or inf (from NaN images?); check the inputs")
  return x


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [d], covariance [d, d]) as pytorch-fid computes them (float64, unbiased).

  Fewer samples than dimensions give a singular covariance: a warning, and the distance is
  still computed as the reference does.
  """
  f = _features(features, "feature_statistics")
  if len(f) < 2:
    fail(f"need at least 2 samples for a covariance, got {len(f)}")
  if len(f) < f.shape[1]:
    warnings.warn(
      f"{len(f)} samples for {f.shape[1]}-d features: the covariance is singular and "
      "the Frechet distance is biased; use more samples for numbers comparable with papers",
      stacklevel=2,
    )
  return np.mean(f, axis=0), np.cov(f, rowvar=False)


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as pytorch-fid."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    fail(
      f"statistics of different widths: mean {mu1.shape} vs {mu2.shape}, covariance "
      f"{sigma1.shape} vs {sigma2.shape}; were both sets embedded by the same extractor?"
    )
  diff = mu1 - mu2
  covmean, _ = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(
      f"singular product of covariances; adding {eps} to their diagonals (as pytorch-fid)",
      stacklevel=2,
    )
    offset = np.eye(sigma1.shape[0]) * eps
    covmean, _ = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      fail(
        f"matrix square root has an imaginary component {np.max(np.abs(covmean.imag)):.3g}; "
        "the covariances are badly conditioned (too few samples?)"
      )
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a: np.ndarray):
  """scipy's sqrtm returning (root, error estimate) across scipy versions (disp was removed)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
      out = linalg.sqrtm(a, disp=False)
    except TypeError:
      out = linalg.sqrtm(a)
  return out if isinstance(out, tuple) else (out, None)


@jax.jit
def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
  # The matmul alone in its own computation: fused with the elementwise ops that follow,
  # XLA's CPU backend emits a plain loop instead of its matmul kernel.
  return jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)


def _sq_dists(gram: jax.Array, na: jax.Array, nb: jax.Array) -> jax.Array:
  """Squared Euclidean distances by the official code's expansion, clamped at 0."""
  return jnp.maximum(na[:, None] - 2.0 * gram + nb[None, :], 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _smallest(gram: jax.Array, na: jax.Array, nb: jax.Array, best: jax.Array, k: int) -> jax.Array:
  """The k+1 smallest of each row of [best | distances], ascending."""
  d = _sq_dists(gram, na, nb)
  return -jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)[0]


@jax.jit
def _covered(
  gram: jax.Array, na: jax.Array, nb: jax.Array, radii: jax.Array, hit: jax.Array
) -> jax.Array:
  return hit | jnp.any(_sq_dists(gram, na, nb) <= radii[None, :], axis=1)


@jax.jit
def _sq_norms(x: jax.Array) -> jax.Array:
  return jnp.sum(x * x, axis=1)


def _blocks(n: int, size: int):
  return [(a, min(a + size, n)) for a in range(0, n, size)]


def _kth_radii(f: np.ndarray, k: int, row_batch: int, col_batch: int) -> np.ndarray:
  """Each row's squared distance to its k-th nearest other row (itself at distance 0 counted
  first)."""
  if len(f) <= k:
    fail(f"precision/recall with k={k} needs more than {k} samples per set, got {len(f)}")
  out = np.empty(len(f), np.float32)
  for a, b in _blocks(len(f), row_batch):
    rows = jnp.asarray(f[a:b])
    n_rows = _sq_norms(rows)
    best = jnp.full((b - a, k + 1), jnp.inf, jnp.float32)
    for c, e in _blocks(len(f), col_batch):
      cols = jnp.asarray(f[c:e])
      best = _smallest(_gram(rows, cols), n_rows, _sq_norms(cols), best, k)
    out[a:b] = np.asarray(best[:, k])
  return out


def _inside(
  eval_f: np.ndarray, ref_f: np.ndarray, radii: np.ndarray, row_batch: int, col_batch: int
) -> float:
  hits = []
  for a, b in _blocks(len(eval_f), row_batch):
    rows = jnp.asarray(eval_f[a:b])
    n_rows = _sq_norms(rows)
    hit = jnp.zeros(b - a, bool)
    for c, e in _blocks(len(ref_f), col_batch):
      cols = jnp.asarray(ref_f[c:e])
      hit = _covered(_gram(rows, cols), n_rows, _sq_norms(cols), jnp.asarray(radii[c:e]), hit)
    hits.append(np.asarray(hit))
  return float(np.concatenate(hits).mean())


def precision_recall(
  real_features: np.ndarray,
  fake_features: np.ndarray,
  k: int = 3,
  row_batch: int = 10000,
  col_batch: int = 10000,
) -> tuple[float, float]:
  """(precision, recall) of fakes against reals, Kynkaanniemi et al. 2019 (float32, `<=`)."""
  real = _features(real_features, "real features", np.float32)
  fake = _features(fake_features, "fake features", np.float32)
  if real.shape[1] != fake.shape[1]:
    fail(f"real features are {real.shape[1]}-d, fake {fake.shape[1]}-d: use one extractor for both")
  real_radii = _kth_radii(real, k, row_batch, col_batch)
  fake_radii = _kth_radii(fake, k, row_batch, col_batch)
  precision = _inside(fake, real, real_radii, row_batch, col_batch)
  recall = _inside(real, fake, fake_radii, row_batch, col_batch)
  return precision, recall


def inception_score(
  logits: np.ndarray, splits: int = 10, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
  """(mean, std) of exp(E_x KL(p(y|x) || p(y))) over `splits` parts, as torch-fidelity."""
  x = _features(logits, "logits")
  n = len(x)
  if n < splits:
    fail(f"inception score with {splits} splits needs at least {splits} samples, got {n}")
  if shuffle:
    x = x[np.random.RandomState(seed).permutation(n)]
  log_p = x - x.max(axis=1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    part = slice(i * n // splits, (i + 1) * n // splits)
    q = p[part].mean(axis=0, keepdims=True)
    scores.append(float(np.exp((p[part] * (log_p[part] - np.log(q))).sum(axis=1).mean())))
  return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(
  real_features: np.ndarray,
  fake_features: np.ndarray,
  subsets: int = 100,
  subset_size: int = 1000,
  degree: int = 3,
  coef0: float = 1.0,
  seed: int = 2020,
) -> tuple[float, float]:
  """(mean, std) of the unbiased MMD^2 with kernel (x.y / d + coef0)^degree, as torch-fidelity
  (its first input, `features_1`, is the fakes)."""
  fake = _features(fake_features, "fake features")
  real = _features(real_features, "real features")
  if fake.shape[1] != real.shape[1]:
    fail(f"real features are {real.shape[1]}-d, fake {fake.shape[1]}-d: use one extractor for both")
  if min(len(fake), len(real)) < subset_size:
    fail(
      f"KID subsets of {subset_size} need at least that many samples per set, got {len(fake)} fake "
      f"and {len(real)} real; lower the subset size"
    )
  rng = np.random.RandomState(seed)
  gamma = 1.0 / fake.shape[1]
  m = subset_size
  mmds = np.zeros(subsets)
  for i in range(subsets):
    x = fake[rng.choice(len(fake), m, replace=False)]
    y = real[rng.choice(len(real), m, replace=False)]
    kxx = (x @ x.T * gamma + coef0) ** degree
    kyy = (y @ y.T * gamma + coef0) ** degree
    kxy = (x @ y.T * gamma + coef0) ** degree
    mmds[i] = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (
      m * (m - 1)
    ) - 2 * kxy.sum() / (m * m)
  return float(np.mean(mmds)), float(np.std(mmds))


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
  """Mean over pairs i of cos(image_i, text_i)."""
  a = _features(image_embeddings, "image embeddings")
  b = _features(text_embeddings, "text embeddings")
  if a.shape != b.shape:
    fail(
      f"image embeddings {list(a.shape)} and text embeddings {list(b.shape)} must pair up "
      "row by row"
    )
  na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
  if (na == 0).any() or (nb == 0).any():
    fail("zero-norm embedding: the cosine is undefined")
  return float(np.mean(np.sum(a * b, axis=1) / (na * nb)))
