"""Training on 8 fake CPU devices: the rules give the asked-for parameter shardings, and data
parallel, FSDP and tensor parallel layouts compute the same steps as one device."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rdm_jax import train_step
from rdm_jax.data import pipeline
from rdm_jax.errors import UserError
from rdm_jax.parallel import mesh as mesh_lib, sharding
from rdm_jax.models import factory
from tests.conftest import tiny_config


def _run(config, mesh_axes, steps=3, devices=None, tx=None):
  mesh = mesh_lib.make_mesh(mesh_axes, devices)
  rules = [tuple(r) for r in config.sharding_rules]
  data = pipeline.load_retrieval_data(config, "train")
  setup = train_step.setup_training(config, data.latents.shape[1:], mesh, tx)
  state, step = setup.init_state(jax.random.PRNGKey(0)), setup.train_step
  losses = []
  with jax.set_mesh(mesh):
    for s in range(steps):
      rows = pipeline.example_indices(0, s, config.train.batch_size, data.num_examples)
      z0, ctx = sharding.put_batch(
        mesh, rules, *pipeline.load_batch(data, rows, config.k_train, "first")
      )
      state, metrics = step(state, z0, ctx, jax.random.PRNGKey(1))
      losses.append(float(metrics["loss"]))
  return state, losses


def _spec(state, path):
  node = state.params
  for key in path.split("/"):
    node = node[key]
  return node.sharding.spec


def test_eight_devices_are_there():
  assert jax.device_count() == 8


def test_fsdp_and_tensor_shardings_follow_the_rules(tiny_data):
  config = tiny_config(tiny_data["data_dir"])
  config.model.patch_size = 1  # the UNet's first conv sees the one grey channel
  state, _ = _run(config, {"data": 2, "fsdp": 2, "tensor": 2}, steps=1)
  # conv kernels (None, None, conv_in -> fsdp, conv_out -> tensor)
  assert _spec(state, "down_0_res_0/in_conv/kernel") == P(None, None, "fsdp", "tensor")
  # first conv has 1 input channel: fsdp=2 cannot divide it, so that dimension stays replicated
  assert _spec(state, "conv_in/kernel") == P(None, None, None, "tensor")
  # attention: q (embed -> fsdp, heads -> tensor); cross-attention k
  # (context -> fsdp, heads -> tensor)
  assert _spec(state, "mid_attn/block_0/attn1/to_q/kernel") == P("fsdp", "tensor")
  assert _spec(state, "mid_attn/block_0/attn2/to_k/kernel") == P("fsdp", "tensor")
  assert _spec(state, "mid_attn/block_0/attn2/to_out/kernel") == P("tensor", "fsdp")
  assert _spec(state, "mid_attn/block_0/ff/proj_out/kernel") == P("tensor", "fsdp")
  # norms replicated; Adam moments and EMA sharded like their parameters
  assert _spec(state, "out_norm/scale") == P(None)
  mu = state.opt_state[1][0].mu["mid_attn"]["block_0"]["attn1"]["to_q"]["kernel"]
  assert mu.sharding.spec == P("fsdp", "tensor")
  assert state.ema_params["conv_in"]["kernel"].sharding.spec == P(None, None, None, "tensor")


def _same_training_steps(data_dir, layouts):
  """Each (mesh axes, fsdp_outer) layout trains to the same losses and parameters as one device.
  SGD here: Adam's first updates are ~lr * sign(g), which turns reduction-order rounding of
  near-zero gradients into lr-sized differences."""
  config = tiny_config(data_dir)
  sgd = optax.sgd(1e-3)
  ref_state, ref_losses = _run(
    config, {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1], tx=sgd
  )
  for axes, outer in layouts:
    config.mesh.fsdp_outer = outer
    state, losses = _run(config, axes, tx=sgd)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(axes))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
      np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=str(axes)
      )


def test_layouts_compute_the_same_training_steps(tiny_data):
  """Data parallel x FSDP x tensor parallel (pure data parallelism is the data axis of it)."""
  _same_training_steps(tiny_data["data_dir"], [({"data": 2, "fsdp": 2, "tensor": 2}, 0)])


@pytest.mark.slow  # 45 s; the two-stage gather itself is checked in make test (next test)
def test_fsdp_gathered_in_two_stages_computes_the_same_training_steps(tiny_data):
  """FSDP's gathers in two stages (fsdp_outer=2: parallel.fsdp.split_mesh) inside the step."""
  _same_training_steps(tiny_data["data_dir"], [({"data": 2, "fsdp": 4, "tensor": 1}, 2)])


