r"""Train-step throughput of rdm_jax against the same UNet in PyTorch, and input-pipeline headroom.

  python benchmarks/train_throughput.py [--steps=5] [--skip_torch] [--only=demo,imagenet_small]
                                       [--conv=auto,xla]

Cases:
  demo            configs/fashion_mnist_rdm.py as is (1x32x32 pixels, batch 32, context 4x1280)
  imagenet_small  configs/imagenet_rdm.py scaled down: channels (64,128,192,320), 2 res blocks,
                  attention at 2/4/8, 3x32x32 latents, batch 16, context 4x512 (float32)

For each: JAX steps/s and examples/s of the full AdamW train step (loss, grads, update, EMA)
for each convolution implementation in --conv (config.model.conv: auto = oneDNN custom calls
on a single CPU device when `make onednn` has built them, xla = XLA's own), the same UNet as
diffusers' UNet2DConditionModel (torch, CPU) timed in the same run with AdamW, and the ratio.
The input pipeline (tf.data over the demo's real stores, when `make demo` has made them) is
timed on its own and compared with what the train step consumes.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from rdm_jax import training  # noqa: E402
from rdm_jax.parallel import mesh as mesh_lib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import diffusers_unet, load_config, patch_grid  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per case (after one warm-up step).")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Do not time the PyTorch reference.")
_ONLY = flags.DEFINE_list("only", ["demo", "imagenet_small"], "Cases to run.")
_CONV = flags.DEFINE_list("conv", ["auto", "xla"], "config.model.conv values to time (xla | onednn | auto).")

def cases():
  demo = load_config("fashion_mnist_rdm")
  small = load_config("imagenet_rdm")
  small.model.channel_mult = (1, 2, 3, 5)
  small.model.model_channels = 64
  small.model.dtype = "float32"
  small.train.batch_size = 16
  return {"demo": (demo, (32, 32, 1)), "imagenet_small": (small, (32, 32, 3))}


def time_jax(config, latent_shape, steps: int) -> tuple[float, int, str]:
  """Seconds per train step, parameter count, the convolution the model ran ("xla" | "onednn")."""
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  rules = [tuple(r) for r in config.sharding_rules]
  setup = training.setup_training(config, latent_shape, mesh)
  state, step = setup.init_state(jax.random.PRNGKey(0)), setup.train_step
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  b = config.train.batch_size
  rng = np.random.default_rng(0)
  z0 = rng.normal(size=(b,) + latent_shape).astype(np.float32)
  ctx = rng.normal(size=(b, config.k_train, config.retrieval.embed_dim)).astype(np.float32)
  z0, ctx = training.put_batch(mesh, rules, z0, ctx)
  key = jax.random.PRNGKey(1)
  with jax.set_mesh(mesh):
    state, m = step(state, z0, ctx, key)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, z0, ctx, key)
    jax.block_until_ready(m)
  return (time.perf_counter() - t) / steps, n_params, setup.model.conv


def time_torch(config, latent_shape, steps: int) -> tuple[float, int]:
  """The same UNet as diffusers' UNet2DConditionModel, AdamW step, CPU threads as available."""
  import torch

  latent_shape = patch_grid(config, latent_shape)  # our patching is a reshape: diffusers' UNet on the grid
  model = diffusers_unet(config, latent_shape)
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  b = config.train.batch_size
  x = torch.randn((b, latent_shape[2]) + tuple(latent_shape[:2]))
  ctx = torch.randn(b, config.k_train, config.retrieval.embed_dim)
  t_ = torch.randint(0, 1000, (b,))
  noise = torch.randn_like(x)

  def one():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x, t_, encoder_hidden_states=ctx).sample, noise)
    loss.backward()
    opt.step()

  one()
  t = time.perf_counter()
  for _ in range(steps):
    one()
  return (time.perf_counter() - t) / steps, n_params


def time_pipeline(config, batches: int = 30) -> float | None:
  """Examples/s of the tf.data input pipeline over the demo's stores (None if not made yet)."""
  from rdm_jax.data import pipeline
  from rdm_jax.errors import UserError
  try:
    data = pipeline.load_retrieval_data(config, "train")
  except UserError as e:
    print(f"  input pipeline: skipped ({e})")
    return None
  it = pipeline.train_iterator(data, config, start_step=0)
  next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * config.train.batch_size / (time.perf_counter() - t)


def main(argv):
  del argv
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPUs")
  for name, (config, latent_shape) in cases().items():
    if name not in _ONLY.value:
      continue
    b = config.train.batch_size
    secs = {}
    for conv in _CONV.value:
      config.model.conv = conv
      sec, n, impl = time_jax(config, latent_shape, _STEPS.value)
      secs[conv] = sec
      print(f"[{name}] rdm_jax (conv={conv}: {impl}): {n / 1e6:.2f}M params, batch {b}: {sec:.3f} s/step, "
            f"{1 / sec:.2f} steps/s, {b / sec:.1f} examples/s")
    if not _SKIP_TORCH.value:
      tsec, tn = time_torch(config, latent_shape, _STEPS.value)
      ratios = ", ".join(f"conv={conv} x{tsec / sec:.2f}" for conv, sec in secs.items())
      print(f"[{name}] torch+diffusers: {tn / 1e6:.2f}M params: {tsec:.3f} s/step -> rdm_jax speed-up {ratios}")
    if name == "demo":
      sec = min(secs.values())
      eps = time_pipeline(config)
      if eps is not None:
        print(f"[{name}] input pipeline: {eps:.0f} examples/s vs train step consumption {b / sec:.1f} "
              f"examples/s -> headroom x{eps / (b / sec):.0f}")


if __name__ == "__main__":
  app.run(main)
