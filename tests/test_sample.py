"""The sample job: batching and keys, exemplar conditioning, neighbour pixels, the trained (EMA)
weights, and what it writes.

References: brute-force cosine neighbours in NumPy; Fashion-MNIST pixels read straight from
the IDX file (16-byte header, then rows of 28x28 bytes); the batching rule of
`sample_in_batches`' docstring written out with a sampler whose output is known.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from tests.conftest import (
  brute_force_neighbors,
  tiny_run_state,
  FMNIST_DB_START,
  REPO,
  TINY_OVERRIDES,
  TRAIN_CONFIG,
  subprocess_env,
  tiny_config,
)

from rdm_jax import checkpoint, conditioning, config_base, inference
from rdm_jax.data import store
from rdm_jax.errors import UserError
from rdm_jax.retrieval import proposal
from rdm_jax.inference import sample_in_batches
from rdm_jax.models import factory

FMNIST_TRAIN = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def test_sample_in_batches_pads_the_last_batch_and_gives_each_sample_its_key():
  """7 rows in batches of 3: batches [0:3], [3:6], [6:7] padded to 3 rows; row i (sample
  first_index + i) uses fold_in(rng, first_index + i), whatever batch it is in."""
  shapes = []

  def sampler(params, context, keys):  # row value: its context sum plus its own key's noise
    shapes.append(context.shape)
    return context.sum(axis=(1, 2)) * params + jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)

  context = np.arange(7 * 2 * 3, dtype=np.float32).reshape(7, 2, 3)
  rng = jax.random.PRNGKey(5)
  noise = lambda i: float(jax.random.uniform(jax.random.fold_in(rng, i), ()))
  got = sample_in_batches(sampler, 10.0, context, 3, rng, first_index=100)
  assert shapes == [(3, 2, 3)] * 3  # one compiled shape for every batch
  want = context.sum(axis=(1, 2)) * 10.0 + np.array([noise(100 + i) for i in range(7)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # other batch sizes, the same samples; fewer rows than a batch: no padding, one call
  np.testing.assert_allclose(
    sample_in_batches(sampler, 10.0, context, 2, rng, first_index=100), want, rtol=1e-6
  )
  shapes.clear()
  assert sample_in_batches(sampler, 1.0, context[:2], 3, rng).shape == (2,) and shapes == [
    (2, 2, 3)
  ]


def test_exemplar_conditioning_retrieves_the_first_queries_neighbours(tiny_data):
  config = tiny_config(tiny_data["data_dir"])
  cond = conditioning.exemplar_conditioning(config, 5, 4, "test")
  paths = config_base.paths(config)
  queries = store.read(paths["embeddings_test"], "embeddings", hint="")["embeddings"][:5]
  db = store.read(paths["database"], "database", hint="")["embeddings"]
  want = brute_force_neighbors(queries, db, 4)
  np.testing.assert_array_equal(cond.query_rows, np.arange(5))
  np.testing.assert_array_equal(cond.neighbor_rows, want)
  np.testing.assert_array_equal(cond.context, np.asarray(db)[want])
  from rdm_jax.errors import UserError

  with pytest.raises(UserError, match="trained with"):
    conditioning.exemplar_conditioning(config, 5, 4, "test", encoder={"name": "another"})
  with pytest.raises(UserError, match="asked for 99 samples"):
    conditioning.exemplar_conditioning(config, 99, 4, "test")


def _fmnist_train_rows(rows, path=FMNIST_TRAIN):
  with gzip.open(path, "rb") as f:
    raw = f.read()
  n = int.from_bytes(raw[4:8], "big")
  return np.frombuffer(raw, np.uint8, offset=16).reshape(n, 28, 28)[rows]


@pytest.mark.skipif(
  not os.path.exists(FMNIST_TRAIN), reason="needs dataset-fashion-mnist (make data)"
)
def test_database_images_follow_the_stores_ids_to_the_source_pixels(tmp_path):
  from tests.conftest import make_tiny_stores

  make_tiny_stores(str(tmp_path / "data"), fmnist_database=True)
  config = tiny_config(str(tmp_path / "data"))
  db = store.read(config_base.paths(config)["database"], "database", hint="")
  rows = np.array([[3, 0], [39, 3]])
  got = conditioning.database_images(db, config.dataset, rows)
  assert got.shape == (2, 2, 28, 28, 1)
  np.testing.assert_array_equal(got[..., 0], _fmnist_train_rows(FMNIST_DB_START + rows))


@pytest.mark.skipif(
  not os.path.exists(FMNIST_TRAIN), reason="needs dataset-fashion-mnist (make data)"
)
def test_exemplar_conditioning_can_put_the_query_itself_first(tmp_path):
  """include_query (the original's omit_query=False): the query's own embedding, then its k-1
  nearest; the panel shows the query image in its slot (row -1), read from the query's source.
  k = 1 is the query alone (the original's caption-only mode)."""
  from tests.conftest import make_tiny_stores

  make_tiny_stores(str(tmp_path / "data"), fmnist_database=True)
  config = tiny_config(str(tmp_path / "data"))
  paths = config_base.paths(config)
  q = store.read(paths["embeddings_test"], "embeddings", hint="")
  store.write(
    paths["embeddings_test"] + "_fm",
    "embeddings",  # as the embed job records test rows 100..
    {
      "embeddings": np.array(q["embeddings"]),
      "ids": np.arange(100, 100 + len(q["ids"])),
      "labels": np.array(q["labels"]),
    },
    encoder=q.manifest["encoder"],
    source={"dataset": "fashion_mnist", "split": "test", "start": 100, "stop": 100 + len(q["ids"])},
  )
  shutil.rmtree(paths["embeddings_test"])
  os.rename(paths["embeddings_test"] + "_fm", paths["embeddings_test"])
  queries = np.asarray(q["embeddings"][:5])
  db = np.asarray(store.read(paths["database"], "database", hint="")["embeddings"])
  nearest = brute_force_neighbors(queries, db, 3)

  cond = conditioning.exemplar_conditioning(config, 5, 4, "test", include_query=True)
  np.testing.assert_array_equal(
    cond.neighbor_rows, np.concatenate([np.full((5, 1), -1), nearest], axis=1)
  )
  np.testing.assert_array_equal(
    cond.context, np.concatenate([queries[:, None], db[nearest]], axis=1)
  )
  images = conditioning.context_images(cond, config.dataset)
  assert images.shape == (5, 4, 28, 28, 1)
  np.testing.assert_array_equal(
    images[:, 0, ..., 0],
    _fmnist_train_rows(np.arange(100, 105), FMNIST_TRAIN.replace("train-", "t10k-")),
  )
  np.testing.assert_array_equal(
    images[:, 1:, ..., 0], _fmnist_train_rows(FMNIST_DB_START + nearest)
  )

  alone = conditioning.exemplar_conditioning(config, 5, 1, "test", include_query=True)
  np.testing.assert_array_equal(alone.context, queries[:, None])
  assert (alone.neighbor_rows == -1).all()


@pytest.mark.skipif(
  not os.path.exists(FMNIST_TRAIN), reason="needs dataset-fashion-mnist (make data)"
)
def test_sample_job_uses_the_ema_weights_and_writes_every_sample(trained, tmp_path):
  data_dir, original = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(original, workdir)
  cmd = [
    sys.executable,
    "-m",
    "rdm_jax.sample",
    f"--config={TRAIN_CONFIG}",
    f"--workdir={workdir}",
    f"--config.data_dir={data_dir}",
    *TINY_OVERRIDES,
    "--config.sample.num_images=5",
    "--config.sample.batch_size=2",
    "--config.sample.num_steps=3",
    "--config.sample.sampler=dpm_solver++",
    "--config.sample.shard_size=2",
  ]
  out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  set_dir = os.path.join(workdir, "samples", "exemplar")
  assert sorted(os.listdir(set_dir)) == [
    "neighbors_and_samples.png",
    "samples.png",
    "settings.json",
    "shard-00000-of-00003.npz",
    "shard-00001-of-00003.npz",
    "shard-00002-of-00003.npz",
  ]
  shards = [dict(np.load(os.path.join(set_dir, f"shard-0000{i}-of-00003.npz"))) for i in range(3)]
  got = {
    k: np.concatenate([sh[k] for sh in shards])
    for k in (
      "latents",
      "images",
      "neighbor_rows",
      "query_rows",
      "sample_index",
      "seed",
      "neighbor_ids",
    )
  }
  got.update({k: shards[0][k] for k in ("checkpoint_step", "condition", "sampler", "num_steps")})
  assert [len(sh["images"]) for sh in shards] == [2, 2, 1]
  np.testing.assert_array_equal(got["sample_index"], np.arange(5))
  assert int(got["checkpoint_step"]) == 4 and str(got["condition"]) == "exemplar"
  assert str(got["sampler"]) == "dpm_solver++" and int(got["num_steps"]) == 3
  assert got["latents"].shape == (5, 8, 8, 1) and got["images"].shape[0] == 5
  config = tiny_config(data_dir)
  paths = config_base.paths(config)
  queries = store.read(paths["embeddings_test"], "embeddings", hint="")["embeddings"][:5]
  db = store.read(paths["database"], "database", hint="")["embeddings"]
  np.testing.assert_array_equal(got["query_rows"], np.arange(5))
  np.testing.assert_array_equal(got["neighbor_rows"], brute_force_neighbors(queries, db, 4))
  db_ids = store.read(paths["database"], "database", hint="")["ids"]
  np.testing.assert_array_equal(got["neighbor_ids"], np.asarray(db_ids)[got["neighbor_rows"]])
  settings = json.load(open(os.path.join(set_dir, "settings.json")))
  assert (
    settings["num_images"] == 5 and settings["num_shards"] == 3 and settings["checkpoint_step"] == 4
  )
  assert settings["sample"]["sampler"] == "dpm_solver++" and (got["seed"] == settings["seed"]).all()

  # the samples are those of the checkpoint's EMA weights, not of its raw weights
  config.sample.num_steps, config.sample.batch_size, config.sample.sampler = 3, 2, "dpm_solver++"
  model, params, info, step = checkpoint.load_trained(config, workdir)

  state = tiny_run_state(data_dir, workdir)
  assert step == int(state.step) == 4
  assert all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params))
  )
  sampler = inference.make_sampler(model, factory.make_schedule(config), (8, 8, 1), config.sample)
  context = np.asarray(db)[got["neighbor_rows"]]
  rng = jax.random.PRNGKey(config.train.seed + 7)  # the default seed; sample i uses fold_in(rng, i)
  np.testing.assert_allclose(
    sample_in_batches(sampler, state.ema_params, context, 5, rng),
    got["latents"],
    rtol=1e-5,
    atol=1e-5,
  )
  raw = sample_in_batches(sampler, state.params, context, 2, rng)
  assert np.abs(raw - got["latents"]).max() > 1e-4


