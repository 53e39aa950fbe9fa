"""What the benchmarks share: the repo's configs, and our UNet rebuilt as diffusers' PyTorch
UNet."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  """`configs/<name>.py`'s get_config()."""
  from rdm_jax.config_base import config_file

  return config_file(os.path.join(REPO, "configs", f"{name}.py"))


def allocator() -> str:
  """The malloc this process runs on, for the benchmark's header line: XLA:CPU's timings depend on
  it (RESULTS.md, "tcmalloc"); `make demo` and `make test` preload tcmalloc."""
  from rdm_jax.parallel.mesh import TCMALLOC, tcmalloc_loaded

  if tcmalloc_loaded():
    return "tcmalloc"
  return f"glibc malloc (LD_PRELOAD={TCMALLOC} for tcmalloc, as make demo/test)"


def cpu() -> str:
  """This CPU for a benchmark's header line: its model, ISA flags and any ISA cap in force
  (ONEDNN_MAX_CPU_ISA, XLA_FLAGS --xla_cpu_max_isa): speed figures depend on all three."""
  from rdm_jax.ops.conv_choice import machine

  m = machine()
  caps = ", ".join(f"{k}={v}" for k, v in m["caps"].items() if k != "XLA_FLAGS" or "max_isa" in v)
  return f"{m['cpu']} ({' '.join(m['isa'])}{'; capped: ' + caps if caps else ''})"


def patch_grid(config, latent_shape):
  """The shape our UNet's layers see: latents [H, W, C] folded into p x p patches
  (config.model.patch_size, a reshape) are diffusers' input [H/p, W/p, C p^2]."""
  p = int(config.model.get("patch_size", 1))
  return (latent_shape[0] // p, latent_shape[1] // p, latent_shape[2] * p * p)


def diffusers_unet(config, latent_shape):
  """Our UNet as diffusers' UNet2DConditionModel (torch, CPU, random weights, same parameter
  count)."""
  sys.path.insert(0, os.path.join(REPO, "tests"))
  from torch_references import define_missing_torchvision_ops

  # the --no-deps torchvision of `make setup-test` breaks `import diffusers`
  define_missing_torchvision_ops()
  from diffusers import UNet2DConditionModel

  m = config.model
  mc = m.model_channels
  channels = tuple(mc * x for x in m.channel_mult)
  ds = [2**i for i in range(len(channels))]
  attn = [d in m.attention_resolutions for d in ds]
  return UNet2DConditionModel(
    sample_size=latent_shape[0],
    in_channels=latent_shape[2],
    out_channels=latent_shape[2],
    block_out_channels=channels,
    layers_per_block=m.num_res_blocks,
    down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
    up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
    cross_attention_dim=config.retrieval.embed_dim,
    attention_head_dim=tuple(c // m.num_head_channels for c in channels),  # diffusers: = heads
    norm_num_groups=32,
    transformer_layers_per_block=m.transformer_depth,
  )
