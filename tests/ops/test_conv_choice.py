"""config.model.conv="auto": the model's convolutions read from its jaxpr, the faster path by
measurement, remembered per machine and geometry (rdm_jax.ops.conv_choice). A mixed UNet against
XLA's: tests/test_onednn_conv.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import repo_config
from rdm_jax import train_step
from rdm_jax.ops import conv_choice, onednn
from rdm_jax.parallel import mesh as mesh_lib

NHWC = ("NHWC", "HWIO", "NHWC")


def _net(x, w3, w1, wg, x16, w16):
  """Two convolutions oneDNN would take (one under remat, one in a nested jit, the first run
  twice) and two it would not (grouped, bfloat16)."""
  conv = lambda x, w, s, p, **kw: jax.lax.conv_general_dilated(
    x, w, s, p, dimension_numbers=NHWC, **kw
  )
  h = jax.checkpoint(lambda x: conv(x, w3, (2, 2), ((1, 1), (1, 1))))(x)
  h = h + jax.checkpoint(lambda x: conv(x, w3, (2, 2), ((1, 1), (1, 1))))(x)
  h = jax.jit(lambda h: conv(h, w1, (1, 1), ((0, 0), (0, 0))))(h)
  g = conv(x, wg, (1, 1), "SAME", feature_group_count=2)
  b = conv(x16, w16, (1, 1), "SAME")
  return h.sum() + g.sum() + b.astype(jnp.float32).sum()


def _args():
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  return (
    f(2, 8, 8, 4),
    f(3, 3, 4, 6),
    f(1, 1, 6, 5),
    f(3, 3, 2, 4),
    jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.bfloat16),
    jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.bfloat16),
  )


def test_geometries_are_the_float32_nhwc_convolutions_with_their_counts():
  got = conv_choice.geometries(_net, *_args())
  G = conv_choice.Geometry
  assert got == {
    G((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))): 2,
    G((2, 4, 4, 6), (1, 1, 6, 5), (1, 1), ((0, 0), (0, 0))): 1,
  }


def test_each_convolution_runs_on_its_faster_path_and_the_choice_is_remembered(
  tmp_path, monkeypatch
):
  geoms = conv_choice.geometries(_net, *_args())
  big, small = sorted(geoms, key=lambda g: g.rhs[0])[::-1]  # the 3x3 conv (run twice) and the 1x1
  calls = []
  timings = {(big, "xla"): 3.0, (big, "onednn"): 1.0, (small, "xla"): 0.5, (small, "onednn"): 2.0}

  def timer(g, impl):
    calls.append((g, impl))
    return timings[g, impl]

  path = str(tmp_path / "cache" / "conv_choice.json")
  first = conv_choice.choose(geoms, timer, path)
  assert first["choice"] == "mixed" and not first["cached"] and len(calls) == 4
  # one pass over the model: the 3x3 twice, the 1x1 once, on each path and on the faster of each
  assert first["seconds"] == {"xla": 2 * 3.0 + 0.5, "onednn": 2 * 1.0 + 2.0, "mixed": 2 * 1.0 + 0.5}
  assert conv_choice.as_impl(first) == frozenset({(8, 8, 4, 3, 3, 6, (2, 2), ((1, 1), (1, 1)))})
  timings[small, "onednn"] = (
    0.1  # a second run on this machine reads the choice, it does not time again
  )
  again = conv_choice.choose(geoms, timer, path)
  assert (
    again["cached"] and conv_choice.as_impl(again) == conv_choice.as_impl(first) and len(calls) == 4
  )
  # the same CPU capped to AVX2 is another machine: measured again (now oneDNN wins both)
  monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
  capped = conv_choice.choose(geoms, timer, path)
  assert (
    capped["choice"] == "onednn" and conv_choice.as_impl(capped) == "onednn" and len(calls) == 8
  )
  assert capped["machine"]["caps"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
  # another geometry is another entry
  timings.update({(g, "xla"): 0.1 for g in geoms})
  other = {conv_choice.Geometry((4,) + big.lhs[1:], big.rhs, big.strides, big.padding): 1}
  timings.update({(g, i): t for g in other for i, t in (("xla", 0.1), ("onednn", 0.2))})
  assert conv_choice.as_impl(conv_choice.choose(other, timer, path)) == "xla"
  assert len(json.loads(open(path).read())) == 3


def test_a_file_that_is_not_a_cache_is_measured_around_and_left_as_it_is(tmp_path, caplog):
  path = tmp_path / "conv_choice.json"
  path.write_text("{not json")
  geoms = conv_choice.geometries(_net, *_args())
  r = conv_choice.choose(geoms, lambda g, impl: {"xla": 1.0, "onednn": 2.0}[impl], str(path))
  assert r["choice"] == "xla" and not r["cached"] and "not a readable cache" in caplog.text
  assert path.read_text() == "{not json"
  # a JSON object with a malformed entry under this key: the entry is not
  # trusted, the others are kept
  path.write_text(
    json.dumps({conv_choice.key(geoms): {"choice": "rm -rf /", "onednn": []}, "other": [1]})
  )
  assert (
    conv_choice.choose(geoms, lambda g, impl: {"xla": 2.0, "onednn": 1.0}[impl], str(path))[
      "choice"
    ]
    == "onednn"
  )
  data = json.loads(path.read_text())
  assert data["other"] == [1] and data[conv_choice.key(geoms)]["choice"] == "onednn"


@pytest.mark.skipif(not onednn.available(), reason="oneDNN convolutions not built (make onednn)")
def test_measure_times_a_real_convolution_forward_and_backward_on_each_path():
  g = conv_choice.Geometry((2, 8, 8, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)))
  for impl in ("xla", "onednn"):
    assert 0 < conv_choice.measure(g, impl, repeats=1) < 5
  # the step it times gives the same forward and gradients on both paths
  x, w, dy = (
    jnp.asarray(np.random.default_rng(i).standard_normal(s, np.float32))
    for i, s in enumerate([(2, 8, 8, 4), (3, 3, 4, 6), (2, 8, 8, 6)])
  )
  for a, b in zip(
    conv_choice._conv_step("xla", g)(x, w, dy), conv_choice._conv_step("onednn", g)(x, w, dy)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not onednn.available(), reason="oneDNN convolutions not built (make onednn)")
def test_auto_in_the_train_setup_follows_the_measurement(tmp_path, monkeypatch):
  c = repo_config("fashion_mnist_rdm")
  c.model.update(model_channels=32, channel_mult=(1,), attention_resolutions=(), num_res_blocks=1)
  c.train.batch_size = 4
  one = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  seen = []
  first = conv_choice.Geometry(
    (4, 16, 16, 4), (3, 3, 4, 32), (1, 1), ((1, 1), (1, 1))
  )  # 2x2 patches of 32x32x1
  for faster in ("onednn", "xla", "mixed"):
    pick = lambda g, f=faster: f if f != "mixed" else ("onednn" if g == first else "xla")
    monkeypatch.setattr(
      conv_choice, "measure", lambda g, impl: seen.append(g) or (1.0 if impl == pick(g) else 2.0)
    )
    monkeypatch.setenv("RDM_JAX_CACHE", str(tmp_path / faster))
    want = (
      frozenset({(16, 16, 4, 3, 3, 32, (1, 1), ((1, 1), (1, 1)))}) if faster == "mixed" else faster
    )
    assert train_step.setup_training(c, (32, 32, 1), one).model.conv == want
  # the measured set is the model's own, at the train batch: its input conv among them
  assert first in seen
  # several devices: XLA without measuring (the custom calls are opaque to the partitioner)
  eight = mesh_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  n = len(seen)
  assert train_step.setup_training(c, (32, 32, 1), eight).model.conv == "xla" and len(seen) == n
