"""The oneDNN convolution custom calls (rdm_jax/ops, `make onednn`) against XLA's own
convolution: forward, input and kernel gradients, the UNet with either, and where the
wrapper must fall back to XLA."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdm_jax import train_step
from rdm_jax.errors import UserError
from rdm_jax.models.unet import UNet
from rdm_jax.ops import onednn
from rdm_jax.parallel import mesh as mesh_lib, sharding
from rdm_jax.models import factory
from tests.conftest import REPO, repo_config, subprocess_env

pytestmark = pytest.mark.skipif(
  not onednn.available(), reason="oneDNN convolutions not built: run `make onednn`"
)

_NHWC = ("NHWC", "HWIO", "NHWC")


def _xla(x, w, strides, padding):
  return jax.lax.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=_NHWC, precision=jax.lax.Precision.HIGHEST
  )


def _close(a, b, tol=2e-5):
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, float(np.abs(b).max())))


# batch, height, width, in, out, kernel, strides, padding. Odd batches split unevenly over the
# thread pool; stride 2 is the UNet's downsample; 1x1 its skip and proj convs.
GEOMETRIES = [
  (4, 16, 16, 32, 32, 3, (1, 1), ((1, 1), (1, 1))),
  (5, 9, 7, 3, 8, 3, (2, 2), ((1, 1), (1, 1))),
  (3, 8, 8, 16, 4, 1, (1, 1), ((0, 0), (0, 0))),
  (1, 6, 10, 4, 6, 3, (1, 2), ((0, 1), (2, 0))),
  (7, 5, 5, 2, 3, 5, (1, 1), ((2, 2), (2, 2))),
]


@pytest.mark.parametrize("n,h,w,cin,cout,k,strides,padding", GEOMETRIES)
def test_forward_and_gradients_match_xla(n, h, w, cin, cout, k, strides, padding):
  keys = jax.random.split(jax.random.PRNGKey(n * 100 + h), 3)
  x = jax.random.normal(keys[0], (n, h, w, cin))
  kernel = jax.random.normal(keys[1], (k, k, cin, cout)) / np.sqrt(k * k * cin)
  y, vjp = jax.vjp(
    lambda a, b: jax.jit(onednn.conv2d, static_argnums=(2, 3))(a, b, strides, padding), x, kernel
  )
  y_ref, vjp_ref = jax.vjp(lambda a, b: _xla(a, b, strides, padding), x, kernel)
  _close(y, y_ref)
  dy = jax.random.normal(keys[2], y_ref.shape)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    _close(got, want)


def test_hand_worked_case():
  """A 3x3 box filter over a 3x3 ramp, zero padding 1: each output is the sum of the in-range
  neighbours; the kernel gradient under dy = 1 is the sum of x over each offset's window."""
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  box = jnp.ones((3, 3, 1, 1))
  y = onednn.conv2d(x, box, (1, 1), ((1, 1), (1, 1)))
  want = np.array([[8, 15, 12], [21, 36, 27], [20, 33, 24]], np.float32)
  np.testing.assert_array_equal(np.asarray(y)[0, :, :, 0], want)
  dw = jax.grad(lambda b: onednn.conv2d(x, b, (1, 1), ((1, 1), (1, 1))).sum())(box)
  # kernel tap (0, 0) meets x at offset (-1, -1): x[0:2, 0:2] = 0+1+3+4 = 8; the centre tap all
  # of x = 36; the same window sums as y's
  np.testing.assert_array_equal(np.asarray(dw)[:, :, 0, 0], want)


