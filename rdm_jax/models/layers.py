"""The layers the networks share (the UNet, the LDM autoencoders, the RARM transformer): convs,
dense layers and GroupNorm whose parameters carry logical axis names for the sharding rules
(config.sharding_rules), and the LDM blocks' GEGLU feed-forward."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from rdm_jax.ops import group_norm as group_norm_lib, onednn

Dtype = Any


_default_kernel_init = nn.initializers.lecun_normal()


_zeros = nn.initializers.zeros_init()


def logical_kernel_init(names: tuple[str | None, ...], init=_default_kernel_init):
  """`init` for a kernel whose axes carry the logical names `names` (the sharding rules' keys)."""
  return nn.with_logical_partitioning(init, names)


def logical_bias_init(init=_zeros):
  """`init` for a bias or norm scale, replicated (logical axis "norm")."""
  return nn.with_logical_partitioning(init, ("norm",))


class GroupNorm(nn.Module):
  """GroupNorm32 of the original: statistics in float32, 32 groups, x: [B, ..., C]; with
  `silu`, SiLU of the result (the original's nn.Sequential(normalization(ch), nn.SiLU())) in
  the same op. rdm_jax.ops.group_norm computes it, with a gradient that keeps only x."""

  eps: float = 1e-5
  num_groups: int = 32
  param_dtype: Dtype = jnp.float32
  silu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param(
      "scale", logical_bias_init(nn.initializers.ones_init()), (c,), self.param_dtype
    )
    bias = self.param("bias", logical_bias_init(), (c,), self.param_dtype)
    return group_norm_lib.group_norm(x, scale, bias, self.num_groups, self.eps, self.silu)


def _conv_function(impl: Any) -> Callable | None:
  if impl == "xla":
    return None
  if impl == "onednn":
    return onednn.conv_general_dilated
  return functools.partial(onednn.conv_general_dilated_where, frozenset(impl))


def Conv(
  features: int,
  kernel_size: int = 3,
  stride: int = 1,
  zero_init: bool = False,
  dtype: Dtype = jnp.float32,
  name: str | None = None,
  padding: Any = None,
  param_dtype: Dtype = jnp.float32,
  impl: Any = "xla",
) -> nn.Conv:
  """2-D conv with logical axis names; torch-style symmetric padding (k // 2) unless given.
  impl "onednn" runs it through `rdm_jax.ops.onednn` (same parameters, CPU only); a frozenset of
  geometries (`onednn.signature`) runs those on oneDNN and the rest on XLA."""
  p = kernel_size // 2
  return nn.Conv(
    features,
    (kernel_size,) * 2,
    strides=(stride,) * 2,
    padding=padding or ((p, p), (p, p)),
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    conv_general_dilated=_conv_function(impl),
    kernel_init=logical_kernel_init(
      (None, None, "conv_in", "conv_out"), _zeros if zero_init else _default_kernel_init
    ),
    bias_init=logical_bias_init(),
  )


def Dense(
  features: int,
  names: tuple[str | None, str | None] = ("embed", "mlp"),
  use_bias: bool = True,
  dtype: Dtype = jnp.float32,
  name: str | None = None,
  param_dtype: Dtype = jnp.float32,
) -> nn.Dense:
  """Dense layer whose kernel carries the logical axis names `names`."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    kernel_init=logical_kernel_init(names),
    bias_init=logical_bias_init(),
  )


class GEGLUFeedForward(nn.Module):
  """FeedForward(glu=True): Linear(c, 2*4c) -> a * gelu(gate) -> Linear(4c, c)."""

  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    inner = x.shape[-1] * self.mult
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(2 * inner, ("embed", "mlp"), name="proj_in")(x)
    a, gate = jnp.split(h, 2, axis=-1)
    h = a * nn.gelu(gate, approximate=False)
    return dense(x.shape[-1], ("mlp", "embed"), name="proj_out")(h)
