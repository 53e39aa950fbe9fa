"""The network and noise schedule a config describes: the UNet of an RDM or the RARM
transformer (config.model.family), the per-example latent shape the data jobs make, and the
inputs that initialise either."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rdm_jax import config_base
from rdm_jax.diffusion import schedule as schedule_lib
from rdm_jax.errors import fail
from rdm_jax.models import first_stage, rarm, unet as unet_lib
from rdm_jax.models.unet import UNet
from rdm_jax.ops import conv_choice, onednn


def make_model(
  config: Any, devices: Any = None, latents: tuple[int, ...] | None = None
) -> UNet | rarm.RARM:
  """The config's network for `devices` (the mesh's; default this process's). With
  config.model.conv="auto" on one CPU device the convolutions of its train step (per-device
  batch config.train.batch_size, latents of shape `latents`, default `latent_shape(config)`)
  decide between XLA and oneDNN by measurement (`rdm_jax.ops.conv_choice`)."""
  model_cfg = config.model
  if config_base.model_family(config) == "rarm":
    return rarm.from_config(config)
  rules = dict((k, v) for k, v in config.sharding_rules)
  impl, remat = model_cfg.attention, model_cfg.remat
  if impl not in unet_lib.ATTENTION_IMPLS or remat not in unet_lib.REMAT_POLICIES:
    fail(
      f"config.model: attention={impl!r} (one of {', '.join(unet_lib.ATTENTION_IMPLS)}), "
      f"remat={remat!r} (one of {', '.join(unet_lib.REMAT_POLICIES)})"
    )
  if impl == "cudnn" and jnp.dtype(model_cfg.dtype) not in (jnp.bfloat16, jnp.float16):
    fail(
      "config.model.attention='cudnn' runs cuDNN's flash attention, which takes bfloat16 or "
      f"float16, and config.model.dtype is {model_cfg.dtype!r}; set --config.model.dtype=bfloat16 "
      "or use attention=xla"
    )
  attention = unet_lib.AttentionOptions(
    impl,
    int(model_cfg.flash_min_seq_len),
    _axes(rules.get("batch")),
    _axes(rules.get("heads")),
  )
  conv = model_cfg.conv
  try:
    resolved = onednn.resolve(conv, devices)
  except (ValueError, RuntimeError) as e:
    fail(str(e))
  model = UNet(
    model_channels=model_cfg.model_channels,
    channel_mult=tuple(model_cfg.channel_mult),
    num_res_blocks=model_cfg.num_res_blocks,
    attention_resolutions=tuple(model_cfg.attention_resolutions),
    num_head_channels=model_cfg.num_head_channels,
    transformer_depth=model_cfg.transformer_depth,
    out_channels=config.first_stage.latent_channels,
    dropout=model_cfg.dropout,
    dtype=jnp.dtype(model_cfg.dtype),
    patch_size=int(model_cfg.patch_size),
    param_dtype=jnp.dtype(model_cfg.param_dtype),
    remat=remat,
    attention=attention,
    conv="xla",
  )
  if conv == "auto" and resolved == "onednn":  # oneDNN can run here: is it faster for this model?
    inputs = example_inputs(
      config, int(config.train.batch_size), latents or latent_shape(config), config.k_train
    )
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs)["params"])
    resolved = conv_choice.resolve_auto(lambda p: model.apply({"params": p}, *inputs), (params,))
  return model.clone(conv=resolved)


def latent_shape(config: Any) -> tuple[int, ...]:
  """The per-example training input the data jobs would make: latents [H, W, C] of the first
  stage at config.dataset.image_size (or first_stage.pad_to), or RARM's token sequence [S]."""
  fs = config.first_stage
  side = int(fs.pad_to or 0) or int(config.dataset.image_size or 0)
  if not side:
    fail("set --config.dataset.image_size (or first_stage.pad_to): the latent size follows from it")
  if fs.name == "identity":
    return side, side, int(fs.latent_channels)
  factor = first_stage.spec(fs).factor
  if side % factor:
    fail(f"image size {side} is not a multiple of the first stage's factor {factor}")
  if config_base.model_family(config) == "rarm":
    return ((side // factor) ** 2,)
  return side // factor, side // factor, int(fs.latent_channels)


def _axes(axes: Any) -> Any:
  """A sharding rule's mesh axes as a hashable value (lists from JSON configs become tuples)."""
  return tuple(axes) if isinstance(axes, (list, tuple)) else axes


def make_schedule(config: Any) -> schedule_lib.Schedule:
  """The noise schedule and what the UNet predicts (config.diffusion.prediction: eps | v | x0)."""
  d = config.diffusion
  prediction, weighting = d.prediction, d.loss_weighting
  if prediction not in schedule_lib.PREDICTIONS or weighting not in schedule_lib.WEIGHTINGS:
    fail(
      f"config.diffusion: prediction={prediction!r} (one of "
      f"{', '.join(schedule_lib.PREDICTIONS)}), loss_weighting={weighting!r} (one of "
      f"{', '.join(schedule_lib.WEIGHTINGS)})"
    )
  return schedule_lib.linear_schedule(d.num_timesteps, d.beta_start, d.beta_end, prediction)


def example_inputs(
  config: Any, batch: int, latent_shape: tuple[int, ...], k: int
) -> tuple[jax.Array, ...]:
  """The model's init inputs: (latents, timesteps, context) for the UNet, (tokens, context) for
  RARM."""
  context = jnp.zeros((batch, k, config.retrieval.embed_dim), jnp.float32)
  if config_base.model_family(config) == "rarm":
    return jnp.zeros((batch,) + tuple(latent_shape), jnp.int32), context
  return (
    jnp.zeros((batch,) + tuple(latent_shape), jnp.float32),
    jnp.zeros((batch,), jnp.int32),
    context,
  )
