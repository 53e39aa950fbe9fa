"""The LDM/RDM UNet eps_theta(z_t, t, context) with spatial-transformer cross-attention.

A Flax port of `ldm.modules.diffusionmodules.openaimodel.UNetModel` as the RDM release
configures it (use_spatial_transformer=True, num_head_channels=32, no scale-shift norm):

  conv_in -> [ResBlock (+ SpatialTransformer where the downsampling factor is in
  `attention_resolutions`)] x num_res_blocks per level, Downsample between levels
  -> middle ResBlock, SpatialTransformer, ResBlock
  -> mirrored output levels with skip concatenation and Upsample
  -> GroupNorm, SiLU, zero-initialised conv_out.

The neighbour context `context: [B, k, d]` enters each SpatialTransformer through the
key/value projections of its cross-attention (raw retrieval embeddings, as in RDM).

Details kept from the original: GroupNorm with 32 groups computed in float32, eps 1e-5
in res blocks and the output norm (torch default) and eps 1e-6 in the transformer's
input norm (`ldm.modules.attention.Normalize`); LayerNorm eps 1e-5; GEGLU feed-forward
with exact GELU and inner width 4x; bias-free q/k/v projections; zero-initialised
`proj_out` (1x1 conv), res-block second conv and `conv_out`; sinusoidal timestep
embedding ordered [cos, sin].

One addition, off by default: `patch_size` p > 1 folds each p x p patch of the input into
channels before conv_in and unfolds conv_out's p*p*C channels back (Simple Diffusion's
patching, Hoogeboom et al. 2023): the whole network runs on a grid p times smaller. The
Fashion-MNIST demo uses p = 2 (pixels, 32 x 32) for its time budget on 2 CPU cores.

Parameters carry logical axis names (see `rdm_jax.parallel.sharding`):
  conv kernels  (None, None, "conv_in", "conv_out")
  dense kernels ("embed", "mlp") / ("mlp", "embed"); attention ("embed", "heads"),
                ("heads", "embed"); context k/v ("context", "heads")
  biases/scales ("norm",)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_default_kernel_init = nn.initializers.lecun_normal()
_zeros = nn.initializers.zeros_init()


def _kernel(names: tuple[str | None, ...], init=_default_kernel_init):
  return nn.with_logical_partitioning(init, names)


def _bias(init=_zeros):
  return nn.with_logical_partitioning(init, ("norm",))


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of integer timesteps t: [B] -> [B, dim], ordered [cos, sin]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class GroupNorm(nn.Module):
  """GroupNorm32 of the original: statistics in float32, 32 groups, x: [B, ..., C].

  Statistics are reduced per channel over the spatial axes first, then per group: the
  same two-pass mean/variance as a grouped reduction, but XLA's CPU backend runs it ~10x
  faster than reducing a [B, HW, G, C/G] view over two non-adjacent axes (measured here).
  """

  eps: float = 1e-5
  num_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    g = self.num_groups
    scale = self.param("scale", _bias(nn.initializers.ones_init()), (c,))
    bias = self.param("bias", _bias(), (c,))
    x32 = x.astype(jnp.float32)
    spatial = tuple(range(1, x.ndim - 1))
    b = x.shape[0]
    group_mean = x32.mean(axis=spatial).reshape(b, g, c // g).mean(-1)                  # [B, G]
    mean_c = jnp.repeat(group_mean, c // g, axis=-1).reshape((b,) + (1,) * len(spatial) + (c,))
    centered = x32 - mean_c
    group_var = jnp.square(centered).mean(axis=spatial).reshape(b, g, c // g).mean(-1)  # [B, G]
    inv_c = jnp.repeat(jax.lax.rsqrt(group_var + self.eps), c // g, axis=-1)
    inv_c = inv_c.reshape((b,) + (1,) * len(spatial) + (c,))
    return (centered * (inv_c * scale) + bias).astype(x.dtype)


def Conv(features: int, kernel_size: int = 3, stride: int = 1, zero_init: bool = False,
         dtype: Dtype = jnp.float32, name: str | None = None, padding: Any = None) -> nn.Conv:
  """2-D conv with logical axis names; torch-style symmetric padding (k // 2) unless given."""
  p = kernel_size // 2
  return nn.Conv(features, (kernel_size,) * 2, strides=(stride,) * 2, padding=padding or ((p, p), (p, p)),
                 dtype=dtype, name=name,
                 kernel_init=_kernel((None, None, "conv_in", "conv_out"),
                                     _zeros if zero_init else _default_kernel_init),
                 bias_init=_bias())


def Dense(features: int, names: tuple[str | None, str | None] = ("embed", "mlp"),
          use_bias: bool = True, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
  """Dense layer whose kernel carries the logical axis names `names`."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=_kernel(names), bias_init=_bias())


class ResBlock(nn.Module):
  """openaimodel.ResBlock without scale-shift norm: x + f(x, emb)."""

  out_channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, deterministic: bool = True) -> jax.Array:
    h = nn.silu(GroupNorm(name="in_norm")(x))
    h = Conv(self.out_channels, dtype=self.dtype, name="in_conv")(h)
    e = Dense(self.out_channels, ("embed", "mlp"), dtype=self.dtype, name="emb_proj")(nn.silu(emb))
    h = h + e[:, None, None, :]
    h = nn.silu(GroupNorm(name="out_norm")(h))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = Conv(self.out_channels, zero_init=True, dtype=self.dtype, name="out_conv")(h)
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, kernel_size=1, dtype=self.dtype, name="skip")(x)
    return x + h


class Attention(nn.Module):
  """Multi-head (cross-)attention of ldm.modules.attention.CrossAttention."""

  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x: [B, N, c]; context: [B, k, d] (self-attention when None) -> [B, N, c]."""
    inner = self.heads * self.dim_head
    ctx_names = ("embed", "heads") if context is None else ("context", "heads")
    context = x if context is None else context
    q = Dense(inner, ("embed", "heads"), use_bias=False, dtype=self.dtype, name="to_q")(x)
    k = Dense(inner, ctx_names, use_bias=False, dtype=self.dtype, name="to_k")(context)
    v = Dense(inner, ctx_names, use_bias=False, dtype=self.dtype, name="to_v")(context)
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.dim_head))
    q, k, v = split(q), split(k), split(v)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (self.dim_head ** -0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape[:2] + (inner,))
    return Dense(x.shape[-1], ("heads", "embed"), dtype=self.dtype, name="to_out")(out)


