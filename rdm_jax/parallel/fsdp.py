"""FSDP's gradients reduce-scattered: the loss under `jax.shard_map`,
parameters all-gathered by hand.

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

from rdm_jax.errors import fail
from rdm_jax.jaxprs import sub_jaxprs
from rdm_jax.ops.manual_axes import vary_over
from rdm_jax.parallel import hlo
from rdm_jax.parallel.sharding import axes_of


def _respec(spec: P, axes_for: Callable[[str], tuple[str, ...]]) -> P:
  """`spec` with each mesh axis replaced by the axes `axes_for` gives it (none: dropped)."""
  out = []
  for entry in spec:
    axes = tuple(a for b in axes_of(entry) for a in axes_for(b))
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def manual_spec(spec: P, manual: Sequence[str]) -> P:
  """`spec` with only the mesh axes in `manual` kept (shard_map's in/out specs name manual axes
  only)."""
  return _respec(spec, lambda a: (a,) if a in manual else ())


def _sharded(spec: P) -> bool:
  return any(axes_of(entry) for entry in spec)


def _gather(x: jax.Array, spec: P) -> jax.Array:
  """All-gathers the shards of `x` over the mesh axes of `spec`, each sharded dimension as new
  leading dimensions: the transpose is then a reduce-scatter over a major dimension, which TPU's
  compiler keeps as one. Scattered in place over a tiled (minor) dimension whose shard is not a
  multiple of the tile (64 channels over 8 chips, 320 over 64), XLA turns a reduce-scatter into
  a full-size all-reduce and a slice. A dimension sharded over several axes is gathered one axis
  at a time, the minor one first, so that the backward pass reduce-scatters the full gradient
  across the major axis's groups first (see `split_mesh`)."""
  for dim, entry in enumerate(spec):
    axes = axes_of(entry)
    if not axes:
      continue
    y = jnp.moveaxis(x, dim, 0)
    for axis in reversed(axes):  # leading dimensions (axes[0], ..., axes[-1]) after the loop
      y = jax.lax.all_gather(y[None], axis, axis=0, tiled=True)
    x = jnp.moveaxis(y.reshape((-1,) + y.shape[len(axes) + 1 :]), 0, dim)
  return x


