"""rdm_jax.compile: TPU slices by name, the analytic FLOP count, collectives in compiled HLO, and
the tool itself compiling a tiny config for a v5e-4 through libtpu's compile-only client."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from rdm_jax import aot, train_step
from rdm_jax.errors import UserError
from rdm_jax.parallel import flops, hlo, mesh as mesh_lib, topology
from rdm_jax.models import factory
from tests.conftest import REPO, repo_config, subprocess_env


def test_slices_by_their_booking_names():
  cases = {
    "v5e-64": ("v5e:8x8", 64),
    "v5e-256": ("v5e:16x16", 256),
    "v5e-8": ("v5e:2x4", 8),
    "v5litepod-16": ("v5e:4x4", 16),
    "v4-8": ("v4:2x2x1", 4),
    "v4-64": ("v4:2x4x4", 32),
    "v5p-128": ("v5:4x4x4", 64),
    "v5p-256": ("v5:4x4x8", 128),
    "v6e-128": ("v6e:8x16", 128),
  }
  for name, (topo, chips) in cases.items():  # as Cloud TPU's accelerator types and MaxText's table
    s = topology.parse(name)
    assert (s.topology_name, s.chips) == (topo, chips), name
  for bad, message in (
    ("v5e64", "accelerator type"),
    ("v7x-8", "unknown TPU generation"),
    ("v4-7", "TensorCores"),
    ("v5e-48", "powers of two"),
  ):
    with pytest.raises(UserError, match=message):
      topology.parse(bad)


def test_missing_libtpu_is_one_line_with_the_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
  with pytest.raises(UserError, match=r"needs libtpu: pip install -e '\.\[tpu\]'"):
    topology.devices(topology.parse("v5e-4"))


def test_flops_of_convs_and_matmuls_by_hand():
  x = jnp.zeros((2, 16, 16, 4))
  conv = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))
  p = conv.init(jax.random.PRNGKey(0), x)
  assert flops.forward_flops(lambda v: conv.apply(p, v), x) == 2 * (2 * 16 * 16 * 8) * (3 * 3 * 4)
  down = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  p = down.init(jax.random.PRNGKey(0), x)
  assert flops.forward_flops(lambda v: down.apply(p, v), x) == 2 * (2 * 8 * 8 * 8) * (3 * 3 * 4)
  grouped = nn.Conv(8, (3, 3), feature_group_count=4, padding=((1, 1), (1, 1)))
  p = grouped.init(jax.random.PRNGKey(0), x)
  assert flops.forward_flops(lambda v: grouped.apply(p, v), x) == 2 * (2 * 16 * 16 * 8) * (
    3 * 3 * 1
  )
  h = jnp.zeros((2, 5, 16))
  dense = nn.Dense(32)
  p = dense.init(jax.random.PRNGKey(0), h)
  assert flops.forward_flops(lambda v: dense.apply(p, v), h) == 2 * 2 * 5 * 16 * 32
  q, k = jnp.zeros((2, 64, 3, 8)), jnp.zeros((2, 4, 3, 8))
  assert (
    flops.forward_flops(lambda a, b: jnp.einsum("bqhd,bkhd->bhqk", a, b), q, k)
    == 2 * 2 * 3 * 64 * 4 * 8
  )
  # inside jit, remat and a scan of 5 steps
  body = jax.checkpoint(lambda c, _: (c @ jnp.ones((16, 16)), None))
  f = jax.jit(lambda c: jax.lax.scan(body, c, None, length=5)[0])
  assert flops.forward_flops(f, jnp.zeros((4, 16))) == 5 * 2 * 4 * 16 * 16


def _tiny_config():
  c = repo_config("fashion_mnist_rdm")
  c.model.update(
    model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,), patch_size=1
  )
  c.first_stage.pad_to = 16
  return c


def test_model_flops_are_the_compilers_matmul_share():
  """The UNet's analytic forward FLOPs against XLA's own count of the compiled forward (which adds
  the element-wise work: norms, activations, softmax)."""
  c = _tiny_config()
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  setup = train_step.setup_training(c, factory.latent_shape(c), mesh)
  ours = aot.model_flops_per_example(c, setup)
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), setup.abstract.params)
  xs = [jnp.zeros(x.shape, x.dtype) for x in setup.inputs]
  xla = (
    jax.jit(lambda p, *v: setup.model.apply({"params": p}, *v))
    .lower(params, *xs)
    .compile()
    .cost_analysis()
  )
  xla = (xla[0] if isinstance(xla, (list, tuple)) else xla)["flops"]
  assert 0.85 * xla < ours <= xla, (ours, xla)


def _cpu_step_collectives(axes):
  """The tiny config's train step (batch 16) compiled on the 8 CPU devices: (setup, its
  collectives)."""
  c = _tiny_config()
  mesh = mesh_lib.make_mesh(axes)
  setup = train_step.setup_training(c, factory.latent_shape(c), mesh)
  with jax.set_mesh(mesh):
    compiled = setup.train_step.lower(setup.state_specs(), *setup.batch_specs(c, 16)).compile()
  return setup, hlo.collectives(compiled.as_text())


def test_data_parallel_collectives_on_cpu():
  """Data parallel over the 8 CPU devices syncs gradients with all-reduce and gathers nothing
  (FSDP's all-gather / reduce-scatter on TPU: test_compile_tool_for_a_v5e_slice)."""
  setup, found = _cpu_step_collectives({"data": 8, "fsdp": 1, "tensor": 1})
  assert set(found) == {"all-reduce"}, found
  # every gradient crosses once at least: the all-reduced bytes cover the f32 parameters
  assert found["all-reduce"]["bytes"] >= 4 * sum(
    x.size for x in jax.tree.leaves(setup.abstract.params)
  )


def test_fsdp_gradients_are_reduce_scattered_on_cpu():
  """FSDP over 4 of the 8 CPU devices (data 2): a sharded parameter's gradient leaves the step as
  a reduce-scatter into its shards and an all-reduce of the shard over the data axis; only the
  replicated parameters (norms, biases, dimensions fsdp does not divide) are all-reduced whole.
  Left to GSPMD, this step all-reduced every gradient whole (7.1 MB a step against 5.9 MB of
  parameters)."""
  setup, found = _cpu_step_collectives({"data": 2, "fsdp": 4, "tensor": 1})
  shardings = jax.tree.leaves(
    setup.state_sh.params, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding)
  )
  sizes = [4 * x.size for x in jax.tree.leaves(setup.abstract.params)]
  sharded = sum(n for n, s in zip(sizes, shardings) if "fsdp" in jax.tree.leaves(tuple(s.spec)))
  replicated = sum(sizes) - sharded
  assert sharded > 0.9 * sum(sizes)
  assert found["reduce-scatter"]["bytes"] == sharded // 4  # the result: each chip's shard
  # all-reduced: the shards over data, at most the replicated parameters whole and the scalars
  # (the loss, the gradient norm's partial sums); no sharded gradient whole
  assert sharded // 4 <= found["all-reduce"]["bytes"] <= sharded // 4 + replicated + 1024, (
    found,
    sharded,
    replicated,
  )
  # each sharded parameter gathered once forward; its transpose is the reduce-scatter backward
  assert found["all-gather"]["count"] == found["reduce-scatter"]["count"]