def test_wrapper_falls_back_where_onednn_does_not_apply():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 4))
  pad = ((1, 1), (1, 1))
  cases = {
    "plain": (dict(), True),
    "bfloat16": (dict(lhs=x.astype(jnp.bfloat16), rhs=w.astype(jnp.bfloat16)), False),
    "dilated kernel": (dict(rhs_dilation=(2, 2)), False),
    "grouped": (dict(rhs=w[:, :, :2], feature_group_count=2), False),
    "NCHW": (dict(lhs=x.transpose(0, 3, 1, 2), dimension_numbers=("NCHW", "HWIO", "NCHW")), False),
  }
  for name, (over, custom) in cases.items():
    args = dict(lhs=x, rhs=w, window_strides=(1, 1), padding=pad, dimension_numbers=_NHWC) | over
    static = {k: v for k, v in args.items() if k not in ("lhs", "rhs")}
    hlo = (
      jax.jit(lambda a, b: onednn.conv_general_dilated(a, b, **static))
      .lower(args["lhs"], args["rhs"])
      .as_text()
    )
    assert ("rdm_onednn_conv_fwd" in hlo) == custom, name
    got = onednn.conv_general_dilated(**args)
    want = jax.lax.conv_general_dilated(**args, precision=jax.lax.Precision.HIGHEST)
    _close(
      got.astype(jnp.float32),
      want.astype(jnp.float32),
      tol=2e-5 if custom or name != "bfloat16" else 1e-2,
    )