@pytest.mark.skipif(
  not os.path.exists(FMNIST_TRAIN), reason="needs dataset-fashion-mnist (make data)"
)
def test_sample_job_clears_the_temporaries_a_killed_run_left_and_only_those(trained, tmp_path):
  """A run killed before its settings were in place leaves only `settings.json.<8 hex>.tmp`: the
  rerun starts the set. One killed while writing a picture leaves `samples.png.<8 hex>.tmp` or
  `neighbors_and_samples.png.<8 hex>.tmp`: the resumed run removes them. A file of another name
  (no 8 hex digits) is not the job's: the directory is refused and the file left alone."""
  data_dir, original = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(original, workdir)
  out = tmp_path / "set"
  cmd = [
    sys.executable,
    "-m",
    "rdm_jax.sample",
    f"--config={TRAIN_CONFIG}",
    f"--workdir={workdir}",
    f"--config.data_dir={data_dir}",
    *TINY_OVERRIDES,
    "--config.sample.num_images=3",
    "--config.sample.batch_size=2",
    "--config.sample.num_steps=2",
    "--config.sample.shard_size=2",
    f"--out={out}",
  ]
  listing = [
    "neighbors_and_samples.png",
    "samples.png",
    "settings.json",
    "shard-00000-of-00002.npz",
    "shard-00001-of-00002.npz",
  ]

  out.mkdir()
  (out / "settings.json.0123abcd.tmp").write_text("{")  # killed before its first rename
  run = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, cwd=REPO)
  assert run.returncode == 0, run.stderr[-3000:]
  assert sorted(os.listdir(out)) == listing
  first = {name: (out / name).read_bytes() for name in listing}

  (out / "samples.png.89abcdef.tmp").write_bytes(b"half a png")  # killed while writing the pictures
  (out / "neighbors_and_samples.png.fedcba98.tmp").write_bytes(b"")
  run = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, cwd=REPO)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "resuming: 2 of 2 shards are done" in run.stdout
  assert sorted(os.listdir(out)) == listing
  assert {name: (out / name).read_bytes() for name in listing} == first

  other = tmp_path / "other"
  other.mkdir()
  (other / "settings.json.tmp").write_text("mine")  # not what the job's atomic writes are called
  run = subprocess.run(
    cmd[:-1] + [f"--out={other}"], env=subprocess_env(), capture_output=True, text=True, cwd=REPO
  )
  assert run.returncode != 0 and "did not write" in run.stderr
  assert os.listdir(other) == ["settings.json.tmp"]


