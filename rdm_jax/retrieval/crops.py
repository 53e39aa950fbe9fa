"""Database entries from image collections: random square crops of every image (the paper's
OpenImages recipe, Sec. 4: the database holds patches of its images, not whole images).

`config.database_build`: `crops_per_image` crops of `crop_size` x `crop_size` pixels at
uniformly random positions of each image (after resizing its shorter side to `resize_to`
when that is set), drawn from `np.random.default_rng([seed, image id])`: an entry depends
only on its image and the settings, never on chunking, processes or reruns. Every entry keeps
its image id and box (x0, y0, x1, y1, in the pixels of the resized image), so neighbour panels
show the crop that was retrieved (`crop_pixels`). The original crops at random positions
too (`rdm/data/base.py` PatcherDataset._crop_coords, random_crop) from images resized to
1200 px (`img_size` of the RDM-OI configs); its crop size there is 256.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from rdm_jax import config_base
from rdm_jax.data import chunked, sources, store
from rdm_jax.errors import fail
from rdm_jax.retrieval import encoders


def settings(cfg: Any) -> dict[str, int]:
  """The settings a database of crops records (and that change its entries)."""
  s = {
    "crop_size": int(cfg.crop_size),
    "crops_per_image": int(cfg.crops_per_image),
    "resize_to": int(cfg.resize_to),
    "seed": int(cfg.seed),
  }
  if s["crop_size"] < 1 or s["crops_per_image"] < 1 or s["resize_to"] < 0:
    fail(
      f"config.database_build = {dict(cfg)}: give crop_size >= 1 and crops_per_image >= 1 "
      "(crops_per_image 0 embeds whole images instead)"
    )
  return s


def enabled(cfg: Any) -> bool:
  return cfg is not None and int(cfg.crops_per_image) > 0


def boxes(h: int, w: int, s: dict[str, int], image_id: int, what: str) -> np.ndarray:
  """int32 [crops_per_image, 4] boxes (x0, y0, x1, y1) of one h x w (resized) image."""
  c = s["crop_size"]
  if c > h or c > w:
    fail(
      f"config.database_build.crop_size={c} is larger than {what} ({w}x{h} pixels"
      f"{' after resize_to' if s['resize_to'] else ''}); lower crop_size or set resize_to >= {c}"
    )
  rng = np.random.default_rng([s["seed"], int(image_id)])
  y0 = rng.integers(0, h - c + 1, size=s["crops_per_image"])
  x0 = rng.integers(0, w - c + 1, size=s["crops_per_image"])
  return np.stack([x0, y0, x0 + c, y0 + c], axis=1).astype(np.int32)


def crops_of(
  image: np.ndarray, s: dict[str, int], image_id: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 crops [n, c, c, C], boxes [n, 4]) of one image."""
  image = sources.resize_shorter_side(image, s["resize_to"])
  b = boxes(image.shape[0], image.shape[1], s, image_id, what)
  return np.stack([image[y0:y1, x0:x1] for x0, y0, x1, y1 in b]), b


def crop_pixels(raw_images: list, image_boxes: np.ndarray, s: dict[str, int]) -> np.ndarray:
  """uint8 [n, c, c, C]: the crops entries point to, each raw image resized as at build time and
  cut to its box (white where an image can no longer be read)."""
  cut = [
    None if isinstance(im, str) else sources.resize_shorter_side(im, s["resize_to"])[y0:y1, x0:x1]
    for im, (x0, y0, x1, y1) in zip(raw_images, np.asarray(image_boxes))
  ]
  channels = max([c.shape[-1] for c in cut if c is not None] or [3])
  size = s["crop_size"]
  return np.stack(
    [
      np.full((size, size, channels), 255, np.uint8)
      if c is None
      else np.broadcast_to(c, (size, size, channels))
      for c in cut
    ]
  )


def build_database(
  config: Any,
  encode: Callable[[np.ndarray], np.ndarray] | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> Any:
  """Writes the database store `config` names as random crops of the database part's images
  (the embed job with crops_per_image > 0); returns it, or None when another process merges it."""
  out, kind = config_base.paths(config)["database"], "database"
  identity = encoders.encoder_identity(config.retrieval)
  cs = settings(config.database_build)
  dtype = config.database_build.embeddings_dtype
  if dtype not in ("float16", "float32"):
    fail(f"config.database_build.embeddings_dtype={dtype!r}; use float16 or float32")
  source = sources.part_source(config.dataset, "database")
  fields = dict(source=source, encoder=identity, crops=cs, embeddings_dtype=dtype)
  done = store.read_if_current(out, kind, "rdm_jax.jobs.embed", **fields)
  if done is not None:
    return done
  p = sources.open_part(config.dataset, "database")
  raw = sources.open_source(config.dataset, p.source).raw_reader()
  encode = encode or encoders.make_encoder(config.retrieval)
  where = p.source["split"]

  def compute(a, b):
    pixels, ids, labels, boxes = [], [], [], []
    for i, image, label in zip(p.ids[a:b], raw(p.ids[a:b]), p.labels[a:b]):
      if isinstance(image, str):
        print(f"{out}: skipping unreadable image {image}")
        continue
      c, bx = crops_of(image, cs, int(i), f"image {i} of {where}")
      pixels.append(c)
      boxes.append(bx)
      ids.append(np.full(len(c), i, np.int64))
      labels.append(np.full(len(c), label, np.int32))
    if not pixels:
      return {
        "embeddings": np.zeros((0, identity["embed_dim"]), dtype),
        "ids": np.zeros(0, np.int64),
        "labels": np.zeros(0, np.int32),
        "boxes": np.zeros((0, 4), np.int32),
      }
    return {
      "embeddings": encode(np.concatenate(pixels)).astype(dtype),
      "ids": np.concatenate(ids),
      "labels": np.concatenate(labels),
      "boxes": np.concatenate(boxes),
    }

  images_per_chunk = max(1, config.retrieval.chunk_size // cs["crops_per_image"])
  result = chunked.write_chunked(
    out,
    kind,
    len(p),
    chunk_size=images_per_chunk,
    compute=compute,
    process_index=process_index,
    process_count=process_count,
    finalize=lambda arrays: sources.skipped_report(out, p.ids, arrays["ids"]),
    variable_rows=True,
    made_by="rdm_jax.jobs.embed",
    **fields,
  )
  if result is not None:
    print(
      f"wrote {out}: {len(result['ids'])} crops of {len(p)} images, embeddings "
      f"{result['embeddings'].dtype}{list(result['embeddings'].shape)}"
    )
  return result
