"""Ahead-of-time compilation of the train and sampling steps for a device set that is not here
(a TPU slice from `topology`), and what the compiled programs say: memory per chip against
HBM, FLOPs (the compiler's and the model's), collectives by kind and bytes, compile time.

The programs are the ones `rdm_jax.train` runs: the same `train_step.setup_training` builds the
model, the abstract state, its shardings and the jitted step; only the devices differ.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax import config_base, train_step
from rdm_jax.diffusion import ddim, schedule as schedule_lib
from rdm_jax.errors import fail
from rdm_jax.parallel import flops as flops_lib, hlo, mesh as mesh_lib, sharding, topology
from rdm_jax.models import factory

GIB = 1024**3


def _one_line(e: Exception) -> str:
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  return lines[0] if lines else type(e).__name__


def _is_oom(message: str) -> bool:
  return (
    "RESOURCE_EXHAUSTED" in message
    or "out of memory" in message.lower()
    or "Ran out of memory" in message
  )


def _memory(compiled, hbm_bytes: float) -> dict[str, Any]:
  m = compiled.memory_analysis()
  total = (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )
  return {
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
    "generated_code_bytes": int(m.generated_code_size_in_bytes),
    "total_bytes": int(total),
    "hbm_bytes": int(hbm_bytes),
    "fits": bool(total <= hbm_bytes),
  }


def _compile(fn, args, mesh, hbm_bytes: float) -> dict[str, Any]:
  """Lowers and compiles fn(*args) under `mesh`; the report, or {"fits": False, "error"} when the
  compiler runs out of memory."""
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = fn.lower(*args)
    try:
      compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001  XLA's errors are JaxRuntimeError / XlaRuntimeError
      message = _one_line(e)
      if not _is_oom(str(e)):
        raise
      return {
        "fits": False,
        "error": message,
        "compile_seconds": round(time.perf_counter() - t0, 1),
      }
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
    "fits": True,
    "memory": _memory(compiled, hbm_bytes),
    "compiler_flops_per_chip": float(cost.get("flops", float("nan"))),
    "collectives": hlo.collectives(compiled.as_text()),
    "compile_seconds": round(time.perf_counter() - t0, 1),
    "_compiled": compiled,
  }


def model_flops_per_example(config: Any, setup: train_step.TrainSetup) -> int:
  """Forward FLOPs of the model on one example (matmuls and convs, `flops`), independent of the
  levers: counted on the plain model (XLA attention, no remat)."""
  model = setup.model
  if hasattr(model, "attention"):
    model = model.clone(remat="none", attention=type(model.attention)())
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), setup.abstract.params)
  inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in setup.inputs]
  return flops_lib.forward_flops(lambda p, *xs: model.apply({"params": p}, *xs), params, *inputs)


def levers(config: Any) -> dict[str, Any]:
  """The config's accelerator levers (RARM: compute and Adam-moment dtypes; the others are the
  UNet's)."""
  m, o = config.model, config.optim
  out = {
    "dtype": m.dtype,
    "mu_dtype": o.mu_dtype or m.param_dtype,
  }
  if config_base.model_family(config) == "unet":
    out.update(
      param_dtype=m.param_dtype,
      remat=m.remat,
      attention=m.attention,
      flash_min_seq_len=int(m.flash_min_seq_len),
    )
  return out


