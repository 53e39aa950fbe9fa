"""FSDP's gradients reduce-scattered: the loss under `jax.shard_map`, parameters all-gathered by hand.

Left to GSPMD, XLA chooses how the gradient of an fsdp-sharded parameter crosses the chips, and
it all-reduces some at full size (combined with the replicated parameters' all-reduce and sliced
afterwards: benchmarks/RESULTS.md, "conv=auto by measurement, the step on both ISAs, FSDP's
collectives"). Here the loss runs manual over the batch axes, as MaxText's and big_vision's FSDP
steps do: each parameter sharded over a batch axis is all-gathered where the step starts, and
the transpose of an all-gather is a reduce-scatter, so its gradient arrives as its shard
(summed over the chips) and never exists at full size. A parameter the batch axes do not shard
(norms, biases, dimensions the axis does not divide) gets the psum it needs. Other mesh axes
(tensor) stay with GSPMD inside.

A parameter the model only ever reads cast to the compute dtype (the kernels of a bf16 UNet) is
cast before its all-gather, as XLA does under GSPMD, so the gathers and the gradients'
reduce-scatters move bf16; one also read in float32 (RARM's embeddings) moves float32.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rdm_jax.jaxprs import sub_jaxprs
from rdm_jax.ops.manual_axes import vary_over
from rdm_jax.parallel.sharding import axes_of


def manual_spec(spec: P, manual: Sequence[str]) -> P:
  """`spec` with only the mesh axes in `manual` kept (shard_map's in/out specs name manual axes only)."""
  out = []
  for entry in spec:
    kept = tuple(a for a in axes_of(entry) if a in manual)
    out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return P(*out)


def _sharded(spec: P) -> bool:
  return any(axes_of(entry) for entry in spec)


def _gather(x: jax.Array, spec: P) -> jax.Array:
  """All-gathers the shards of `x` over the mesh axes of `spec`, each sharded dimension as a new
  leading dimension of its own: the transpose is then a reduce-scatter over a major dimension,
  which TPU's compiler keeps as one. Scattered in place over a tiled (minor) dimension whose
  shard is not a multiple of the tile (64 channels over 8 chips, 320 over 64), XLA turns a
  reduce-scatter into a full-size all-reduce and a slice."""
  for dim, entry in enumerate(spec):
    axes = axes_of(entry)
    if axes:
      y = jax.lax.all_gather(jnp.moveaxis(x, dim, 0)[None], axes if len(axes) > 1 else axes[0], axis=0, tiled=True)
      x = jnp.moveaxis(y.reshape((-1,) + y.shape[2:]), 0, dim)
  return x


def _only_cast_to(jaxpr, var, dtype) -> bool:
  """Whether every read of `var` in `jaxpr` (through calls whose operands map one to one onto
  their body's inputs: jit, remat, custom_vjp) is a cast to `dtype`."""
  if any(v is var for v in jaxpr.outvars):
    return False
  for eqn in jaxpr.eqns:
    places = [i for i, v in enumerate(eqn.invars) if v is var]
    if not places:
      continue
    if eqn.primitive.name == "convert_element_type":
      if np.dtype(eqn.params["new_dtype"]) != np.dtype(dtype):
        return False
      continue
    subs = sub_jaxprs(eqn)
    if len(subs) != 1 or len(subs[0].invars) != len(eqn.invars):
      return False
    if not all(_only_cast_to(subs[0], subs[0].invars[i], dtype) for i in places):
      return False
  return True


def cast_before_gather(apply_fn: Callable, params: Any, inputs: Sequence[Any], dtype: Any) -> Any:
  """A tree of bools like `params`: True where `apply_fn(params, *inputs)` reads the leaf only as
  a cast to `dtype` (so casting it before the all-gather changes nothing), by its jaxpr."""
  leaves, treedef = jax.tree.flatten(params)
  if np.dtype(dtype) == np.dtype(jnp.float32):
    return jax.tree.unflatten(treedef, [False] * len(leaves))
  closed = jax.make_jaxpr(lambda ps, *xs: apply_fn(jax.tree.unflatten(treedef, ps), *xs))(leaves, *inputs)
  jaxpr = closed.jaxpr
  return jax.tree.unflatten(treedef, [np.dtype(leaf.dtype) != np.dtype(dtype) and _only_cast_to(jaxpr, var, dtype)
                                      for leaf, var in zip(leaves, jaxpr.invars[:len(leaves)])])


def value_and_grad(loss_fn: Callable[..., jax.Array], mesh: Mesh, param_shardings: Any, batch_axes: Sequence[str],
                   cast: Any = None, dtype: Any = jnp.bfloat16) -> Callable[..., tuple[jax.Array, Any]]:
  """(params, *batch) -> (loss, grads) of the global batch, with `loss_fn(params, *local batch)`
  the mean loss of one device's rows. The batch arrays are split over `batch_axes` on their
  first dimension; `param_shardings` (NamedShardings like `params`) say which parameters those
  axes shard, and those are all-gathered (cast to `dtype` first where `cast`, a tree of bools,
  says so) and their gradients reduce-scattered. The gradients come back sharded as the
  parameters are. Replicated parameters are not cast: their gradients are summed in float32."""
  manual = tuple(batch_axes)
  is_sharding = lambda s: isinstance(s, NamedSharding)  # noqa: E731
  specs = jax.tree.map(lambda s: manual_spec(s.spec, manual), param_shardings, is_leaf=is_sharding)
  if cast is None or mesh.devices.flat[0].platform == "cpu":
    # XLA:CPU (jaxlib 0.10.2) aborts compiling a bf16 reduce-scatter ("Invalid binary
    # instruction opcode copy"); CPU meshes gather and reduce in the parameters' dtype
    cast = jax.tree.map(lambda _: False, specs, is_leaf=lambda s: isinstance(s, P))
  devices = int(np.prod([mesh.shape[a] for a in manual]))
  batch_spec = P(manual if len(manual) > 1 else manual[0])

  def local(params, *batch):
    def mean_loss(params):
      # varying over every batch axis before the gather: the transpose sums each shard over the
      # axes that do not shard it (data) and reduce-scatters it over those that do (fsdp)
      full = jax.tree.map(lambda p, spec, c: _gather(vary_over(p.astype(dtype) if c and _sharded(spec) else p, manual),
                                                     spec), params, specs, cast, is_leaf=lambda s: isinstance(s, P))
      return loss_fn(full, *batch) / devices

    loss, grads = jax.value_and_grad(mean_loss)(params)
    return jax.lax.psum(loss, manual), grads

  def run(params, *batch):
    return jax.shard_map(local, mesh=mesh, in_specs=(specs,) + (batch_spec,) * len(batch), out_specs=(P(), specs),
                         axis_names=set(manual))(params, *batch)

  return run
