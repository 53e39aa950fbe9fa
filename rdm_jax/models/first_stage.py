"""First stages E/D that map images to the latents the diffusion model works on.

`identity`: pixels scaled to [-1, 1] and padded (with -1, the background) to a square of
`pad_to`: honest for 28x28 Fashion-MNIST. The LDM autoencoders (KL-f8, VQ-f4) of the
paper's ImageNet models need their PyTorch checkpoints converted; that port is not here
yet, and asking for them says so instead of producing wrong latents.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rdm_jax.errors import fail


def _pads(size: int, target: int) -> tuple[int, int]:
  if size > target:
    fail(f"images of size {size} do not fit first_stage.pad_to={target}")
  lo = (target - size) // 2
  return lo, target - size - lo


def encode(cfg: Any, images: np.ndarray) -> np.ndarray:
  """uint8 images [B, H, W, C] -> float32 latents [B, h, w, c]."""
  if cfg.name != "identity":
    fail(f"first stage {cfg.name!r} is not available in rdm_jax yet (only 'identity'); "
         "encode latents elsewhere and write them as a latents store")
  x = images.astype(np.float32) / 127.5 - 1.0
  ph, pw = _pads(x.shape[1], cfg.pad_to), _pads(x.shape[2], cfg.pad_to)
  return np.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=-1.0)


def decode(cfg: Any, latents: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
  """float latents [B, h, w, c] -> uint8 images [B, H, W, C] (inverse of `encode`)."""
  if cfg.name != "identity":
    fail(f"first stage {cfg.name!r} is not available in rdm_jax yet (only 'identity')")
  (t, _), (l, _) = _pads(image_hw[0], cfg.pad_to), _pads(image_hw[1], cfg.pad_to)
  x = np.asarray(latents)[:, t:t + image_hw[0], l:l + image_hw[1]]
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
