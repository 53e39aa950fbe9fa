"""The LDM first stages in Flax: VQ (VQModel / VQModelInterface) and KL (AutoencoderKL).

A port of `ldm/models/autoencoder.py` and of the Encoder / Decoder of
`ldm/modules/diffusionmodules/model.py` (the same modules as taming-transformers'
`taming/modules/diffusionmodules/model.py`, which the tests use as the reference), in NHWC:

  Encoder: conv_in -> per level [ResnetBlock (+ AttnBlock at `attn_resolutions`)] x
  num_res_blocks, Downsample (stride-2 conv after a (0, 1) pad) between levels -> mid
  ResnetBlock, AttnBlock, ResnetBlock -> GroupNorm, swish, conv_out (2 z_channels for KL).
  Decoder: the mirror image, num_res_blocks + 1 blocks per level, nearest x2 Upsample + conv.
  GroupNorm: 32 groups, eps 1e-6. AttnBlock: one head over all channels, 1x1-conv q/k/v.

VQ (`VectorQuantizer2` of taming): nearest code by ||z||^2 + ||e||^2 - 2 z.e, computed as the
reference computes it so that ties break alike. `encode` is `VQModelInterface.encode`, the
*unquantised* quant_conv(encoder(x)); `decode` quantises to the nearest code first (as
`VQModelInterface.decode`), then post_quant_conv and the decoder. `encode_tokens` /
`decode_tokens` are `VQModel.encode`'s indices and `decode_code` (the RARM issue's tokens).
KL: quant_conv gives the posterior's mean and log-variance (clamped to [-30, 20], as
`DiagonalGaussianDistribution`); `encode` returns the mean, or a sample when given a key.

Parameters are named after the PyTorch state dict (`encoder.down.0.block.1.norm1.weight` is
params["encoder"]["down_0"]["block_1"]["norm1"]["scale"]) so that `convert_state_dict` is a
renaming plus conv-kernel transposes, and every key is accounted for.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax.models import torch_convert
from rdm_jax.models.layers import Conv, GroupNorm


@dataclasses.dataclass(frozen=True)
class Spec:
  """An LDM autoencoder's `ddconfig` plus its kind ("vq" or "kl"), embed_dim and codebook size."""

  kind: str
  embed_dim: int
  z_channels: int
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = ()
  resolution: int = 256
  in_channels: int = 3
  out_ch: int = 3
  n_embed: int = 0

  @property
  def factor(self) -> int:
    """Downsampling factor f: latents are (H / f, W / f)."""
    return 2 ** (len(self.ch_mult) - 1)


# The published first stages (latent-diffusion models/first_stage_models/*/config.yaml and
# configs/autoencoder/*.yaml; vq_f16 as the RDM release's RARM training configs set it,
# configs/rarm/dogs.yaml:32-54). vqgan_f16 is taming-transformers' VQGAN (taming.models.vqgan.
# VQModel), the first stage of the released RARM weights (models/rarm/imagenet/dogs/config.yaml:
# 29-50): the same Encoder / Decoder and quantiser with 256-channel latents and codes.
PRESETS = {
  "vq_f4": Spec("vq", embed_dim=3, z_channels=3, ch_mult=(1, 2, 4), n_embed=8192),
  "vq_f8": Spec(
    "vq", embed_dim=4, z_channels=4, ch_mult=(1, 2, 2, 4), attn_resolutions=(32,), n_embed=16384
  ),
  "vq_f16": Spec(
    "vq", embed_dim=8, z_channels=8, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), n_embed=16384
  ),
  "vqgan_f16": Spec(
    "vq",
    embed_dim=256,
    z_channels=256,
    ch_mult=(1, 1, 2, 2, 4),
    attn_resolutions=(16,),
    n_embed=16384,
  ),
  "kl_f4": Spec("kl", embed_dim=3, z_channels=3, ch_mult=(1, 2, 4)),
  "kl_f8": Spec("kl", embed_dim=4, z_channels=4, ch_mult=(1, 2, 4, 4)),
  "kl_f16": Spec(
    "kl", embed_dim=16, z_channels=16, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,)
  ),
}


