r"""Sampling throughput: rdm_jax's samplers against diffusers' UNet and schedulers, same run.

  python benchmarks/sample_throughput.py [--num_images=16] [--skip_torch] [--conv=auto,xla]

The demo's UNet (configs/fashion_mnist_rdm.py, 1x32x32 pixels, context 4x1280; random weights:
speed does not depend on them) samples `num_images` images with classifier-free guidance
(scale 2, both branches in one doubled batch) with:
  DDIM 100 steps (eta 0)            vs diffusers' DDIMScheduler, same timesteps
  DPM-Solver++(2M) 20 steps (logsnr) vs diffusers' DPMSolverMultistepScheduler on our timesteps
The PyTorch loop calls diffusers' UNet2DConditionModel (the same architecture and parameter
count) under torch.no_grad, with the scheduler's `step`. Prints images/s and the ratio.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from rdm_jax.diffusion import samplers  # noqa: E402
from rdm_jax.models import factory  # noqa: E402
from rdm_jax import inference  # noqa: E402
from common import allocator, cpu, diffusers_unet, load_config, patch_grid  # noqa: E402

_NUM_IMAGES = flags.DEFINE_integer("num_images", 16, "Images per timed run (one batch).")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Do not time the PyTorch reference.")
_CONV = flags.DEFINE_list(
  "conv", ["auto", "xla"], "config.model.conv values to time (xla | onednn | auto)."
)

LATENT = (32, 32, 1)
SETTINGS = {"DDIM 100": ("ddim", 100), "DPM-Solver++ 20": ("dpm_solver++", 20)}
SCALE = 2.0


def time_jax(config, context: np.ndarray, sampler: str, steps: int) -> float:
  """Seconds for one guided sampling run of len(context) images (compiled beforehand)."""
  model = factory.make_model(config)
  params = nn.meta.unbox(
    model.init(jax.random.PRNGKey(0), *factory.example_inputs(config, 1, LATENT, config.k_train))[
      "params"
    ]
  )
  config.sample.update(sampler=sampler, num_steps=steps, guidance_scale=SCALE, eta=0.0, clip_x0=0.0)
  fn = inference.make_sampler(model, factory.make_schedule(config), LATENT, config.sample)
  jax.block_until_ready(fn(params, context, jax.random.PRNGKey(1)))
  t = time.perf_counter()
  jax.block_until_ready(fn(params, context, jax.random.PRNGKey(2)))
  return time.perf_counter() - t


def time_torch(config, context: np.ndarray, sampler: str, steps: int) -> float:
  """Seconds for the same run with diffusers' UNet and scheduler."""
  import torch
  from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

  betas = np.asarray(factory.make_schedule(config).betas)
  if sampler == "ddim":
    sch = DDIMScheduler(
      num_train_timesteps=len(betas),
      trained_betas=betas,
      clip_sample=False,
      set_alpha_to_one=False,
      steps_offset=1,
      timestep_spacing="leading",
    )
    sch.set_timesteps(steps)
  else:
    sch = DPMSolverMultistepScheduler(
      num_train_timesteps=len(betas),
      trained_betas=betas,
      algorithm_type="dpmsolver++",
      solver_order=2,
      final_sigmas_type="sigma_min",
    )
    a_bar = np.cumprod(1 - betas.astype(np.float64))
    sch.set_timesteps(timesteps=samplers.dpm_solver_timesteps(a_bar, steps).tolist())
  grid = patch_grid(config, LATENT)  # our patching is a reshape: diffusers' UNet on the patch grid
  net = diffusers_unet(config, grid).eval()
  ctx = torch.from_numpy(context)
  ctx2 = torch.cat([torch.zeros_like(ctx), ctx])
  x = torch.randn((len(context), grid[2]) + grid[:2])
  t0 = time.perf_counter()
  with torch.no_grad():
    for t in sch.timesteps:
      e = net(torch.cat([x, x]), t, encoder_hidden_states=ctx2).sample
      e_u, e_c = e.chunk(2)
      x = sch.step(e_u + SCALE * (e_c - e_u), t, x).prev_sample
  return time.perf_counter() - t0


def main(argv):
  del argv
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, {cpu()}, "
    f"{allocator()}; demo UNet, {_NUM_IMAGES.value} images per run, guidance {SCALE} (doubled "
    "batch)"
  )
  config = load_config("fashion_mnist_rdm")
  context = (
    np.random.default_rng(0)
    .normal(size=(_NUM_IMAGES.value, config.k_train, config.retrieval.embed_dim))
    .astype(np.float32)
  )
  for name, (sampler, steps) in SETTINGS.items():
    secs = {}
    for conv in _CONV.value:
      config.model.conv = conv
      secs[conv] = time_jax(config, context, sampler, steps)
    line = f"[{name}] rdm_jax: " + ", ".join(
      f"conv={conv} {sec:.2f} s, {len(context) / sec:.2f} images/s" for conv, sec in secs.items()
    )
    if not _SKIP_TORCH.value:
      tsec = time_torch(config, context, sampler, steps)
      line += (
        f"; torch+diffusers: {tsec:.2f} s, {len(context) / tsec:.2f} images/s -> rdm_jax "
        + ", ".join(f"conv={conv} x{tsec / sec:.2f}" for conv, sec in secs.items())
      )
    print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
