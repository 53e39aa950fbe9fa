"""Training augmentation on pre-encoded latents (config.dataset.augment): V random crops / flips of
every train image, each encoded, embedded and given its own neighbours; training draws one
variant per example per epoch.

References: the crop worked by hand on a column-numbered image; the original's crop (taming's
ImagePaths: SmallestMaxSize, then RandomCrop) redone with PIL on the mocked ImageNet records;
EfficientNet-Lite0 embeddings of the latents' own pixels; numpy's brute-force cosine search;
scipy's chi-squared test for the uniformity of the drawn variants.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from rdm_jax.data import pipeline, sources


def test_variants_are_drawn_once_per_example_per_epoch_uniformly_and_deterministically():
  n_examples, v, batch = 100, 4, 10
  rows = np.concatenate(
    [
      pipeline.example_indices(3, step, batch, n_examples * v, variants=v)
      for step in range(200 * n_examples // batch)
    ]
  )  # 200 epochs
  np.testing.assert_array_equal(
    rows,
    np.concatenate(
      [
        pipeline.example_indices(3, step, batch, n_examples * v, variants=v)
        for step in range(200 * n_examples // batch)
      ]
    ),
  )
  epochs = rows.reshape(200, n_examples)
  for e in (0, 1, 199):  # every example once per epoch, in the epoch's permutation
    np.testing.assert_array_equal(
      epochs[e] // v, np.random.default_rng([3, e]).permutation(n_examples)
    )
  counts = np.bincount((rows % v), minlength=v)
  assert stats.chisquare(counts).pvalue > 0.01, counts  # uniform over the 4 variants
  per_example = np.stack([np.bincount(epochs[:, i] % v, minlength=v) for i in range(n_examples)])
  assert (
    stats.chisquare(per_example.sum(0)).pvalue > 0.01 and (per_example > 0).all()
  )  # each sees every crop
  other_seed = pipeline.example_indices(4, 0, batch, n_examples * v, variants=v)
  assert not np.array_equal(other_seed, rows[:batch])
  # without variants the rows are the examples' permutation, as before
  np.testing.assert_array_equal(
    pipeline.example_indices(3, 0, batch, n_examples),
    np.random.default_rng([3, 0]).permutation(n_examples)[:batch],
  )


def test_a_variants_crop_worked_by_hand():
  """A 4 x 8 image whose column x holds x: at size 4 no resize, and the crop of variant v is
  columns left..left+3 (odd variants mirrored when flipping); crops=0 is the centre; over many
  examples the left offset is uniform over its 5 values."""
  image = np.tile(np.arange(8, dtype=np.uint8)[None, :, None], (4, 1, 3))
  aug = {"crops": 3, "flips": True, "seed": 7, "variants": 6}
  lefts = []
  for source_id in range(400):
    for variant in range(6):
      top, left, flipped = sources.variant_box(4, 8, 4, 7, source_id, variant, aug)
      crop = image[top : top + 4, left : left + 4]
      crop = crop[:, ::-1] if flipped else crop
      assert top == 0 and 0 <= left <= 4 and flipped == (variant % 2 == 1)
      want = np.arange(left, left + 4)[:: -1 if flipped else 1]
      np.testing.assert_array_equal(crop[0, :, 0], want)
    pair = [sources.variant_box(4, 8, 4, 7, source_id, v, aug)[:2] for v in (0, 1)]
    assert pair[0] == pair[1]  # a flip mirrors its crop, not another one
    lefts.append(sources.variant_box(4, 8, 4, 7, source_id, 0, aug)[1])
  assert stats.chisquare(np.bincount(lefts, minlength=5)).pvalue > 0.01
  assert sources.variant_box(4, 8, 4, 7, 0, 1, {"crops": 0, "flips": True}) == (0, 2, True)
  from tests.conftest import repo_config
  from rdm_jax.errors import UserError

  config = repo_config("fashion_mnist_rdm")  # 28 px IDX images: no longer side to crop along
  config.dataset.augment.crops = 2
  with pytest.raises(UserError, match="augment applies to TFDS sources"):
    sources.part_source(config.dataset, "train")
  sources.part_source(config.dataset, "test")  # other parts are never augmented


def _original_crop(
  image: np.ndarray, size: int, seed: int, source_id: int, variant: int, flips: bool
):
  """taming's SmallestMaxSize + RandomCrop, by hand with PIL, at the offset drawn for (seed, id,
  crop)."""
  from PIL import Image

  h, w = image.shape[:2]
  s = size / min(h, w)
  nw, nh = max(size, round(w * s)), max(size, round(h * s))
  a = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC))
  crop, flipped = divmod(variant, 2) if flips else (variant, 0)
  rng = np.random.default_rng([seed, source_id, crop])
  top, left = rng.integers(0, nh - size + 1), rng.integers(0, nw - size + 1)
  out = a[top : top + size, left : left + size]
  return out[:, ::-1] if flipped else out


def test_each_crop_is_encoded_embedded_and_searched_as_itself(tmp_path):
  """Mocked ImageNet records, 2 crops x flips = 4 variants of 6 images (identity first stage, so
  latents are the crop's pixels): latents row r is variant r's crop as the original cuts it, the
  query embedding of row r is EfficientNet-Lite0's of those same pixels, its neighbours are the
  brute-force nearest of that embedding, and a training batch pairs each drawn row's latents
  with its own neighbours."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import ml_collections as mlc
  from tests.conftest import repo_config

  from rdm_jax import config_base
  from rdm_jax.jobs import embed, encode, neighbors
  from rdm_jax.retrieval import encoders, index

  config = repo_config("fashion_mnist_rdm")
  config.data_dir = str(tmp_path)
  config.dataset.update(image_size=32, augment=mlc.ConfigDict(dict(crops=2, flips=True, seed=5)))
  config.dataset.parts.train = mlc.ConfigDict(
    dict(split="tfds:imagenet2012/train", start=0, stop=6)
  )
  config.dataset.parts.database.update(start=40000, stop=40040)
  config.first_stage.update(pad_to=32, latent_channels=3)
  config.retrieval.update(chunk_size=10, batch_size=8, num_neighbors=5)
  config.retrieval.index.kind = "exact"
  with tfds.testing.mock_data(num_examples=6):
    latents = encode.encode_part(config, "train")
    queries = embed.embed_part(config, "train")
    ds = tfds.builder("imagenet2012").as_dataset(
      split="train", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    feature = tfds.builder("imagenet2012").info.features["image"]
    raw = [feature.decode_example(ex["image"]).numpy() for ex in list(ds)[:6]]
  database = embed.embed_part(config, "database")
  np.testing.assert_array_equal(latents["ids"], np.repeat(np.arange(6), 4))
  np.testing.assert_array_equal(latents["variants"], np.tile(np.arange(4), 6))
  np.testing.assert_array_equal(queries["variants"], latents["variants"])
  assert latents.manifest["source"]["augment"] == {
    "crops": 2,
    "flips": True,
    "seed": 5,
    "variants": 4,
  }
  for r in range(24):
    want = _original_crop(raw[r // 4], 32, 5, r // 4, r % 4, True).astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(latents["latents"][r], want, atol=1e-6)
  assert not np.allclose(latents["latents"][0], latents["latents"][2])  # two crops differ

  pixels = np.round((np.asarray(latents["latents"]) + 1) * 127.5).astype(np.uint8)
  embed_alone = encoders.make_encoder(config.retrieval)
  np.testing.assert_allclose(
    queries["embeddings"],
    np.concatenate([embed_alone(pixels[r : r + 1]) for r in range(24)]),
    rtol=1e-4,
    atol=1e-4 * float(np.abs(queries["embeddings"]).max()),
  )
  paths = config_base.paths(config)
  idx = index.ensure(database, config.retrieval.index, 5, paths["index"])
  nb = neighbors.find_neighbors(config, queries, database, idx, paths["neighbors_train"])
  q = queries["embeddings"] / np.linalg.norm(queries["embeddings"], axis=1, keepdims=True)
  db_raw = np.array(database["embeddings"], np.float32)
  d = db_raw / np.linalg.norm(db_raw, axis=1, keepdims=True)
  np.testing.assert_array_equal(
    nb["neighbor_ids"], np.argsort(-(q @ d.T), axis=1, kind="stable")[:, :5]
  )
  np.testing.assert_array_equal(nb["query_variants"], latents["variants"])

  data = pipeline.load_retrieval_data(config, "train")
  assert data.variants == 4 and data.num_examples == 24
  rows = pipeline.example_indices(config.train.seed, 0, 6, 24, variants=4)
  z0, context = pipeline.load_batch(data, rows, 4, "first")
  np.testing.assert_array_equal(z0, latents["latents"][rows])
  np.testing.assert_array_equal(
    context, db_raw[nb["neighbor_ids"][rows, :4]]
  )  # each row's own neighbours
  assert sorted(rows // 4) == list(range(6))
