"""Device mesh from the config: named axes (data / fsdp / tensor), -1 for "the rest"."""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from rdm_jax.errors import fail


def resolve_axis_sizes(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills in the one -1 axis so the product equals `num_devices`; validates the rest."""
  sizes = dict(axes)
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    fail(f"config.mesh has more than one -1 axis ({free}); give all but one a size")
  for name, size in sizes.items():
    if size != -1 and size < 1:
      fail(f"config.mesh.{name}={size}: axis sizes are positive, or -1 for the rest")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if num_devices % fixed:
      fail(f"config.mesh {dict(axes)} does not divide {num_devices} devices: the fixed axes multiply "
           f"to {fixed}; choose sizes whose product divides {num_devices}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    fail(f"config.mesh {dict(axes)} has {fixed} devices but {num_devices} are available; "
         f"set one axis to -1 or make the product {num_devices}")
  return sizes


def make_mesh(axes: Mapping[str, int], devices=None) -> Mesh:
  """A Mesh with Auto axis types (Explicit axes reject sharded contractions, see STACK_NOTES)."""
  devices = jax.devices() if devices is None else devices
  sizes = resolve_axis_sizes(axes, len(devices))
  names = tuple(sizes)
  return jax.make_mesh(tuple(sizes[n] for n in names), names,
                       axis_types=(AxisType.Auto,) * len(names), devices=devices)
