"""The LDM first stages against the original PyTorch modules, on random weights.

Reference: taming-transformers' Encoder, Decoder and VectorQuantizer2 (the PyPI package
taming-transformers-rom1504, installed --no-deps), wired as latent-diffusion's
`ldm/models/autoencoder.py` wires them: VQModelInterface (encode = quant_conv(encoder(x)),
decode = decoder(post_quant_conv(quantize(h)))), VQModel's indices / decode_code, and
AutoencoderKL (quant_conv -> [mean, logvar], decode = decoder(post_quant_conv(z))).
Tolerance 1e-4 relative to the output's scale. Weights are drawn wider than torch's init
(GroupNorm affines and codebook included) so that every parameter matters.
"""

from __future__ import annotations

import os

import ml_collections as mlc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

from tests.conftest import config_section  # noqa: E402
from tests.taming_reference import TINY, TorchAutoencoder, nhwc, save_lightning_ckpt  # noqa: E402

from rdm_jax.errors import UserError  # noqa: E402
from rdm_jax.models import autoencoder, first_stage  # noqa: E402


def close(a, b):
  scale = np.abs(b).max()
  assert np.abs(a - b).max() <= 1e-4 * scale, (np.abs(a - b).max(), scale)


@pytest.fixture(scope="module", params=list(TINY))
def pair(request):
  name = request.param
  ref = TorchAutoencoder(autoencoder.PRESETS[name].kind, TINY[name])
  spec = autoencoder.Spec(autoencoder.PRESETS[name].kind, **TINY[name])
  params = autoencoder.convert_state_dict({k: v.numpy() for k, v in ref.state_dict().items()}, spec)
  return name, ref, spec, params