def test_a_run_refuses_a_config_that_changes_what_its_weights_compute(trained, tmp_path):
  """model_info.json records the fields that change what the same weights compute (prediction, noise
  schedule); sampling or resuming under other values stops with the values to pass,
  before it restores anything; a run from before the record loads as it did."""
  data_dir, workdir = trained
  info = json.load(open(os.path.join(workdir, "model_info.json")))
  config = tiny_config(data_dir)
  assert info["function"] == {
    "diffusion.prediction": config.diffusion.prediction,
    "diffusion.num_timesteps": 1000,
    "diffusion.beta_start": 0.0015,
    "diffusion.beta_end": 0.0195,
  }
  for key, value in (("prediction", "v"), ("beta_end", 0.012)):
    changed = tiny_config(data_dir)
    changed.diffusion[key] = value
    with pytest.raises(
      UserError,
      match=rf"trained with diffusion.{key}=.*--config.diffusion.{key}="
      rf"{info['function']['diffusion.' + key]}",
    ):
      checkpoint.load_trained(changed, workdir)
  # resuming under another prediction: the train job stops and saves nothing
  run = str(tmp_path / "run")
  shutil.copytree(workdir, run)
  before = sorted(os.listdir(os.path.join(run, "checkpoints")))
  cmd = [
    sys.executable,
    "-m",
    "rdm_jax.train",
    f"--config={TRAIN_CONFIG}",
    f"--workdir={run}",
    f"--config.data_dir={data_dir}",
    *TINY_OVERRIDES,
    "--config.mesh.data=4",
    "--config.mesh.fsdp=2",
    "--config.train.num_steps=6",
    "--config.diffusion.prediction=eps",
    "--config.diffusion.x0_bound=0",  # the censored loss is for x0 predictions only
  ]
  out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, cwd=REPO)
  assert out.returncode != 0 and "--config.diffusion.prediction=x0" in out.stderr + out.stdout, (
    out.stderr[-3000:]
  )
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == before
  # a run whose model_info.json predates the record is not checked
  del info["function"]
  with open(os.path.join(run, "model_info.json"), "w") as f:
    json.dump(info, f)
  changed = tiny_config(data_dir)
  changed.diffusion.prediction = "v"
  assert checkpoint.load_trained(changed, run)[3] == 4


