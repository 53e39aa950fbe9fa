"""Image sources: IDX files (Fashion-MNIST / MNIST layout), TFDS datasets, image folders.

`open_part(dataset, part)` gives the examples of a named part of a dataset ("train" |
"database" | "test"), with the `source` record written into manifests so any store can point
back to its pixels (neighbour provenance); `open_source(dataset, record)` reads that split again
from a store's record (one `Source` class per kind: IDX, TFDS, image folder).

A part whose split is "folder:PATH" comes from every PNG/JPEG under PATH (sorted; linked folders
not entered), e.g. the openclipart-png package's clip art as a new database: transparency
composited on `dataset.folder.background`, padded to a square with it, resized to
`dataset.folder.image_size` and converted to `dataset.folder.channels`; the label of an image is
the index of its top-level subfolder among the sorted subfolders (-1 for files at the top).

A part whose split is "tfds:NAME/SPLIT" (or any split of a `dataset.name` other than
fashion_mnist, e.g. imagenet2012) is read from a TFDS dataset prepared locally (never
downloaded at run time), streamed in file order: the shorter side resized to
`dataset.image_size` (PIL bicubic, antialiased), then centre-cropped square, as the ImageNet
loaders of the original (taming's ImagePaths: SmallestMaxSize + CenterCrop) without their
random crop. `open_part` gives a part's ids, labels and an image reader that loads only the
rows asked for, so a 1.28M-image split never sits in memory. `part_arrays` reads a small part (a
demo's, a test's) into memory whole.

`dataset.label_range` keeps the examples whose label is in the range, read as the original
`SubsetSampler` reads it: two values [a, b] that are not neighbours mean every label from
min to max inclusive (ImageNet dogs [151, 280]); any other list is the labels themselves.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import hashlib
import math
import os
import struct
import zlib
from typing import Any, Callable, Iterator

import numpy as np

from rdm_jax import config_base, untrusted
from rdm_jax.data import store
from rdm_jax.errors import fail

FASHION_MNIST_IDX_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)  # label 0..9, as Zalando's dataset card names them
_IDX_FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str, max_bytes: int | None = None) -> np.ndarray:
  """Reads an IDX file (optionally .gz); validates magic number and size.

  The header's declared size is checked (against `max_bytes`, default the job's memory budget,
  `untrusted.memory_budget()`) before the body is read or inflated, and exactly that many bytes
  are read.
  """
  reinstall = "reinstall it (apt-get install --reinstall dataset-fashion-mnist)"
  try:
    with (
      untrusted.open_regular(path) as raw,
      gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw as f,
    ):
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
      limit = max_bytes if max_bytes is not None else untrusted.memory_budget()
      if expected > limit:
        fail(
          f"{path} declares {list(dims)} {dtype} ({expected / 2**30:.1f} GiB), more than the "
          f"{limit / 2**30:.1f} GiB it may take; it is not the dataset file it claims to be"
        )
      body = f.read(expected)
      padded = bool(f.read(1))
  except (OSError, EOFError, zlib.error) as e:
    fail(f"cannot read {path} ({e}); {reinstall}")
  if len(body) != expected or padded:
    fail(f"{path} is truncated or padded: the header says {expected} bytes of data; {reinstall}")
  return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find(idx_dir: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    path = os.path.join(idx_dir, name)
    if os.path.isfile(path):
      return path
  fail(
    f"{stem}(.gz) not found in {idx_dir}: `apt-get install dataset-fashion-mnist` "
    "or set config.dataset.idx_dir"
  )


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
    ds = tfds.as_numpy(
      tfds.load(name, split=split, batch_size=-1, download=False)
    )  # never fetched at run time
  except Exception as e:  # no local copy
    fail(
      f"TFDS {name}/{split} is not prepared locally ({type(e).__name__}); prepare it once with "
      f"`tfds build {name}` (or set TFDS_DATA_DIR), or install the IDX files (apt-get "
      "install dataset-fashion-mnist)"
    )
  return ds["image"], ds["label"].astype(np.int32)


IMAGENET_CLASSES_FILE = os.path.join(os.path.dirname(__file__), "imagenet2012_classes.txt")


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
  """ImageNet-1k's 1000 class names in TFDS imagenet2012's label order ("tench", ..., "toilet
  tissue")."""
  with open(IMAGENET_CLASSES_FILE, encoding="utf-8") as f:
    return tuple(line.strip() for line in f if line.strip() and not line.startswith("#"))


def class_names(dataset: Any) -> tuple[str, ...]:
  """The names of the dataset's labels 0..C-1 (config.dataset.class_names, or the known ones:
  Fashion-MNIST's, ImageNet-1k's)."""
  names = tuple(dataset.class_names or ())
  if not names and dataset.name == "fashion_mnist":
    names = FASHION_MNIST_CLASSES
  if not names and dataset.name == "imagenet2012":
    names = imagenet_classes()
  return names


FOLDER = "folder:"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
BACKGROUNDS = {"white": 255, "black": 0}


def image_files(path: str) -> list[str]:
  """The PNG/JPEG files under `path`, sorted. Linked directories are not entered (a `loop -> .`
  link would repeat the folder) and a file reached twice through links counts once."""
  files, seen = [], set()
  for root, dirs, names in os.walk(path, followlinks=False):
    dirs.sort()
    for name in sorted(names):
      full = os.path.join(root, name)
      if (
        name.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(full)
        and os.path.realpath(full) not in seen
      ):
        seen.add(os.path.realpath(full))
        files.append(full)
  return sorted(files)


def read_file_list(list_file: str, what: str) -> list[str]:
  """The relative image paths a file list names, one per line (the original's data/ffhqtrain.txt);
  blank lines are skipped, paths leaving the folder are refused."""
  if not os.path.isfile(list_file):
    fail(f"{what}: the file list {list_file} does not exist")
  with untrusted.open_regular(list_file) as fh:
    data = fh.read((64 << 20) + 1)
  if len(data) > 64 << 20:
    fail(f"{what}: {list_file} is over 64 MiB; a file list holds one relative image path per line")
  try:
    names = [os.path.normpath(x.strip()) for x in data.decode("utf-8").splitlines() if x.strip()]
  except UnicodeDecodeError:
    fail(f"{what}: {list_file} is not UTF-8 text (one relative image path per line)")
  bad = [n for n in names if os.path.isabs(n) or n.split(os.sep)[0] == ".."]
  if bad or not names:
    fail(
      f"{what}: {list_file} must list image paths relative to the folder, one per line "
      f"({'e.g. ' + bad[0] + ' is not' if bad else 'it lists none'})"
    )
  if len(set(names)) != len(names):
    fail(f"{what}: {list_file} lists {len(names) - len(set(names))} paths twice; each image once")
  return names


def listed_files(usable: list[str], list_file: str, what: str) -> list[str]:
  """The files of a folder a file list names, in the list's order; every one must be usable."""
  names = read_file_list(list_file, what)
  have = set(usable)
  missing = [n for n in names if n not in have]
  if missing:
    fail(
      f"{what}: {len(missing)} of the {len(names)} images {list_file} lists are not usable images "
      f"of the folder ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); complete "
      "the folder or fix the list"
    )
  return names


def folder_settings(dataset: Any, split: str, file_list: str = "") -> dict[str, Any]:
  """What a "folder:PATH" split's pixels depend on: the folder, its usable files (names and sizes,
  digested; files PIL cannot open or over `folder.max_pixels` are skipped and listed) or those a
  `file_list` names (in its order), and the size, channels and background they are converted to."""
  path = split[len(FOLDER) :]
  if not os.path.isdir(path):
    fail(
      f"{path} is not a folder of images (split {split!r}); "
      "e.g. `apt-get install openclipart-png` gives folder:/usr/share/openclipart/png"
    )
  f = dataset.folder
  size, channels, background = f.image_size, f.channels, f.background
  max_pixels = f.max_pixels or untrusted.MAX_IMAGE_PIXELS
  if size < 1 or channels not in (1, 3) or background not in BACKGROUNDS:
    fail(
      f"config.dataset.folder = {dict(f)}: give image_size > 0, channels 1 or 3 and background "
      f"{' or '.join(BACKGROUNDS)} (what the folder's images are converted to)"
    )
  files, skipped, digest = folder_listing(path, max_pixels)
  if not files:
    fail(f"{path} holds no usable {', '.join(IMAGE_EXTENSIONS)} images ({len(skipped)} skipped)")
  listing = {}
  if file_list:
    files = listed_files(files, file_list, f"split {split!r}")
    digest = _files_digest(path, files)
    listing = {
      "file_list": os.path.realpath(file_list),
      "file_list_sha256": store.file_sha256(file_list),
    }
  record = {
    "images_from": os.path.realpath(path),
    "image_size": int(size),
    "channels": int(channels),
    "background": background,
    "max_pixels": int(max_pixels),
    "files": len(files),
    "files_sha256": digest,
    "skipped": skipped,
    "classes": list(folder_classes(files)),
    **listing,
  }
  captions = os.path.join(path, f.captions or CAPTIONS_FILE)
  if os.path.isfile(captions):
    record.update(
      captions_file=os.path.realpath(captions), captions_sha256=store.file_sha256(captions)
    )
  return record


CAPTIONS_FILE = (
  "captions.jsonl"  # an image folder's captions: {"file": relative path, "caption": text} per line
)


_MAX_CAPTION_LINE = (
  8 * untrusted.MAX_CAPTION_CHARS + 4096
)  # bytes: a caption's UTF-8 and JSON escapes, a path


def folder_captions(settings: dict[str, Any], files: list[str]) -> np.ndarray | None:
  """Captions of an image folder's files from its side file ("" for a file it does not list), or
  None without one; the side file must be the one the store's record digested. Each is a str of
  at most `untrusted.MAX_CAPTION_CHARS` characters in an object array (each costs only itself)."""
  path = settings.get("captions_file")
  if not path:
    return None
  if not os.path.isfile(path) or store.file_sha256(path) != settings.get("captions_sha256"):
    fail(f"{path} changed or went away since the stores were made from it; embed the folder again")
  by_file: dict[str, str] = {}
  with untrusted.open_regular(path) as fh:
    for n, line in enumerate(iter(lambda: fh.readline(_MAX_CAPTION_LINE + 1), b""), 1):
      if len(line) > _MAX_CAPTION_LINE:
        fail(
          f"{path}:{n} is longer than {_MAX_CAPTION_LINE} bytes; captions may have at most "
          f"{untrusted.MAX_CAPTION_CHARS} characters: shorten it"
        )
      if not line.strip():
        continue
      entry = untrusted.parse_json(line, f"{path}:{n}")
      if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("file"), str)
        or "caption" not in entry
      ):
        fail(f'{path}:{n} is not a JSON object with "file" and "caption"; fix that line')
      by_file[os.path.normpath(entry["file"])] = untrusted.caption(entry["caption"], f"{path}:{n}")
  return np.array([by_file.get(os.path.normpath(f), "") for f in files] + [None], dtype=object)[:-1]


