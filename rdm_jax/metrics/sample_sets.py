"""Reading sample sets, reference sets and image folders for evaluation (uint8 [N, H, W, 1|3]
arrays), and the content-keyed cache of reference features."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from rdm_jax import files, untrusted
from rdm_jax.data import sources, store
from rdm_jax.errors import fail


def read_image_folder(path: str, budget: untrusted.Budget | None = None) -> np.ndarray:
  """All PNG/JPEG images under `path` (see `sources.image_files`), as uint8 [N, H, W, 1|3]; sizes
  must agree. Each image's pixels are charged to the job's budget from its
  header, before it is decoded."""
  budget = budget or untrusted.Budget(f"reading {path}")
  files = sources.image_files(path)
  if not files:
    fail(f"{path} holds no {', '.join(sources.IMAGE_EXTENSIONS)} images")
  images = []
  for f in files:
    try:
      with untrusted.image(f) as im:
        mode = "L" if im.mode in ("L", "1", "I;16") else "RGB"
        budget.charge(im.size[0] * im.size[1] * len(mode), f, "its pixels")
        a = np.asarray(im.convert(mode))
    except untrusted.UnreadableImage as e:
      fail(f"cannot read the image {e}; remove it from the folder or replace it")
    images.append(a[..., None] if a.ndim == 2 else a)
    if images[-1].shape != images[0].shape:
      fail(
        f"{f} is {images[-1].shape} but {files[0]} is {images[0].shape}: images of one set must "
        "share size and channels; resize them first"
      )
  return np.stack(images)


def default_sample_sets(workdir: str) -> list[str]:
  """The sample job's sets in <workdir>/samples: directories with its settings.json."""
  return [
    d
    for d in files.glob(files.join(workdir, "samples"), "*")
    if files.isfile(files.join(d, "settings.json"))
  ]


def check_complete(path: str, shards: list[str]) -> None:
  """A sample job's directory (it has settings.json) must hold all its shards: a killed run is
  finished by rerunning it, not evaluated on what it has."""
  settings = files.join(path, "settings.json")
  if not files.isfile(settings):
    return
  try:
    expected = files.read_json(settings)["num_shards"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    fail(
      f"{settings} does not say how many shards the set has ({e}); pass the shards as .npz files"
    )
  if not isinstance(expected, int) or len(shards) != expected:
    fail(
      f"{path} holds {len(shards)} of {expected} shards: its sample run did not finish; rerun the "
      "same `python -m rdm_jax.sample` command to complete it"
    )


def read_samples(
  path: str, budget: untrusted.Budget | None = None
) -> tuple[str, np.ndarray, list[str]]:
  """(label, uint8 images, captions) of a sample set: an .npz (optionally with `captions`, for
  the CLIP score of text-conditioned samples), a directory of .npz shards, or an image folder;
  what is read is charged to the job's `budget`."""
  budget = budget or untrusted.Budget(f"reading {path}")
  if path.endswith(".npz"):
    shards = [path]
  elif files.isdir(path):
    shards = files.glob(path, "*.npz")
    if not shards:
      return files.basename(files.normpath(path)), read_image_folder(path, budget), []
    check_complete(path, shards)
  else:
    fail(f"{path}: expected an .npz file, a directory of .npz shards or an image folder")
  images, label, captions = [], None, []
  if files.isdir(path):
    label = files.basename(files.normpath(path))  # a sample job's set: its directory's name
  for shard in shards:
    if not files.isfile(shard):
      fail(f"{shard} does not exist; run `python -m rdm_jax.sample` first")
    with files.load_npz(shard, budget) as z:
      images.append(z["images"])
      label = label or (str(z["condition"]) if "condition" in z else None)
      if "captions" in z:
        captions.extend(untrusted.caption(c, shard) for c in z["captions"])
  if len({im.shape[1:] for im in images}) > 1:
    fail(
      f"{path}: shards hold images of different shapes {sorted({im.shape[1:] for im in images})}"
    )
  images = np.concatenate(images)
  if captions and len(captions) != len(images):
    fail(f"{path}: {len(captions)} captions for {len(images)} images; they must pair up")
  return label or files.basename(path).removesuffix(".npz"), images, captions


def read_sample_sets(paths: list[str]) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
  """({row name: uint8 images}, {row name: captions}) of the sample sets; sets that share a
  condition (e.g. two seeds) get one row each, named by their file."""
  budget = untrusted.Budget("the evaluate job")
  read = [(p, *read_samples(p, budget)) for p in paths]
  labels = [name for _, name, _, _ in read]
  sets, captions = {}, {}
  for p, name, images, caps in read:
    if labels.count(name) > 1:
      name = f"{name} ({files.basename(files.normpath(p))})"
    if name in sets:
      fail(f"two sample sets are both called {name!r}; pass each once")
    sets[name], captions[name] = images, caps
  return sets, captions


def trained_on(paths: list[str], sets: dict[str, np.ndarray]) -> dict[str, str]:
  """{row name: the training data of the model that made the set} for sets made by the sample job
  (its settings.json records the model's `trained_on`); rows named as
  `read_sample_sets` names them."""
  out = {}
  for path, name in zip(paths, sets):
    settings = files.join(path, "settings.json")
    if files.isfile(settings):
      record = files.read_json(settings)
      out[name] = store.describe_stores(
        record.get("trained_on") if isinstance(record, dict) else None
      )
  return out


def read_reference(config: Any, spec: str, limit: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
  """(uint8 images, source description) of the reference set named by config.eval.reference: its
  first `limit` images (0: all); a dataset part reads only those (ImageNet's train split is not
  loaded whole)."""
  if spec in config.dataset.parts:
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
  fail(
    f"config.eval.reference={spec!r}: use a dataset part ({', '.join(config.dataset.parts)}), "
    "tfds:NAME/SPLIT, a folder of images or an .npz with 'images'"
  )


def cached_features(
  config: Any, extractor: Any, images: np.ndarray, source: dict[str, Any]
) -> dict[str, np.ndarray]:
  """{'features', 'logits'} of a real image set, computed once per (source, extractor, count,
  content) and cached as a store: the key holds the sha256 of the images themselves, so an
  image edited in place (any file, any subfolder, any mtime) is never scored from the cache."""
  key = {
    "source": source,
    "extractor": extractor.identity,
    "count": len(images),
    "images_sha256": store.checksum(images),
  }
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  path = os.path.join(config.data_dir, "eval_cache", f"{extractor.identity['name']}_{digest}")
  cached = store.read_if_current(path, "eval_features", "python -m rdm_jax.evaluate", **key)
  if cached is None:
    out = extractor(images, what=f"reference images {source}")
    cached = store.write(path, "eval_features", out, made_by="rdm_jax.evaluate", **key)
  return {name: np.asarray(cached[name]) for name in ("features", "logits")}
