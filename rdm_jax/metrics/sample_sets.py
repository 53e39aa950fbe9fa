"""Reading sample sets and image folders for evaluation: uint8 [N, H, W, 1|3] arrays."""

from __future__ import annotations

import glob
import os

import numpy as np

from rdm_jax.errors import fail

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def read_image_folder(path: str) -> np.ndarray:
  """All PNG/JPEG images under `path` (sorted), as uint8 [N, H, W, 1|3]; sizes must agree."""
  from PIL import Image

  files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    fail(f"{path} holds no {', '.join(IMAGE_EXTENSIONS)} images")
  images = []
  for f in files:
    with Image.open(f) as im:
      a = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))
    images.append(a[..., None] if a.ndim == 2 else a)
    if images[-1].shape != images[0].shape:
      fail(f"{f} is {images[-1].shape} but {files[0]} is {images[0].shape}: images of one set must "
           "share size and channels; resize them first")
  return np.stack(images)


def read_samples(path: str) -> tuple[str, np.ndarray, list[str]]:
  """(label, uint8 images, captions) of a sample set: an .npz (optionally with `captions`, for
  the CLIP score of text-conditioned samples), a directory of .npz shards, or an image folder."""
  if path.endswith(".npz"):
    shards = [path]
  elif os.path.isdir(path):
    shards = sorted(glob.glob(os.path.join(path, "*.npz")))
    if not shards:
      return os.path.basename(path.rstrip("/")), read_image_folder(path), []
  else:
    fail(f"{path}: expected an .npz file, a directory of .npz shards or an image folder")
  images, label, captions = [], None, []
  for shard in shards:
    if not os.path.isfile(shard):
      fail(f"{shard} does not exist; run `python -m rdm_jax.sample` first")
    with np.load(shard, allow_pickle=False) as z:
      if "images" not in z:
        fail(f"{shard} has no 'images' array (keys: {', '.join(z.files)})")
      images.append(z["images"])
      label = label or (str(z["condition"]) if "condition" in z else None)
      if "captions" in z:
        captions.extend(str(c) for c in z["captions"])
  if len({im.shape[1:] for im in images}) > 1:
    fail(f"{path}: shards hold images of different shapes {sorted({im.shape[1:] for im in images})}")
  images = np.concatenate(images)
  if captions and len(captions) != len(images):
    fail(f"{path}: {len(captions)} captions for {len(images)} images; they must pair up")
  return label or os.path.basename(path).removesuffix(".npz"), images, captions
