"""The encode and embed jobs on small parts of the real Fashion-MNIST: chunks that cut across
batches and a padded last batch give the rows an image-by-image computation gives.

References: pixels and labels read straight from the IDX files (16- and 8-byte headers); the
identity first stage written out (x / 127.5 - 1, padded with -1 to 32x32); embeddings of each
image computed alone (a batch of one: no padding anywhere).
"""

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
from tests.conftest import REPO, TRAIN_CONFIG, config_section, subprocess_env

from rdm_jax.data import store
from rdm_jax.models import efficientnet_lite

IDX = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.skipif(
  not os.path.isdir(IDX), reason="needs dataset-fashion-mnist (make data)"
)


def idx_rows(stem, header, shape, rows):
  with gzip.open(os.path.join(IDX, stem + ".gz"), "rb") as f:
    raw = f.read()
  return np.frombuffer(raw, np.uint8, offset=header).reshape((-1,) + shape)[rows]


SMALL = [
  "--config.dataset.parts.train.stop=50",
  "--config.dataset.parts.test.stop=20",
  "--config.dataset.parts.database.start=40000",
  "--config.dataset.parts.database.stop=40030",
  "--config.retrieval.batch_size=16",  # 50 = 3 x 16 + 2, 30 = 16 + 14: the last batch is padded
  "--config.retrieval.chunk_size=24",  # chunks cut across batches
  "--config.retrieval.image_size=48",
]  # the demo's block_10 on a 3x3 grid: a 3x3 map at 48 px


def run_job(module, data_dir, part):
  """The job as a user runs it (each job module owns its command-line flags)."""
  cmd = [
    sys.executable,
    "-m",
    module,
    f"--config={TRAIN_CONFIG}",
    f"--config.data_dir={data_dir}",
    f"--parts={part}",
    *SMALL,
  ]
  out = subprocess.run(cmd, env=subprocess_env(devices=2), capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]


