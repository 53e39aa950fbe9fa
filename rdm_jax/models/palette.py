"""A palette tokenizer, the offline demo's first stage for RARM
(config.first_stage.name = "palette").

No pretrained VQ model ships offline, so the demo tokenises images as ImageGPT does (Chen et
al. 2020): average-pool by `factor`, then map every pixel to the nearest of `palette_size`
colours that k-means fitted on the training images' pooled pixels. Tokens are the palette
indices in raster order; decoding is the palette colour per token, repeated `factor` times
each way (a coarser picture than the image, honestly so). The palette is a small float32 .npy
([palette_size, channels], in [-1, 1]) that the encode job fits once, deterministically, from
the train part and writes to `config.first_stage.weights`; stores record its sha256.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from rdm_jax import files, untrusted
from rdm_jax.errors import fail


@dataclasses.dataclass(frozen=True)
class Spec:
  """What RARM needs of a tokenizer (the same fields as a VQ autoencoder's Spec)."""

  n_embed: int
  factor: int
  channels: int
  kind: str = "vq"


def spec(cfg) -> Spec:
  k, f = int(cfg.palette_size), int(cfg.palette_factor)
  if k < 2 or f < 1:
    fail(f"config.first_stage: palette_size={k} (>= 2) and palette_factor={f} (>= 1)")
  return Spec(n_embed=k, factor=f, channels=int(cfg["latent_channels"]))


def pooled(images: np.ndarray, factor: int) -> np.ndarray:
  """uint8 [B, H, W, C] -> float32 [B, H/f, W/f, C] in [-1, 1], averaged over f x f blocks."""
  b, h, w, c = images.shape
  if h % factor or w % factor:
    fail(
      f"images of {h}x{w} do not split into {factor}x{factor} blocks "
      "(config.first_stage.palette_factor)"
    )
  x = images.astype(np.float32).reshape(b, h // factor, factor, w // factor, factor, c).mean((2, 4))
  return x / 127.5 - 1.0


def fit(images: np.ndarray, cfg, iterations: int = 30, max_pixels: int = 500_000) -> np.ndarray:
  """k-means palette [K, C] of the pooled pixels of `images` (the first max_pixels of them),
  started from pixels at evenly spaced ranks of their brightness: deterministic."""
  s = spec(cfg)
  x = pooled(images, s.factor).reshape(-1, images.shape[-1])[:max_pixels].astype(np.float64)
  order = np.argsort(x.mean(1), kind="stable")
  centres = x[order[np.linspace(0, len(x) - 1, s.n_embed).astype(int)]]
  for _ in range(iterations):
    nearest = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    for j in range(s.n_embed):
      members = x[nearest == j]
      if len(members):
        centres[j] = members.mean(0)
  return centres.astype(np.float32)


def load(path: str, cfg) -> np.ndarray:
  s = spec(cfg)
  if not path or not os.path.isfile(path):
    fail(
      f"palette {path!r} not found: the encode job fits it from the train part "
      "(python -m rdm_jax.jobs.encode --config=...), or set config.first_stage.weights"
    )
  palette = untrusted.load_npy(path)
  if (
    palette.shape != (s.n_embed, s.channels)
    or palette.dtype != np.float32
    or not np.isfinite(palette).all()
  ):
    fail(
      f"{path} holds {palette.dtype}{list(palette.shape)}; a palette of config.first_stage is "
      f"float32 [{s.n_embed}, {s.channels}]: delete it and rerun the encode job to fit it again"
    )
  return palette


def save(path: str, palette: np.ndarray) -> None:
  files.makedirs(os.path.dirname(path) or ".")
  files.atomic_write(path, lambda f: np.save(f, palette))


def encode(images: np.ndarray, palette: np.ndarray, factor: int) -> np.ndarray:
  """uint8 images [B, H, W, C] -> int32 tokens [B, (H/f)(W/f)]: the nearest palette colour."""
  x = pooled(images, factor)
  d = ((x[..., None, :] - palette) ** 2).sum(-1)
  return np.argmin(d, axis=-1).reshape(len(images), -1).astype(np.int32)


def decode(tokens: np.ndarray, palette: np.ndarray, factor: int) -> np.ndarray:
  """int tokens [B, S] (S a square) -> float images [B, H, W, C] in [-1, 1]."""
  b, n = tokens.shape
  side = int(round(n**0.5))
  x = palette[tokens.reshape(b, side, side)]
  return x.repeat(factor, axis=1).repeat(factor, axis=2)
