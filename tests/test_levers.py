"""The accelerator levers of config.model / config.optim against the plain path, on CPU: remat,
the attention kernels (jax.nn.dot_product_attention; the Pallas TPU flash kernel in Pallas'
interpret mode, sharded through shard_map), the parameter and Adam-moment dtypes."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding, PartitionSpec as P

from rdm_jax import train_step
from rdm_jax.errors import UserError
from rdm_jax.models import factory, unet as unet_lib
from rdm_jax.parallel import mesh as mesh_lib
from tests.conftest import repo_config


def _config(**model):
  """A small UNet on 16 x 16 x 1 latents, self-attention over 256 tokens at the top level."""
  c = repo_config("fashion_mnist_rdm")
  c.model.update(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(1,),
    patch_size=1,
  )
  c.model.update(**model)
  c.retrieval.embed_dim = 16
  c.first_stage.latent_channels = 1
  return c


def _inputs(batch=8, side=16):
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  return (
    jax.random.normal(k[0], (batch, side, side, 1)),
    jax.random.randint(k[1], (batch,), 0, 1000),
    jax.random.normal(k[2], (batch, 4, 16)),
  )


def _params(model, inputs):
  params = model.init(jax.random.PRNGKey(0), *inputs)["params"]
  # the zero-initialised output convs would hide most of the network from the comparison
  rng = np.random.default_rng(1)
  return jax.tree.map(
    lambda p: jnp.asarray(np.asarray(p) + 0.05 * rng.standard_normal(p.shape), p.dtype), params
  )


def _loss_and_grads(model, params, inputs):
  z, t, c = inputs
  return jax.jit(
    jax.value_and_grad(lambda p: jnp.mean(jnp.square(model.apply({"params": p}, z, t, c))))
  )(params)


def _assert_close(got, want, rtol, atol):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol
    )


@pytest.mark.slow  # CI's budget: an accelerator memory lever
def test_remat_policies_change_nothing_but_memory():
  inputs = _inputs(2, 8)
  plain = factory.make_model(_config(channel_mult=(1,)))
  params = _params(plain, inputs)
  want = _loss_and_grads(plain, params, inputs)
  for policy in ("full", "dots"):
    model = factory.make_model(_config(remat=policy, channel_mult=(1,)))
    assert jax.tree.structure(
      model.init(jax.random.PRNGKey(0), *inputs)["params"]
    ) == jax.tree.structure(params)
    _assert_close(_loss_and_grads(model, params, inputs), want, rtol=1e-5, atol=1e-7)
  # the recomputation is really there: the remat'd gradient program holds checkpoint regions
  jaxpr = str(
    jax.make_jaxpr(
      lambda p: _loss_and_grads(
        factory.make_model(_config(remat="full", channel_mult=(1,))), p, inputs
      )
    )(params)
  )
  assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_dot_product_attention_equals_the_einsum_softmax():
  inputs = _inputs(2, 8)
  plain = factory.make_model(_config(channel_mult=(1,)))
  params = _params(plain, inputs)
  model = factory.make_model(_config(attention="dot_product", channel_mult=(1,)))
  _assert_close(
    _loss_and_grads(model, params, inputs),
    _loss_and_grads(plain, params, inputs),
    rtol=2e-5,
    atol=1e-6,
  )


@pytest.mark.slow  # CI's budget: a GPU lever, lowered on CPU
def test_cudnn_attention_sends_the_self_attentions_to_cudnn(monkeypatch):
  """attention=cudnn: every self-attention goes to
  jax.nn.dot_product_attention(implementation="cudnn"), cross-attention to the 4 neighbours stays on
  the einsum softmax. cuDNN needs a GPU, so here the call runs XLA's implementation of the same
  function; loss and gradients are as close to the float32 model's as the plain bfloat16 model's are
  (the GPU run of benchmarks/train_throughput.py compares cuDNN itself)."""
  inputs = _inputs(2)
  plain = factory.make_model(_config())
  params = _params(plain, inputs)
  calls, real = [], jax.nn.dot_product_attention

  def on_xla(q, k, v, *args, implementation=None, **kwargs):
    calls.append((q.shape, k.shape, q.dtype, implementation))
    return real(q, k, v, *args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", on_xla)
  got = _loss_and_grads(
    factory.make_model(_config(dtype="bfloat16", attention="cudnn")), params, inputs
  )
  top, mid = (
    ((2, 256, 1, 32),) * 2,
    ((2, 64, 2, 32),) * 2,
  )  # 32 channels at 16 x 16, 64 in the middle block
  assert (
    calls
    == [top + (jnp.bfloat16, "cudnn")]
    + [mid + (jnp.bfloat16, "cudnn")]
    + [top + (jnp.bfloat16, "cudnn")] * 2
  )
  want, bf16 = (
    _loss_and_grads(plain, params, inputs),
    _loss_and_grads(factory.make_model(_config(dtype="bfloat16")), params, inputs),
  )
  flat = lambda x: np.concatenate(
    [np.ravel(np.asarray(a, np.float32)) for a in jax.tree.leaves(x[1])]
  )
  error = lambda x: (
    abs(float(x[0]) / float(want[0]) - 1),
    np.linalg.norm(flat(x) - flat(want)) / np.linalg.norm(flat(want)),
  )
  assert np.all(np.array(error(got)) <= 2 * np.array(error(bf16)) + 1e-3)
  with pytest.raises(UserError, match="takes bfloat16 or float16.*'float32'"):
    factory.make_model(_config(attention="cudnn"))


@pytest.mark.slow  # CI's budget: a TPU kernel, interpreted on CPU
def test_pallas_flash_attention_equals_xla_attention(monkeypatch):
  """The TPU kernel (Pallas interpret mode on CPU) for the 256-token self-attentions: loss and
  gradients on one device; the forward per shard through shard_map on a (data=4, fsdp=2) mesh
  (Pallas' interpret mode does not finish a sharded backward pass on 8 CPU devices in minutes).
  The 64-token level (mid block) and cross-attention stay on XLA (flash_min_seq_len)."""
  inputs = _inputs(2)
  plain = factory.make_model(_config())
  params = _params(plain, inputs)
  flash_config = _config(attention="flash", flash_min_seq_len=256)
  model = factory.make_model(flash_config)
  assert model.attention.batch_axes == ("data", "fsdp")
  calls = []
  kernel = unet_lib.flash_attention
  monkeypatch.setattr(
    unet_lib, "flash_attention", lambda q, *a: calls.append(q.shape) or kernel(q, *a)
  )
  with pltpu.force_tpu_interpret_mode():
    got = _loss_and_grads(model, params, inputs)
  assert (
    calls == [(2, 256, 1, 32)] * 3
  )  # the 256-token self-attentions: down_0_attn_0, up_0_attn_0/1
  _assert_close(got, _loss_and_grads(plain, params, inputs), rtol=2e-4, atol=2e-6)

  mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  inputs8 = _inputs(8)
  with jax.set_mesh(mesh), pltpu.force_tpu_interpret_mode():
    placed = tuple(jax.device_put(x, batch) for x in inputs8)
    out = jax.jit(lambda p, *x: model.apply({"params": p}, *x))(params, *placed)
  assert out.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(
    np.asarray(out), np.asarray(plain.apply({"params": params}, *inputs8)), rtol=2e-4, atol=2e-6
  )


def test_param_dtype_bfloat16_is_the_model_with_rounded_parameters():
  inputs = _inputs()
  plain = factory.make_model(_config())
  params = _params(plain, inputs)
  model = factory.make_model(_config(param_dtype="bfloat16"))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs)["params"])
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
  rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  got = model.apply({"params": rounded}, *inputs)
  want = plain.apply({"params": jax.tree.map(lambda p: p.astype(jnp.float32), rounded)}, *inputs)
  np.testing.assert_array_equal(
    np.asarray(got), np.asarray(want)
  )  # compute stays float32 (config.model.dtype)


def test_adam_first_moment_dtype():
  """optim.mu_dtype=bfloat16: the first moment is stored in bfloat16 (half the bytes) and the
  updates are float32 Adam's within bfloat16 rounding of that moment."""
  params = {"w": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32)}
  grads = [{"w": jnp.sin(jnp.arange(64.0) * (i + 1))} for i in range(3)]
  results = {}
  for mu_dtype in ("", "bfloat16"):
    c = _config()
    c.optim.update(mu_dtype=mu_dtype, warmup_steps=1, lr=1e-3)
    tx = train_step.make_optimizer(c)
    state, p = tx.init(params), params
    for g in grads:
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    moments = [s for s in jax.tree.leaves(state) if getattr(s, "shape", ()) == (64,)]
    results[mu_dtype] = p, [m.dtype for m in moments]
  assert results[""][1] == [jnp.dtype(jnp.float32)] * 2
  assert results["bfloat16"][1] == [jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)]  # mu, nu
  moved = np.asarray(results[""][0]["w"] - params["w"])
  assert np.all(moved != 0)
  np.testing.assert_allclose(
    np.asarray(results["bfloat16"][0]["w"] - params["w"]),
    moved,
    rtol=2e-2,
    atol=1e-2 * np.abs(moved).max(),
  )  # mu's bf16 rounding, where steps nearly cancel


