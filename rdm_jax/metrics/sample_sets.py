"""Reading sample sets and image folders for evaluation: uint8 [N, H, W, 1|3] arrays."""

from __future__ import annotations

import glob
import math
import os

import numpy as np

from rdm_jax.data import sources
from rdm_jax.errors import fail

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def image_files(path: str) -> list[str]:
  """The PNG/JPEG files under `path`, sorted. Linked directories are not entered (a `loop -> .`
  link would repeat the folder) and a file reached twice through links counts once."""
  files, seen = [], set()
  for root, dirs, names in os.walk(path, followlinks=False):
    dirs.sort()
    for name in sorted(names):
      full = os.path.join(root, name)
      if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(full) and os.path.realpath(full) not in seen:
        seen.add(os.path.realpath(full))
        files.append(full)
  return sorted(files)


def read_image_folder(path: str) -> np.ndarray:
  """All PNG/JPEG images under `path` (see `image_files`), as uint8 [N, H, W, 1|3]; sizes must agree."""
  from PIL import Image

  files = image_files(path)
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


def npz_member(z: "np.lib.npyio.NpzFile", name: str, path: str) -> np.ndarray:
  """One array of an .npz, its declared shape and dtype checked before it is inflated: it must
  fit the member's stored size and half the machine's memory (a small file cannot claim GiBs)."""
  info = z.zip.getinfo(name + ".npy")
  with z.zip.open(info) as f:
    try:
      version = np.lib.format.read_magic(f)
      shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                         else np.lib.format.read_array_header_2_0)(f)
    except ValueError as e:
      fail(f"{path}: {name} is not a readable array ({e})")
    header = f.tell()
  nbytes = math.prod(shape) * dtype.itemsize
  if dtype.hasobject or header + nbytes != info.file_size or nbytes > sources.memory_budget():
    fail(f"{path}: {name} declares {dtype}{list(shape)} ({nbytes / 2**30:.2f} GiB) in a member of "
         f"{info.file_size} bytes; rewrite the sample set with np.savez")
  return z[name]


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
        fail(f"{shard} has no 'images' array (keys: {', '.join(z.files)[:200]})")
      images.append(npz_member(z, "images", shard))
      label = label or (str(npz_member(z, "condition", shard)) if "condition" in z else None)
      if "captions" in z:
        captions.extend(str(c) for c in npz_member(z, "captions", shard))
  if len({im.shape[1:] for im in images}) > 1:
    fail(f"{path}: shards hold images of different shapes {sorted({im.shape[1:] for im in images})}")
  images = np.concatenate(images)
  if captions and len(captions) != len(images):
    fail(f"{path}: {len(captions)} captions for {len(images)} images; they must pair up")
  return label or os.path.basename(path).removesuffix(".npz"), images, captions
