"""The whole UNet against diffusers' PyTorch `UNet2DConditionModel` on the same weights.

diffusers' UNet2DConditionModel is an independent implementation of the LDM UNet that the
RDM release uses (ldm.modules.diffusionmodules.openaimodel.UNetModel with
use_spatial_transformer=True): with flip_sin_to_cos=True, freq_shift=0, 32 groups, eps 1e-5,
heads = channels / num_head_channels per level and a cross-attention block type wherever the
downsampling factor is in attention_resolutions, the two compute the same function. Our
random parameters (every one non-zero, conv_out and proj_out included) are mapped onto its
state dict with `strict=True`, so a parameter that either side leaves out fails the load.
The reference runs in float64; ours in float32, and in bfloat16 within a stated tolerance.

Both architectures come from the repository's configs (the demo's, and ImageNet's at 1/6
of its width, on a 16x16 latent), so the wiring tested is the wiring trained.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import repo_config
from rdm_jax.models.unet import UNet
from rdm_jax.models import factory
from tests.torch_references import reference


def _diffusers_unet(model: UNet, in_channels: int, context_dim: int):
  """diffusers' UNet2DConditionModel configured as our UNet (float64, eval mode)."""
  diffusers = reference("diffusers")
  mult = tuple(model.channel_mult)
  down, up, ds = [], [], 1
  for level in range(len(mult)):
    down.append("CrossAttnDownBlock2D" if ds in model.attention_resolutions else "DownBlock2D")
    ds *= 2 if level != len(mult) - 1 else 1
  for level in reversed(range(len(mult))):
    up.append("CrossAttnUpBlock2D" if ds in model.attention_resolutions else "UpBlock2D")
    ds //= 2 if level else 1
  net = diffusers.UNet2DConditionModel(
    sample_size=None,
    in_channels=in_channels,
    out_channels=model.out_channels * model.patch_size**2 if model.out_channels else in_channels,
    down_block_types=tuple(down),
    up_block_types=tuple(up),
    block_out_channels=tuple(m * model.model_channels for m in mult),
    layers_per_block=model.num_res_blocks,
    cross_attention_dim=context_dim,
    # diffusers' attention_head_dim is the number of heads per level
    attention_head_dim=tuple(m * model.model_channels // model.num_head_channels for m in mult),
    transformer_layers_per_block=model.transformer_depth,
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
  )
  return net.double().eval()


_BLOCK_RENAMES = {
  # res block
  "in_norm": "norm1",
  "in_conv": "conv1",
  "emb_proj": "time_emb_proj",
  "out_norm": "norm2",
  "out_conv": "conv2",
  "skip": "conv_shortcut",
  # transformer block
  "to_out": "to_out.0",
  "ff.proj_in": "ff.net.0.proj",
  "ff.proj_out": "ff.net.2",
}


def _diffusers_name(path: tuple[str, ...], num_levels: int) -> str:
  """Our parameter path (module names, leaf) -> diffusers' state-dict key."""
  top, inner, leaf = path[0], list(path[1:-1]), path[-1]
  fixed = {
    "conv_in": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_1": "time_embedding.linear_2",
    "out_norm": "conv_norm_out",
    "conv_out": "conv_out",
    "mid_res_0": "mid_block.resnets.0",
    "mid_res_1": "mid_block.resnets.1",
    "mid_attn": "mid_block.attentions.0",
  }
  if top in fixed:
    prefix = fixed[top]
  else:
    side, level, kind = top.split("_")[:3]
    blocks = "down_blocks" if side == "down" else "up_blocks"
    index = int(level) if side == "down" else num_levels - 1 - int(level)
    prefix = {
      "res": f"{blocks}.{index}.resnets.{top.split('_')[-1]}",
      "attn": f"{blocks}.{index}.attentions.{top.split('_')[-1]}",
      "downsample": f"{blocks}.{index}.downsamplers.0.conv",
      "upsample": f"{blocks}.{index}.upsamplers.0.conv",
    }[kind]
  inner = [n.replace("block_", "transformer_blocks.") for n in inner]
  middle = ".".join(inner)
  for ours, theirs in _BLOCK_RENAMES.items():
    if middle == ours or middle.endswith("." + ours):
      middle = middle[: len(middle) - len(ours)] + theirs
  return ".".join(
    p for p in (prefix, middle, {"scale": "weight", "kernel": "weight"}.get(leaf, leaf)) if p
  )


def _to_torch_layout(value: np.ndarray):
  import torch

  if value.ndim == 4:  # conv HWIO -> OIHW
    value = value.transpose(3, 2, 0, 1)
  elif value.ndim == 2:  # dense [in, out] -> [out, in]
    value = value.T
  return torch.from_numpy(np.ascontiguousarray(value, np.float64))


def _random_params(model: UNet, x, t, ctx, seed: int):
  """Every parameter random and non-zero: N(0, 1/fan_in) kernels, N(1, 0.1) scales, N(0, 0.1)
  biases."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, ctx)
  params = nn.meta.unbox(shapes)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0.0, fan_in**-0.5, leaf.shape).astype(np.float32)
    return rng.normal(1.0 if name == "scale" else 0.0, 0.1, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, params)


def _compare(config, latent_shape, batch=2, dtype=jnp.float32):
  """(ours, reference) eps predictions for the config's UNet on shared random inputs and weights."""
  import torch

  model = factory.make_model(config).clone(dtype=dtype)
  in_ch, k, d = latent_shape[-1], config.k_train, config.retrieval.embed_dim
  rng = np.random.default_rng(7)
  x = rng.normal(size=(batch,) + tuple(latent_shape)).astype(np.float32)
  t = np.array([3, 861][:batch], np.int32)
  ctx = rng.normal(size=(batch, k, d)).astype(np.float32)
  params = _random_params(model, x, t, ctx, seed=11)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, x, t, ctx))

  p = (
    model.patch_size
  )  # patched (the demo): diffusers' UNet on torch's pixel_unshuffle of the input
  assert p == 1 or in_ch == 1, "pixel_unshuffle orders channels as ours only for one channel"
  net = _diffusers_unet(model, in_ch * p * p, d)
  flat = {
    _diffusers_name(tuple(p.key for p in path), len(model.channel_mult)): _to_torch_layout(
      np.asarray(v)
    )
    for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  net.load_state_dict(flat, strict=True)
  with torch.no_grad():
    want = net(
      torch.nn.functional.pixel_unshuffle(torch.from_numpy(x.transpose(0, 3, 1, 2)).double(), p),
      torch.from_numpy(t).long(),
      encoder_hidden_states=torch.from_numpy(ctx).double(),
    ).sample
    want = torch.nn.functional.pixel_shuffle(want, p)
  return ours, want.numpy().transpose(0, 2, 3, 1)


def _demo_config():
  return repo_config("fashion_mnist_rdm"), (32, 32, 1)  # pad_to 32, one channel, 2 x 2 patches


def _imagenet_config():
  c = repo_config("imagenet_rdm")
  c.model.model_channels = 32  # 1/6 of 192: channels 32/64/96/160, 1/2/3/5 heads of 32
  c.model.dtype = "float32"
  return c, (16, 16, c.first_stage.latent_channels)


@pytest.mark.parametrize("make", [_demo_config, _imagenet_config], ids=["demo", "imagenet_shaped"])
def test_unet_matches_diffusers_unet(make):
  config, latent_shape = make()
  ours, want = _compare(config, latent_shape)
  scale = float(np.abs(want).max())
  assert scale > 0.1  # the output layer is live: a zero output would match nothing
  np.testing.assert_allclose(ours, want, rtol=0, atol=2e-5 * scale)  # measured: 1.3e-6


def test_bf16_unet_is_within_tolerance_of_the_f32_reference():
  """bf16 compute (f32 norms, softmax and output): max error under 4% of the output's range."""
  config, latent_shape = _imagenet_config()
  ours, want = _compare(config, latent_shape, dtype=jnp.bfloat16)
  scale = float(np.abs(want).max())
  err = float(np.abs(ours - want).max())
  assert err < 0.04 * scale, (err, scale)  # measured: 0.017-0.022
  # and bf16 is not secretly f32: some error must be there
  assert err > 1e-4 * scale


def test_original_state_dict_names_agree_with_diffusers_ldm_converter():
  """`unet.ldm_names` (our parameters -> openaimodel.UNetModel's state-dict keys, used to import the
  published RDM checkpoints) against diffusers' own converter of LDM checkpoints
  (`convert_ldm_unet_checkpoint`, what diffusers' single-file loading uses): our random weights,
  written under the original's keys and converted by diffusers, load strictly into its UNet and
  compute our output; and the import (`torch_convert.to_flax`) gives our weights back exactly."""
  import torch
  from rdm_jax.models import torch_convert, unet

  convert = reference("diffusers.loaders.single_file_utils").convert_ldm_unet_checkpoint
  config, latent_shape = _imagenet_config()
  model = factory.make_model(config)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2,) + latent_shape).astype(np.float32)
  t = np.array([3, 861], np.int32)
  ctx = rng.normal(size=(2, config.k_train, config.retrieval.embed_dim)).astype(np.float32)
  params = _random_params(model, x, t, ctx, seed=5)
  names = unet.ldm_names(model, params)
  original = {
    "model.diffusion_model." + k: torch.from_numpy(v)
    for k, v in torch_convert.to_torch(params, names).items()
  }
  assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in original
  assert (
    "model.diffusion_model.output_blocks.2.2.conv.weight" in original
  )  # attention before Upsample

  net = _diffusers_unet(model, latent_shape[-1], config.retrieval.embed_dim)
  converted = convert(original, dict(net.config))
  net.load_state_dict({k: v.double() for k, v in converted.items()}, strict=True)
  with torch.no_grad():
    want = (
      net(
        torch.from_numpy(x.transpose(0, 3, 1, 2)).double(),
        torch.from_numpy(t).long(),
        encoder_hidden_states=torch.from_numpy(ctx).double(),
      )
      .sample.numpy()
      .transpose(0, 2, 3, 1)
    )
  ours = np.asarray(jax.jit(model.apply)({"params": params}, x, t, ctx))
  scale = float(np.abs(want).max())
  assert scale > 0.1
  np.testing.assert_allclose(ours, want, rtol=0, atol=2e-5 * scale)

  back = torch_convert.to_flax(
    {k[len("model.diffusion_model.") :]: v.numpy() for k, v in original.items()},
    torch_convert.flat_shapes(params),
    names,
  )
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  # a checkpoint of another architecture: one line listing what differs
  del original["model.diffusion_model.middle_block.1.proj_in.weight"]
  with pytest.raises(ValueError, match=r"1 missing \(middle_block.1.proj_in.weight\)"):
    torch_convert.to_flax(
      {k[len("model.diffusion_model.") :]: v.numpy() for k, v in original.items()},
      torch_convert.flat_shapes(params),
      names,
    )