def test_a_two_stage_gather_is_the_array_and_its_transpose_the_summed_shard():
  """parallel.fsdp's gather over fsdp split into 2 groups of 4 (data 2 x fsdp 8 would not fit: 8
  devices, so data 2 x fsdp 4 split 2 x 2): every device holds the whole array, in order; the
  gradient of sum(gathered * w), summed over the 8 devices' losses, is 8 w on each shard,
  reduce-scattered in two stages and summed over data at shard size; no full-size all-reduce."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from rdm_jax.parallel import fsdp, hlo

  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  split, names = fsdp.split_mesh(mesh, "fsdp", 2)
  manual = ("data",) + names
  spec = P(None, names)
  x = np.arange(3 * 8, dtype=np.float32).reshape(3, 8)
  w = np.random.RandomState(0).randn(3, 8).astype(np.float32)

  def local(x, w):
    full = fsdp._gathered(x, spec, False, jnp.float32, manual)
    grad = jax.grad(lambda x: jnp.sum(fsdp._gathered(x, spec, False, jnp.float32, manual) * w))(x)
    return full[None], grad

  f = jax.jit(
    jax.shard_map(
      local, mesh=split, in_specs=(spec, P()), out_specs=(P(manual), spec), axis_names=set(manual)
    )
  )
  placed = jax.device_put(x, NamedSharding(mesh, P(None, "fsdp")))  # placed on the unsplit mesh
  full, grad = f(placed, w)
  np.testing.assert_array_equal(np.asarray(full).reshape(8, 3, 8), np.broadcast_to(x, (8, 3, 8)))
  np.testing.assert_allclose(np.asarray(grad), 8 * w, rtol=1e-6)
  found = hlo.collectives(f.lower(placed, w).compile().as_text())
  assert found["reduce-scatter"]["count"] == 2, found
  assert found["all-reduce"]["bytes"] == 3 * 2 * 4, found  # the shard (3 x 2 f32), summed over data
  with pytest.raises(UserError, match="must divide the fsdp axis"):
    fsdp.split_mesh(mesh, "fsdp", 3)


def test_mesh_errors():
  with pytest.raises(UserError, match="does not divide 8 devices"):
    mesh_lib.make_mesh({"data": -1, "fsdp": 3})
  with pytest.raises(UserError, match="has 4 devices but 8"):
    mesh_lib.make_mesh({"data": 2, "fsdp": 2})
  with pytest.raises(UserError, match="more than one -1"):
    mesh_lib.make_mesh({"data": -1, "fsdp": -1})
  assert dict(mesh_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 2}).shape) == {
    "data": 2,
    "fsdp": 2,
    "tensor": 2,
  }


def test_which_parameters_are_gathered_in_the_compute_dtype():
  """A parameter is cast before FSDP's all-gather only when every read of it is a cast to the
  compute dtype, through jit and remat: a hand-written case, and RARM, whose token and position
  embeddings are read in float32 (flax's Embed without a dtype; pos_emb added as is) beside
  bf16 kernels."""
  import jax.numpy as jnp
  from rdm_jax.parallel import fsdp

  def apply(p, x):
    h = x.astype(jnp.bfloat16) @ p["a"].astype(jnp.bfloat16)  # cast: gathered in bf16
    h = h.astype(jnp.float32) + p["b"].sum()  # read in f32
    inner = jax.checkpoint(lambda c, h: h * c.astype(jnp.bfloat16).astype(jnp.float32).sum())
    h = inner(p["c"], h)  # cast inside remat
    h = jax.jit(lambda d, h: h + d.astype(jnp.bfloat16).sum() + d.sum())(p["d"], h)  # cast and f32
    return h + p["e"].astype(jnp.float16).sum()  # another dtype

  params = {k: jax.ShapeDtypeStruct((4, 4), jnp.float32) for k in "abcde"}
  x = jax.ShapeDtypeStruct((2, 4), jnp.float32)
  cast = fsdp.cast_before_gather(apply, params, (x,), jnp.bfloat16)
  assert cast == {"a": True, "b": False, "c": True, "d": False, "e": False}
  assert not any(jax.tree.leaves(fsdp.cast_before_gather(apply, params, (x,), jnp.float32)))

  from tests.conftest import repo_config

  c = repo_config("imagenet_rarm")
  c.model.update(depth=1, heads=2, dim_head=8, dtype="bfloat16")
  mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  model = factory.make_model(c, list(mesh.devices.flat), factory.latent_shape(c))
  inputs = factory.example_inputs(c, 1, factory.latent_shape(c), c.k_train)
  abstract, sh = train_step.state_shardings(
    model, optax.sgd(0.1), inputs, mesh, [tuple(r) for r in c.sharding_rules], 4
  )
  layout = train_step.fsdp_layout(
    c, model, inputs, mesh, c.sharding_rules, abstract.params, sh.params
  )
  assert layout is not None and layout.batch_axes == ("data", "fsdp")
  assert not layout.cast["tok_emb"]["embedding"] and not layout.cast["pos_emb"]
  kernels = [
    v
    for k, v in jax.tree_util.tree_flatten_with_path(layout.cast)[0]
    if "kernel" in jax.tree_util.keystr(k)
  ]
  assert kernels and all(kernels)
  # no explicit layout beside tensor parallelism, or without fsdp
  for axes in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 8, "fsdp": 1, "tensor": 1}):
    m = mesh_lib.make_mesh(axes)
    a, s = train_step.state_shardings(
      model, optax.sgd(0.1), inputs, m, [tuple(r) for r in c.sharding_rules], 4
    )
    assert (
      train_step.fsdp_layout(c, model, inputs, m, c.sharding_rules, a.params, s.params) is None
    ), axes