def test_collectives_parser_on_hlo_lines():
  text = "\n".join(
    [
      # the computation an all-reduce-scatter fusion calls: its all-reduce
      # is the fusion's, counted there
      "%all-reduce-scatter.1 (input_0: f32[64,64]) -> f32[16,64] {",
      "  %input_0 = f32[64,64]{1,0} parameter(0)",
      "  %all-reduce.3 = f32[64,64]{1,0} all-reduce(f32[64,64]{1,0} %input_0), replica_groups={}",
      "  ROOT %ds = f32[16,64]{1,0} dynamic-slice(%all-reduce.3, %i, %j), "
      "dynamic_slice_sizes={16,64}",
      "}",
      "",
      "ENTRY %main (p: f32[128,4]) -> f32[128,4] {",
      "  %all-reduce.1 = f32[128,4]{1,0} all-reduce(f32[128,4]{1,0} %p), replica_groups={}",
      "  %ag = (bf16[16]{0}, bf16[64]{0}) all-gather-start(bf16[16]{0} %x), dimensions={0}",
      "  %ag.done = bf16[64]{0} all-gather-done((bf16[16]{0}, bf16[64]{0}) %ag)",
      "  %rs = (f32[8]{0}, s32[2]{0}) reduce-scatter(f32[32]{0} %a, s32[8]{0} %b), dimensions={0}",
      "  %add = f32[4]{0} add(f32[4]{0} %a, f32[4]{0} %b)",
      "  %fusion.9 = (f32[16,64]{1,0:T(8,128)S(1)}, f32[8]{0}) fusion(%all-reduce.3), "
      "kind=kOutput, calls=%all-reduce-scatter.1",
    ]
  )
  assert hlo.collectives(text) == {
    "all-gather": {"count": 1, "bytes": 128},
    "all-reduce": {"count": 1, "bytes": 2048},
    "reduce-scatter": {"count": 2, "bytes": 40 + 16 * 64 * 4 + 32},
  }


TINY = [
  "--config=configs/fashion_mnist_rdm.py",
  "--topology=v5e-4",
  "--config.model.model_channels=32",
  "--config.model.channel_mult=(1,)",
  "--config.model.attention_resolutions=(1,)",
  "--config.model.num_res_blocks=1",
  "--config.model.patch_size=1",
  "--config.first_stage.pad_to=16",
  "--steps=train",
]