def test_encode_job_writes_the_identity_latents_of_the_parts_rows(tmp_path):
  run_job("rdm_jax.jobs.encode", str(tmp_path), "train")
  out = store.read(str(tmp_path / "latents_train"), "latents", hint="")
  images = idx_rows("train-images-idx3-ubyte", 16, (28, 28), np.arange(50)).astype(np.float64)
  want = np.pad(images / 127.5 - 1.0, ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)[..., None]
  np.testing.assert_allclose(out["latents"], want, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(out["ids"], np.arange(50))
  np.testing.assert_array_equal(
    out["labels"], idx_rows("train-labels-idx1-ubyte", 8, (), np.arange(50))
  )


def test_embed_job_equals_embedding_each_image_alone(tmp_path):
  import jax

  run_job("rdm_jax.jobs.embed", str(tmp_path), "database")
  out = store.read(str(tmp_path / "database"), "database", hint="")
  rows = np.arange(40000, 40030)
  images = idx_rows("train-images-idx3-ubyte", 16, (28, 28), rows)[..., None]
  params = efficientnet_lite.load_params()
  model = efficientnet_lite.EfficientNetLite0(feature_map="block_10")  # the demo's features, grid 3
  one = jax.jit(lambda x: model.apply({"params": params}, efficientnet_lite.preprocess(x, 48)))
  maps = [np.asarray(one(images[i : i + 1])) for i in range(len(images))]
  assert maps[0].shape == (1, 3, 3, 112)  # 3x3 cells of a 3x3 map: each cell one position
  want = np.concatenate([m.reshape(1, -1) for m in maps])
  assert out["embeddings"].shape == (30, 112 * 3 * 3)
  np.testing.assert_allclose(out["embeddings"], want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(out["ids"], rows)
  np.testing.assert_array_equal(out["labels"], idx_rows("train-labels-idx1-ubyte", 8, (), rows))


def test_identity_first_stage_by_hand():
  """27x26 pixels in a 32x32 latent: padded (2, 3) rows and (3, 3) columns with -1 (black); decode
  crops the same window, rounds and clips; latents out of [-1, 1] come back clipped."""
  from rdm_jax.errors import UserError
  from rdm_jax.models import first_stage

  cfg = config_section("first_stage", name="identity", pad_to=32)
  images = np.random.default_rng(0).integers(0, 256, (2, 27, 26, 1), dtype=np.uint8)
  z = first_stage.encode(cfg, images)
  assert z.shape == (2, 32, 32, 1) and z.dtype == np.float32
  np.testing.assert_allclose(z[:, 2:29, 3:29], images / 127.5 - 1.0, atol=1e-6)
  assert (
    (z[:, :2] == -1).all()
    and (z[:, 29:] == -1).all()
    and (z[:, :, :3] == -1).all()
    and (z[:, :, 29:] == -1).all()
  )
  np.testing.assert_array_equal(first_stage.decode(cfg, z, (27, 26)), images)
  z[0, 2, 3, 0], z[0, 2, 4, 0] = 3.0, -7.0
  out = first_stage.decode(cfg, z, (27, 26))
  assert out[0, 0, 0, 0] == 255 and out[0, 0, 1, 0] == 0
  with pytest.raises(UserError, match="do not fit"):
    first_stage.encode(cfg, np.zeros((1, 33, 20, 1), np.uint8))
  with pytest.raises(
    UserError, match="weights file '' not found"
  ):  # LDM autoencoders need their checkpoint
    first_stage.encode(config_section("first_stage", name="vq_f4", pad_to=256, weights=""), images)


def test_embed_job_keeps_a_folders_captions_and_sampling_can_prompt_with_them(tmp_path):
  """An image-folder test part with a captions.jsonl: its embeddings store holds each row's caption
  (one fixed width across chunks, the longest whole), and `sample.prompts_from=test` reads them."""
  import json

  from PIL import Image

  from tests.conftest import repo_config
  from rdm_jax import conditioning

  folder = tmp_path / "captioned"
  folder.mkdir()
  rng = np.random.default_rng(0)
  captions = {}
  for i in range(30):
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    if i % 4:
      captions[f"{i:02d}.png"] = f"garment {i} " + "long " * (i if i == 29 else 0)
  (folder / "captions.jsonl").write_text(
    "".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in captions.items())
  )
  data_dir = str(tmp_path / "data")
  cmd = [
    sys.executable,
    "-m",
    "rdm_jax.jobs.embed",
    f"--config={TRAIN_CONFIG}",
    f"--config.data_dir={data_dir}",
    "--parts=test",
    *SMALL,
    f"--config.dataset.parts.test.split=folder:{folder}",
    "--config.dataset.parts.test.stop=0",
  ]
  out = subprocess.run(cmd, env=subprocess_env(devices=2), capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  queries = store.read(os.path.join(data_dir, "embeddings_test"), "embeddings", hint="")
  want = [captions.get(f"{i:02d}.png", "") for i in range(30)]
  assert (
    list(queries["captions"]) == want
  )  # 30 rows in chunks of 24: the longest caption is in the last
  config = repo_config("fashion_mnist_rdm")
  config.data_dir = data_dir
  assert conditioning.part_captions(config, "test") == want


def test_an_unreadable_image_is_logged_skipped_and_counted_by_encode_and_embed(tmp_path):
  """A PNG whose header reads but whose pixels do not (truncated): the encode and embed jobs log it
  with its path, leave its row out of both stores alike (they stay aligned by id) and count it in
  the manifest; every other row is the image's own."""
  from PIL import Image

  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(1)
  for i in range(6):
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
  raw = (folder / "3.png").read_bytes()
  (folder / "3.png").write_bytes(raw[: len(raw) // 2])  # the header still reads
  data_dir = str(tmp_path / "data")
  for module in ("rdm_jax.jobs.encode", "rdm_jax.jobs.embed"):
    cmd = [
      sys.executable,
      "-m",
      module,
      f"--config={TRAIN_CONFIG}",
      f"--config.data_dir={data_dir}",
      "--parts=test",
      *SMALL,
      f"--config.dataset.parts.test.split=folder:{folder}",
      "--config.dataset.parts.test.stop=0",
    ]
    out = subprocess.run(
      cmd, env=subprocess_env(devices=2), capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"skipping unreadable image {folder}/3.png" in out.stdout, out.stdout
  latents = store.read(os.path.join(data_dir, "latents_test"), "latents", hint="")
  queries = store.read(os.path.join(data_dir, "embeddings_test"), "embeddings", hint="")
  for s in (latents, queries):
    np.testing.assert_array_equal(s["ids"], [0, 1, 2, 4, 5])
    assert s.manifest["unreadable_images"] == 1 and s.manifest["unreadable_ids"] == [3]
  for row, i in enumerate(
    [0, 1, 2, 4, 5]
  ):  # identity first stage: x / 127.5 - 1, padded with -1 to 32
    image = np.asarray(Image.open(folder / f"{i}.png"), np.float64)
    want = np.pad(image / 127.5 - 1.0, 2, constant_values=-1.0)
    np.testing.assert_allclose(latents["latents"][row, ..., 0], want, atol=1e-6)
