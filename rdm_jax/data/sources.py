"""Image sources: IDX files (Fashion-MNIST / MNIST layout), TFDS as a fallback.

`load_split(cfg, split)` returns uint8 images [N, H, W, C] and int labels [N] of the named
part of a dataset ("train" | "database" | "test" for the embedded default), together with
`source` metadata written into manifests so any store can point back to its pixels
(neighbour provenance).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from typing import Any

import numpy as np

from rdm_jax.errors import fail

FASHION_MNIST_IDX_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")  # label 0..9, as Zalando's dataset card names them
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str, max_bytes: int | None = None) -> np.ndarray:
  """Reads an IDX file (optionally .gz); validates magic number and size.

  The header's declared size is checked (against `max_bytes`, default half the machine's
  memory) before the body is read or inflated, and exactly that many bytes are read.
  """
  opener = gzip.open if path.endswith(".gz") else open
  reinstall = "reinstall it (apt-get install --reinstall dataset-fashion-mnist)"
  try:
    with opener(path, "rb") as f:
      head = f.read(4)
      if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        fail(f"{path} is not an IDX file (bad magic number)")
      ndim = head[3]
      raw_dims = f.read(4 * ndim)
      if len(raw_dims) != 4 * ndim:
        fail(f"{path} is truncated (in its header); {reinstall}")
      dims = struct.unpack(">" + "I" * ndim, raw_dims)
      dtype = np.dtype(_IDX_DTYPES[head[2]])
      expected = math.prod(dims) * dtype.itemsize
      limit = max_bytes if max_bytes is not None else memory_budget()
      if expected > limit:
        fail(f"{path} declares {list(dims)} {dtype} ({expected / 2**30:.1f} GiB), more than the "
             f"{limit / 2**30:.1f} GiB it may take; it is not the dataset file it claims to be")
      body = f.read(expected)
      padded = bool(f.read(1))
  except (OSError, EOFError, zlib.error) as e:
    fail(f"cannot read {path} ({e}); {reinstall}")
  if len(body) != expected or padded:
    fail(f"{path} is truncated or padded: the header says {expected} bytes of data; {reinstall}")
  return np.frombuffer(body, dtype=dtype).reshape(dims)


def memory_budget() -> int:
  """Half the machine's memory: the most one declared array in an input file may take."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
  except (ValueError, OSError, AttributeError):
    return 8 << 30


def _find(idx_dir: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    path = os.path.join(idx_dir, name)
    if os.path.isfile(path):
      return path
  fail(f"{stem}(.gz) not found in {idx_dir}: `apt-get install dataset-fashion-mnist` "
       "or set config.dataset.idx_dir")


def load_idx_split(idx_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 [N, H, W, 1] and labels int32 [N] of an IDX split ("train" | "test")."""
  images_file, labels_file = _IDX_FILES[split]
  images = read_idx(_find(idx_dir, images_file))
  labels = read_idx(_find(idx_dir, labels_file)).astype(np.int32)
  if images.ndim != 3 or labels.shape != images.shape[:1]:
    fail(f"{idx_dir}: {split} images {images.shape} and labels {labels.shape} do not match")
  return images[..., None], labels


def load_tfds(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  import tensorflow_datasets as tfds
  try:
    ds = tfds.as_numpy(tfds.load(name, split=split, batch_size=-1, download=False))  # never fetched at run time
  except Exception as e:  # no local copy
    fail(f"TFDS {name}/{split} is not prepared locally ({type(e).__name__}); prepare it once with "
         f"`tfds build {name}` (or set TFDS_DATA_DIR), or install the IDX files (apt-get install dataset-fashion-mnist)")
  return ds["image"], ds["label"].astype(np.int32)


def class_names(dataset: Any) -> tuple[str, ...]:
  """The names of the dataset's labels 0..C-1 (config.dataset.class_names, or the known ones)."""
  names = tuple(dataset.get("class_names", ()) or ())
  if not names and dataset.name == "fashion_mnist":
    names = FASHION_MNIST_CLASSES
  return names


def load_source_split(dataset: Any, source_split: str) -> tuple[np.ndarray, np.ndarray]:
  """A whole split of the raw dataset named by `dataset.name` ("fashion_mnist")."""
  if dataset.name != "fashion_mnist":
    fail(f"dataset {dataset.name!r} has no image loader here; supported: fashion_mnist "
         "(bring latents and embeddings made elsewhere as stores instead)")
  idx_dir = dataset.get("idx_dir", FASHION_MNIST_IDX_DIR)
  if os.path.isdir(idx_dir):
    return load_idx_split(idx_dir, source_split)
  if dataset.get("allow_tfds", True):
    return load_tfds("fashion_mnist", source_split)
  fail(f"{idx_dir} does not exist: `apt-get install dataset-fashion-mnist`")


def split_range(dataset: Any, part: str) -> tuple[str, int, int]:
  """(source split, start, stop) of a part: 'train' | 'database' | 'test'."""
  spec = dataset.parts[part]
  return spec.split, spec.start, spec.stop


def check_disjoint(dataset: Any) -> None:
  """Training images and the database must not overlap (the paper's D is disjoint from X)."""
  tr_split, tr_a, tr_b = split_range(dataset, "train")
  db_split, db_a, db_b = split_range(dataset, "database")
  if tr_split == db_split and tr_a < db_b and db_a < tr_b:
    fail(f"config.dataset.parts: train [{tr_a}, {tr_b}) and database [{db_a}, {db_b}) of "
         f"'{tr_split}' overlap; make them disjoint")


def part_source(dataset: Any, part: str) -> dict[str, Any]:
  """The provenance a store of this part records: dataset, split, example range and where the
  images come from (the IDX directory, or TFDS when it does not exist): every field that
  changes the data, so a store made from other files is never reused."""
  split, start, stop = split_range(dataset, part)
  idx_dir = dataset.get("idx_dir", FASHION_MNIST_IDX_DIR)  # as load_source_split resolves it
  origin = os.path.realpath(idx_dir) if os.path.isdir(idx_dir) or not dataset.get("allow_tfds", True) else "tfds"
  return {"dataset": dataset.name, "split": split, "start": start, "stop": stop, "images_from": origin}


def load_part(dataset: Any, part: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """(images uint8 [N, H, W, C], labels [N], source metadata) of a configured part."""
  source = part_source(dataset, part)
  split, start, stop = source["split"], source["start"], source["stop"]
  images, labels = load_source_split(dataset, split)
  if not 0 <= start < stop <= len(images):
    fail(f"config.dataset.parts.{part} = [{start}, {stop}) is outside '{split}' (size {len(images)})")
  return images[start:stop], labels[start:stop], source
