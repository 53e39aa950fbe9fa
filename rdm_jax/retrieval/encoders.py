"""Retrieval encoders phi: images -> embeddings, named in every manifest they produce.

A store records `encoder_identity(...)`; a later job refuses to combine stores (or a
model) made by different encoders, since their embedding spaces are unrelated.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax.data import store
from rdm_jax.errors import fail
from rdm_jax.models import efficientnet_lite


def encoder_identity(cfg: Any) -> dict[str, Any]:
  """What makes two embedding spaces the same: encoder name, weights, preprocessing."""
  if cfg.encoder != "efficientnet_lite0":
    fail(f"retrieval encoder {cfg.encoder!r} is not available yet; supported: efficientnet_lite0")
  path = cfg.weights or efficientnet_lite.default_weights_path()
  if not path or not os.path.isfile(path):
    efficientnet_lite.load_params(path)  # raises the helpful error
  return {"name": cfg.encoder, "weights_sha256": store.file_sha256(path), "image_size": cfg.image_size,
          "embed_dim": efficientnet_lite.EMBED_DIM}


def make_encoder(cfg: Any) -> Callable[[np.ndarray], np.ndarray]:
  """A batched function uint8 images [B, H, W, C] -> float32 embeddings [B, embed_dim]."""
  identity = encoder_identity(cfg)
  if cfg.embed_dim != identity["embed_dim"]:
    fail(f"config.retrieval.embed_dim={cfg.embed_dim} but {cfg.encoder} embeds to {identity['embed_dim']}")
  params = efficientnet_lite.load_params(cfg.weights)
  model = efficientnet_lite.EfficientNetLite0()

  @functools.partial(jax.jit)
  def embed(images):
    x = efficientnet_lite.preprocess(images, cfg.image_size)
    features, _ = model.apply({"params": params}, x)
    return features

  def run(images: np.ndarray) -> np.ndarray:
    out = []
    for a in range(0, len(images), cfg.batch_size):
      batch = images[a:a + cfg.batch_size]
      n = len(batch)
      if n < cfg.batch_size:  # pad the last batch: one compiled shape
        batch = np.concatenate([batch, np.zeros((cfg.batch_size - n,) + batch.shape[1:], batch.dtype)])
      out.append(np.asarray(embed(jnp.asarray(batch)))[:n])
    return np.concatenate(out).astype(np.float32)

  return run


def check_same_encoder(a: dict[str, Any], b: dict[str, Any], what_a: str, what_b: str, fix: str) -> None:
  if a != b:
    fail(f"{what_a} was made by encoder {a} but {what_b} by {b}; {fix}")