class ResnetBlock(nn.Module):
  """x + conv2(swish(norm2(conv1(swish(norm1(x)))))), 1x1 `nin_shortcut` when widths differ."""

  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Conv(self.out_channels, dtype=self.dtype, name="conv1")(
      GroupNorm(1e-6, silu=True, name="norm1")(x)
    )
    h = Conv(self.out_channels, dtype=self.dtype, name="conv2")(
      GroupNorm(1e-6, silu=True, name="norm2")(h)
    )
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, kernel_size=1, dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions, the channels as the head dimension."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = GroupNorm(1e-6, name="norm")(x)
    q, k, v = (
      Conv(c, kernel_size=1, dtype=self.dtype, name=n)(y).reshape(b, h * w, 1, c) for n in "qkv"
    )
    out = jax.nn.dot_product_attention(q, k, v).reshape(b, h, w, c)
    return x + Conv(c, kernel_size=1, dtype=self.dtype, name="proj_out")(out)


class Level(nn.Module):
  """One resolution level (`down.i` / `up.i` of the original): res blocks, each followed by
  attention when `attn`, then the resampling: "down" (stride-2 conv after torch's manual
  (0, 1) pad), "up" (nearest x2, then a 3x3 conv) or none."""

  channels: int
  num_blocks: int
  attn: bool
  resample: str | None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_blocks):
      x = ResnetBlock(self.channels, self.dtype, name=f"block_{i}")(x)
      if self.attn:
        x = AttnBlock(self.dtype, name=f"attn_{i}")(x)
    if self.resample == "down":
      x = Downsample(self.channels, self.dtype, name="downsample")(x)
    elif self.resample == "up":
      x = Upsample(self.channels, self.dtype, name="upsample")(x)
    return x


class Downsample(nn.Module):
  """A 3x3 stride-2 conv after padding (0, 1) on both spatial axes (the original pads by hand)."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Conv(self.channels, stride=2, dtype=self.dtype, padding=((0, 1), (0, 1)), name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(self.channels, dtype=self.dtype, name="conv")(x)


class Mid(nn.Module):
  """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.dtype, name="block_1")(x)
    x = AttnBlock(self.dtype, name="attn_1")(x)
    return ResnetBlock(c, self.dtype, name="block_2")(x)


class Encoder(nn.Module):
  """images in [-1, 1], [B, H, W, in_channels] -> [B, H/f, W/f, z_channels (x2 for KL)]."""

  spec: Spec
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.spec
    h = Conv(s.ch, dtype=self.dtype, name="conv_in")(x)
    res, last = s.resolution, len(s.ch_mult) - 1
    for i, mult in enumerate(s.ch_mult):
      h = Level(
        s.ch * mult,
        s.num_res_blocks,
        res in s.attn_resolutions,
        "down" if i != last else None,
        self.dtype,
        name=f"down_{i}",
      )(h)
      res = res // 2 if i != last else res
    h = Mid(self.dtype, name="mid")(h)
    h = GroupNorm(1e-6, silu=True, name="norm_out")(h)
    return Conv(
      2 * s.z_channels if s.kind == "kl" else s.z_channels, dtype=self.dtype, name="conv_out"
    )(h)


class Decoder(nn.Module):
  """[B, h, w, z_channels] -> images [B, h f, w f, out_ch] (unclipped, about [-1, 1])."""

  spec: Spec
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    s = self.spec
    h = Conv(s.ch * s.ch_mult[-1], dtype=self.dtype, name="conv_in")(z)
    h = Mid(self.dtype, name="mid")(h)
    res = s.resolution // s.factor
    for i in reversed(range(len(s.ch_mult))):  # the original builds up.0 (full size) last
      h = Level(
        s.ch * s.ch_mult[i],
        s.num_res_blocks + 1,
        res in s.attn_resolutions,
        "up" if i else None,
        self.dtype,
        name=f"up_{i}",
      )(h)
      res = res * 2 if i else res
    h = GroupNorm(1e-6, silu=True, name="norm_out")(h)
    return Conv(s.out_ch, dtype=self.dtype, name="conv_out")(h)


