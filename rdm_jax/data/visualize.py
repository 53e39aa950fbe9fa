"""Image grids and neighbour panels as PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image

from rdm_jax import files


def grid(images: np.ndarray, ncol: int, pad: int = 2, fill: int = 255) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 image [rows*(H+pad)+pad, ncol*(W+pad)+pad, C]."""
  n, h, w, c = images.shape
  rows = -(-n // ncol)
  out = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncol)
    out[
      pad + r * (h + pad) : pad + r * (h + pad) + h,
      pad + col * (w + pad) : pad + col * (w + pad) + w,
    ] = images[i]
  return out


def resize_like(images: np.ndarray, hw: tuple[int, int], channels: int) -> np.ndarray:
  """uint8 [N, h, w, c] -> [N, H, W, channels]: bilinear resize and grey <-> RGB as needed."""
  if images.shape[1:3] != tuple(hw):
    images = np.stack(
      [
        np.asarray(
          Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).resize(
            (hw[1], hw[0]), Image.BILINEAR
          )
        ).reshape(hw + (im.shape[-1],))
        for im in images
      ]
    )
  if images.shape[-1] != channels:
    images = (
      images.repeat(channels, axis=-1)
      if images.shape[-1] == 1
      else np.round(images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[
        ..., None
      ].astype(np.uint8)
    )
  return images


def neighbor_panel(neighbors: np.ndarray, samples: np.ndarray, gap: int = 8) -> np.ndarray:
  """Rows of [k neighbour images | gap | sample]: neighbors [B, k, h, w, c], samples [B, H, W, C].

  Neighbours of another size or channel count (a database from another dataset) are shown
  resized and converted to the samples' H, W, C.
  """
  b, k = neighbors.shape[:2]
  left = grid(
    resize_like(
      neighbors.reshape((b * k,) + neighbors.shape[2:]), samples.shape[1:3], samples.shape[-1]
    ),
    ncol=k,
  )
  right = grid(samples, ncol=1)
  spacer = np.full((left.shape[0], gap, left.shape[2]), 255, np.uint8)
  return np.concatenate([left, spacer, right], axis=1)


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
  """Writes atomically; grayscale for one channel; nearest upscaling by `scale`."""
  if scale > 1:
    image = image.repeat(scale, axis=0).repeat(scale, axis=1)
  if image.shape[-1] == 1:
    image = image[..., 0]
  files.makedirs(files.dirname(path))
  files.atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))
