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

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rdm_jax.models.layers import Conv, Dense, Dtype, GEGLUFeedForward, GroupNorm, logical_bias_init
from rdm_jax.parallel import sharding


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of integer timesteps t: [B] -> [B, dim], ordered [cos, sin]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


ATTENTION_IMPLS = ("xla", "dot_product", "cudnn", "flash")
REMAT_POLICIES = ("none", "full", "dots")


def remat_policy(name: str):
  """jax.checkpoint policy of config.model.remat: "full" saves nothing inside a block (the
  original's use_checkpoint), "dots" saves matmul outputs without batch dimensions
  (projections and MLPs; convolutions and attention weights are recomputed)."""
  if name == "full":
    return None
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  raise ValueError(f"config.model.remat={name!r}; use one of {', '.join(REMAT_POLICIES)}")


class ResBlock(nn.Module):
  """openaimodel.ResBlock without scale-shift norm: x + f(x, emb)."""

  out_channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  conv: Any = "xla"  # xla | onednn | frozenset of geometries on oneDNN: see Conv

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, deterministic: bool = True) -> jax.Array:
    conv = functools.partial(Conv, dtype=self.dtype, param_dtype=self.param_dtype, impl=self.conv)
    norm = functools.partial(GroupNorm, param_dtype=self.param_dtype)
    h = norm(name="in_norm", silu=True)(x)
    h = conv(self.out_channels, name="in_conv")(h)
    e = Dense(
      self.out_channels,
      ("embed", "mlp"),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="emb_proj",
    )(nn.silu(emb))
    h = h + e[:, None, None, :]
    h = norm(name="out_norm", silu=True)(h)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = conv(self.out_channels, zero_init=True, name="out_conv")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, kernel_size=1, name="skip")(x)
    return x + h


