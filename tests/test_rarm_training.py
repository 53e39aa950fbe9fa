"""RARM training steps (training.make_train_step with config.model.family = "rarm"): the
configs/imagenet_rarm.py config shrunk to a toy, on 8 fake devices with a tensor axis of 2
against one device; the loss against the cross-entropy of the logits computed directly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import repo_config
from jax.sharding import PartitionSpec as P

from rdm_jax import training
from rdm_jax.models import rarm
from rdm_jax.parallel import mesh as mesh_lib


def _tiny_config():
  c = repo_config("imagenet_rarm")
  c.first_stage.arch.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, n_embed=64, resolution=16)
  c.dataset.image_size = 16            # 4 x 4 = 16 tokens of 64 codes
  c.model.update(heads=2, dim_head=16, depth=2, dtype="float32")
  c.retrieval.embed_dim = 12
  c.train.batch_size = 8
  return c


def _batches(config, steps):
  """One batch, repeated: the loss must fall step by step."""
  rng = np.random.default_rng(0)
  batch = (rng.integers(0, 64, (config.train.batch_size, 16)).astype(np.int32),
           rng.normal(size=(config.train.batch_size, config.k_train, 12)).astype(np.float32))
  return [batch] * steps


def _run(config, mesh_axes, tx, devices=None, steps=3):
  mesh = mesh_lib.make_mesh(mesh_axes, devices)
  rules = [tuple(r) for r in config.sharding_rules]
  model = training.make_model(config)
  inputs = training.example_inputs(config, 1, (16,), config.k_train)
  _, sh = training.state_shardings(model, tx, inputs, mesh, rules)
  state = training.init_state(model, tx, inputs, jax.random.PRNGKey(0), sh)
  step = training.jit_train_step(training.make_train_step(config, model, tx, None), sh, mesh, rules, 2)
  losses = []
  with jax.set_mesh(mesh):
    for z, ctx in _batches(config, steps):
      state, metrics = step(state, *training.put_batch(mesh, rules, z, ctx), jax.random.PRNGKey(1))
      losses.append(float(metrics["loss"]))
  return model, state, losses


def test_the_loss_is_the_next_token_cross_entropy():
  config = _tiny_config()
  model, state, losses = _run(config, {"data": 1, "fsdp": 1, "tensor": 1}, optax.sgd(0.0), jax.devices()[:1], 1)
  z, ctx = _batches(config, 1)[0]
  logits = np.asarray(model.apply({"params": jax.device_get(state.params)}, jnp.asarray(z), jnp.asarray(ctx)),
                      np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      logits.max(-1, keepdims=True)
  want = -np.mean(np.take_along_axis(logp, z[..., None], -1))
  np.testing.assert_allclose(losses[0], want, rtol=1e-5)
  assert abs(want - np.log(64)) < 2.0  # a fresh model is near uniform over the 64 codes


def test_sharded_steps_with_a_tensor_axis_equal_one_device():
  """(data=2, fsdp=2, tensor=2) against one device: same losses and parameters after 3 SGD steps;
  the vocabulary and heads are split over the tensor axis, embed over fsdp."""
  config = _tiny_config()
  sgd = optax.sgd(0.05)
  _, ref_state, ref_losses = _run(config, {"data": 1, "fsdp": 1, "tensor": 1}, sgd, jax.devices()[:1])
  _, state, losses = _run(config, {"data": 2, "fsdp": 2, "tensor": 2}, sgd)
  assert state.params["tok_emb"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert state.params["proj_out"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert state.params["blocks_0"]["attn2"]["to_k"]["kernel"].sharding.spec == P("fsdp", "tensor")
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  assert losses[2] < losses[1] < losses[0]  # it learns the batch
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_the_original_configs_sizes():
  """configs/imagenet_rarm.py: VQ-f16 tokens of 256-px images, 16384 codes + mask + start,
  12 x 64 heads, depth 18 (the original's RetrievalPatchTransformer)."""
  model = training.make_model(repo_config("imagenet_rarm"))
  assert (model.num_codes, model.seq_len, model.heads, model.dim_head, model.depth) == (16384, 256, 12, 64, 18)
  assert (model.mask_token, model.sos_token) == (16384, 16385)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 256), jnp.int32),
                                             jnp.zeros((1, 4, 512))))
  params = jax.tree.leaves(shapes)
  assert shapes["params"]["tok_emb"]["embedding"].value.shape == (16386, 768)
  assert isinstance(model, rarm.RARM) and len(params) > 0


def test_bad_token_stores_are_refused_in_one_line(tmp_path):
  """Continuous latents, tokens of another first stage, another sequence length, ids outside the
  codebook: each one line that says what to do."""
  import pytest
  pytest.importorskip("torch")  # the tiny VQ checkpoint is written with it
  from test_first_stage import TINY, TorchAutoencoder, save_lightning_ckpt

  from rdm_jax.data import pipeline, store
  from rdm_jax.errors import UserError
  from rdm_jax.models import first_stage

  save_lightning_ckpt(tmp_path / "vq.ckpt", dict(TorchAutoencoder("vq", TINY["vq_f4"], seed=7).state_dict()))
  config = _tiny_config()
  config.first_stage.update(name="vq_f4", latent_channels=3, weights=str(tmp_path / "vq.ckpt"))
  config.first_stage.arch.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, n_embed=64, resolution=32,
                                 attn_resolutions=(0,))
  identity = first_stage.identity(config.first_stage)
  good = np.random.default_rng(0).integers(0, 64, (5, 16)).astype(np.int32)

  def latents(name, array, **fields):
    return store.write(str(tmp_path / name), "latents", {"latents": array, "ids": np.arange(5)}, **fields)

  pipeline.check_tokens(config, latents("ok", good, tokens=True, first_stage=identity))
  cases = [
      (latents("continuous", good.astype(np.float32), first_stage=identity), "holds continuous latents"),
      (latents("other", good, tokens=True, first_stage={**identity, "weights_sha256": "0" * 16}),
       "another first stage"),
      (latents("short", good[:, :9], tokens=True, first_stage=identity), r"int32\[9\] per image, but the model reads 16"),
      (latents("range", np.where(good == good.max(), 64, good), tokens=True, first_stage=identity),
       r"ids in \[0, 64\] but the codebook has 64 codes"),
  ]
  for bad, says in cases:
    with pytest.raises(UserError, match=says) as e:
      pipeline.check_tokens(config, bad)
    assert "\n" not in str(e.value)


def test_the_demo_config_models_palette_tokens():
  """configs/fashion_mnist_rarm.py: 14 x 14 palette tokens of 16 grey levels per 28-px image."""
  model = training.make_model(repo_config("fashion_mnist_rarm"))
  assert (model.num_codes, model.seq_len, model.heads * model.dim_head, model.depth) == (16, 196, 128, 4)