@pytest.mark.parametrize("module", ["rdm_jax.sample", "rdm_jax.jobs.context_ablation"])
def test_jobs_that_run_the_model_refuse_a_lever_this_platform_lacks_before_reading_anything(
  tmp_path, module
):
  """`model.attention=flash` is a TPU kernel: on CPU the sample and ablation jobs stop with the
  platform check's message (as the train job does) before they open the
  workdir, and create nothing."""
  workdir = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    module,
    f"--config={TRAIN_CONFIG}",
    f"--workdir={workdir}",
    *TINY_OVERRIDES,
    "--config.model.attention=flash",
  ]
  out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, cwd=REPO)
  assert out.returncode != 0
  assert (
    "Pallas TPU kernel" in out.stderr + out.stdout
    and "attention=dot_product" in out.stderr + out.stdout
  )
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert not workdir.exists()


def test_python_api_samples_with_one_loaded_model(trained, tmp_path):
  """inference.RDM: exemplars, the same queries given as embeddings (same neighbours, and with
  the same seed the same samples), and class pools; the panel has a row per sample."""
  data_dir = str(tmp_path / "data")
  shutil.copytree(trained[0], data_dir)  # the proposal store is written below
  workdir = trained[1]
  config = tiny_config(data_dir)
  config.sample.num_steps, config.sample.batch_size = 2, 4
  rdm = inference.RDM(config, workdir)
  assert rdm.step == 4
  out = rdm.sample(rdm.exemplars(3), seed=5)
  assert (
    out.latents.shape == (3, 8, 8, 1)
    and out.images.shape == (3, 8, 8, 1)
    and out.images.dtype == np.uint8
  )
  queries = store.read(config_base.paths(config)["embeddings_test"], "embeddings", hint="")[
    "embeddings"
  ][:3]
  again = rdm.sample(rdm.embeddings(np.asarray(queries)), seed=5)
  np.testing.assert_array_equal(again.conditioning.neighbor_rows, out.conditioning.neighbor_rows)
  np.testing.assert_array_equal(again.latents, out.latents)
  assert np.abs(rdm.sample(rdm.exemplars(3), seed=6).latents - out.latents).max() > 1e-3
  # config.sample.k (the original's --k_nn) apart from k_train (4): each query's k exact nearest
  # neighbours, fewer or more than in training, and the model reads them all
  for k in (2, 6):
    config.sample.k = k
    other = rdm.sample(rdm.exemplars(3), seed=5)
    np.testing.assert_array_equal(
      other.conditioning.neighbor_rows,
      brute_force_neighbors(np.asarray(queries), rdm.database["embeddings"], k),
    )
    assert other.conditioning.context.shape == (3, k, queries.shape[1])
    assert np.abs(other.latents - out.latents).max() > 1e-3
  config.sample.k = 10**6
  with pytest.raises(UserError, match=r"config.sample.k=1000000: give 1 to \d+ neighbours"):
    rdm.exemplars(3)
  config.sample.k = 0
  # condition=zeros: one all-zeros entry, which attention reads as it reads k_train zero entries
  # (the unconditional branch guidance trains)
  config.sample.condition = "zeros"
  zeros = rdm.from_config(2)
  assert zeros.context.shape == (2, 1, queries.shape[1]) and not zeros.context.any()
  np.testing.assert_allclose(
    rdm.latents(zeros.context, seed=3),
    rdm.latents(np.zeros((2, 4, queries.shape[1]), np.float32), seed=3),
    atol=1e-5,
  )
  config.sample.condition = "exemplar"
  by_class = rdm.sample(rdm.classes(4, "0", seed=1))  # the tiny database is all label 0
  pool = conditioning.class_pool(rdm.database, 0, config.sample.class_pool_size)
  assert set(by_class.conditioning.neighbor_rows.ravel()) <= set(pool.tolist())
  panel = rdm.panel(by_class)
  assert panel.dtype == np.uint8 and panel.shape[0] >= 4 * 8
  # unconditional: pseudo-queries from p_D (written here from the training neighbours), then their
  # k nearest; each pseudo-query is a database entry, so it is its own nearest neighbour
  paths = config_base.paths(config)
  nbrs = store.read(paths["neighbors_train"], "neighbors", hint="")
  proposal.write_proposal(paths["proposal"], nbrs, rdm.database, k=config.k_train)
  unconditional = rdm.sample(rdm.proposal(3, seed=2))
  got = unconditional.conditioning
  np.testing.assert_array_equal(got.neighbor_rows[:, 0], got.query_rows)
  np.testing.assert_array_equal(
    got.neighbor_rows,
    brute_force_neighbors(
      np.asarray(rdm.database["embeddings"])[got.query_rows], rdm.database["embeddings"], 4
    ),
  )
  assert unconditional.images.shape[0] == 3
  # config.sample.seed draws the pseudo-queries too: the same seed the same set, another another
  config.sample.condition, config.sample.num_images = "proposal", 8
  draws = []
  for seed in (3, 3, 4):
    config.sample.seed = seed
    draws.append(rdm.from_config().query_rows)
  np.testing.assert_array_equal(draws[0], draws[1])
  assert not np.array_equal(draws[0], draws[2])
  config.sample.condition = "text"  # needs captions, and a database embedded by the config's CLIP
  with pytest.raises(UserError, match="needs captions"):
    rdm.from_config()
  config.sample.prompts = ("a dress",)
  with pytest.raises(UserError, match="must come from one CLIP"):
    rdm.from_config()