def test_unet_with_onednn_convolutions_matches_xla():
  """Same parameters, same outputs and gradients (patching, downsample, upsample, skips), with
  every convolution on oneDNN and with a mixed UNet (conv="auto"'s per-shape choice) that runs
  only its input convolution there."""
  kw = dict(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    patch_size=2,
  )
  # conv_in sees 2x2 patches of 16x16x1: 8x8x4 -> 32 channels
  ref, fast, mixed = (
    UNet(**kw),
    UNet(**kw, conv="onednn"),
    UNet(**kw, conv=frozenset({(8, 8, 4, 3, 3, 32, (1, 1), ((1, 1), (1, 1)))})),
  )
  keys = jax.random.split(jax.random.PRNGKey(2), 4)
  x = jax.random.normal(keys[0], (3, 16, 16, 1))
  t = jax.random.randint(keys[1], (3,), 0, 1000)
  ctx = jax.random.normal(keys[2], (3, 4, 16))
  params = ref.init(keys[3], x, t, ctx)["params"]
  # randomise the zero-initialised output convs, which would hide most of the network
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(keys[3], p.shape), params)
  assert jax.tree.structure(fast.init(keys[3], x, t, ctx)["params"]) == jax.tree.structure(params)
  loss = lambda m: jax.jit(
    jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, x, t, ctx) ** 2))
  )
  hlo = lambda m: jax.jit(lambda p: m.apply({"params": p}, x, t, ctx)).lower(params).as_text()
  assert hlo(fast).count("rdm_onednn_conv_fwd") > 10
  assert hlo(mixed).count("rdm_onednn_conv_fwd") == 1 and "convolution(" in hlo(mixed)
  want, g_want = loss(ref)(params)
  for m in (fast, mixed):
    got, g_got = loss(m)(params)
    _close(got, want, tol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
      _close(a, b, tol=1e-4)


def test_config_choice():
  assert jax.device_count() == 8  # the test session's host devices: "auto" keeps XLA's convolution
  assert onednn.resolve("auto") == "xla"
  # "auto" follows the devices the model runs on: one CPU device, or a mesh, or a TPU slice that
  # rdm_jax.compile builds for from this CPU host
  assert onednn.resolve("auto", jax.devices()[:1]) == "onednn"
  assert onednn.resolve("auto", jax.devices()[:2]) == "xla"
  tpu = type("FakeTpu", (), {"platform": "tpu"})()
  assert onednn.resolve("auto", [tpu]) == "xla"
  assert onednn.resolve("onednn") == "onednn" and onednn.resolve("xla") == "xla"
  with pytest.raises(ValueError, match="xla, onednn, auto"):
    onednn.resolve("cudnn")
  c = repo_config("fashion_mnist_rdm")
  assert c.model.conv == "auto" and factory.make_model(c).conv == "xla"
  c.model.conv = "onednn"
  assert factory.make_model(c).conv == "onednn"
  c.model.conv = "mkl"
  with pytest.raises(UserError, match="config.model.conv='mkl'"):
    factory.make_model(c)


def test_missing_library_is_explained(tmp_path):
  why = onednn.problem(str(tmp_path / "_onednn_conv.so"))
  assert "make onednn" in why and "libdnnl-dev" in why
  bad = tmp_path / "bad.so"
  bad.write_bytes(b"not a shared library")
  assert "make onednn" in onednn.problem(str(bad))


@pytest.mark.slow  # CI's budget: "auto" keeps XLA's convolutions on a mesh
def test_train_steps_on_a_sharded_mesh_match_xla():
  """conv="onednn" on a (data=4, fsdp=2) mesh: XLA's partitioner runs the opaque custom calls
  replicated, slower than XLA's own convolution there but the same training (which is why
  "auto" keeps XLA's on a mesh)."""
  metrics = {}
  for conv in ("xla", "onednn"):
    c = repo_config("fashion_mnist_rdm")
    c.model.update(
      model_channels=32,
      channel_mult=(1, 2),
      num_res_blocks=1,
      attention_resolutions=(2,),
      patch_size=2,
      conv=conv,
    )
    c.retrieval.embed_dim = 16
    c.train.batch_size = 8
    c.mesh.update(data=4, fsdp=2)
    mesh = mesh_lib.from_config(c)
    rules = [tuple(r) for r in c.sharding_rules]
    setup = train_step.setup_training(c, (32, 32, 1), mesh)
    state = setup.init_state(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    z0, ctx = sharding.put_batch(
      mesh,
      rules,
      rng.normal(size=(8, 32, 32, 1)).astype(np.float32),
      rng.normal(size=(8, 4, 16)).astype(np.float32),
    )
    with jax.set_mesh(mesh):
      for _ in range(3):
        state, m = setup.train_step(state, z0, ctx, jax.random.PRNGKey(1))
    metrics[conv] = (float(m["loss"]), float(m["grad_norm"]), state.params)
  (loss_x, norm_x, params_x), (loss_o, norm_o, params_o) = metrics["xla"], metrics["onednn"]
  np.testing.assert_allclose([loss_o, norm_o], [loss_x, norm_x], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_o), jax.tree.leaves(params_x)):
    _close(a, b, tol=1e-5)


CAPPED = "forward_and_gradients_match_xla or hand_worked_case"


@pytest.mark.parametrize("isa", ["AVX2"])
def test_the_kernels_match_xla_under_an_isa_cap(isa):
  """The kernel tests above again in a process whose oneDNN and XLA are capped to `isa`
  (ONEDNN_MAX_CPU_ISA, --xla_cpu_max_isa): the kernels an AVX2-only CPU runs, on any x86 CPU.
  oneDNN's verbose log shows which kernels ran: none of a wider ISA."""
  env = subprocess_env()
  env.update(
    ONEDNN_MAX_CPU_ISA=isa,
    DNNL_MAX_CPU_ISA=isa,
    ONEDNN_VERBOSE="1",
    XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_cpu_max_isa={isa}".strip(),
  )
  proc = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__, "-k", CAPPED],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0 and " passed" in proc.stdout, (
    proc.stdout[-3000:],
    proc.stderr[-3000:],
  )
  assert re.search(r"\b(\d+) passed", proc.stdout).group(1) == str(len(GEOMETRIES) + 1), (
    proc.stdout[-500:]
  )
  runs = [
    ln for ln in proc.stdout.splitlines() if ln.startswith("onednn_verbose") and ",exec," in ln
  ]
  assert runs and "isa:Intel AVX2" in proc.stdout, proc.stdout[:2000]
  wider = [ln for ln in runs if "avx512" in ln.lower() or "amx" in ln.lower()]
  assert not wider, wider[:3]
