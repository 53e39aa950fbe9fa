"""Reading sample sets, reference sets and image folders for evaluation (uint8 [N, H, W, 1|3]
arrays), and the content-keyed cache of reference features."""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import numpy as np

from rdm_jax import files
from rdm_jax.data import sources, store
from rdm_jax.errors import fail

def read_image_folder(path: str) -> np.ndarray:
  """All PNG/JPEG images under `path` (see `sources.image_files`), as uint8 [N, H, W, 1|3]; sizes must agree."""
  from PIL import Image

  files = sources.image_files(path)
  if not files:
    fail(f"{path} holds no {', '.join(sources.IMAGE_EXTENSIONS)} images")
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
  npz_header(z, name, path)
  return z[name]


def npz_header(z: "np.lib.npyio.NpzFile", name: str, path: str) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) an .npz member declares, checked against its stored size and half the
  machine's memory, without inflating it."""
  if name + ".npy" not in z.zip.namelist():
    fail(f"{path} has no array {name!r} (it has {', '.join(z.files) or 'none'})")
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
         f"{info.file_size} bytes; rewrite it with np.savez")
  return tuple(shape), dtype


def default_sample_sets(workdir: str) -> list[str]:
  """The sample job's sets in <workdir>/samples: directories with its settings.json."""
  return [d for d in files.glob(files.join(workdir, "samples"), "*") if files.isfile(files.join(d, "settings.json"))]


def check_complete(path: str, shards: list[str]) -> None:
  """A sample job's directory (it has settings.json) must hold all its shards: a killed run is
  finished by rerunning it, not evaluated on what it has."""
  settings = files.join(path, "settings.json")
  if not files.isfile(settings):
    return
  try:
    expected = json.loads(files.read_text(settings))["num_shards"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    fail(f"{settings} does not say how many shards the set has ({e}); pass the shards as .npz files")
  if not isinstance(expected, int) or len(shards) != expected:
    fail(f"{path} holds {len(shards)} of {expected} shards: its sample run did not finish; rerun the same "
         "`python -m rdm_jax.sample` command to complete it")


def read_samples(path: str) -> tuple[str, np.ndarray, list[str]]:
  """(label, uint8 images, captions) of a sample set: an .npz (optionally with `captions`, for
  the CLIP score of text-conditioned samples), a directory of .npz shards, or an image folder."""
  if path.endswith(".npz"):
    shards = [path]
  elif files.isdir(path):
    shards = files.glob(path, "*.npz")
    if not shards:
      return files.basename(files.normpath(path)), read_image_folder(path), []
    check_complete(path, shards)
  else:
    fail(f"{path}: expected an .npz file, a directory of .npz shards or an image folder")
  images, label, captions = [], None, []
  if files.isdir(path):
    label = files.basename(files.normpath(path))  # a sample job's set: its directory's name
  for shard in shards:
    if not files.isfile(shard):
      fail(f"{shard} does not exist; run `python -m rdm_jax.sample` first")
    with files.load_npz(shard) as z:
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
  return label or files.basename(path).removesuffix(".npz"), images, captions


def read_sample_sets(paths: list[str]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
  """({row name: uint8 images}, {row name: captions}) of the sample sets; sets that share a
  condition (e.g. two seeds) get one row each, named by their file."""
  read = [(p, *read_samples(p)) for p in paths]
  labels = [name for _, name, _, _ in read]
  sets, captions = {}, {}
  for p, name, images, caps in read:
    if labels.count(name) > 1:
      name = f"{name} ({files.basename(files.normpath(p))})"
    if name in sets:
      fail(f"two sample sets are both called {name!r}; pass each once")
    sets[name], captions[name] = images, caps
  return sets, captions


def read_reference(config: Any, spec: str, limit: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
  """(uint8 images, source description) of the reference set named by config.eval.reference: its
  first `limit` images (0: all); a dataset part reads only those (ImageNet's train split is not
  loaded whole)."""
  if spec in config.dataset.get("parts", {}):
    part = sources.open_part(config.dataset, spec)
    images, ok, unreadable = part.readable(0, limit or None)
    for why in unreadable:
      print(f"reference {spec}: skipping unreadable image {why}")
    return images[ok], part.source
  if spec.startswith("tfds:"):
    name, _, split = spec[5:].partition("/")
    images, _ = sources.load_tfds(name, split or "test")
    return images, {"tfds": name, "split": split or "test"}
  if spec.endswith(".npz") or os.path.isdir(spec):
    _, images, _ = read_samples(spec)
    return images, {"path": os.path.realpath(spec)}
  fail(f"config.eval.reference={spec!r}: use a dataset part ({', '.join(config.dataset.get('parts', {}))}), "
       "tfds:NAME/SPLIT, a folder of images or an .npz with 'images'")


def cached_features(config: Any, extractor: Any, images: np.ndarray,
                    source: dict[str, Any]) -> dict[str, np.ndarray]:
  """{'features', 'logits'} of a real image set, computed once per (source, extractor, count,
  content) and cached as a store: the key holds the sha256 of the images themselves, so an
  image edited in place (any file, any subfolder, any mtime) is never scored from the cache."""
  key = {"source": source, "extractor": extractor.identity, "count": len(images),
         "images_sha256": store.checksum(images)}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  path = os.path.join(config.data_dir, "eval_cache", f"{extractor.identity['name']}_{digest}")
  cached = store.reusable(path, "eval_features", "python -m rdm_jax.evaluate", **key)
  if cached is None:
    out = extractor(images, what=f"reference images {source}")
    cached = store.write(path, "eval_features", out, made_by="rdm_jax.evaluate", **key)
  return {name: np.asarray(cached[name]) for name in ("features", "logits")}