_LISTINGS: dict[tuple[str, int], tuple[tuple, tuple[list[str], list[str], str]]] = {}


def folder_listing(path: str, max_pixels: int) -> tuple[list[str], list[str], str]:
  """(usable files, skipped files with the reason, sha256 of the usable files' names and sizes):
  one pass over the folder's headers (`usable_images`), reused within a process while no file's
  name, size or modification time changed (a job asks several times; a stat is much cheaper
  than opening an image)."""
  stats = tuple((f, st.st_size, st.st_mtime_ns) for f in image_files(path) for st in [os.stat(f)])
  cached = _LISTINGS.get((path, max_pixels))
  if cached is not None and cached[0] == stats:
    files, skipped, digest = cached[1]
    return list(files), list(skipped), digest
  files, skipped = usable_images(path, max_pixels)
  digest = _files_digest(path, files)
  _LISTINGS[(path, max_pixels)] = (stats, (list(files), list(skipped), digest))
  return files, skipped, digest


def _files_digest(path: str, files: list[str]) -> str:
  digest = hashlib.sha256()
  for name in files:
    digest.update(f"{name}\0{os.path.getsize(os.path.join(path, name))}\0".encode())
  return digest.hexdigest()


def folder_classes(files: list[str] | tuple[str, ...]) -> tuple[str, ...]:
  """The sorted top-level subfolders of relative file paths: label i is classes[i]."""
  return tuple(sorted({f.split(os.sep)[0] for f in files if os.sep in f}))