def split_mesh(mesh: Mesh, axis: str, outer: int) -> tuple[Mesh, tuple[str, str]]:
  """`mesh` with `axis` split in place into (`axis`_outer of `outer` devices, `axis`_inner): the
  same devices in the same order, so P(axis) on `mesh` and P((outer, inner)) on the split mesh
  place every shard alike, and a gather over both axes runs in two stages. TPU's compiler lowers
  a reduce-scatter over every chip of a square slice (v5e-16, v5e-64, v4-128) as a full-size
  all-reduce and a slice; in two stages over parts of the slice it keeps reduce-scatters."""
  i = mesh.axis_names.index(axis)
  shape = mesh.devices.shape
  if outer < 1 or shape[i] % outer:
    fail(f"--config.mesh.fsdp_outer={outer}: it must divide the fsdp axis ({shape[i]} devices)")
  names = (f"{axis}_outer", f"{axis}_inner")
  devices = mesh.devices.reshape(shape[:i] + (outer, shape[i] // outer) + shape[i + 1 :])
  types = mesh.axis_types[:i] + (mesh.axis_types[i],) * 2 + mesh.axis_types[i + 1 :]
  return Mesh(
    devices, mesh.axis_names[:i] + names + mesh.axis_names[i + 1 :], axis_types=types
  ), names


def _split(
  mesh: Mesh, manual: tuple, specs: Any, split: tuple[str, int] | None
) -> tuple[Mesh, tuple, Any]:
  """(mesh, manual axes, manual specs) with `split` = (axis, outer) applied (`split_mesh`)."""
  if split is None or split[1] <= 1:
    return mesh, manual, specs
  mesh, names = split_mesh(mesh, *split)
  axes_for = lambda a: names if a == split[0] else (a,)
  manual = tuple(a for b in manual for a in axes_for(b))
  return (
    mesh,
    manual,
    jax.tree.map(lambda s: _respec(s, axes_for), specs, is_leaf=lambda s: isinstance(s, P)),
  )


def _gathered(p: jax.Array, spec: P, cast: bool, dtype: Any, manual: tuple) -> jax.Array:
  """One parameter as the step reads it: cast to `dtype` (where `cast` and sharded), varying
  over every manual axis (the transpose sums each shard over the axes that do not shard it and
  reduce-scatters it over those that do), gathered over `spec`'s axes."""
  return _gather(vary_over(p.astype(dtype) if cast and _sharded(spec) else p, manual), spec)


def all_reduce_bytes(
  mesh: Mesh,
  batch_axes: Sequence[str],
  param_shardings: Any,
  params: Any,
  cast: Any,
  dtype: Any,
  split: tuple[str, int] | None = None,
) -> int:
  """Bytes per device that the compiled gradients of the step's gathers alone all-reduce, with
  `split` applied: one parameter of each (shape, dtype, sharding, cast) the batch axes shard,
  gathered as `value_and_grad` gathers it (`params` abstract). The replicated parameters' sums
  are left out: they are the same at every split."""
  manual = tuple(batch_axes)
  is_sharding = lambda s: isinstance(s, NamedSharding)
  kinds = {
    (tuple(p.shape), jnp.dtype(p.dtype).name, spec, bool(c)): None
    for p, s, c in zip(
      jax.tree.leaves(params),
      jax.tree.leaves(param_shardings, is_leaf=is_sharding),
      jax.tree.leaves(cast),
    )
    if _sharded(spec := manual_spec(s.spec, manual))
  }
  specs = [k[2] for k in kinds]
  mesh, manual, specs = _split(mesh, manual, specs, split)

  def local(xs, weights):
    def total(xs):
      return sum(
        jnp.sum(_gathered(x, s, k[3], dtype, manual).astype(jnp.float32) * w)
        for x, s, k, w in zip(xs, specs, kinds, weights)
      )

    return jax.grad(total)(xs)

  xs = [
    jax.ShapeDtypeStruct(k[0], k[1], sharding=NamedSharding(mesh, s)) for k, s in zip(kinds, specs)
  ]
  ws = [jax.ShapeDtypeStruct(k[0], jnp.float32, sharding=NamedSharding(mesh, P())) for k in kinds]
  run = jax.shard_map(
    local, mesh=mesh, in_specs=(specs, P()), out_specs=specs, axis_names=set(manual)
  )
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    found = hlo.collectives(jax.jit(run).lower(xs, ws).compile().as_text())
  return found.get("all-reduce", {}).get("bytes", 0)


def choose_outer(
  mesh: Mesh,
  batch_axes: Sequence[str],
  param_shardings: Any,
  params: Any,
  cast: Any,
  dtype: Any,
  axis: str = "fsdp",
) -> int:
  """How many groups of `axis` FSDP's gathers run over (1: one gather over the whole axis;
  `split_mesh`), chosen by compiling the gradients of the gathers alone for each power-of-two
  split and taking the one that all-reduces the fewest bytes (the fewest groups among equals).
  Where one stage all-reduces nothing, that is all compiled."""
  n = mesh.shape[axis]
  best, best_bytes, outer = (
    1,
    all_reduce_bytes(mesh, batch_axes, param_shardings, params, cast, dtype),
    2,
  )
  while best_bytes and outer < n:
    if n % outer == 0:
      got = all_reduce_bytes(mesh, batch_axes, param_shardings, params, cast, dtype, (axis, outer))
      if got < best_bytes:
        best, best_bytes = outer, got
    outer *= 2
  return best


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
  closed = jax.make_jaxpr(lambda ps, *xs: apply_fn(jax.tree.unflatten(treedef, ps), *xs))(
    leaves, *inputs
  )
  jaxpr = closed.jaxpr
  return jax.tree.unflatten(
    treedef,
    [
      np.dtype(leaf.dtype) != np.dtype(dtype) and _only_cast_to(jaxpr, var, dtype)
      for leaf, var in zip(leaves, jaxpr.invars[: len(leaves)])
    ],
  )


def value_and_grad(
  loss_fn: Callable[..., jax.Array],
  mesh: Mesh,
  param_shardings: Any,
  batch_axes: Sequence[str],
  cast: Any = None,
  dtype: Any = jnp.bfloat16,
  split: tuple[str, int] | None = None,
) -> Callable[..., tuple[jax.Array, Any]]:
  """(params, *batch) -> (loss, grads) of the global batch, with `loss_fn(params, *local batch)`
  the mean loss of one device's rows. The batch arrays are split over `batch_axes` on their
  first dimension; `param_shardings` (NamedShardings like `params`) say which parameters those
  axes shard, and those are all-gathered (cast to `dtype` first where `cast`, a tree of bools,
  says so) and their gradients reduce-scattered. The gradients come back sharded as the
  parameters are. Replicated parameters are not cast: their gradients are summed in float32.
  `split` = (axis, outer) gathers over that batch axis in two stages (`split_mesh`)."""
  manual = tuple(batch_axes)
  is_sharding = lambda s: isinstance(s, NamedSharding)
  specs = jax.tree.map(lambda s: manual_spec(s.spec, manual), param_shardings, is_leaf=is_sharding)
  if cast is None or mesh.devices.flat[0].platform == "cpu":
    # XLA:CPU (jaxlib 0.10.2) aborts compiling a bf16 reduce-scatter ("Invalid binary
    # instruction opcode copy"); CPU meshes gather and reduce in the parameters' dtype
    cast = jax.tree.map(lambda _: False, specs, is_leaf=lambda s: isinstance(s, P))
  mesh, manual, specs = _split(mesh, manual, specs, split)
  devices = int(np.prod([mesh.shape[a] for a in manual]))
  batch_spec = P(manual if len(manual) > 1 else manual[0])

  def local(params, *batch):
    def mean_loss(params):
      full = jax.tree.map(
        lambda p, spec, c: _gathered(p, spec, c, dtype, manual),
        params,
        specs,
        cast,
        is_leaf=lambda s: isinstance(s, P),
      )
      return loss_fn(full, *batch) / devices

    loss, grads = jax.value_and_grad(mean_loss)(params)
    return jax.lax.psum(loss, manual), grads

  def run(params, *batch):
    with jax.sharding.use_abstract_mesh(
      mesh.abstract_mesh
    ):  # the split mesh, where the caller's is set
      return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(specs,) + (batch_spec,) * len(batch),
        out_specs=(P(), specs),
        axis_names=set(manual),
      )(params, *batch)

  return run
