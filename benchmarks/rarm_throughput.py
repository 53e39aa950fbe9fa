r"""RARM throughput: cached against uncached decoding, and the train step against PyTorch.

  python benchmarks/rarm_throughput.py [--case=small] [--batch=8] [--steps=3] [--skip_torch]

Cases (configs/imagenet_rarm.py's transformer, scaled to this machine unless --case=paper):
  small   256 tokens of 16384 codes, 4 heads x 64, depth 4, batch 8, context 4 x 512 (float32)
  paper   the original's: 12 x 64 heads, depth 18 (for accelerators)

Decoding: tokens/s of `rarm.sample` (KV cache, one lax.fori_loop) against the original's
algorithm (the whole prefix rerun for each token, as LatentImageRETRO.sample does), the latter
jitted on the padded full sequence so that one compiled program serves every step; the ratio
is the cache's speed-up. Training: tokens/s of the AdamW train step (loss, grads, update) against
the same transformer in PyTorch (diffusers' BasicTransformerBlock stacked as the original's
RetrievalPatchTransformer, AdamW) in the same run, and the ratio.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from rdm_jax import train_step  # noqa: E402
from rdm_jax.models import factory, rarm  # noqa: E402
from rdm_jax.parallel import mesh as mesh_lib, sharding  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, allocator, cpu, load_config  # noqa: E402

_CASE = flags.DEFINE_enum("case", "small", ["small", "paper"], "Model size.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per batch.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps (after a warm-up step).")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Do not time the PyTorch reference.")


def config_for(case: str, batch: int):
  c = load_config("imagenet_rarm")
  if case == "small":
    c.model.update(heads=4, dim_head=64, depth=4)
  c.model.dtype = "float32"
  c.train.batch_size = batch
  return c


def _timed(fn, *args):
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t


def decode_speed(model: rarm.RARM, params, batch: int) -> tuple[float, float]:
  """(tokens/s cached, tokens/s uncached) for one batch of full sequences."""
  ctx = jax.random.normal(jax.random.PRNGKey(1), (batch, 4, 512))
  keys = jax.random.split(jax.random.PRNGKey(2), batch)
  cached = jax.jit(lambda p, c, k: rarm.sample(model, p, c, k, top_k=100))
  _timed(cached, params, ctx, keys)  # compile
  t_cached = _timed(cached, params, ctx, keys)

  @jax.jit
  def uncached(p, c, k):  # the original's loop: every step reruns the whole (padded) prefix
    def body(t, tokens):
      logits = model.apply({"params": p}, tokens, c)[:, t]
      logits = rarm.filter_logits(logits, 100)
      tok = jax.vmap(jax.random.categorical)(
        jax.vmap(lambda kk: jax.random.fold_in(kk, t))(k), logits
      )
      return tokens.at[:, t].set(tok.astype(tokens.dtype))

    return jax.lax.fori_loop(0, model.seq_len, body, jnp.zeros((batch, model.seq_len), jnp.int32))

  _timed(uncached, params, ctx, keys)
  t_uncached = _timed(uncached, params, ctx, keys)
  n = batch * model.seq_len
  return n / t_cached, n / t_uncached


def train_speed(config, steps: int) -> tuple[float, int]:
  """(train tokens/s, parameter count) of the jitted AdamW step on one device."""
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = [tuple(r) for r in config.sharding_rules]
  model = factory.make_model(config)
  setup = train_step.setup_training(config, (model.seq_len,), mesh)
  state, step = setup.init_state(jax.random.PRNGKey(0)), setup.train_step
  b = config.train.batch_size
  rng = np.random.default_rng(0)
  z = rng.integers(0, model.num_codes, (b, model.seq_len)).astype(np.int32)
  ctx = rng.normal(size=(b, config.k_train, 512)).astype(np.float32)
  with jax.set_mesh(mesh):
    z, ctx = sharding.put_batch(mesh, rules, z, ctx)
    state, m = step(state, z, ctx, jax.random.PRNGKey(1))
    jax.block_until_ready(m["loss"])
    t = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, z, ctx, jax.random.PRNGKey(1))
    jax.block_until_ready(m["loss"])
  seconds = (time.perf_counter() - t) / steps
  return b * model.seq_len / seconds, sum(x.size for x in jax.tree.leaves(state.params))


def torch_train_speed(model: rarm.RARM, batch: int, steps: int) -> tuple[float, int]:
  """The same transformer in PyTorch (diffusers' blocks, as tests/models/test_rarm.py checks it),
  AdamW."""
  import torch

  sys.path.insert(0, os.path.join(REPO, "tests"))
  from torch_references import reference

  attention = reference("diffusers.models.attention")
  inner = model.heads * model.dim_head

  class Reference(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.tok = torch.nn.Embedding(model.num_codes + 2, inner)
      self.pos = torch.nn.Parameter(torch.randn(model.seq_len, inner) / inner**0.5)
      self.blocks = torch.nn.ModuleList(
        attention.BasicTransformerBlock(
          inner,
          model.heads,
          model.dim_head,
          cross_attention_dim=512,
          activation_fn="geglu",
          attention_bias=False,
        )
        for _ in range(model.depth)
      )
      self.out = torch.nn.Linear(inner, model.num_codes)

    def forward(self, z, ctx):
      inputs = torch.cat([torch.full_like(z[:, :1], model.sos_token), z[:, :-1]], 1)
      x = self.tok(inputs) + self.pos
      mask = torch.triu(torch.full((z.shape[1], z.shape[1]), float("-inf")), 1).expand(
        z.shape[0], -1, -1
      )
      for blk in self.blocks:
        x = blk(x, attention_mask=mask, encoder_hidden_states=ctx)
      return self.out(x)

  net = Reference()
  opt = torch.optim.AdamW(net.parameters(), lr=5e-4, betas=(0.9, 0.95))
  z = torch.randint(0, model.num_codes, (batch, model.seq_len))
  ctx = torch.randn(batch, 4, 512)

  def step():
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(
      net(z, ctx).reshape(-1, model.num_codes), z.reshape(-1)
    )
    loss.backward()
    opt.step()

  step()
  t = time.perf_counter()
  for _ in range(steps):
    step()
  seconds = (time.perf_counter() - t) / steps
  return batch * model.seq_len / seconds, sum(p.numel() for p in net.parameters())


def main(argv):
  del argv
  config = config_for(_CASE.value, _BATCH.value)
  model = factory.make_model(config)
  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs, "
    f"{cpu()}, {allocator()}; case {_CASE.value}: {model.heads} heads x {model.dim_head}, depth "
    f"{model.depth}, {model.seq_len} tokens of {model.num_codes} codes, batch {_BATCH.value}"
  )
  params = jax.jit(model.init)(
    jax.random.PRNGKey(0), jnp.zeros((1, model.seq_len), jnp.int32), jnp.zeros((1, 4, 512))
  )["params"]
  params = jax.tree.map(
    lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
  )
  cached, uncached = decode_speed(model, params, _BATCH.value)
  print(
    f"decode: cached {cached:,.0f} tokens/s, uncached (prefix rerun) {uncached:,.0f} tokens/s: "
    f"{cached / uncached:.1f}x"
  )
  ours, n_ours = train_speed(config, _STEPS.value)
  print(f"train: rdm_jax {ours:,.0f} tokens/s ({n_ours / 1e6:.1f}M parameters)")
  if not _SKIP_TORCH.value:
    theirs, n_theirs = torch_train_speed(model, _BATCH.value, _STEPS.value)
    print(
      f"train: PyTorch reference {theirs:,.0f} tokens/s ({n_theirs / 1e6:.1f}M parameters): "
      f"ratio {ours / theirs:.2f}x"
    )


if __name__ == "__main__":
  app.run(main)