class Autoencoder(nn.Module):
  """encoder, quant_conv, post_quant_conv, decoder (+ the VQ codebook `quantize.embedding`)."""

  spec: Spec
  dtype: Any = jnp.float32

  def setup(self):
    s = self.spec
    self.encoder = Encoder(s, self.dtype)
    self.decoder = Decoder(s, self.dtype)
    self.quant_conv = Conv(
      2 * s.embed_dim if s.kind == "kl" else s.embed_dim, kernel_size=1, dtype=self.dtype
    )
    self.post_quant_conv = Conv(s.z_channels, kernel_size=1, dtype=self.dtype)
    if s.kind == "vq":
      self.quantize = Codebook(s.n_embed, s.embed_dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction (for init): decode(encode(x))."""
    return self.decode(self.encode(x))

  def moments(self, x: jax.Array) -> jax.Array:
    """quant_conv(encoder(x)): the VQ pre-quantisation latents, or KL's [mean, logvar]."""
    return self.quant_conv(self.encoder(x)).astype(jnp.float32)

  def encode(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """VQ: unquantised latents. KL: the posterior mean, or a sample when `rng` is given."""
    h = self.moments(x)
    if self.spec.kind == "vq":
      return h
    mean, logvar = jnp.split(h, 2, axis=-1)
    if rng is None:
      return mean
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    return mean + std * jax.random.normal(rng, mean.shape, mean.dtype)

  def decode(self, z: jax.Array) -> jax.Array:
    """VQ: quantise to the nearest code, then decode (VQModelInterface.decode). KL: decode."""
    if self.spec.kind == "vq":
      z = self.quantize.lookup(self.quantize.nearest(z))
    return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

  def encode_tokens(self, x: jax.Array) -> jax.Array:
    """VQ: code indices [B, h, w] (int32) of images."""
    return self.quantize.nearest(self.moments(x))

  def decode_tokens(self, tokens: jax.Array) -> jax.Array:
    """VQ: images from code indices [B, h, w] (VQModel.decode_code)."""
    return self.decoder(self.post_quant_conv(self.quantize.lookup(tokens))).astype(jnp.float32)


class Codebook(nn.Module):
  """taming's VectorQuantizer2 at inference: nearest-code indices and their embeddings."""

  n_embed: int
  embed_dim: int

  def setup(self):
    self.embedding = self.param(  # torch: uniform(-1/n, 1/n)
      "embedding",
      lambda key, shape: jax.random.uniform(
        key, shape, minval=-1 / self.n_embed, maxval=1 / self.n_embed
      ),
      (self.n_embed, self.embed_dim),
    )

  def nearest(self, z: jax.Array) -> jax.Array:
    e = self.embedding.astype(jnp.float32)
    z = z.astype(jnp.float32)
    # the reference's expression and order: ||z||^2 + ||e||^2 - 2 z.e
    d = (
      jnp.sum(z**2, axis=-1, keepdims=True)
      + jnp.sum(e**2, axis=-1)
      - 2 * jnp.einsum("...d,nd->...n", z, e, precision=jax.lax.Precision.HIGHEST)
    )
    return jnp.argmin(d, axis=-1).astype(jnp.int32)

  def lookup(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, tokens, axis=0)


# ---------------------------------------------------------------------------------------
# PyTorch state dicts

IGNORED_PREFIXES = (
  "loss.",
  "model_ema.",
)  # the training loss (LPIPS, discriminator) and EMA buffers


def torch_name(path: Sequence[str]) -> str:
  """Flax parameter path -> the original state-dict key."""
  *mods, leaf = path
  # list indices: down_0 -> down.0, block_1 -> block.1, except mid's
  # named block_1 / attn_1 / block_2
  name = ".".join(
    m if prev == "mid" else re.sub(r"^(down|up|block|attn)_(\d+)$", r"\1.\2", m)
    for prev, m in zip([""] + mods, mods)
  )
  if mods == ["quantize"] and leaf == "embedding":
    return "quantize.embedding.weight"
  return f"{name}.{ {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf] }"


def init_shapes(spec: Spec) -> dict[str, Any]:
  """The Flax parameter tree of `spec` as ShapeDtypeStructs (nothing is computed)."""
  x = jnp.zeros((1, spec.factor * 2, spec.factor * 2, spec.in_channels))
  shapes = jax.eval_shape(Autoencoder(spec).init, jax.random.PRNGKey(0), x)
  return nn.meta.unbox(shapes)["params"]


def convert_state_dict(state_dict: dict[str, np.ndarray], spec: Spec) -> dict[str, Any]:
  """Flax params of `spec` from an LDM autoencoder state dict (keys as `encoder.down.0.block.0.
  norm1.weight`). Raises ValueError listing the missing, unexpected and misshapen keys."""
  expected = torch_convert.flat_shapes(init_shapes(spec))
  return torch_convert.to_flax(
    state_dict, expected, {p: torch_name(p) for p in expected}, IGNORED_PREFIXES
  )