def test_platform_check(monkeypatch):
  monkeypatch.setattr(mesh_lib, "tcmalloc_loaded", lambda: True)
  line, warnings = mesh_lib.check_platform(_config(dtype="bfloat16", remat="full"))
  assert line.startswith("platform cpu: 8 x cpu") and f"jax {jax.__version__}" in line
  assert any("bfloat16 on CPU" in w for w in warnings) and any("remat" in w for w in warnings)
  assert mesh_lib.check_platform(_config()) == (line, [])
  monkeypatch.setattr(mesh_lib, "tcmalloc_loaded", lambda: False)
  (warning,) = mesh_lib.check_platform(_config())[1]
  assert "LD_PRELOAD" in warning and "libtcmalloc-minimal4" in warning
  with pytest.raises(UserError, match="Pallas TPU kernel.*attention=dot_product"):
    mesh_lib.check_platform(_config(attention="flash"))
  with pytest.raises(
    UserError,
    match="cuDNN's flash attention on NVIDIA GPUs, and this is cpu.*attention=dot_product",
  ):
    mesh_lib.check_platform(_config(attention="cudnn", dtype="bfloat16"))
  # the sample and ablation jobs (training=False): no train-step warnings (allocator, remat);
  # bfloat16 and flash still
  (warning,) = mesh_lib.check_platform(_config(dtype="bfloat16", remat="full"), training=False)[1]
  assert "bfloat16 on CPU" in warning
  assert mesh_lib.check_platform(_config(remat="full"), training=False) == (line, [])
  with pytest.raises(UserError, match="Pallas TPU kernel"):
    mesh_lib.check_platform(_config(attention="flash"), training=False)
  with pytest.raises(UserError, match="attention='splash'"):
    factory.make_model(_config(attention="splash"))
  with pytest.raises(UserError, match="remat='some'"):
    factory.make_model(_config(remat="some"))


@pytest.mark.skipif(
  not os.path.exists(mesh_lib.TCMALLOC),
  reason="libtcmalloc-minimal4 is not installed (make setup installs it)",
)
def test_tcmalloc_detected_in_a_fresh_process():
  """The allocator check reads what the dynamic loader really mapped: on with LD_PRELOAD, off
  without."""
  probe = [
    sys.executable,
    "-c",
    "from rdm_jax.parallel.mesh import tcmalloc_loaded; print(tcmalloc_loaded())",
  ]
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  without = subprocess.run(
    probe, env=env, capture_output=True, text=True, check=True
  ).stdout.split()[-1]
  with_ = subprocess.run(
    probe, env={**env, "LD_PRELOAD": mesh_lib.TCMALLOC}, capture_output=True, text=True, check=True
  ).stdout.split()[-1]
  assert (without, with_) == ("False", "True")