def test_encode_and_decode_match_the_original(pair):
  import jax.numpy as jnp

  name, ref, spec, params = pair
  x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
  model = autoencoder.Autoencoder(spec)
  h = np.asarray(
    model.apply({"params": params}, jnp.asarray(nhwc(x)), method=autoencoder.Autoencoder.encode)
  )
  want = ref.encode(x)
  assert h.shape == (2, 32 // spec.factor, 32 // spec.factor, spec.embed_dim)
  close(h, nhwc(want))
  rec = np.asarray(
    model.apply({"params": params}, jnp.asarray(nhwc(want)), method=autoencoder.Autoencoder.decode)
  )
  close(rec, nhwc(ref.decode(want)))


def test_vq_tokens_round_trip_like_the_original(pair):
  import jax.numpy as jnp

  name, ref, spec, params = pair
  if spec.kind != "vq":
    pytest.skip("KL autoencoders have no tokens")
  x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
  model = autoencoder.Autoencoder(spec)
  tokens = np.asarray(
    model.apply(
      {"params": params}, jnp.asarray(nhwc(x)), method=autoencoder.Autoencoder.encode_tokens
    )
  )
  want = ref.tokens(x).numpy().reshape(tokens.shape)
  np.testing.assert_array_equal(tokens, want)
  assert len(np.unique(tokens)) > 5  # the codebook is really used, not one code everywhere
  b, h, w = tokens.shape
  images = np.asarray(
    model.apply(
      {"params": params}, jnp.asarray(tokens), method=autoencoder.Autoencoder.decode_tokens
    )
  )
  close(images, nhwc(ref.decode_code(torch.as_tensor(want), (b, h, w, spec.embed_dim))))


def first_stage_config(name, weights, **kw):
  c = config_section(
    "first_stage",
    name=name,
    pad_to=0,
    latent_channels=TINY[name]["embed_dim"],
    weights=str(weights),
    scale_factor=1.0,
    batch_size=8,
    arch=dict(TINY[name]),
  )
  c.update(kw)
  return c


def test_the_job_api_reads_a_lightning_ckpt_and_encodes_uint8_images(tmp_path):
  ref = TorchAutoencoder("vq", TINY["vq_f4"], seed=3)
  sd = dict(ref.state_dict())
  sd["loss.discriminator.main.0.weight"] = torch.zeros(
    2, 2
  )  # the training loss's weights are ignored
  path = tmp_path / "model.ckpt"
  save_lightning_ckpt(path, sd)
  cfg = first_stage_config("vq_f4", path, pad_to=32, scale_factor=0.5)
  images = np.random.default_rng(0).integers(
    0, 256, size=(11, 28, 28, 1), dtype=np.uint8
  )  # grey, padded
  z = first_stage.encode(cfg, images)
  x = np.pad(
    images.astype(np.float32) / 127.5 - 1, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1
  )
  xt = torch.as_tensor(np.repeat(x, 3, -1).transpose(0, 3, 1, 2))
  want = ref.encode(xt)
  close(z, 0.5 * nhwc(want))  # 11 images in batches of 8 over 8 devices: the last batch is padded
  out = first_stage.decode(cfg, z, (28, 28))
  rec = ((np.clip(nhwc(ref.decode(want)), -1, 1) + 1) * 127.5)[:, 2:30, 2:30]
  assert out.dtype == np.uint8 and out.shape == (11, 28, 28, 3)
  assert np.abs(out.astype(np.float64) - rec).max() <= 0.51
  assert first_stage.identity(cfg)["weights_sha256"]


def test_a_checkpoint_of_another_architecture_is_one_line_naming_the_keys(tmp_path):
  ref = TorchAutoencoder("kl", TINY["kl_f8"])
  path = tmp_path / "kl.ckpt"
  save_lightning_ckpt(path, dict(ref.state_dict()))
  with pytest.raises(UserError) as e:
    first_stage.load(first_stage_config("vq_f16", path))
  msg = str(e.value)
  assert "\n" not in msg and "not a checkpoint of this architecture" in msg
  assert "missing" in msg and "quantize.embedding.weight" in msg and "of another shape" in msg


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_a_ckpt_whose_pickle_would_run_code_is_refused_and_nothing_runs(tmp_path):
  ref = TorchAutoencoder("vq", TINY["vq_f4"])
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.ckpt"
  torch.save({"state_dict": dict(ref.state_dict()), "hyper_parameters": _RunsCode(marker)}, path)
  with pytest.raises(UserError) as e:
    first_stage.load(first_stage_config("vq_f4", path))
  assert "\n" not in str(e.value) and "refusing to unpickle posix.system" in str(e.value)
  assert not marker.exists()


def test_bad_first_stage_settings_say_what_to_set(tmp_path):
  with pytest.raises(UserError, match="not found"):
    first_stage.load(first_stage_config("vq_f4", tmp_path / "missing.ckpt"))
  with pytest.raises(UserError, match="available: identity, vq_f4"):
    first_stage.spec(mlc.ConfigDict(dict(name="vq_f3", arch={})))
  ref = TorchAutoencoder("vq", TINY["vq_f4"])
  save_lightning_ckpt(tmp_path / "m.ckpt", dict(ref.state_dict()))
  with pytest.raises(UserError, match="set latent_channels=3"):
    first_stage.load(first_stage_config("vq_f4", tmp_path / "m.ckpt", latent_channels=4))
  fs = first_stage.load(first_stage_config("vq_f4", tmp_path / "m.ckpt"))
  with pytest.raises(UserError, match="multiples of 4"):
    fs.encode(np.zeros((1, 30, 30, 3), np.uint8))
  with pytest.raises(UserError, match=r"token ids must lie in \[0, 64\)"):
    fs.decode_tokens(np.full((1, 8, 8), 64), (32, 32))


def test_presets_are_the_published_architectures():
  """Parameter counts of the published checkpoints' architectures (encoder + decoder + convs +
  codebook), from their configs: VQ-f4 (embed 3, 8192 codes, ch_mult 1,2,4), KL-f8 (embed 4, ch_mult
  1,2,4,4), VQ-f16 (embed 8, 16384 codes, ch_mult 1,1,2,2,4, attention at 16) and the released
  RARMs' taming VQGAN (embed and z 256, 16384 codes, as VQ-f16 otherwise; 76.1M parameters),
  counted on the taming modules with those configs."""
  import jax

  for name in ("vq_f4", "kl_f8", "vq_f16", "vqgan_f16"):
    spec = autoencoder.PRESETS[name]
    arch = dict(
      ch=spec.ch,
      ch_mult=spec.ch_mult,
      num_res_blocks=spec.num_res_blocks,
      attn_resolutions=spec.attn_resolutions,
      embed_dim=spec.embed_dim,
      z_channels=spec.z_channels,
      n_embed=spec.n_embed,
      resolution=spec.resolution,
    )
    with torch.device("meta"):
      ref = TorchAutoencoder.__new__(TorchAutoencoder)
      torch.nn.Module.__init__(ref)
      dd = dict(
        double_z=spec.kind == "kl",
        z_channels=spec.z_channels,
        resolution=256,
        in_channels=3,
        out_ch=3,
        ch=spec.ch,
        ch_mult=spec.ch_mult,
        num_res_blocks=spec.num_res_blocks,
        attn_resolutions=spec.attn_resolutions,
        dropout=0.0,
      )
      ref.encoder, ref.decoder = taming_model.Encoder(**dd), taming_model.Decoder(**dd)
    want = sum(p.numel() for p in ref.parameters())
    e, z = arch["embed_dim"], arch["z_channels"]
    want += (2 * z * 2 * e + 2 * e if spec.kind == "kl" else z * e + e) + e * z + z
    want += spec.n_embed * e
    got = sum(a.size for a in jax.tree.leaves(autoencoder.init_shapes(spec)))
    assert got == want, name


def test_kl_autoencoder_matches_diffusers_autoencoder_kl():
  """A second, independent reference (the issue's): diffusers' AutoencoderKL, loaded from the same
  LDM state dict through diffusers' own converter (`convert_ldm_vae_checkpoint`), strictly. Its
  blocks have attention only in the middle, as the published kl-f8 /
  kl-f16 (attn_resolutions [])."""
  import jax.numpy as jnp
  from tests.torch_references import reference

  diffusers = reference("diffusers")
  convert = reference("diffusers.loaders.single_file_utils").convert_ldm_vae_checkpoint
  arch = dict(TINY["kl_f8"], attn_resolutions=())
  ref = TorchAutoencoder("kl", arch, seed=5)
  sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
  widths = tuple(arch["ch"] * m for m in arch["ch_mult"])
  net = (
    diffusers.AutoencoderKL(
      in_channels=3,
      out_channels=3,
      down_block_types=("DownEncoderBlock2D",) * len(widths),
      up_block_types=("UpDecoderBlock2D",) * len(widths),
      block_out_channels=widths,
      layers_per_block=arch["num_res_blocks"],
      latent_channels=arch["embed_dim"],
      norm_num_groups=32,
      sample_size=arch["resolution"],
    )
    .double()
    .eval()
  )
  net.load_state_dict(
    {k: v.double() for k, v in convert(sd, dict(net.config)).items()}, strict=True
  )

  spec = autoencoder.Spec("kl", **arch)
  params = autoencoder.convert_state_dict({k: v.numpy() for k, v in sd.items()}, spec)
  model = autoencoder.Autoencoder(spec)
  x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
  mean = np.asarray(
    model.apply({"params": params}, jnp.asarray(nhwc(x)), method=autoencoder.Autoencoder.encode)
  )
  with torch.no_grad():
    want = net.encode(x.double()).latent_dist.mean
    rec = net.decode(want).sample
  close(mean, nhwc(want))
  ours = np.asarray(
    model.apply(
      {"params": params},
      jnp.asarray(nhwc(want).astype(np.float32)),
      method=autoencoder.Autoencoder.decode,
    )
  )
  close(ours, nhwc(rec))
