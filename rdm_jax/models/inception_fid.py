"""The FID InceptionV3 of pytorch-fid in Flax: pool3 features (2048-d) and logits (1008).

The network is torchvision's Inception3 with pytorch-fid's FID blocks (the TF 2015-12-05
graph the FID was defined on): average pools exclude padding, and the last block max-pools.
Module names follow the PyTorch state dict, so pytorch-fid's weights file
(`pt_inception-2015-12-05-6726825d.pth`, given as a local path) converts by name. Inputs
are preprocessed as pytorch-fid does: uint8 -> [0, 1], bilinear resize to 299x299
(align_corners=False, no antialias), then 2x - 1.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax.errors import fail
from rdm_jax.models import torch_legacy
from rdm_jax.models.efficientnet_lite import BatchNormInference

FEATURE_DIM = 2048
NUM_CLASSES = 1008


class BasicConv2d(nn.Module):
  """conv (no bias) + BatchNorm (eps 1e-3) + ReLU; `padding` per spatial axis as in torch."""

  features: int
  kernel: Sequence[int]
  stride: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(
      self.features,
      tuple(self.kernel),
      strides=(self.stride, self.stride),
      padding=[(p, p) for p in self.padding],
      use_bias=False,
      name="conv",
    )(x)
    return nn.relu(BatchNormInference(eps=1e-3, name="bn")(x))


def _conv(features, kernel, stride=1, padding=0, name=None):
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  padding = (padding, padding) if isinstance(padding, int) else padding
  return BasicConv2d(features, kernel, stride, padding, name=name)


def _avg_pool_3x3(x):  # FID blocks: count_include_pad=False
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _conv(64, 1, name="branch1x1")(x)
    b5 = _conv(64, 5, padding=2, name="branch5x5_2")(_conv(48, 1, name="branch5x5_1")(x))
    b3 = _conv(96, 3, padding=1, name="branch3x3dbl_3")(
      _conv(96, 3, padding=1, name="branch3x3dbl_2")(_conv(64, 1, name="branch3x3dbl_1")(x))
    )
    bp = _conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = _conv(384, 3, stride=2, name="branch3x3")(x)
    bd = _conv(96, 3, stride=2, name="branch3x3dbl_3")(
      _conv(96, 3, padding=1, name="branch3x3dbl_2")(_conv(64, 1, name="branch3x3dbl_1")(x))
    )
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = _conv(192, 1, name="branch1x1")(x)
    b7 = _conv(c, 1, name="branch7x7_1")(x)
    b7 = _conv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = _conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = _conv(c, 1, name="branch7x7dbl_1")(x)
    bd = _conv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = _conv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = _conv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = _conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = _conv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = _conv(320, 3, stride=2, name="branch3x3_2")(_conv(192, 1, name="branch3x3_1")(x))
    b7 = _conv(192, 1, name="branch7x7x3_1")(x)
    b7 = _conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = _conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = _conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  max_pool: bool  # FIDInceptionE_2 (the last block) max-pools its pool branch

  @nn.compact
  def __call__(self, x):
    b1 = _conv(320, 1, name="branch1x1")(x)
    b3 = _conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        _conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        _conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = _conv(384, 3, padding=1, name="branch3x3dbl_2")(_conv(448, 1, name="branch3x3dbl_1")(x))
    bd = jnp.concatenate(
      [
        _conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        _conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    pooled = (
      nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
      if self.max_pool
      else _avg_pool_3x3(x)
    )
    bp = _conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """[B, 299, 299, 3] in [-1, 1] -> (pool3 features [B, 2048], logits [B, 1008])."""

  @nn.compact
  def __call__(self, x):
    x = _conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = _conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = _conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = _conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = _conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(False, name="Mixed_7b")(x)
    x = InceptionE(True, name="Mixed_7c")(x)
    features = jnp.mean(x, axis=(1, 2))
    return features, nn.Dense(NUM_CLASSES, name="fc")(features)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 1|3] -> [B, 299, 299, 3] in [-1, 1], as pytorch-fid (bilinear, no
  antialias)."""
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = jax.image.resize(x, (x.shape[0], 299, 299, 3), method="bilinear", antialias=False)
  return 2.0 * x - 1.0


def convert_state_dict(sd: dict[str, np.ndarray]) -> dict[str, Any]:
  """pytorch-fid's FID Inception state dict -> Flax params (by module name)."""
  params: dict[str, Any] = {}
  for key, value in sd.items():
    *path, leaf = key.split(".")
    if path and path[0] == "AuxLogits":
      continue
    if leaf == "num_batches_tracked":
      continue
    value = np.asarray(value, np.float32)
    if path[-1] == "conv" and leaf == "weight":
      leaf, value = (
        "kernel",
        np.transpose(value, (2, 3, 1, 0)),
      )  # [out, in, kh, kw] -> [kh, kw, in, out]
    elif path[-1] == "bn":
      leaf = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}[leaf]
    elif path == ["fc"]:
      leaf, value = ("kernel", value.T) if leaf == "weight" else ("bias", value)
    node = params
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = value
  return jax.tree.map(jnp.asarray, params)


def load_params(path: str) -> dict[str, Any]:
  """Flax params from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a local file)."""
  if not path or not os.path.isfile(path):
    fail(
      f"FID Inception weights not found at {path!r}: download pytorch-fid's "
      "pt_inception-2015-12-05-6726825d.pth once and set config.eval.weights to its path"
    )
  try:
    params = convert_state_dict(torch_legacy.load(path))
  except Exception as e:  # corrupt or foreign file
    fail(f"could not read FID Inception weights from {path} ({e})")
  expected = jax.eval_shape(
    FIDInceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3))
  )["params"]
  if jax.tree.structure(params) != jax.tree.structure(expected) or any(
    jax.tree.leaves(jax.tree.map(lambda a, b: a.shape != b.shape, params, expected))
  ):
    fail(f"{path} is not pytorch-fid's FID Inception checkpoint (other layers or shapes)")
  return params
