"""Storage per training variant (config.dataset.augment): what each (image, crop) row costs on disk.

Runs the encode, embed and neighbour jobs' functions on mocked ImageNet records (TFDS's mock
data; 8 images x 2 crops x flips = 32 rows at 32 px, identity first stage, EfficientNet-Lite0)
and measures the bytes each store holds per row, array by array (stores are raw .npy files, so a
row costs the same at any size: its shape times its dtype). Then prints the cost of one variant
of every ImageNet train image at configs/imagenet_rdm.py's shapes (VQ-f4 latents 3 x 64 x 64
float32, CLIP 512-d query embeddings, K = 20 neighbours) from the measured per-element sizes.

  python benchmarks/augment_storage.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

IMAGENET_TRAIN = 1281167


def _row_bytes(s, rows: int) -> dict[str, float]:
  out = {}
  for name in s.arrays:
    path = os.path.join(s.path, name + ".npy")
    arr = np.load(path, mmap_mode="r")
    header = os.path.getsize(path) - arr.nbytes
    out[name] = ((os.path.getsize(path) - header) / rows, arr.shape[1:], arr.dtype)
  return out


def main() -> None:
  import ml_collections as mlc
  import tensorflow_datasets as tfds
  from conftest import repo_config

  from rdm_jax import config_base
  from rdm_jax.jobs import embed, encode, neighbors
  from rdm_jax.retrieval import index

  with tempfile.TemporaryDirectory() as tmp:
    config = repo_config("fashion_mnist_rdm")
    config.data_dir = tmp
    config.dataset.update(image_size=32, augment=mlc.ConfigDict(dict(crops=2, flips=True, seed=0)))
    config.dataset.parts.train = mlc.ConfigDict(
      dict(split="tfds:imagenet2012/train", start=0, stop=8)
    )
    config.dataset.parts.database.update(start=40000, stop=40100)
    config.first_stage.update(pad_to=32, latent_channels=3)
    config.retrieval.update(num_neighbors=20)
    config.retrieval.index.kind = "exact"
    with tfds.testing.mock_data(num_examples=8):
      latents = encode.encode_part(config, "train")
      queries = embed.embed_part(config, "train")
    database = embed.embed_part(config, "database")
    paths = config_base.paths(config)
    idx = index.ensure(database, config.retrieval.index, 20, paths["index"])
    nb = neighbors.find_neighbors(config, queries, database, idx, paths["neighbors_train"])
    rows = len(latents["ids"])
    print(
      f"measured on {rows} rows (8 images x {latents.manifest['source']['augment']['variants']} "
      "variants):"
    )
    per = {}
    for label, s in (("latents", latents), ("embeddings", queries), ("neighbours", nb)):
      per[label] = _row_bytes(s, rows)
      for name, (b, shape, dtype) in per[label].items():
        print(f"  {label:10s} {name:15s} {dtype!s:8s} {list(shape)!s:12s} {b:10.1f} bytes/row")

  def elem(label, name):
    b, shape, _ = per[label][name]
    return b / max(1, int(np.prod(shape)))

  imagenet = {
    "latents (3x64x64)": elem("latents", "latents") * 3 * 64 * 64,
    "query embedding (512)": elem("embeddings", "embeddings") * 512,
    "neighbours (K=20 ids + scores)": (
      elem("neighbours", "neighbor_ids") + elem("neighbours", "scores")
    )
    * 20,
    "ids, labels, variants (3 stores)": sum(
      per[lab][n][0] for lab in ("latents", "embeddings") for n in ("ids", "labels", "variants")
    )
    + per["neighbours"]["query_ids"][0]
    + per["neighbours"]["query_variants"][0],
  }
  total = sum(imagenet.values())
  print("one variant of every ImageNet train image at configs/imagenet_rdm.py's shapes:")
  for k, v in imagenet.items():
    print(f"  {k:34s} {v:9.0f} bytes/image  {v * IMAGENET_TRAIN / 2**30:7.2f} GiB")
  print(
    f"  {'total':34s} {total:9.0f} bytes/image  {total * IMAGENET_TRAIN / 2**30:7.2f} GiB per "
    f"variant (x8 for 4 crops with flips: {8 * total * IMAGENET_TRAIN / 2**30:.0f} GiB)"
  )


if __name__ == "__main__":
  main()
