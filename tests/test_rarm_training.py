"""RARM training steps (train_step.make_train_step with config.model.family = "rarm"): the
configs/imagenet_rarm.py config shrunk to a toy, on 8 fake devices with a tensor axis of 2
against one device; the loss against the cross-entropy of the logits computed directly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tests.conftest import brute_force_neighbors, rarm_final_state, repo_config, tiny_token_run
from jax.sharding import PartitionSpec as P

from rdm_jax import train_step
from rdm_jax.models import factory, rarm
from rdm_jax.parallel import mesh as mesh_lib, sharding


def _tiny_config():
  c = repo_config("imagenet_rarm")
  c.first_stage.arch.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, n_embed=64, resolution=16)
  c.dataset.image_size = 16  # 4 x 4 = 16 tokens of 64 codes
  c.model.update(heads=2, dim_head=16, depth=2, dtype="float32")
  c.retrieval.embed_dim = 12
  c.train.batch_size = 8
  return c


def _batches(config, steps):
  """One batch, repeated: the loss must fall step by step."""
  rng = np.random.default_rng(0)
  batch = (
    rng.integers(0, 64, (config.train.batch_size, 16)).astype(np.int32),
    rng.normal(size=(config.train.batch_size, config.k_train, 12)).astype(np.float32),
  )
  return [batch] * steps


def _run(config, mesh_axes, tx, devices=None, steps=3):
  mesh = mesh_lib.make_mesh(mesh_axes, devices)
  rules = [tuple(r) for r in config.sharding_rules]
  setup = train_step.setup_training(config, (16,), mesh, tx)
  model, state, step = setup.model, setup.init_state(jax.random.PRNGKey(0)), setup.train_step
  losses = []
  with jax.set_mesh(mesh):
    for z, ctx in _batches(config, steps):
      state, metrics = step(state, *sharding.put_batch(mesh, rules, z, ctx), jax.random.PRNGKey(1))
      losses.append(float(metrics["loss"]))
  return model, state, losses


def test_the_loss_is_the_next_token_cross_entropy():
  config = _tiny_config()
  model, state, losses = _run(
    config, {"data": 1, "fsdp": 1, "tensor": 1}, optax.sgd(0.0), jax.devices()[:1], 1
  )
  z, ctx = _batches(config, 1)[0]
  logits = np.asarray(
    model.apply({"params": jax.device_get(state.params)}, jnp.asarray(z), jnp.asarray(ctx)),
    np.float64,
  )
  logp = (
    logits
    - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - logits.max(-1, keepdims=True)
  )
  want = -np.mean(np.take_along_axis(logp, z[..., None], -1))
  np.testing.assert_allclose(losses[0], want, rtol=1e-5)
  assert abs(want - np.log(64)) < 2.0  # a fresh model is near uniform over the 64 codes


def test_sharded_steps_equal_one_device():
  """(data=2, fsdp=2, tensor=2) and (data=4, fsdp=2) against one device: same losses and
  parameters after 3 SGD steps; the vocabulary and heads are split over the tensor axis, embed
  over fsdp; without a tensor axis the gradient is FSDP's explicit one (parallel/fsdp.py)."""
  config = _tiny_config()
  sgd = optax.sgd(0.05)
  _, ref_state, ref_losses = _run(
    config, {"data": 1, "fsdp": 1, "tensor": 1}, sgd, jax.devices()[:1]
  )
  for axes in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 4, "fsdp": 2, "tensor": 1}):
    _, state, losses = _run(config, axes, sgd)
    assert state.params["tok_emb"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert state.params["proj_out"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert state.params["blocks_0"]["attn2"]["to_k"]["kernel"].sharding.spec == P("fsdp", "tensor")
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(axes))
    assert losses[2] < losses[1] < losses[0]  # it learns the batch
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
      np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=str(axes)
      )