def _compile(tmp_path, *extra):
  pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]')")
  out = tmp_path / "report.json"
  proc = subprocess.run(
    [sys.executable, "-m", "rdm_jax.compile", *TINY, f"--out={out}", *extra],
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_compile_tool_for_a_v5e_slice(tmp_path):
  proc, r = _compile(
    tmp_path, "--batch=32", "--config.mesh.fsdp=2", f"--hlo={tmp_path / 'train.hlo'}"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (r["topology"], r["libtpu_topology"], r["chips"], r["device_kind"]) == (
    "v5e-4",
    "v5e:2x2",
    4,
    "TPU v5 lite",
  )
  assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and r["latent_shape"] == [16, 16, 1]
  t = r["train"]
  m = t["memory"]
  assert t["fits"] and m["fits"] and m["hbm_bytes"] == 16 * 2**30
  assert (
    m["total_bytes"] == m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
  )
  # the donated state: every output but the metrics aliases an argument
  # the donated state (params, EMA, two Adam moments: f32, half of each
  # on a chip) aliases the outputs
  assert (
    0 < m["alias_bytes"] <= m["output_bytes"]
    and m["argument_bytes"] >= 4 * 4 * r["params"] / 2 * 0.9
  )
  assert t["model_flops_per_chip"] == pytest.approx(
    3 * r["model_flops_per_example_forward"] * 32 / 4
  )
  assert 0.5 < t["compiler_flops_per_chip"] / t["model_flops_per_chip"] < 2.0
  # FSDP: weights all-gathered, gradients reduce-scattered; the data axis all-reduces
  assert {"all-gather", "reduce-scatter", "all-reduce"} <= set(t["collectives"]), t["collectives"]
  assert hlo.collectives((tmp_path / "train.hlo").read_text()) == t["collectives"]
  assert r["levers"]["remat"] == "none" and r["levers"]["attention"] == "xla"
  assert "train step (batch 32):" in proc.stdout and "of 16 GiB per chip" in proc.stdout


@pytest.mark.slow  # CI's budget: test_compile_tool_for_a_v5e_slice keeps the TPU compile
def test_fsdp_over_a_square_slice_gathers_in_two_stages():
  """On a v5e-16 (4 x 4 chips) TPU's compiler lowers a reduce-scatter over all 16 chips as a
  full-size all-reduce and a slice: the tiny UNet's gathers in one stage (compiled alone, one
  parameter of each shape) all-reduce every sharded bf16 gradient whole. The step picks the
  split whose compiled gathers all-reduce least (parallel.fsdp.choose_outer) and gathers in two
  stages: its compiled train step reduce-scatters gradients and all-reduces at most half the
  sharded bytes (the one-stage step: all of them; benchmarks/RESULTS.md, "FSDP over a square
  TPU slice")."""
  pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]')")
  from rdm_jax.parallel import fsdp

  c = _tiny_config()
  c.model.dtype = "bfloat16"
  c.mesh.update(data=1, fsdp=-1)
  mesh = mesh_lib.from_config(c, topology.devices(topology.parse("v5e-16")))
  setup = train_step.setup_training(c, factory.latent_shape(c), mesh)
  layout = setup.layout
  assert layout is not None and layout.fsdp_outer in (2, 4, 8), layout
  params = jax.tree.leaves(setup.abstract.params)
  shardings = jax.tree.leaves(
    layout.param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding)
  )
  is_sharded = ["fsdp" in jax.tree.leaves(tuple(s.spec)) for s in shardings]
  distinct = {
    (x.shape, str(s.spec)): 2 * x.size for x, s, sh in zip(params, shardings, is_sharded) if sh
  }
  one = fsdp.all_reduce_bytes(
    mesh,
    layout.batch_axes,
    layout.param_shardings,
    setup.abstract.params,
    layout.cast,
    layout.dtype,
  )
  assert one >= sum(distinct.values()), (one, sum(distinct.values()))
  with jax.set_mesh(mesh):
    compiled = setup.train_step.lower(setup.state_specs(), *setup.batch_specs(c, 32)).compile()
  found = hlo.collectives(compiled.as_text())
  sharded = sum(2 * x.size for x, sh in zip(params, is_sharded) if sh)
  replicated = sum(4 * x.size for x, sh in zip(params, is_sharded) if not sh)
  # reduce-scattered now; all-reduced: at most half the sharded bytes (the split's other stage)
  # and the replicated parameters (norms, biases) in float32
  assert (
    found["reduce-scatter"]["bytes"] > 0
    and found["all-reduce"]["bytes"] <= sharded // 2 + replicated
  ), (found, sharded, replicated)


def test_compile_tool_reports_out_of_memory_in_one_line(tmp_path):
  proc, r = _compile(tmp_path, "--batch=1048576")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [ln for ln in proc.stdout.splitlines() if "does not fit" in ln]
  assert len(lines) == 1 and "RESOURCE_EXHAUSTED" in lines[0] and "HBM" in lines[0], proc.stdout
  assert r["train"]["fits"] is False and r["train"]["error"] in lines[0]