class GEGLUFeedForward(nn.Module):
  """FeedForward(glu=True): Linear(c, 2*4c) -> a * gelu(gate) -> Linear(4c, c)."""

  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    inner = x.shape[-1] * self.mult
    h = Dense(2 * inner, ("embed", "mlp"), dtype=self.dtype, name="proj_in")(x)
    a, gate = jnp.split(h, 2, axis=-1)
    h = a * nn.gelu(gate, approximate=False)
    return Dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="proj_out")(h)


class TransformerBlock(nn.Module):
  """BasicTransformerBlock: self-attention, cross-attention to the context, GEGLU FF."""

  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name,
                                   scale_init=_bias(nn.initializers.ones_init()), bias_init=_bias())
    x = x + Attention(self.heads, self.dim_head, self.dtype, name="attn1")(ln("norm1")(x).astype(x.dtype))
    x = x + Attention(self.heads, self.dim_head, self.dtype, name="attn2")(
        ln("norm2")(x).astype(x.dtype), context)
    x = x + GEGLUFeedForward(dtype=self.dtype, name="ff")(ln("norm3")(x).astype(x.dtype))
    return x


class SpatialTransformer(nn.Module):
  """GroupNorm(eps 1e-6) -> 1x1 proj_in -> transformer blocks -> zero 1x1 proj_out, + residual."""

  heads: int
  dim_head: int
  depth: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    inner = self.heads * self.dim_head
    y = GroupNorm(eps=1e-6, name="norm")(x)
    y = Conv(inner, kernel_size=1, dtype=self.dtype, name="proj_in")(y)
    y = y.reshape(b, h * w, inner)
    for i in range(self.depth):
      y = TransformerBlock(self.heads, self.dim_head, self.dtype, name=f"block_{i}")(y, context)
    y = y.reshape(b, h, w, inner)
    y = Conv(c, kernel_size=1, zero_init=True, dtype=self.dtype, name="proj_out")(y)
    return x + y


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p patch's pixels as channels, in (row, column,
  channel) order (torch's pixel_unshuffle for C = 1)."""
  b, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f"latents of {h}x{w} do not split into {p}x{p} patches (config.model.patch_size)")
  return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """The inverse of `space_to_depth`."""
  b, h, w, pc = x.shape
  c = pc // (p * p)
  return x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, c)