def test_neighbour_panel_shows_neighbours_of_another_size_at_the_samples_size():
  """A database from another dataset: grey 6x6 neighbours beside RGB 3x3 samples (pad 2, gap 8)."""
  from rdm_jax.data import visualize

  neighbors = np.stack([np.full((6, 6, 1), 10, np.uint8), np.full((6, 6, 1), 200, np.uint8)])[None]
  samples = np.full((1, 3, 3, 3), 77, np.uint8)
  panel = visualize.neighbor_panel(neighbors, samples)
  assert panel.shape == (2 + 3 + 2, (2 + 2 * (3 + 2)) + 8 + (2 + 3 + 2), 3)
  np.testing.assert_array_equal(panel[2:5, 2:5], 10)  # first neighbour, resized, grey -> RGB
  np.testing.assert_array_equal(panel[2:5, 7:10], 200)  # second neighbour
  np.testing.assert_array_equal(panel[2:5, 22:25], 77)  # the sample


@pytest.mark.skipif(
  not os.path.exists(FMNIST_TRAIN), reason="needs dataset-fashion-mnist (make data)"
)
def test_training_writes_samples_of_its_ema_weights_every_sample_every_steps(trained):
  """sample_every=2 over 4 steps: grids at steps 2 and 4, each the step's EMA weights sampled with
  key seed+1 from the first 4 test queries (2 DDIM steps), decoded and laid out 4 to a row."""
  from PIL import Image
  from rdm_jax.data import visualize
  from rdm_jax.models import first_stage

  data_dir, workdir = trained
  config = tiny_config(data_dir)
  config.sample.num_steps = 2
  cond = conditioning.exemplar_conditioning(config, 4, 4, "test")
  files = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert files == [
    "neighbors_and_samples_0000002.png",
    "neighbors_and_samples_0000004.png",
    "samples_0000002.png",
    "samples_0000004.png",
  ]
  for step in (2, 4):
    state = tiny_run_state(data_dir, workdir, step)
    sampler = inference.make_sampler(
      factory.make_model(config), factory.make_schedule(config), (8, 8, 1), config.sample
    )
    z = sampler(state.ema_params, cond.context, jax.random.PRNGKey(config.train.seed + 1))
    images = first_stage.decode(config.first_stage, np.asarray(z), (8, 8))
    want = visualize.grid(images, 4).repeat(2, 0).repeat(2, 1)[..., 0]
    got = np.asarray(Image.open(os.path.join(workdir, "samples", f"samples_{step:07d}.png")))
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float noise may flip a rounding