def test_the_original_configs_sizes():
  """configs/imagenet_rarm.py: VQ-f16 tokens of 256-px images, 16384 codes + mask + start,
  12 x 64 heads, depth 18 (the original's RetrievalPatchTransformer)."""
  model = factory.make_model(repo_config("imagenet_rarm"))
  assert (model.num_codes, model.seq_len, model.heads, model.dim_head, model.depth) == (
    16384,
    256,
    12,
    64,
    18,
  )
  assert (model.mask_token, model.sos_token) == (16384, 16385)
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 256), jnp.int32), jnp.zeros((1, 4, 512))
    )
  )
  params = jax.tree.leaves(shapes)
  assert shapes["params"]["tok_emb"]["embedding"].value.shape == (16386, 768)
  assert isinstance(model, rarm.RARM) and len(params) > 0


def test_bad_token_stores_are_refused_in_one_line(tmp_path):
  """Continuous latents, tokens of another first stage, another sequence length, ids outside the
  codebook: each one line that says what to do."""
  import pytest

  pytest.importorskip("torch")  # the tiny VQ checkpoint is written with it
  from tests.taming_reference import TINY, TorchAutoencoder, save_lightning_ckpt

  from rdm_jax.data import pipeline, store
  from rdm_jax.errors import UserError
  from rdm_jax.models import first_stage

  save_lightning_ckpt(
    tmp_path / "vq.ckpt", dict(TorchAutoencoder("vq", TINY["vq_f4"], seed=7).state_dict())
  )
  config = _tiny_config()
  config.first_stage.update(name="vq_f4", latent_channels=3, weights=str(tmp_path / "vq.ckpt"))
  config.first_stage.arch.update(
    ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, n_embed=64, resolution=32, attn_resolutions=(0,)
  )
  identity = first_stage.identity(config.first_stage)
  good = np.random.default_rng(0).integers(0, 64, (5, 16)).astype(np.int32)

  def latents(name, array, **fields):
    return store.write(
      str(tmp_path / name), "latents", {"latents": array, "ids": np.arange(5)}, **fields
    )

  pipeline.check_tokens(config, latents("ok", good, tokens=True, first_stage=identity))
  cases = [
    (
      latents("continuous", good.astype(np.float32), first_stage=identity),
      "holds continuous latents",
    ),
    (
      latents("other", good, tokens=True, first_stage={**identity, "weights_sha256": "0" * 16}),
      "another first stage",
    ),
    (
      latents("short", good[:, :9], tokens=True, first_stage=identity),
      r"int32\[9\] per image, but the model reads 16",
    ),
    (
      latents("range", np.where(good == good.max(), 64, good), tokens=True, first_stage=identity),
      r"ids in \[0, 64\] but the codebook has 64 codes",
    ),
  ]
  for bad, says in cases:
    with pytest.raises(UserError, match=says) as e:
      pipeline.check_tokens(config, bad)
    assert "\n" not in str(e.value)


def test_the_demo_config_models_palette_tokens():
  """configs/fashion_mnist_rarm.py: 14 x 14 palette tokens of 16 grey levels per 28-px image."""
  model = factory.make_model(repo_config("fashion_mnist_rarm"))
  assert (model.num_codes, model.seq_len, model.heads * model.dim_head, model.depth) == (
    16,
    196,
    128,
    4,
  )


def _train(args, workdir, kill_at=0):
  import subprocess
  import sys

  from tests.conftest import REPO, killable, subprocess_env

  cmd = killable([sys.executable, "-m", "rdm_jax.train", f"--workdir={workdir}", *args], kill_at)
  return subprocess.run(
    cmd, env=subprocess_env(devices=8), capture_output=True, text=True, cwd=REPO
  )


@pytest.fixture(scope="module")
def rarm_run(tmp_path_factory):
  """The tiny RARM trained 4 steps uninterrupted: (its job's arguments, workdir)."""
  root = tmp_path_factory.mktemp("rarm_run")
  args = tiny_token_run(root)
  out = _train(args, str(root / "straight"))
  assert out.returncode == 0, out.stderr[-3000:]
  return args, str(root / "straight")


