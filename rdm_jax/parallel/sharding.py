"""Logical-axis sharding: parameters name their axes, the config maps names to mesh axes.

`config.sharding_rules` is a list of (logical name, mesh axis or axes or None). Changing
pure data parallelism into FSDP or tensor parallelism is a change of `config.mesh` and
these rules, not of model code. A dimension whose size the mapped mesh axes do not divide
stays replicated (e.g. a conv with 1 input channel under fsdp=2), as big_vision's fsdp does.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]


def axes_of(entry: Any) -> tuple:
  """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names) as a tuple."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _axis_size(mesh: Mesh, axis: Any) -> int:
  size = 1
  for a in axes_of(axis):
    size *= mesh.shape[a]
  return size


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide evenly."""
  fitted = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    fitted.append(axis if dim % _axis_size(mesh, axis) == 0 else None)
  return P(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`) abstract values.

  Leaves without logical names are replicated. The result has the tree structure of
  `nn.meta.unbox(abstract_tree)`.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  unboxed = nn.meta.unbox(abstract_tree)
  return jax.tree.map(
    lambda spec, leaf: NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh)),
    mesh_specs,
    unboxed,
    is_leaf=lambda x: isinstance(x, P),
  )


def batch_devices(mesh: Mesh, rules: Rules) -> int:
  """How many devices the 'batch' rule's mesh axes span (a batch splits into that many parts)."""
  return _axis_size(mesh, dict((k, v) for k, v in rules).get("batch"))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Shards the leading (batch) dimension over the axes the 'batch' rule names."""
  axes = dict((k, v) for k, v in rules).get("batch")
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def put_batch(mesh: Mesh, rules, *local_arrays):
  """Process-local numpy batches -> global jax.Arrays sharded over the batch axes."""
  return tuple(
    jax.make_array_from_process_local_data(batch_sharding(mesh, rules, a.ndim), a)
    for a in local_arrays
  )
