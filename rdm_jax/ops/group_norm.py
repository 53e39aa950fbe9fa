"""GroupNorm, optionally followed by SiLU, with a hand-written gradient.

The UNet applies `silu(group_norm(x))` about 25 times per step. Differentiated by JAX, each
becomes several passes over the activation in the forward pass (the normalised value, the
sigmoid and the product are kept for the backward pass, each fusion recomputing the
normalisation and its exponential) and more in the backward pass. Here the forward pass keeps
only its input and [B, C] statistics, and the backward pass is one reduction (per-channel sums
of dy and dy * (x - mean)) and one elementwise pass, dx = A dy + B (x - mean) + C with [B, C]
coefficients (the textbook GroupNorm gradient, rearranged). Measured on the train steps of
benchmarks/train_throughput.py in benchmarks/RESULTS.md. (flax's LayerNorm, differentiated by
JAX, is as fast as a hand-written gradient here, so the transformer blocks keep it.)

Statistics are float32 whatever x's dtype, mean and variance in two passes (as torch's
GroupNorm: no E[x^2] - E[x]^2 cancellation); the result has x's dtype. They are reduced per
channel over the spatial axes first, then per group: XLA's CPU backend reduces over adjacent
axes far faster than over the two non-adjacent axes of a [B, HW, G, C/G] view
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from rdm_jax.ops.manual_axes import vary_like


def group_norm(
  x: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  num_groups: int = 32,
  eps: float = 1e-5,
  silu: bool = False,
) -> jax.Array:
  """y = (x - mean_g) / sqrt(var_g + eps) * scale + bias over [B, spatial..., C] with C split into
  `num_groups` groups (biased variance over the spatial axes and the group's channels), then
  y * sigmoid(y) if `silu`. scale, bias: [C]."""
  c = x.shape[-1]
  if x.ndim < 3 or c % num_groups:
    raise ValueError(
      f"group_norm: x {x.shape} must be [B, spatial..., C] with C divisible by {num_groups} groups"
    )
  return _group_norm(
    num_groups, float(eps), bool(silu), x, vary_like(scale, x), vary_like(bias, x)
  )  # (shard_map)


def _per_channel(v: jax.Array, ndim: int) -> jax.Array:
  """[B, C] -> [B, 1, ..., 1, C] against an ndim-dimensional activation."""
  return v.reshape((v.shape[0],) + (1,) * (ndim - 2) + (v.shape[1],))


def _to_channels(v: jax.Array, channels: int) -> jax.Array:
  """[B, G] per-group values -> [B, C], each group's value on its channels.

  On CPU a matmul with a 0/1 matrix (exact), which XLA:CPU runs as its own op: the repeat's
  index arithmetic would otherwise be fused into every full-size loop that reads the result
  and slow each of them down. Elsewhere the repeat, which fuses well on TPU and GPU."""
  groups = v.shape[-1]

  def by_matmul(v):
    one_hot = jnp.repeat(jnp.eye(groups, dtype=v.dtype), channels // groups, axis=1)
    return jnp.dot(v, one_hot, precision=jax.lax.Precision.HIGHEST)

  return jax.lax.platform_dependent(
    v, cpu=by_matmul, default=lambda v: jnp.repeat(v, channels // groups, axis=-1)
  )


def _group_mean(v: jax.Array, groups: int) -> jax.Array:
  """[B, C] per-channel values -> their group means repeated over each group's channels, [B, C]."""
  b, c = v.shape
  return _to_channels(v.reshape(b, groups, c // groups).mean(-1), c)


def _stats(x32: jax.Array, groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
  """Group mean and 1/std, each repeated per channel: [B, C] and [B, C]."""
  spatial = tuple(range(1, x32.ndim - 1))
  mean = _group_mean(x32.mean(axis=spatial), groups)
  var = _group_mean(jnp.square(x32 - _per_channel(mean, x32.ndim)).mean(axis=spatial), groups)
  return mean, jax.lax.rsqrt(var + eps)


def _forward(groups: int, eps: float, silu: bool, x: jax.Array, scale: jax.Array, bias: jax.Array):
  x32 = x.astype(jnp.float32)
  mean, rstd = _stats(x32, groups, eps)
  a = rstd * scale.astype(jnp.float32)
  shift = bias.astype(jnp.float32) - mean * a
  y = x32 * _per_channel(a, x.ndim) + _per_channel(shift, x.ndim)
  out = y * jax.nn.sigmoid(y) if silu else y
  return out.astype(x.dtype), (x, scale, bias, mean, rstd, a, shift)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _group_norm(
  groups: int, eps: float, silu: bool, x: jax.Array, scale: jax.Array, bias: jax.Array
) -> jax.Array:
  return _forward(groups, eps, silu, x, scale, bias)[0]


def _backward(groups: int, eps: float, silu: bool, res, d_out: jax.Array):
  """With xhat = (x - mean) rstd and g = dy * scale (dy: the cotangent of the norm's output):
  dx = rstd (g - mean_group(g) - xhat mean_group(g xhat)), d_scale = sum dy xhat, d_bias = sum dy;
  as dx = A dy + B (x - mean) + C with [B, C] coefficients."""
  del eps
  x, scale, bias, mean, rstd, a, shift = res
  nd = x.ndim
  spatial = tuple(range(1, nd - 1))
  x32 = x.astype(jnp.float32)

  dy = d_out.astype(jnp.float32)  # the cotangent of the norm's output
  if silu:
    y = x32 * _per_channel(a, nd) + _per_channel(shift, nd)
    # sigmoid(y) written as (1 + tanh(y / 2)) / 2: were it the forward's expression, XLA would
    # merge the two and keep the forward's sigmoid for this pass, one more full-size array
    # written and read.
    s = 0.5 * jnp.tanh(0.5 * y) + 0.5
    dy = dy * s * (1.0 + y * (1.0 - s))
  centered = x32 - _per_channel(mean, nd)  # (not x alone: no cancellation when |mean| >> std)
  s1 = dy.sum(axis=spatial)  # [B, C]: sum dy
  sx = (dy * centered).sum(axis=spatial) * rstd  # [B, C]: sum dy xhat
  scale32 = scale.astype(jnp.float32)
  hw = math.prod(x.shape[1:-1])
  m1 = _group_mean(scale32 * s1, groups) / hw  # [B, C]: mean_group(g)
  m2 = _group_mean(scale32 * sx, groups) / hw  # [B, C]: mean_group(g xhat)
  coef_dy = rstd * scale32
  coef_x = -rstd * rstd * m2
  coef_1 = -rstd * m1
  dx = (
    dy * _per_channel(coef_dy, nd) + centered * _per_channel(coef_x, nd) + _per_channel(coef_1, nd)
  )
  return dx.astype(x.dtype), sx.sum(0).astype(scale.dtype), s1.sum(0).astype(bias.dtype)


_group_norm.defvjp(_forward, _backward)