def folder_labels(files: list[str] | tuple[str, ...]) -> np.ndarray:
  """int32 labels of relative file paths: the index of the top-level subfolder, -1 at the top."""
  classes = folder_classes(files)
  return np.array(
    [classes.index(f.split(os.sep)[0]) if os.sep in f else -1 for f in files], np.int32
  )


def usable_images(path: str, max_pixels: int) -> tuple[list[str], list[str]]:
  """(the image files under `path` that PIL opens and that have at most max_pixels pixels, the
  others with the reason), as paths relative to `path`; only headers are read."""
  files, skipped = [], []
  for full in image_files(path):
    name = os.path.relpath(full, path)
    try:
      with untrusted.image(full, max_pixels=1 << 62) as im:
        w, h = im.size
    except untrusted.UnreadableImage as e:
      skipped.append(f"{name}: {e.why}")
      continue
    if w * h > max_pixels:
      skipped.append(f"{name}: {w}x{h} pixels")
    else:
      files.append(name)
  return files, skipped


def _open_image(name: str, channels: int, fill: int, max_pixels: int = untrusted.MAX_IMAGE_PIXELS):
  """A PIL image in mode L or RGB, transparency composited on `fill`; raises
  untrusted.UnreadableImage."""
  from PIL import Image

  with untrusted.image(name, max_pixels) as im:
    im.load()
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
      rgba = im.convert("RGBA")
      im = Image.alpha_composite(Image.new("RGBA", rgba.size, (fill, fill, fill, 255)), rgba)
    return im.convert("L" if channels == 1 else "RGB")