def report(
  config: Any,
  slice_name: str,
  batch: int = 0,
  sample_batch: int = 0,
  steps: tuple[str, ...] = ("train", "sample"),
  devices: list | None = None,
) -> dict[str, Any]:
  """Compiles the train step (global batch `batch`, default config.train.batch_size) and the
  sampling step (one guided denoising step over `sample_batch`, default config.sample.batch_size)
  for the TPU slice `slice_name`; the report as a JSON-able dict (plus "_compiled" programs)."""
  s = topology.parse(slice_name)
  devices = devices if devices is not None else topology.devices(s)
  mesh = mesh_lib.from_config(config, devices)
  batch = batch or int(config.train.batch_size)
  sample_batch = sample_batch or int(config.sample.batch_size)
  rules = [tuple(r) for r in config.sharding_rules]
  n_batch = sharding.batch_devices(mesh, rules)
  for what, b in (("batch", batch), ("sample batch", sample_batch)):
    if b % n_batch:
      fail(
        f"{what} {b} is not divisible by the {n_batch} devices of the batch axes; choose a multiple"
      )
  shape = factory.latent_shape(config)
  setup = train_step.setup_training(config, shape, mesh)
  hbm = s.chip.hbm_gib * GIB
  per_example = model_flops_per_example(config, setup)
  out: dict[str, Any] = {
    "topology": s.name,
    "libtpu_topology": s.topology_name,
    "device_kind": devices[0].device_kind,
    "chips": s.chips,
    "hbm_gib_per_chip": s.chip.hbm_gib,
    "bf16_peak_tflops_per_chip": s.chip.bf16_tflops,
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "levers": levers(config),
    "fsdp_outer": setup.layout.fsdp_outer if setup.layout else 1,
    "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(setup.abstract.params))),
    "latent_shape": list(shape),
    "model_flops_per_example_forward": per_example,
    "jax": jax.__version__,
  }
  if "train" in steps:
    r = _compile(
      setup.train_step, (setup.state_specs(),) + setup.batch_specs(config, batch), mesh, hbm
    )
    model_flops = flops_lib.TRAIN_MULTIPLIER * per_example * batch / s.chips
    r.update(
      global_batch=batch,
      model_flops_per_chip=model_flops,
      best_case_examples_per_second_per_chip=s.chip.bf16_tflops
      * 1e12
      / (flops_lib.TRAIN_MULTIPLIER * per_example),
    )
    out["train"] = r
  if "sample" in steps and config_base.model_family(config) == "unet":
    out["sample"] = _sample_step(config, setup, sample_batch, mesh, hbm, per_example, s)
  return out


def _sample_step(
  config,
  setup: train_step.TrainSetup,
  batch: int,
  mesh,
  hbm: float,
  per_example: int,
  s: topology.Slice,
) -> dict[str, Any]:
  """One guided denoising step eps(z_t, t, context) (with the zero-context branch when the
  guidance scale is not 1), on the EMA parameters sharded as in training."""
  model, sched, scale = setup.model, setup.sched, float(config.sample.guidance_scale)

  def step(params, z, t, context):
    return ddim.guided_eps(schedule_lib.eps_fn(model, params, sched), z, t, context, scale)

  state = setup.state_specs()
  z, c, _ = setup.batch_specs(config, batch)
  t = jax.ShapeDtypeStruct(
    (batch,), jnp.int32, sharding=sharding.batch_sharding(mesh, setup.rules, 1)
  )
  fn = jax.jit(step, out_shardings=z.sharding)
  r = _compile(fn, (state.ema_params, z, t, c), mesh, hbm)
  passes = 1 if scale == 1.0 else 2
  r.update(
    batch=batch,
    model_flops_per_chip=passes * per_example * batch / s.chips,
    best_case_denoising_steps_per_second_per_chip=s.chip.bf16_tflops
    * 1e12
    / (passes * per_example),
  )
  return r


def summary(r: dict[str, Any]) -> str:
  """The report as a few human lines."""
  lines = [
    f"{r['topology']} ({r['chips']} x {r['device_kind']}, {r['hbm_gib_per_chip']:g} GiB HBM each), "
    f"mesh {r['mesh']}, {r['params'] / 1e6:.1f}M params, levers {r['levers']}"
    + (
      f", FSDP gathered in two stages ({r['fsdp_outer']} groups of the fsdp axis)"
      if r["fsdp_outer"] > 1
      else ""
    )
  ]
  for name in ("train", "sample"):
    if name not in r:
      continue
    x = r[name]
    head = f"{name} step (batch {x.get('global_batch', x.get('batch'))}):"
    if not x["fits"]:
      lines.append(f"{head} does not fit: {x['error']}")
      continue
    m = x["memory"]
    coll = (
      ", ".join(
        f"{k} x{v['count']} {v['bytes'] / 2**20:.1f} MiB" for k, v in x["collectives"].items()
      )
      or "none"
    )
    lines.append(
      f"{head} {m['total_bytes'] / GIB:.2f} of {m['hbm_bytes'] / GIB:g} GiB per chip "
      f"(arguments {m['argument_bytes'] / GIB:.2f}, temporaries {m['temp_bytes'] / GIB:.2f}, "
      f"outputs {m['output_bytes'] / GIB:.2f}, aliased {m['alias_bytes'] / GIB:.2f}); "
      f"{x['model_flops_per_chip'] / 1e12:.2f} model TFLOP per chip "
      f"(compiler: {x['compiler_flops_per_chip'] / 1e12:.2f}); collectives: {coll}; "
      f"compiled in {x['compile_seconds']:.0f} s"
    )
  return "\n".join(lines)
