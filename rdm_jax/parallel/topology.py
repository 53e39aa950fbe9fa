"""TPU slices by the names users book them under (v5e-64, v4-8, v5p-128, v6e-256), as compile-only
device sets: `jax.experimental.topologies` with libtpu compiles for a slice on any host.

Names follow Cloud TPU's accelerator types: the number counts chips for v5e / v6e and
TensorCores for v4 / v5p (two per chip, one "megacore" device). Chip figures are the public
per-chip specifications (HBM, dense bf16 peak).
"""

from __future__ import annotations

import dataclasses
import os
import re

from rdm_jax.errors import fail


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str  # the device_kind libtpu reports
  hbm_gib: float  # HBM per chip
  bf16_tflops: float  # dense bf16 peak per chip
  cores_per_chip: int  # 2: the accelerator name counts TensorCores (v4, v5p)
  topology_prefix: str  # libtpu's topology name prefix
  dims: int  # 2-D (v5e, v6e) or 3-D torus (v4, v5p)


CHIPS = {
  "v4": Chip("TPU v4", 32, 275, 2, "v4", 3),
  "v5p": Chip("TPU v5", 95, 459, 2, "v5", 3),
  "v5e": Chip("TPU v5 lite", 16, 197, 1, "v5e", 2),
  "v6e": Chip("TPU v6 lite", 32, 918, 1, "v6e", 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as given, e.g. "v5e-64"
  chip_name: str  # "v5e"
  chip: Chip
  chips: int
  shape: tuple[int, ...]

  @property
  def topology_name(self) -> str:
    return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"


def _shape(chips: int, dims: int) -> tuple[int, ...]:
  """The slice's chip grid: powers of two, split as evenly as possible, smallest first
  (64 chips -> 8x8 in 2-D, 4x4x4 in 3-D; 32 -> 4x8, 2x4x4; 4 -> 2x2, 2x2x1)."""
  if chips < 1 or chips & (chips - 1):
    fail(f"{chips} chips: slices here are powers of two (v5e-16, v5e-64, v4-32, ...)")
  exponent = chips.bit_length() - 1
  parts = [exponent // dims + (1 if i < exponent % dims else 0) for i in range(dims)]
  shape = sorted(2**p for p in parts)
  if dims == 3 and chips == 4:
    shape = [2, 2, 1]
  return tuple(shape)


def parse(name: str) -> Slice:
  """ "v5e-64" / "v4-8" / "v5p-128" / "v6e-256" (or "v5litepod-64") -> the slice and its chip
  grid."""
  m = re.fullmatch(r"(v\d+[a-z]*|trillium)-(\d+)", name.strip().lower())
  if not m:
    fail(f"--topology={name!r}: give an accelerator type such as v5e-64, v4-8, v5p-128 or v6e-256")
  chip_name = _ALIASES.get(m.group(1), m.group(1))
  if chip_name not in CHIPS:
    fail(f"--topology={name!r}: unknown TPU generation {m.group(1)!r}; known: {', '.join(CHIPS)}")
  chip = CHIPS[chip_name]
  count = int(m.group(2))
  if count % chip.cores_per_chip:
    fail(
      f"--topology={name!r}: {chip_name} slices count TensorCores, {chip.cores_per_chip} per chip"
    )
  chips = count // chip.cores_per_chip
  return Slice(name, chip_name, chip, chips, _shape(chips, chip.dims))


def devices(s: Slice) -> list:
  """Compile-only devices of the slice (one per chip), from libtpu; UserError naming the install
  when libtpu is missing."""
  # Compiling touches no TPU: let this process load libtpu beside another one (its lock file
  # otherwise allows one libtpu process per host) and keep JAX's runtime backend on the host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  try:
    import libtpu  # noqa: F401
  except ImportError:
    fail(
      "compiling for TPU needs libtpu: pip install -e '.[tpu]' (or pip install "
      '"jax[tpu]==$(python -c '
      "'import jax; print(jax.__version__)')\")"
    )
  from jax.experimental import topologies

  kwargs = dict(
    chip_config_name="megacore" if s.chip.cores_per_chip == 2 else "default",
    chips_per_host_bounds=(2, 2, 1) if s.chips >= 4 else (1, 1, 1),
    num_slices=1,
    wrap=tuple(d >= (16 if s.chip.dims == 2 else 4) and s.chips >= 64 for d in s.shape)
    + ((False,) if s.chip.dims == 2 else ()),
  )
  if s.chip.dims == 2 and s.chips == 8:
    kwargs["chips_per_host_bounds"] = (2, 4, 1)  # v5e-8 / v6e-8: one host of 8 chips
  topo = topologies.get_topology_desc(platform="tpu", topology_name=s.topology_name, **kwargs)
  found = list(topo.devices)
  if len(found) != s.chips:
    fail(f"libtpu made {len(found)} devices for {s.name} ({s.topology_name}), expected {s.chips}")
  return found
