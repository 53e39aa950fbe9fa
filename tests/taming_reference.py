"""latent-diffusion's first stages in PyTorch, built from taming-transformers' modules (the PyPI
package taming-transformers-rom1504, installed --no-deps by `make setup-test`), at tiny sizes of
the published shapes, and their weights saved as a Lightning .ckpt: the reference the first-stage
tests, the checkpoint importers and the ImageNet chains compare against.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

# Tiny versions of the published shapes: VQ-f4 (no attention), VQ-f16 (attention at a middle
# resolution; f8 here), KL-f8 with attention, taming's VQGAN-f16 (f8 here).
TINY = {
  "vq_f4": dict(
    ch=32,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    embed_dim=3,
    z_channels=3,
    n_embed=64,
    resolution=32,
  ),
  "vq_f16": dict(
    ch=32,
    ch_mult=(1, 1, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(8,),
    embed_dim=8,
    z_channels=8,
    n_embed=128,
    resolution=32,
  ),
  "kl_f8": dict(
    ch=32,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    embed_dim=4,
    z_channels=4,
    resolution=32,
  ),
  # taming's VQGAN (the released RARMs' first stage): latents as wide as the codes
  "vqgan_f16": dict(
    ch=32,
    ch_mult=(1, 1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    embed_dim=32,
    z_channels=32,
    n_embed=64,
    resolution=32,
  ),
}


class TorchAutoencoder(torch.nn.Module):
  """latent-diffusion's VQModel / AutoencoderKL without the training parts."""

  def __init__(self, kind, arch, seed=0):
    super().__init__()
    dd = dict(
      double_z=kind == "kl",
      z_channels=arch["z_channels"],
      resolution=arch["resolution"],
      in_channels=3,
      out_ch=3,
      ch=arch["ch"],
      ch_mult=arch["ch_mult"],
      num_res_blocks=arch["num_res_blocks"],
      attn_resolutions=arch["attn_resolutions"],
      dropout=0.0,
    )
    e, z = arch["embed_dim"], arch["z_channels"]
    self.kind = kind
    self.encoder, self.decoder = taming_model.Encoder(**dd), taming_model.Decoder(**dd)
    self.quant_conv = torch.nn.Conv2d(2 * z if kind == "kl" else z, 2 * e if kind == "kl" else e, 1)
    self.post_quant_conv = torch.nn.Conv2d(e, z, 1)
    if kind == "vq":
      self.quantize = taming_quantize.VectorQuantizer2(arch["n_embed"], e, beta=0.25)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for name, p in self.named_parameters():
        scale = (
          0.5 if "quantize" in name else 1.0 / np.sqrt(max(1, p[0].numel())) if p.ndim > 1 else 0.3
        )
        p.copy_(
          torch.randn(p.shape, generator=g) * scale
          + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
        )
    self.eval()

  @torch.no_grad()
  def encode(self, x):  # VQModelInterface.encode / the KL posterior's mean
    h = self.quant_conv(self.encoder(x))
    return h if self.kind == "vq" else torch.chunk(h, 2, dim=1)[0]

  @torch.no_grad()
  def decode(self, h):  # VQModelInterface.decode / AutoencoderKL.decode
    if self.kind == "vq":
      h = self.quantize(h)[0]
    return self.decoder(self.post_quant_conv(h))

  @torch.no_grad()
  def tokens(self, x):  # VQModel.encode's indices
    b = x.shape[0]
    ind = self.quantize(self.quant_conv(self.encoder(x)))[2][2]
    return ind.reshape(b, -1)

  @torch.no_grad()
  def decode_code(self, ind, shape):
    return self.decoder(
      self.post_quant_conv(self.quantize.get_codebook_entry(ind.reshape(-1), shape))
    )


def nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


def _fake_lightning_class():
  """A class that pickles as pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint (how a
  Lightning .ckpt keys its callback states), without needing Lightning."""
  names = [
    "pytorch_lightning",
    "pytorch_lightning.callbacks",
    "pytorch_lightning.callbacks.model_checkpoint",
  ]
  saved = {n: sys.modules.get(n) for n in names}
  for n in names:
    sys.modules[n] = types.ModuleType(n)
  cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
  sys.modules[names[-1]].ModelCheckpoint = cls
  return cls, saved


def save_lightning_ckpt(path, state_dict):
  cls, saved = _fake_lightning_class()
  try:
    torch.save(
      {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state_dict,
        "callbacks": {cls: {"best_model_score": torch.tensor(0.5)}},
        "optimizer_states": [{"state": {}}],
      },
      path,
    )
  finally:
    for n, m in saved.items():
      if m is None:
        sys.modules.pop(n, None)
      else:
        sys.modules[n] = m