@pytest.mark.skipif(
  not os.path.exists(FMNIST_TRAIN), reason="needs dataset-fashion-mnist (make data)"
)
def test_sample_job_with_an_image_folder_swapped_in_as_the_database(trained, tmp_path):
  """--config.database= a store embedded from an image folder (two class folders of 6 images, each
  one grey level): class pools from the folder names, held-out queries searched through an index
  built on first use, and the neighbours' pixels read back from the folder for the panel."""
  from PIL import Image
  from rdm_jax.data import sources

  data_dir, workdir = trained
  for c, name in enumerate(("cats", "dogs")):
    (tmp_path / "art" / name).mkdir(parents=True)
    for i in range(6):
      Image.fromarray(np.full((4, 4), 10 + 120 * c + 15 * i, np.uint8)).save(
        tmp_path / "art" / name / f"{i}.png"
      )
  config = tiny_config(data_dir)
  config.dataset.parts.database = dict(split=f"folder:{tmp_path}/art", start=0, stop=0)
  config.dataset.folder.update(image_size=8, channels=1, background="white", max_pixels=100)
  source = sources.part_source(config.dataset, "database")
  encoder = store.read(os.path.join(data_dir, "database"), "database", hint="").manifest["encoder"]
  emb = np.random.default_rng(3).normal(size=(12, 16)).astype(np.float32)
  db_path = str(tmp_path / "art_db")
  store.write(
    db_path,
    "database",
    {"embeddings": emb, "ids": np.arange(12), "labels": np.repeat([0, 1], 6).astype(np.int32)},
    encoder=encoder,
    source=source,
  )

  def run(condition, *extra):
    out = str(tmp_path / condition)
    cmd = [
      sys.executable,
      "-m",
      "rdm_jax.sample",
      f"--config={TRAIN_CONFIG}",
      f"--workdir={workdir}",
      f"--config.data_dir={data_dir}",
      *TINY_OVERRIDES,
      f"--config.database={db_path}",
      f"--out={out}",
      "--config.sample.num_images=3",
      "--config.sample.num_steps=2",
      f"--config.sample.condition={condition}",
      "--config.sample.class_pool_size=5",
      "--config.retrieval.num_neighbors=4",
      *extra,
    ]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(os.path.join(out, "shard-00000-of-00001.npz")), result.stdout

  by_class, _ = run("class", "--config.sample.classes=DOGS")
  assert (by_class["query_rows"] == 1).all() and (by_class["neighbor_rows"] >= 6).all()
  assert by_class["images"].shape == (3, 8, 8, 1)
  exemplar, stdout = run("exemplar")
  assert "building it" in stdout and store.exists(db_path + "_index")
  queries = store.read(config_base.paths(config)["embeddings_test"], "embeddings", hint="")[
    "embeddings"
  ][:3]
  np.testing.assert_array_equal(exemplar["neighbor_rows"], brute_force_neighbors(queries, emb, 4))
  np.testing.assert_array_equal(exemplar["neighbor_ids"], exemplar["neighbor_rows"])
  # the panel's neighbours: each file's grey, read back through the store's source record
  config.database = db_path
  pixels = conditioning.database_images(
    store.read(db_path, "database", hint=""), config.dataset, exemplar["neighbor_rows"]
  )
  np.testing.assert_array_equal(
    pixels[..., 0, 0, 0],
    10 + 120 * (exemplar["neighbor_rows"] // 6) + 15 * (exemplar["neighbor_rows"] % 6),
  )
  assert os.path.getsize(tmp_path / "exemplar" / "neighbors_and_samples.png") > 0
  # a database of another width is refused before anything is sampled
  narrow = str(tmp_path / "narrow_db")
  store.write(
    narrow,
    "database",
    {"embeddings": emb[:, :8], "ids": np.arange(12), "labels": np.zeros(12, np.int32)},
    encoder=encoder,
    source=source,
  )
  config.database = narrow
  with pytest.raises(
    UserError, match="holds 8-d embeddings but the model takes config.retrieval.embed_dim=16"
  ):
    conditioning.open_database(config, encoder)
