"""Device mesh from the config: named axes (data / fsdp / tensor), -1 for "the rest"."""

from __future__ import annotations

import os
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
      fail(
        f"config.mesh {dict(axes)} does not divide {num_devices} devices: the fixed axes multiply "
        f"to {fixed}; choose sizes whose product divides {num_devices}"
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    fail(
      f"config.mesh {dict(axes)} has {fixed} devices but {num_devices} are available; "
      f"set one axis to -1 or make the product {num_devices}"
    )
  return sizes


AXES = ("data", "fsdp", "tensor")  # config.mesh's axis sizes; its other fields tune the step


def from_config(config, devices=None) -> Mesh:
  """The mesh of `config.mesh`'s axis sizes over `devices` (default: all)."""
  return make_mesh({a: config.mesh[a] for a in AXES}, devices)


def make_mesh(axes: Mapping[str, int], devices=None) -> Mesh:
  """A Mesh with Auto axis types (Explicit axes reject sharded contractions, see STACK_NOTES)."""
  devices = jax.devices() if devices is None else devices
  sizes = resolve_axis_sizes(axes, len(devices))
  names = tuple(sizes)
  return jax.make_mesh(
    tuple(sizes[n] for n in names), names, axis_types=(AxisType.Auto,) * len(names), devices=devices
  )


# Debian's libtcmalloc-minimal4, which the Makefile preloads for every job and test
TCMALLOC = f"/usr/lib/{os.uname().machine}-linux-gnu/libtcmalloc_minimal.so.4"


def tcmalloc_loaded() -> bool | None:
  """Whether this process runs on tcmalloc (LD_PRELOAD); None where /proc/self/maps is missing."""
  try:
    with open("/proc/self/maps") as f:
      return "libtcmalloc" in f.read()
  except OSError:
    return None


def check_platform(config, devices=None, training: bool = True) -> tuple[str, list[str]]:
  """(a line naming the platform, device kind and count, processes and jax version; warnings
  about the config on this platform). A lever that cannot run here is a UserError. `training`
  False (the sample and context-ablation jobs, `jobs.cli.check_platform`): no warnings about what
  only a train step pays for (the allocator's per-step buffer, rematerialisation)."""
  devices = jax.devices() if devices is None else devices
  platform = devices[0].platform
  line = (
    f"platform {platform}: {len(devices)} x {devices[0].device_kind} over {jax.process_count()} "
    f"process(es), jax {jax.__version__}"
  )
  warnings = []
  model_cfg = config.model
  if platform == "cpu" and "bfloat16" in (
    model_cfg.dtype,
    model_cfg.param_dtype,
  ):
    warnings.append(
      "config.model asks for bfloat16 on CPU, where it is emulated and slower than float32; "
      "--config.model.dtype=float32 for CPU runs"
    )
  if model_cfg.attention == "flash" and platform != "tpu":
    fail(
      f"config.model.attention='flash' is the Pallas TPU kernel, and this is {platform}; use "
      "--config.model.attention="
      + ("cudnn (cuDNN's flash attention)" if platform == "gpu" else "dot_product")
    )
  if model_cfg.attention == "cudnn" and platform != "gpu":
    fail(
      "config.model.attention='cudnn' is cuDNN's flash attention on NVIDIA GPUs, and this is "
      f"{platform}; use --config.model.attention="
      + ("flash (the Pallas TPU kernel)" if platform == "tpu" else "dot_product")
    )
  if training and platform == "cpu" and tcmalloc_loaded() is False:
    warnings.append(
      "glibc malloc: XLA:CPU maps and zeroes a fresh temporary buffer every step (about a "
      f"quarter of a train step's CPU time); run with LD_PRELOAD={TCMALLOC} (Debian's "
      "libtcmalloc-minimal4; `make demo` and `make test` do)"
    )
  if training and model_cfg.remat != "none" and platform == "cpu":
    warnings.append(
      f"config.model.remat={model_cfg.remat!r} trades compute for accelerator memory; on CPU it "
      "only slows training (--config.model.remat=none)"
    )
  return line, warnings