class UNet(nn.Module):
  """eps_theta(z_t, t, context): [B, H, W, C], [B], [B, k, d] -> [B, H, W, C]."""

  model_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  attention_resolutions: Sequence[int]  # downsampling factors with attention (1 = top level)
  num_head_channels: int = 32
  transformer_depth: int = 1
  out_channels: int | None = None
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  patch_size: int = 1  # > 1: p x p space-to-depth before conv_in, depth-to-space after conv_out

  def _attn(self, ch: int, name: str) -> SpatialTransformer:
    heads = ch // self.num_head_channels
    return SpatialTransformer(heads, self.num_head_channels, self.transformer_depth, self.dtype, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array,
               deterministic: bool = True) -> jax.Array:
    mc = self.model_channels
    dt = self.dtype
    emb = timestep_embedding(t, mc)
    emb = Dense(4 * mc, ("norm", "mlp"), dtype=dt, name="time_embed_0")(emb)
    emb = Dense(4 * mc, ("mlp", "embed"), dtype=dt, name="time_embed_1")(nn.silu(emb))
    context = context.astype(dt)

    p = self.patch_size
    out_ch = self.out_channels or x.shape[-1]
    if p > 1:  # Simple Diffusion's patching (Hoogeboom et al. 2023, Sec. 3.3): the grid shrinks p x p
      x = space_to_depth(x, p)
    h = Conv(mc, dtype=dt, name="conv_in")(x.astype(dt))
    skips = [h]
    ds = 1
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = ResBlock(mult * mc, self.dropout, dt, name=f"down_{level}_res_{i}")(h, emb, deterministic)
        if ds in self.attention_resolutions:
          h = self._attn(mult * mc, f"down_{level}_attn_{i}")(h, context)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        h = Conv(mult * mc, stride=2, dtype=dt, name=f"down_{level}_downsample")(h)
        skips.append(h)
        ds *= 2

    ch = self.channel_mult[-1] * mc
    h = ResBlock(ch, self.dropout, dt, name="mid_res_0")(h, emb, deterministic)
    h = self._attn(ch, "mid_attn")(h, context)
    h = ResBlock(ch, self.dropout, dt, name="mid_res_1")(h, emb, deterministic)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResBlock(mult * mc, self.dropout, dt, name=f"up_{level}_res_{i}")(h, emb, deterministic)
        if ds in self.attention_resolutions:
          h = self._attn(mult * mc, f"up_{level}_attn_{i}")(h, context)
        if level and i == self.num_res_blocks:
          h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest, as F.interpolate x2
          h = Conv(mult * mc, dtype=dt, name=f"up_{level}_upsample")(h)
          ds //= 2

    h = nn.silu(GroupNorm(name="out_norm")(h))
    out = Conv(out_ch * p * p, zero_init=True, dtype=dt, name="conv_out")(h)
    if p > 1:
      out = depth_to_space(out, p)
    return out.astype(jnp.float32)


# ---------------------------------------------------------------------------------------
# The original's state dict (ldm/rdm openaimodel.UNetModel keys, e.g. `input_blocks.1.1.
# transformer_blocks.0.attn2.to_k.weight`), for importing the published RDM checkpoints

# inside a ResBlock (in_layers = GroupNorm, SiLU, conv; emb_layers = SiLU, Linear;
# out_layers = GroupNorm, SiLU, Dropout, conv) and a transformer block (to_out = Linear,
# Dropout; ff.net = GEGLU(proj), Dropout, Linear)
_LDM_INNER = {"in_norm": "in_layers.0", "in_conv": "in_layers.2", "emb_proj": "emb_layers.1",
              "out_norm": "out_layers.0", "out_conv": "out_layers.3", "skip": "skip_connection",
              "to_out": "to_out.0"}
_LDM_FF = {"proj_in": "net.0.proj", "proj_out": "net.2"}


def ldm_prefixes(model: UNet) -> dict[str, str]:
  """Our top-level module names -> the original's module paths (input_blocks / middle_block /
  output_blocks numbered as openaimodel.UNetModel builds them with use_spatial_transformer)."""
  p = {"time_embed_0": "time_embed.0", "time_embed_1": "time_embed.2", "conv_in": "input_blocks.0.0",
       "mid_res_0": "middle_block.0", "mid_attn": "middle_block.1", "mid_res_1": "middle_block.2",
       "out_norm": "out.0", "conv_out": "out.2"}
  levels, n, ds = len(model.channel_mult), 1, 1
  for level in range(levels):
    for i in range(model.num_res_blocks):
      p[f"down_{level}_res_{i}"], p[f"down_{level}_attn_{i}"] = f"input_blocks.{n}.0", f"input_blocks.{n}.1"
      n += 1
    if level != levels - 1:
      p[f"down_{level}_downsample"] = f"input_blocks.{n}.0.op"
      n, ds = n + 1, ds * 2
  m = 0
  for level in reversed(range(levels)):
    for i in range(model.num_res_blocks + 1):
      p[f"up_{level}_res_{i}"], p[f"up_{level}_attn_{i}"] = f"output_blocks.{m}.0", f"output_blocks.{m}.1"
      if level and i == model.num_res_blocks:  # Upsample comes after the block's attention, if any
        p[f"up_{level}_upsample"] = f"output_blocks.{m}.{2 if ds in model.attention_resolutions else 1}.conv"
      m += 1
    ds //= 2 if level else 1
  return p


def ldm_names(model: UNet, params: Any) -> dict[tuple[str, ...], str]:
  """{our parameter path: the original's state-dict key} for every leaf of `params`."""
  prefixes = ldm_prefixes(model)
  names = {}
  for path in jax.tree_util.tree_flatten_with_path(params)[0]:
    top, *inner, leaf = (str(getattr(k, "key", k)) for k in path[0])
    parts = [prefixes[top]]
    for parent, part in zip([top] + inner, inner):
      if part.startswith("block_"):
        parts.append("transformer_blocks." + part[len("block_"):])
      else:
        parts.append(_LDM_FF[part] if parent == "ff" else _LDM_INNER.get(part, part))
    parts.append({"kernel": "weight", "scale": "weight"}.get(leaf, leaf))
    names[(top, *inner, leaf)] = ".".join(parts)
  return names