def _folder_image(
  name: str,
  size: int,
  channels: int,
  fill: int,
  lenient: bool = False,
  max_pixels: int = untrusted.MAX_IMAGE_PIXELS,
) -> np.ndarray | str:
  """One image file as uint8 [size, size, channels] (see the module docstring); an unreadable
  file is one line, or with `lenient` the str saying why."""
  from PIL import Image

  try:
    im = _open_image(name, channels, fill, max_pixels)
  except untrusted.UnreadableImage as e:
    if lenient:
      return f"{name}: {type(e).__name__}: {str(e)[:100]}"
    fail(f"cannot read the image {name} ({e}); remove it from the folder or replace it")
  w, h = im.size
  side = max(w, h)
  square = Image.new(im.mode, (side, side), fill if channels == 1 else (fill,) * 3)
  square.paste(im, ((side - w) // 2, (side - h) // 2))
  a = np.asarray(square.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0))
  return a[..., None] if a.ndim == 2 else a


def _threaded(fn: Callable[[Any], Any], items) -> list:
  """[fn(x) for x in items] on a thread per core: PIL decodes without the GIL."""
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    return list(pool.map(fn, items))


def folder_files(settings: dict[str, Any]) -> list[str]:
  """The usable files of an image folder as `folder_settings` listed them (relative paths);
  refused when the folder changed since."""
  path = settings["images_from"]
  files, _, digest = folder_listing(path, settings["max_pixels"])
  if settings.get("file_list"):
    list_file = settings["file_list"]
    if not os.path.isfile(list_file) or store.file_sha256(list_file) != settings.get(
      "file_list_sha256"
    ):
      fail(
        f"the file list {list_file} changed or went away since the stores were made from it; "
        "embed the folder again"
      )
    usable = set(files)
    files = [f for f in read_file_list(list_file, f"folder {path}") if f in usable]
    digest = _files_digest(path, files)
  if digest != settings["files_sha256"]:
    fail(
      f"the images in {path} changed ({len(files)} usable files now, {settings['files']} then): "
      "the stores made from it no longer match; embed the folder again"
    )
  return files


def has_pixels(source: dict[str, Any]) -> bool:
  """Whether a store's entries can be shown: not for embeddings imported from a file (a .npy of
  one's own, the original's .npz database), which carry no images."""
  return not source.get("file")


def fashion_mnist_split(dataset: Any, source_split: str) -> tuple[np.ndarray, np.ndarray]:
  """A whole in-memory split of the raw dataset named by `dataset.name` ("fashion_mnist")."""
  idx_dir = dataset.idx_dir
  if os.path.isdir(idx_dir):
    return load_idx_split(idx_dir, source_split)
  if dataset.allow_tfds:
    return load_tfds("fashion_mnist", source_split)
  fail(f"{idx_dir} does not exist: `apt-get install dataset-fashion-mnist`")


TFDS = "tfds:"


def tfds_name_split(dataset: Any, split: str) -> tuple[str, str] | None:
  """(TFDS name, split) when a part's split is read from TFDS, else None."""
  if split.startswith(TFDS):
    name, _, sub = split[len(TFDS) :].partition("/")
    if not name or not sub:
      fail(f"split {split!r}: write tfds:NAME/SPLIT, e.g. tfds:imagenet2012/train")
    return name, sub
  if split.startswith(FOLDER) or dataset.name == "fashion_mnist":
    return None
  return dataset.name, split


def label_set(label_range: Any) -> np.ndarray | None:
  """The labels `dataset.label_range` keeps (None: all), as `rdm.data.base.SubsetSampler` reads
  it."""
  r = [int(x) for x in (label_range or ())]
  if not r:
    return None
  if len(r) == 2 and abs(r[1] - r[0]) != 1:
    return np.arange(min(r), max(r) + 1)
  return np.unique(r)


def _tfds_builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds

  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # unknown name, no local copy
    fail(
      f"TFDS dataset {name!r} is not available ({type(e).__name__}: {str(e)[:200]}); prepare it "
      f"once with `tfds build {name}` (ImageNet: put the tar files in "
      "~/tensorflow_datasets/downloads/manual) or set config.dataset.tfds_data_dir"
    )


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] with its shorter side resized to `size` (PIL bicubic, antialiased; 0 or the
  same size: unchanged)."""
  if not size or min(image.shape[:2]) == size:
    return image
  from PIL import Image

  h, w = image.shape[:2]
  scale = size / min(h, w)
  im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  a = np.asarray(
    im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
  )
  return a[..., None] if a.ndim == 2 else a


class TfdsReader:
  """Streams a TFDS split in file order (no shuffling), decoding only the examples asked for."""

  def __init__(
    self, name: str, split: str, data_dir: str, image_size: int, caption_feature: str = "auto"
  ):
    if image_size < 1:
      fail(
        f"TFDS source {name}/{split}: set config.dataset.image_size (e.g. 256) to size its images"
      )
    self.name, self.split, self.data_dir, self.image_size = name, split, data_dir, image_size
    self.caption_feature = caption_feature
    self._it: Iterator | None = None
    self._pos = 0

  def _dataset(self, decode_images: bool):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")
    builder = _tfds_builder(self.name, self.data_dir)
    try:
      return builder.as_dataset(
        split=self.split,
        shuffle_files=False,
        read_config=tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=False),
        decoders=None if decode_images else {"image": tfds.decode.SkipDecoding()},
      )
    except Exception as e:
      fail(
        f"TFDS {self.name}/{self.split} is not prepared locally ({type(e).__name__}: "
        f"{str(e)[:200]}); run `tfds build {self.name}` once or set config.dataset.tfds_data_dir"
      )

  @functools.cached_property
  def _index(self) -> tuple[np.ndarray, np.ndarray | None]:
    ds = self._dataset(decode_images=False)
    has_label = "label" in ds.element_spec
    path = caption_path(ds.element_spec, self.caption_feature, f"TFDS {self.name}")
    labels, captions = [], []
    for ex in ds.as_numpy_iterator():
      labels.append(int(ex["label"]) if has_label else -1)
      if path:
        captions.append(_caption_of(ex, path))
    return np.array(labels, np.int32), (
      np.array(captions + [None], dtype=object)[:-1] if path else None
    )

  @property
  def labels(self) -> np.ndarray:
    """Every example's label (-1 when the dataset has none), in file order: one pass, images
    skipped."""
    return self._index[0]

  @property
  def captions(self) -> np.ndarray | None:
    """Every example's caption (its first, for a list of them), from the same pass; None without."""
    return self._index[1]

  def _image(self, image: np.ndarray) -> np.ndarray:
    a, s = resize_shorter_side(image, self.image_size), self.image_size
    top, left = (a.shape[0] - s) // 2, (a.shape[1] - s) // 2
    return a[top : top + s, left : left + s]

  def read(self, ids: np.ndarray, raw: bool = False, lenient: bool = False) -> np.ndarray | list:
    """uint8 images [len(ids), s, s, C] of the examples at file positions `ids` (ascending); with
    `raw`, the list of decoded images at their own sizes. A record that does not decode is one
    line naming it, or with `lenient` (a list is returned) the str saying why, in its place."""
    import tensorflow as tf

    ids = np.asarray(ids, np.int64)
    if len(ids) and (np.any(np.diff(ids) <= 0) or ids[0] < 0):
      raise ValueError("TfdsReader.read takes ascending, unique positions")
    feature = _tfds_builder(self.name, self.data_dir).info.features["image"]
    out = []
    for i in ids:
      if self._it is None or i < self._pos:  # (re)start: skip to i without decoding what is skipped
        self._it = iter(self._dataset(decode_images=False).skip(int(i)).as_numpy_iterator())
        self._pos = int(i)
      while self._pos < i:
        next(self._it)
        self._pos += 1
      try:
        encoded = next(self._it)["image"]
      except StopIteration:
        fail(f"TFDS {self.name}/{self.split} has no example {i}")
      self._pos += 1
      try:  # decoded here, one record at a time, so that a corrupt one is skipped, not fatal
        image = feature.decode_example(tf.constant(encoded)).numpy()
      except (tf.errors.InvalidArgumentError, ValueError) as e:
        why = (
          f"TFDS {self.name}/{self.split} example {i}: {type(e).__name__}: "
          f"{' '.join(str(e).split())[:100]}"
        )
        if not lenient:
          fail(f"cannot decode {why}")
        out.append(why)
        continue
      out.append(image if raw else self._image(image))
    if raw or lenient:
      return out
    return np.stack(out) if out else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)


