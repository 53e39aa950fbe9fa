"""The database built from crops of an image collection, worked by hand.

References: crop positions written out from the documented rule (x0, y0 uniform from
`np.random.default_rng([seed, image id])`, y drawn first), pixels cut from the PNGs as PIL
reads them, and an "encoder" that returns each crop's mean colour, so every entry can be
checked against the crop it claims to be.
"""

from __future__ import annotations

import ml_collections as mlc
import numpy as np
import pytest
from PIL import Image

from rdm_jax import config_base
from rdm_jax.data import store
from rdm_jax.retrieval import crops
from rdm_jax.errors import UserError


def folder(tmp_path, sizes):
  rng = np.random.default_rng(0)
  root = tmp_path / "collection"
  images = {}
  for i, (w, h) in enumerate(sizes):
    sub = root / ("cats" if i % 2 else "dogs")
    sub.mkdir(parents=True, exist_ok=True)
    a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(sub / f"im{i}.png")
    images[f"{sub.name}/im{i}.png"] = a
  return root, images


def config(tmp_path, root, crop=8, per=3, resize_to=0, chunk=4):
  c = config_base.base_config()
  c.data_dir = str(tmp_path / "data")
  c.dataset.name = "collection"
  c.dataset.parts = mlc.ConfigDict(
    dict(
      train=dict(split="folder:/nonexistent", start=0, stop=1),
      database=dict(split=f"folder:{root}", start=0, stop=0),
      test=dict(split="folder:/nonexistent", start=0, stop=1),
    )
  )
  c.dataset.folder.update(image_size=16, channels=3, background="white")
  c.database_build.update(crops_per_image=per, crop_size=crop, resize_to=resize_to, seed=5)
  c.retrieval.update(encoder="efficientnet_lite0", embed_dim=3, chunk_size=chunk)
  return c


def mean_colour(crops):
  return crops.reshape(len(crops), -1, crops.shape[-1]).mean(axis=1).astype(np.float32)


def hand_boxes(image_id, h, w, crop, per, seed=5):
  rng = np.random.default_rng([seed, image_id])
  y0 = rng.integers(0, h - crop + 1, size=per)
  x0 = rng.integers(0, w - crop + 1, size=per)
  return [(x, y) for x, y in zip(x0, y0)]


def test_every_entry_is_the_crop_it_records(tmp_path):
  root, images = folder(tmp_path, [(20, 12), (9, 30), (16, 16), (40, 25), (12, 12)])
  c = config(tmp_path, root)
  db = crops.build_database(c, encode=mean_colour)
  names = sorted(images)  # the folder's files, sorted: image id = position
  assert db["embeddings"].dtype == np.float16 and db["embeddings"].shape == (15, 3)
  np.testing.assert_array_equal(db["ids"], np.repeat(np.arange(5), 3))
  np.testing.assert_array_equal(
    db["labels"], [1 if n.startswith("dogs") else 0 for n in names for _ in range(3)]
  )
  for row in range(15):
    i = row // 3
    a = images[names[i]]
    x0, y0 = hand_boxes(i, a.shape[0], a.shape[1], 8, 3)[row % 3]
    np.testing.assert_array_equal(db["boxes"][row], [x0, y0, x0 + 8, y0 + 8])
    want = a[y0 : y0 + 8, x0 : x0 + 8].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(db["embeddings"][row].astype(np.float32), want, rtol=1e-3)
  assert db.manifest["crops"] == {"crop_size": 8, "crops_per_image": 3, "resize_to": 0, "seed": 5}
  assert db.manifest["unreadable_images"] == 0
  # neighbour panels show the crop an entry is
  from rdm_jax import conditioning

  shown = conditioning.database_images(db, c.dataset, np.array([[4, 13]]))
  for j, row in enumerate((4, 13)):
    x0, y0, x1, y1 = db["boxes"][row]
    np.testing.assert_array_equal(shown[0, j], images[names[row // 3]][y0:y1, x0:x1])


def test_unreadable_images_are_counted_and_skipped_and_small_ones_are_one_line(tmp_path):
  root, images = folder(tmp_path, [(20, 12), (16, 16), (30, 20)])
  bad = root / "dogs" / "im0.png"
  bad.write_bytes(bad.read_bytes()[:60])  # the header reads, the pixels do not
  c = config(tmp_path, root, per=2)
  db = crops.build_database(c, encode=mean_colour)
  names = sorted(images)
  bad_id = names.index("dogs/im0.png")
  assert db.manifest["unreadable_images"] == 1 and db.manifest["unreadable_ids"] == [bad_id]
  assert bad_id not in set(db["ids"].tolist()) and len(db["ids"]) == 4
  c2 = config(tmp_path / "b", root, crop=17)
  with pytest.raises(UserError) as e:
    crops.build_database(c2, encode=mean_colour)
  assert "\n" not in str(e.value) and "crop_size=17 is larger than image" in str(e.value)
  assert "set resize_to >= 17" in str(e.value)


def test_an_interrupted_build_resumes_to_the_same_rows(tmp_path):
  root, _ = folder(tmp_path, [(20 + i, 12 + i) for i in range(9)])
  full = crops.build_database(config(tmp_path / "full", root, resize_to=14), encode=mean_colour)
  c = config(tmp_path / "cut", root, resize_to=14)
  calls = []

  def dies_after_two_chunks(crops):
    calls.append(len(crops))
    if len(calls) == 3:
      raise KeyboardInterrupt("killed")
    return mean_colour(crops)

  with pytest.raises(KeyboardInterrupt):
    crops.build_database(c, encode=dies_after_two_chunks)
  redone = []
  again = crops.build_database(c, encode=lambda x: (redone.append(len(x)), mean_colour(x))[1])
  assert len(redone) == 7  # chunks of 4 // 3 = 1 image: two were done before the kill
  for name in ("embeddings", "ids", "labels", "boxes"):
    np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(full[name]))
  assert store.read(again.path, "database", hint="").fingerprint == again.fingerprint


def test_two_processes_split_the_images_and_the_last_merges(tmp_path):
  """--process_id/--num_processes: each process embeds its block of images; the one that finds
  every chunk done merges, and the store equals a single process's."""
  root, _ = folder(tmp_path, [(20 + i, 12 + i) for i in range(7)])
  single = crops.build_database(config(tmp_path / "one", root), encode=mean_colour)
  c = config(tmp_path / "two", root)
  assert (
    crops.build_database(c, encode=mean_colour, process_index=0, process_count=2) is None
  )  # 1's block missing
  merged = crops.build_database(c, encode=mean_colour, process_index=1, process_count=2)
  for name in ("embeddings", "ids", "labels", "boxes"):
    np.testing.assert_array_equal(np.asarray(merged[name]), np.asarray(single[name]))