def test_rarm_training_killed_while_checkpointing_resumes_to_the_uninterrupted_state(
  rarm_run, tmp_path
):
  """The RARM train job SIGKILLed (a preemption: no clean-up) just as its step-4 checkpoint is
  committed, then rerun: it resumes from step 2 and ends in the uninterrupted run's state (weights,
  Adam moments, EMA), bit for bit (8 fake devices, data=4 x fsdp=2). Seeded kill points:
  tests/test_kill_jobs.py."""
  import signal

  from tests.conftest import assert_same_state

  from rdm_jax import checkpoint

  args, straight = rarm_run
  killed = str(tmp_path / "killed")
  out = _train(args, killed, kill_at="path:checkpoints/4")
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert checkpoint.steps(checkpoint.manager(killed, create=False)) == [2]
  out = _train(args, killed)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 2" in out.stderr
  assert_same_state(rarm_final_state(args, killed, 4), rarm_final_state(args, straight, 4), 4)


def test_the_python_api_samples_rarm_from_every_conditioning_source(rarm_run):
  """inference.RDM on the tiny RARM run: exemplar, proposal, class-pool and own-embedding
  conditioning. Each gives the context of its database rows (the embeddings' rows against a
  brute-force cosine search), tokens drawn by the cached decoder with the per-sample keys
  fold_in(PRNGKey(seed), i) whatever the batch size, and images that are the palette's colour of
  each token blown up 2 x 2 (worked by hand). Text conditioning is the same path from CLIP's
  text embedding (tests/test_clip_eval.py); it needs a CLIP encoder, which the tiny stores lack."""
  from rdm_jax.config_base import with_overrides
  from tests.conftest import final_state, repo_config

  from rdm_jax import config_base, inference
  from rdm_jax.data import store
  from rdm_jax.retrieval import proposal

  args, workdir = rarm_run
  config = with_overrides(repo_config("fashion_mnist_rarm"), args)
  config.sample.update(
    batch_size=3, class_pool_size=6, temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0
  )
  paths = config_base.paths(config)
  db = store.read(paths["database"], "database", hint="")
  proposal.write_proposal(
    paths["proposal"],
    store.read(paths["neighbors_train"], "neighbors", hint=""),
    db,
    config.k_train,
  )
  rdm = inference.RDM(config, workdir)
  ema = final_state(config, workdir, (16,), 4).ema_params
  palette = np.load(config.first_stage.weights)
  queries = np.random.default_rng(4).normal(size=(5, 16)).astype(np.float32)
  conds = {
    "exemplar": rdm.exemplars(5),
    "proposal": rdm.proposal(5, seed=2),
    "class": rdm.classes(5, "0"),
    "embeddings": rdm.embeddings(queries, include_query=False),
  }
  np.testing.assert_array_equal(
    conds["embeddings"].neighbor_rows,
    brute_force_neighbors(queries, db["embeddings"], config.k_train),
  )
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(9), i))(
    jnp.arange(5, dtype=jnp.uint32)
  )
  for name, cond in conds.items():
    np.testing.assert_array_equal(
      cond.context, np.asarray(db["embeddings"])[cond.neighbor_rows], err_msg=name
    )
    out = rdm.sample(cond, seed=9)  # batches of 3: [0:3], [3:5] padded
    want = rarm.sample(rdm.model, ema, jnp.asarray(cond.context), keys)  # all five at once
    np.testing.assert_array_equal(out.latents, np.asarray(want), err_msg=name)
    assert out.latents.shape == (5, 16) and 0 <= out.latents.min() and out.latents.max() < 16
    by_hand = (
      palette[out.latents.reshape(5, 4, 4)].repeat(2, 1).repeat(2, 2)
    )  # [-1, 1] grey per 2 x 2 block
    np.testing.assert_array_equal(
      out.images, np.clip(np.round((by_hand + 1) * 127.5), 0, 255).astype(np.uint8), err_msg=name
    )