@functools.lru_cache(maxsize=8)
def _cached_tfds_reader(
  name: str, split: str, data_dir: str, image_size: int, caption_feature: str = "auto"
) -> TfdsReader:
  return TfdsReader(name, split, data_dir, image_size, caption_feature)


class Source:
  """The split a store's `source` record names, as images, labels and captions: one subclass per
  kind of record (an in-memory IDX split, a TFDS split, an image folder); `open_source` picks it.
  Records are read back from manifests, so a subclass trusts only the fields its kind writes."""

  def __init__(self, dataset: Any, record: dict[str, Any]):
    self.dataset, self.record = dataset, record

  def reader(self, lenient: bool = False) -> tuple[Callable[[np.ndarray], Any], np.ndarray]:
    """(read(ids) -> uint8 images [n, H, W, C], labels of the whole split). With `lenient`,
    read(ids) gives a list: an image per id, or the str saying why it is unreadable (a corrupt
    file or record), for the caller to skip and count."""
    raise NotImplementedError

  def raw_reader(self) -> Callable[[np.ndarray], list]:
    """read(ids) -> for each id its image at full resolution (uint8 [H, W, C], not resized), or
    a str saying why it cannot be read."""
    read, _ = self.reader(lenient=True)
    return read

  def captions(self) -> np.ndarray | None:
    """Captions of the whole split (str [N]), or None when it has none."""
    return None

  def class_names(self) -> tuple[str, ...]:
    """The names of labels 0..C-1 (the dataset's `class_names`)."""
    return class_names(self.dataset)

  def image_shape(self, read: Callable[[np.ndarray], np.ndarray], ids: np.ndarray) -> tuple:
    """(H, W, C) of every image `read` gives."""
    return tuple(read(ids[:1]).shape[1:])


class IdxSource(Source):
  """A whole split held in memory: Fashion-MNIST's IDX files (or its TFDS copy)."""

  @functools.cached_property
  def _images_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the whole split, loaded once per Source."""
    if self.record.get("dataset") != self.dataset.name:
      fail(
        f"the store comes from {self.record.get('dataset')!r} but config.dataset.name is "
        f"{self.dataset.name!r}; no image loader configured for it"
      )
    return fashion_mnist_split(self.dataset, self.record["split"])

  def reader(self, lenient: bool = False) -> tuple[Callable[[np.ndarray], Any], np.ndarray]:
    images, labels = self._images_and_labels
    if lenient:  # in memory: every image is readable
      return (lambda ids: list(images[np.asarray(ids, np.int64)])), labels
    return (lambda ids: images[np.asarray(ids, np.int64)]), labels


class TfdsSource(Source):
  """A TFDS split, streamed by row (shorter side to image_size, centre crop)."""

  def tfds_reader(self) -> TfdsReader:
    """The split's streaming reader (shared by every Source of the same split)."""
    r = self.record
    return _cached_tfds_reader(
      r["tfds_name"],
      r["tfds_split"],
      r.get("tfds_data_dir", ""),
      r["image_size"],
      r.get("caption_feature", "auto"),
    )

  def reader(self, lenient: bool = False) -> tuple[Callable[[np.ndarray], Any], np.ndarray]:
    tfds_reader = self.tfds_reader()

    def read(ids):
      ids = np.asarray(ids, np.int64)
      order, inverse = np.unique(ids, return_inverse=True)
      images = tfds_reader.read(order, lenient=lenient)
      return [images[j] for j in inverse.reshape(-1)] if lenient else images[inverse.reshape(-1)]

    return read, tfds_reader.labels

  def raw_reader(self) -> Callable[[np.ndarray], list]:
    tfds_reader = self.tfds_reader()
    return lambda ids: tfds_reader.read(np.asarray(ids, np.int64), raw=True, lenient=True)

  def captions(self) -> np.ndarray | None:
    return self.tfds_reader().captions

  def image_shape(self, read: Callable[[np.ndarray], np.ndarray], ids: np.ndarray) -> tuple:
    r = self.record
    feature = _tfds_builder(r["tfds_name"], r.get("tfds_data_dir", "")).info.features["image"]
    return (r["image_size"], r["image_size"], int(feature.shape[-1] or 3))