def flash_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, scale: float, batch_axes=None, heads_axis=None
) -> jax.Array:
  """Pallas TPU flash attention (jax.experimental.pallas.ops.tpu.flash_attention) on [B, S, H, D].

  Under a mesh (jax.set_mesh) the kernel runs per shard through shard_map: the batch split
  over `batch_axes`, heads over `heads_axis` where they divide (a custom call is opaque to
  XLA's partitioner). Off TPU it runs only in Pallas' interpret mode
  (`pltpu.force_tpu_interpret_mode()`), which the tests use to check it on CPU.
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

  kernel = functools.partial(pallas_flash.flash_attention, sm_scale=scale)
  q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # the kernel's [B, H, S, D]
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    spec = sharding.fit_spec(P(batch_axes, heads_axis), q.shape[:2], mesh)
    kernel = jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
  return kernel(q, k, v).transpose(0, 2, 1, 3)


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) v for q [B, N, H, D], k and v [B, M, H, D], softmax in float32.

  Heads go first ([B, H, N, D]) and the softmax's division is applied to the output, [B, H, N, D],
  instead of the weights, [B, H, N, M] (as flash attention does). Both are exact rewrites; on
  XLA:CPU the einsums on [B, N, H, D] and the full-size division each cost more than the matmuls
  (benchmarks/RESULTS.md).
  """
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * scale
  p = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v).astype(jnp.float32) / p.sum(
    axis=-1, keepdims=True
  )
  return jnp.swapaxes(out, 1, 2).astype(v.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
  """How attention is computed (config.model.attention, .flash_min_seq_len) and, for the
  flash kernel's shard_map, which mesh axes split the batch and the heads."""

  impl: str = "xla"
  flash_min_seq_len: int = 1024
  batch_axes: Any = None
  heads_axis: Any = None


class Attention(nn.Module):
  """Multi-head (cross-)attention of ldm.modules.attention.CrossAttention.

  `options.impl` (config.model.attention) chooses how softmax(q k^T / sqrt(d)) v is computed, with
  the same parameters and the same result: "xla" (einsums, float32 softmax), "dot_product"
  (`jax.nn.dot_product_attention` with its default implementation, which is XLA's on every
  platform in jax 0.10-0.11), "cudnn" (the same function's cuDNN fused flash attention for the
  self-attentions, GPU only, bfloat16/float16 compute; cross-attention to the k neighbours keeps
  "xla") or "flash" (the Pallas TPU kernel for self-attention over at least
  `options.flash_min_seq_len` tokens, MaxDiffusion's flash_min_seq_length; shorter sequences and
  cross-attention use "dot_product").
  """

  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  options: AttentionOptions = AttentionOptions()

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x: [B, N, c]; context: [B, k, d] (self-attention when None) -> [B, N, c]."""
    inner = self.heads * self.dim_head
    self_attention = context is None
    ctx_names = ("embed", "heads") if self_attention else ("context", "heads")
    context = x if self_attention else context
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(inner, ("embed", "heads"), use_bias=False, name="to_q")(x)
    k = dense(inner, ctx_names, use_bias=False, name="to_k")(context)
    v = dense(inner, ctx_names, use_bias=False, name="to_v")(context)
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.dim_head))
    q, k, v = split(q), split(k), split(v)
    scale = self.dim_head**-0.5
    o = self.options
    if o.impl not in ATTENTION_IMPLS:
      raise ValueError(
        f"config.model.attention={o.impl!r}; use one of {', '.join(ATTENTION_IMPLS)}"
      )
    if o.impl == "flash" and self_attention and x.shape[1] >= o.flash_min_seq_len:
      out = flash_attention(q, k, v, scale, o.batch_axes, o.heads_axis)
    elif o.impl == "cudnn" and self_attention:
      out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    elif o.impl in ("dot_product", "flash"):
      out = jax.nn.dot_product_attention(q, k, v, scale=scale)
    else:
      out = _softmax_attention(q, k, v, scale)
    return dense(x.shape[-1], ("heads", "embed"), name="to_out")(
      out.reshape(x.shape[:2] + (inner,))
    )


class TransformerBlock(nn.Module):
  """BasicTransformerBlock: self-attention, cross-attention to the context, GEGLU FF."""

  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: AttentionOptions = AttentionOptions()

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    ln = lambda name: nn.LayerNorm(
      epsilon=1e-5,
      dtype=jnp.float32,
      param_dtype=self.param_dtype,
      name=name,
      scale_init=logical_bias_init(nn.initializers.ones_init()),
      bias_init=logical_bias_init(),
    )
    attn = functools.partial(
      Attention, self.heads, self.dim_head, self.dtype, self.param_dtype, self.attention
    )
    x = x + attn(name="attn1")(ln("norm1")(x).astype(x.dtype))
    x = x + attn(name="attn2")(ln("norm2")(x).astype(x.dtype), context)
    x = x + GEGLUFeedForward(dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(
      ln("norm3")(x).astype(x.dtype)
    )
    return x


class SpatialTransformer(nn.Module):
  """GroupNorm(eps 1e-6) -> 1x1 proj_in -> transformer blocks -> zero 1x1 proj_out, + residual."""

  heads: int
  dim_head: int
  depth: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: AttentionOptions = AttentionOptions()
  conv: Any = "xla"  # xla | onednn | frozenset of geometries on oneDNN: see Conv

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    inner = self.heads * self.dim_head
    conv = functools.partial(
      Conv, kernel_size=1, dtype=self.dtype, param_dtype=self.param_dtype, impl=self.conv
    )
    y = GroupNorm(eps=1e-6, param_dtype=self.param_dtype, name="norm")(x)
    y = conv(inner, name="proj_in")(y)
    y = y.reshape(b, h * w, inner)
    for i in range(self.depth):
      y = TransformerBlock(
        self.heads, self.dim_head, self.dtype, self.param_dtype, self.attention, name=f"block_{i}"
      )(y, context)
    y = y.reshape(b, h, w, inner)
    y = conv(c, zero_init=True, name="proj_out")(y)
    return x + y


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p patch's pixels as channels, in (row, column,
  channel) order (torch's pixel_unshuffle for C = 1)."""
  b, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(
      f"latents of {h}x{w} do not split into {p}x{p} patches (config.model.patch_size)"
    )
  return (
    x.reshape(b, h // p, p, w // p, p, c)
    .transpose(0, 1, 3, 2, 4, 5)
    .reshape(b, h // p, w // p, p * p * c)
  )


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """The inverse of `space_to_depth`."""
  b, h, w, pc = x.shape
  c = pc // (p * p)
  return x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, c)


class UNet(nn.Module):
  """eps_theta(z_t, t, context): [B, H, W, C], [B], [B, k, d] -> [B, H, W, C].

  The accelerator levers (config.model; none changes the parameters' names or shapes):
  `remat` recomputes each res block and spatial transformer in the backward pass ("full",
  as the original's use_checkpoint, or "dots": matmul outputs kept), `attention` and
  `flash_min_seq_len` choose the attention kernel (see `Attention`), `dtype` is the compute
  dtype and `param_dtype` the parameters' (and so the gradients' and EMA's), `conv` "onednn"
  runs the convolutions on oneDNN custom calls (CPU, one device: `rdm_jax.ops.onednn`).
  """

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
  param_dtype: Dtype = jnp.float32
  remat: str = "none"  # none | full | dots
  attention: AttentionOptions = AttentionOptions()
  conv: Any = (
    "xla"  # xla | onednn (rdm_jax.ops.onednn's custom calls; CPU, one device) | frozenset: see Conv
  )

  @nn.compact
  def __call__(
    self, x: jax.Array, t: jax.Array, context: jax.Array, deterministic: bool = True
  ) -> jax.Array:
    mc = self.model_channels
    dt, pdt = self.dtype, self.param_dtype
    conv = functools.partial(Conv, dtype=dt, param_dtype=pdt, impl=self.conv)
    dense = functools.partial(Dense, dtype=dt, param_dtype=pdt)
    res_cls, attn_cls = ResBlock, SpatialTransformer
    if self.remat != "none":
      policy = remat_policy(self.remat)
      res_cls = nn.remat(
        ResBlock, policy=policy, static_argnums=(3,)
      )  # (self, x, emb, deterministic)
      attn_cls = nn.remat(SpatialTransformer, policy=policy)
    res = lambda ch, name: res_cls(ch, self.dropout, dt, pdt, self.conv, name=name)
    attn = lambda ch, name: attn_cls(
      ch // self.num_head_channels,
      self.num_head_channels,
      self.transformer_depth,
      dt,
      pdt,
      self.attention,
      self.conv,
      name=name,
    )

    emb = timestep_embedding(t, mc)
    emb = dense(4 * mc, ("norm", "mlp"), name="time_embed_0")(emb)
    emb = dense(4 * mc, ("mlp", "embed"), name="time_embed_1")(nn.silu(emb))
    context = context.astype(dt)

    p = self.patch_size
    out_ch = self.out_channels or x.shape[-1]
    if (
      p > 1
    ):  # Simple Diffusion's patching (Hoogeboom et al. 2023, Sec. 3.3): the grid shrinks p x p
      x = space_to_depth(x, p)
    h = conv(mc, name="conv_in")(x.astype(dt))
    skips = [h]
    ds = 1
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = res(mult * mc, f"down_{level}_res_{i}")(h, emb, deterministic)
        if ds in self.attention_resolutions:
          h = attn(mult * mc, f"down_{level}_attn_{i}")(h, context)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        h = conv(mult * mc, stride=2, name=f"down_{level}_downsample")(h)
        skips.append(h)
        ds *= 2

    ch = self.channel_mult[-1] * mc
    h = res(ch, "mid_res_0")(h, emb, deterministic)
    h = attn(ch, "mid_attn")(h, context)
    h = res(ch, "mid_res_1")(h, emb, deterministic)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(mult * mc, f"up_{level}_res_{i}")(h, emb, deterministic)
        if ds in self.attention_resolutions:
          h = attn(mult * mc, f"up_{level}_attn_{i}")(h, context)
        if level and i == self.num_res_blocks:
          h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest, as F.interpolate x2
          h = conv(mult * mc, name=f"up_{level}_upsample")(h)
          ds //= 2

    h = GroupNorm(param_dtype=pdt, silu=True, name="out_norm")(h)
    out = conv(out_ch * p * p, zero_init=True, name="conv_out")(h)
    if p > 1:
      out = depth_to_space(out, p)
    return out.astype(jnp.float32)


# ---------------------------------------------------------------------------------------
# The original's state dict (ldm/rdm openaimodel.UNetModel keys, e.g. `input_blocks.1.1.
# transformer_blocks.0.attn2.to_k.weight`), for importing the published RDM checkpoints

# inside a ResBlock (in_layers = GroupNorm, SiLU, conv; emb_layers = SiLU, Linear;
# out_layers = GroupNorm, SiLU, Dropout, conv) and a transformer block (to_out = Linear,
# Dropout; ff.net = GEGLU(proj), Dropout, Linear)
_LDM_INNER = {
  "in_norm": "in_layers.0",
  "in_conv": "in_layers.2",
  "emb_proj": "emb_layers.1",
  "out_norm": "out_layers.0",
  "out_conv": "out_layers.3",
  "skip": "skip_connection",
  "to_out": "to_out.0",
}
_LDM_FF = {"proj_in": "net.0.proj", "proj_out": "net.2"}


def ldm_prefixes(model: UNet) -> dict[str, str]:
  """Our top-level module names -> the original's module paths (input_blocks / middle_block /
  output_blocks numbered as openaimodel.UNetModel builds them with use_spatial_transformer)."""
  p = {
    "time_embed_0": "time_embed.0",
    "time_embed_1": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "mid_res_0": "middle_block.0",
    "mid_attn": "middle_block.1",
    "mid_res_1": "middle_block.2",
    "out_norm": "out.0",
    "conv_out": "out.2",
  }
  levels, n, ds = len(model.channel_mult), 1, 1
  for level in range(levels):
    for i in range(model.num_res_blocks):
      p[f"down_{level}_res_{i}"], p[f"down_{level}_attn_{i}"] = (
        f"input_blocks.{n}.0",
        f"input_blocks.{n}.1",
      )
      n += 1
    if level != levels - 1:
      p[f"down_{level}_downsample"] = f"input_blocks.{n}.0.op"
      n, ds = n + 1, ds * 2
  m = 0
  for level in reversed(range(levels)):
    for i in range(model.num_res_blocks + 1):
      p[f"up_{level}_res_{i}"], p[f"up_{level}_attn_{i}"] = (
        f"output_blocks.{m}.0",
        f"output_blocks.{m}.1",
      )
      if level and i == model.num_res_blocks:  # Upsample comes after the block's attention, if any
        p[f"up_{level}_upsample"] = (
          f"output_blocks.{m}.{2 if ds in model.attention_resolutions else 1}.conv"
        )
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
        parts.append("transformer_blocks." + part[len("block_") :])
      else:
        parts.append(_LDM_FF[part] if parent == "ff" else _LDM_INNER.get(part, part))
    parts.append({"kernel": "weight", "scale": "weight"}.get(leaf, leaf))
    names[(top, *inner, leaf)] = ".".join(parts)
  return names
