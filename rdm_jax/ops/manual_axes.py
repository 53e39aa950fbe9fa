"""Custom gradients inside `jax.shard_map`: values typed varying over the manual mesh axes.

Under shard_map (FSDP's explicit gradient, rdm_jax/parallel/fsdp.py) every value carries the
set of manual axes it varies over. A custom_vjp's backward must return cotangents of its
inputs' types, and an FFI call's outputs carry no such type; these casts make both agree (the
transpose of a cast to varying is the psum a replicated input's gradient needs).
"""

from __future__ import annotations

import jax


def varying_axes(x: jax.Array) -> frozenset:
  """The manual mesh axes `x` varies over (empty outside shard_map)."""
  return frozenset(jax.typeof(x).manual_axis_type.varying)


def vary_over(v: jax.Array, axes) -> jax.Array:
  """`v` cast to varying over the manual mesh `axes` it does not vary over yet."""
  missing = tuple(sorted(frozenset(axes) - varying_axes(v)))
  return jax.lax.pcast(v, missing, to="varying") if missing else v


def vary_like(v: jax.Array, *refs: jax.Array) -> jax.Array:
  """`v` cast to varying over the manual axes any of `refs` varies over."""
  return vary_over(v, frozenset().union(*(varying_axes(r) for r in refs)))