class FolderSource(Source):
  """An image folder: only the files asked for are decoded, converted as the record says
  (channels, background, size); labels are the top-level subfolders."""

  @functools.cached_property
  def files(self) -> list[str]:
    """The folder's files as the record lists them, checked against the folder once per Source."""
    return folder_files(self.record)

  def reader(self, lenient: bool = False) -> tuple[Callable[[np.ndarray], Any], np.ndarray]:
    r, files = self.record, self.files
    path, size, channels = r["images_from"], r["image_size"], r["channels"]
    fill = BACKGROUNDS[r["background"]]

    def read_files(ids):
      out = _threaded(
        lambda i: _folder_image(
          os.path.join(path, files[int(i)]), size, channels, fill, lenient, r["max_pixels"]
        ),
        ids,
      )
      return (
        out if lenient else np.stack(out) if out else np.zeros((0, size, size, channels), np.uint8)
      )

    return read_files, folder_labels(files)

  def raw_reader(self) -> Callable[[np.ndarray], list]:
    r, files = self.record, self.files

    def read_file(i):
      name = os.path.join(r["images_from"], files[i])
      try:
        a = np.asarray(
          _open_image(name, r["channels"], BACKGROUNDS[r["background"]], r["max_pixels"])
        )
      except untrusted.UnreadableImage as e:
        return f"{files[i]}: {str(e)[:200]}"
      return a[..., None] if a.ndim == 2 else a

    return lambda ids: _threaded(read_file, [int(i) for i in ids])

  def captions(self) -> np.ndarray | None:
    return folder_captions(self.record, self.files)

  def class_names(self) -> tuple[str, ...]:
    return tuple(self.record.get("classes", ()))

  def image_shape(self, read: Callable[[np.ndarray], np.ndarray], ids: np.ndarray) -> tuple:
    return (self.record["image_size"], self.record["image_size"], self.record["channels"])


def open_source(dataset: Any, record: dict[str, Any]) -> Source:
  """The Source of the kind a store's `source` record names."""
  if record.get("dataset") == "folder":
    return FolderSource(dataset, record)
  if record.get("images_from") == "tfds" and "tfds_name" in record:
    return TfdsSource(dataset, record)
  return IdxSource(dataset, record)


CAPTION_FEATURES = (
  "caption",
  "captions/text",
)  # what "auto" looks for, in order (coco_captions: the second)


def caption_path(spec: Any, feature: str, what: str) -> str:
  """The caption feature of a TFDS element spec: `feature` ("a/b" for nested features; "" = none;
  "auto" = the first of CAPTION_FEATURES present, else none)."""

  def present(path):
    node = spec
    for key in path.split("/"):
      if not isinstance(node, dict) or key not in node:
        return False
      node = node[key]
    return True

  if feature == "auto":
    return next((f for f in CAPTION_FEATURES if present(f)), "")
  if feature and not present(feature):
    fail(
      f"{what} has no feature {feature!r} (config.dataset.caption_feature); it has "
      f'{", ".join(sorted(spec))}; use "" for none'
    )
  return feature


def _caption_of(example: dict, path: str) -> str:
  value = example
  for key in path.split("/"):
    value = value[key]
  if isinstance(value, np.ndarray) and value.ndim:  # a list of captions: the first
    value = value[0] if len(value) else b""
  return untrusted.caption(
    value.decode("utf-8", "replace") if isinstance(value, bytes) else value, "a TFDS caption"
  )


@dataclasses.dataclass
class Part:
  """A configured part: `source` (its provenance record), `ids` (positions in the source split,
  ascending), `labels`, and `images(a, b)` reading rows a..b of the part only."""

  source: dict[str, Any]
  ids: np.ndarray
  labels: np.ndarray
  read_ids: Callable[[np.ndarray], np.ndarray]
  captions: np.ndarray | None = (
    None  # str, one per id: TFDS caption features, an image folder's side file
  )
  read_lenient: Callable[[np.ndarray], list] | None = None  # an image or the str why not, per id
  image_shape: tuple[int, ...] = ()  # (H, W, C) of every image read
  # with dataset.augment: rows are (example, variant) pairs, example-major; readers take both
  variants: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.ids)

  def _args(self, a: int, b: int | None) -> tuple:
    return (self.ids[a:b],) if self.variants is None else (self.ids[a:b], self.variants[a:b])

  def images(self, a: int = 0, b: int | None = None) -> np.ndarray:
    """uint8 images of rows a..b; an unreadable one stops with one line naming it."""
    return self.read_ids(*self._args(a, b))

  def rows(self, a: int = 0, b: int | None = None) -> dict[str, np.ndarray]:
    """The per-row arrays a store of this part keeps beside its data: ids, labels (and variants)."""
    out = {"ids": self.ids[a:b], "labels": self.labels[a:b]}
    return out if self.variants is None else {**out, "variants": self.variants[a:b]}

  def readable(self, a: int = 0, b: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images of rows a..b, bool mask of the readable ones, why each other one is not): an
    unreadable image (a corrupt file or record) holds zeros, for the caller to drop and count."""
    got = self.read_lenient(*self._args(a, b)) if self.read_lenient else list(self.images(a, b))
    shape = self.image_shape
    ok = np.array([not isinstance(g, str) for g in got], bool)
    images = (
      np.stack([np.zeros(shape, np.uint8) if isinstance(g, str) else g for g in got])
      if got
      else np.zeros((0,) + tuple(shape), np.uint8)
    )
    return images, ok, [g for g in got if isinstance(g, str)]


def open_part(dataset: Any, part: str) -> Part:
  """The examples of config.dataset.parts[part] (in [start, stop) of its split, with a label in
  `dataset.label_range` when set), read lazily."""
  source = part_source(dataset, part)
  split, start, stop = source["split"], source["start"], source["stop"]
  src = open_source(dataset, source)
  read, labels = src.reader()
  if not 0 <= start < stop <= len(labels):
    fail(
      f"config.dataset.parts.{part} = [{start}, {stop}) is outside '{split}' (size {len(labels)})"
    )
  ids = np.arange(start, stop, dtype=np.int64)
  keep = label_set(source.get("label_range"))
  if keep is not None:
    ids = ids[np.isin(labels[start:stop], keep)]
    if not len(ids):
      fail(
        f"config.dataset.label_range={list(source['label_range'])} keeps no example of part {part}"
      )
  captions = src.captions()
  lenient, _ = src.reader(lenient=True)
  shape = src.image_shape(read, ids)
  if "augment" in source:
    return _variant_part(src, ids, labels[ids], None if captions is None else captions[ids], shape)
  return Part(
    source, ids, labels[ids], read, None if captions is None else captions[ids], lenient, shape
  )


def augment_settings(dataset: Any, part: str, source: dict[str, Any]) -> dict[str, Any] | None:
  """The train part's `dataset.augment` as its stores record it (None: one centre crop per
  image)."""
  a = dataset.augment
  crops, flips, seed = int(a.crops), bool(a.flips), int(a.seed)
  if part != "train" or (crops == 0 and not flips):
    return None
  if crops < 0 or crops > 64:
    fail(
      f"config.dataset.augment.crops={crops}: give 1..64 random crops per image (0 = the "
      "centre crop only)"
    )
  if "tfds_name" not in source:  # streamed TFDS records: images larger than the crop
    fail(
      "config.dataset.augment applies to TFDS sources (shorter side to image_size, then a random "
      f"square: the original's ImageNet crop); part train is {source.get('dataset')!r} "
      f"{source.get('split')!r}: set augment.crops=0 and augment.flips=False"
    )
  return {
    "crops": crops,
    "flips": flips,
    "seed": seed,
    "variants": max(crops, 1) * (2 if flips else 1),
  }


def variant_box(
  height: int,
  width: int,
  size: int,
  seed: int,
  source_id: int,
  variant: int,
  augment: dict[str, Any],
) -> tuple[int, int, bool]:
  """(top, left, flipped) of variant `variant` of example `source_id` in its image resized to
  shorter side `size` ([height, width]): crop c = variant // 2 (with flips; else variant) sits at a
  uniform offset along the longer side drawn from (seed, id, c) (crops=0: the centre), and flips
  mirror odd variants, so a variant's pixels depend only on the record, never on which job or
  chunk reads it."""
  crop, flipped = divmod(variant, 2) if augment["flips"] else (variant, 0)
  if augment["crops"] == 0:
    return (height - size) // 2, (width - size) // 2, bool(flipped)
  rng = np.random.default_rng([seed, int(source_id), crop])
  return (
    int(rng.integers(0, height - size + 1)),
    int(rng.integers(0, width - size + 1)),
    bool(flipped),
  )


def _variant_part(
  src: TfdsSource,
  ids: np.ndarray,
  labels: np.ndarray,
  captions: np.ndarray | None,
  shape: tuple[int, ...],
) -> Part:
  """The train part as (example, variant) rows: each image's `augment["variants"]` crops, read
  from its decoded record (shorter side to image_size, then `variant_box`)."""
  source = src.record
  aug, size = source["augment"], source["image_size"]
  v = aug["variants"]
  reader = src.tfds_reader()

  def read(row_ids, row_variants, lenient=False):
    unique = np.unique(np.asarray(row_ids, np.int64))
    raw = dict(zip(unique.tolist(), reader.read(unique, raw=True, lenient=lenient)))
    out = []
    for i, var in zip(np.asarray(row_ids).tolist(), np.asarray(row_variants).tolist()):
      image = raw[i]
      if isinstance(image, str):
        out.append(image)
        continue
      a = resize_shorter_side(image, size)
      top, left, flipped = variant_box(a.shape[0], a.shape[1], size, aug["seed"], i, var, aug)
      crop = a[top : top + size, left : left + size]
      out.append(crop[:, ::-1] if flipped else crop)
    if lenient:
      return out
    return np.stack(out) if out else np.zeros((0,) + tuple(shape), np.uint8)

  return Part(
    source,
    np.repeat(ids, v),
    np.repeat(labels, v),
    read,
    None if captions is None else np.repeat(captions, v),
    lambda i, var: read(i, var, True),
    shape,
    np.tile(np.arange(v, dtype=np.int32), len(ids)),
  )


def skipped_report(out: str, part_ids: np.ndarray, written_ids: np.ndarray) -> dict[str, Any]:
  """Manifest fields counting the part's images that a store left out as unreadable (logged)."""
  missing = np.setdiff1d(part_ids, np.unique(np.asarray(written_ids)))
  if len(missing):
    print(f"{out}: {len(missing)} unreadable images skipped (ids {missing[:10].tolist()}...)")
  return {"unreadable_images": int(len(missing)), "unreadable_ids": missing[:1000].tolist()}


def part_spec(dataset: Any, part: str) -> dict[str, Any]:
  """config.dataset.parts[part] with every field of `config_base.PART` (the ones it leaves out at
  their defaults); a part the config lacks, or a field PART does not declare, is one line."""
  if part not in dataset.parts:
    fail(f"config.dataset.parts has no {part!r} part (it has {', '.join(dataset.parts) or 'none'})")
  given = dict(dataset.parts[part])
  unknown = sorted(set(given) - set(config_base.PART))
  if unknown:
    fail(
      f"config.dataset.parts.{part} sets {', '.join(unknown)}; a part takes "
      f"{', '.join(config_base.PART)}"
    )
  return {**config_base.PART, **given}


def split_range(dataset: Any, part: str) -> tuple[str, int, int]:
  """(source split, start, stop) of a part: 'train' | 'database' | 'test'."""
  spec = part_spec(dataset, part)
  return spec["split"], spec["start"], spec["stop"]


def check_disjoint(dataset: Any) -> None:
  """Training images and the database must not overlap (the paper's D is disjoint from X), unless
  `dataset.database_overlaps_train` says they are meant to (RDM-IN: ImageNet's train images as D).
  Parts of one folder named by file lists overlap when the lists share a file."""
  tr_split, tr_a, tr_b = split_range(dataset, "train")
  db_split, db_a, db_b = split_range(dataset, "database")
  lists = [part_spec(dataset, p)["files"] for p in ("train", "database")]
  if tr_split != db_split or dataset.database_overlaps_train:
    return
  if all(lists) and lists[0] != lists[1]:  # two lists over one folder: do they share a file?
    train, database = (
      set(read_file_list(f, f"parts.{p}")) for f, p in zip(lists, ("train", "database"))
    )
    overlap = bool(train & database)
  elif lists[0] != lists[1]:  # one part listed, the other the whole folder
    overlap = True
  else:
    overlap = tr_a < db_b and db_a < tr_b
  if overlap:
    fail(
      f"config.dataset.parts: train [{tr_a}, {tr_b}) and database [{db_a}, {db_b}) of "
      f"'{tr_split}' overlap; make them disjoint (or set "
      "config.dataset.database_overlaps_train=True to "
      "retrieve from the training images, as RDM-IN does: configs/imagenet_rdm.py:in-db)"
    )


def part_source(dataset: Any, part: str) -> dict[str, Any]:
  """The provenance a store of this part records: dataset, split, example range and where the
  images come from (the IDX directory, TFDS, or an image folder with its files' digest and
  conversion), the label range: every field that changes the data, so a store made from other
  files is never reused."""
  split, start, stop = split_range(dataset, part)
  label_range = [int(x) for x in (dataset.label_range or ())]
  extra = {"label_range": label_range} if label_range else {}
  if split.startswith(FOLDER):
    folder = folder_settings(dataset, split, part_spec(dataset, part)["files"])
    record = {
      "dataset": "folder",
      "split": split,
      "start": start,
      "stop": stop or folder["files"],
      **folder,
      **extra,
    }
    augment_settings(dataset, part, record)  # refused here, in one line
    return record
  tf = tfds_name_split(dataset, split)
  if tf is not None:
    data_dir = dataset.tfds_data_dir or os.environ.get("TFDS_DATA_DIR", "")
    captions = dataset.caption_feature
    if captions != "auto":  # recorded when set: the stores' captions depend on it
      extra["caption_feature"] = captions
    record = {
      "dataset": dataset.name,
      "split": split,
      "start": start,
      "stop": stop,
      "images_from": "tfds",
      "tfds_name": tf[0],
      "tfds_split": tf[1],
      "tfds_data_dir": data_dir,
      "image_size": int(dataset.image_size),
      **extra,
    }
    augment = augment_settings(dataset, part, record)
    return {**record, "augment": augment} if augment else record
  idx_dir = dataset.idx_dir  # as fashion_mnist_split resolves it
  origin = os.path.realpath(idx_dir) if os.path.isdir(idx_dir) or not dataset.allow_tfds else "tfds"
  record = {
    "dataset": dataset.name,
    "split": split,
    "start": start,
    "stop": stop,
    "images_from": origin,
    **extra,
  }
  augment_settings(dataset, part, record)  # refused here, in one line
  return record


def part_arrays(dataset: Any, part: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """(images uint8 [N, H, W, C], labels [N], source metadata) of a configured part, in memory."""
  p = open_part(dataset, part)
  return p.images(), p.labels, p.source
