r"""Train-step throughput of rdm_jax against the same UNet in PyTorch, and input-pipeline headroom.

  python benchmarks/train_throughput.py [--steps=5] [--rounds=5] [--skip_torch]
                                       [--only=demo,imagenet_small] [--conv=auto,xla]
                                       [--attention=xla,cudnn] [--batch=N]

Cases:
  demo            configs/fashion_mnist_rdm.py as is (1x32x32 pixels, batch 16, context 4x1008:
  block-10 retrieval features) imagenet_small  configs/imagenet_rdm.py scaled down: channels
  (64,128,192,320), 2 res blocks,
                  attention at 2/4/8, 3x32x32 latents, batch 16, context 4x512 (float32)
  imagenet        configs/imagenet_rdm.py as is (400.9M parameters, bfloat16 compute, 3x64x64
                  latents), batch --batch (default 64) on this process's devices: for a GPU;
                  not in the default --only

On a GPU the PyTorch reference runs there too (bfloat16 autocast where the config computes in
bfloat16, cuDNN autotuning on), and each variant's model FLOP utilisation is printed against the
chip's dense bf16 peak (rdm_jax.parallel.flops' count: 3 forward passes per train step).
Every rdm_jax variant starts from the same state, batch and key, so their first steps' loss and
gradient norm agree up to the compute dtype's rounding; the run prints how far they differ.

Timed for each case, in the same process:
  rdm_jax, conv=C   our full train step (train_step.setup_training) for each C in --conv
                    (config.model.conv: auto = oneDNN custom calls on a single CPU device when
                    `make onednn` has built them, xla = XLA's own convolution)
  torch, same step  the same UNet as diffusers' UNet2DConditionModel doing the work our step does:
                    t and noise drawn in the step, context dropout (train.p_uncond), the config's
                    target and loss weighting, the global gradient norm (clipped at
                    optim.grad_clip when > 0), the finite check, AdamW with the config's
                    hyper-parameters, and the EMA update as LDM's LitEma does it
                    (latent-diffusion ldm/modules/ema.py, forward, lines 31-48)
  torch, AdamW only the reference of earlier runs: fixed t and noise, plain MSE, AdamW, no
                    clipping, no EMA (less work than our step)
Run it on tcmalloc, as `make demo` and `make test` run everything (the header line names the
allocator; with glibc's malloc XLA:CPU spends a quarter of the step's CPU time in page faults):
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
      .venv/bin/python benchmarks/train_throughput.py
The variants run interleaved: --rounds rounds of --steps steps each, so that a slow spell of the
machine hits them all; each figure is the median round's seconds per step, with the range.
The input pipeline (tf.data over the demo's real stores, when `make demo` has made them) is
timed on its own and compared with what the train step consumes.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from rdm_jax import aot, train_step  # noqa: E402
from rdm_jax.parallel import flops as flops_lib, mesh as mesh_lib, sharding  # noqa: E402
from rdm_jax.models import factory  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import allocator, cpu, diffusers_unet, load_config, patch_grid  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 5, "Steps per variant per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds (the median round is reported).")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Do not time the PyTorch reference.")
_ONLY = flags.DEFINE_list("only", ["demo", "imagenet_small"], "Cases to run.")
_CONV = flags.DEFINE_list(
  "conv", ["auto", "xla"], "config.model.conv values to time (xla | onednn | auto)."
)
_ATTENTION = flags.DEFINE_list(
  "attention", [], "config.model.attention values to time (default: the config's)."
)
_BATCH = flags.DEFINE_integer("batch", 0, "Batch of every case (0: the case's own; imagenet: 64).")

# Dense bfloat16 peak per chip, TFLOP/s (vendor datasheets), by jax's device_kind.
PEAK_BF16_TFLOPS = {
  "NVIDIA H100 80GB HBM3": 989.4,
  "NVIDIA H200": 989.4,
  "NVIDIA A100-SXM4-80GB": 312.0,
  "NVIDIA A100-SXM4-40GB": 312.0,
}

Runner = Callable[
  [int], Any
]  # runs n train steps and waits for them (ours: the last step's metrics)
_TORCH_REFS = {"torch:same": "same step", "torch:adamw": "AdamW only"}


def cases():
  demo = load_config("fashion_mnist_rdm")
  small = load_config("imagenet_rdm")
  small.model.channel_mult = (1, 2, 3, 5)
  small.model.model_channels = 64
  small.model.dtype = "float32"
  small.train.batch_size = 16
  full = load_config("imagenet_rdm")
  full.train.batch_size = 64
  out = {
    "demo": (demo, (32, 32, 1)),
    "imagenet_small": (small, (32, 32, 3)),
    "imagenet": (full, (64, 64, 3)),
  }
  for config, _ in out.values():
    config.train.batch_size = _BATCH.value or config.train.batch_size
  return out


def on_gpu() -> bool:
  return jax.devices()[0].platform == "gpu"


@jax.jit
def perturbed(state: train_step.TrainState) -> train_step.TrainState:
  """The initial state with N(0, 0.01^2) added to every parameter (EMA alike): LDM's
  zero-initialised output layers (every res block's second conv, every transformer's proj_out, the
  UNet's last conv) would otherwise hide the attention from the first step's loss and gradients that
  this script compares between variants."""
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = tree.unflatten(
    [x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  )
  return state.replace(params=params, ema_params=params)


def jax_runner(
  config, latent_shape
) -> tuple[Runner, int, str, dict[str, float], train_step.TrainSetup]:
  """Our train step on the config's mesh: (runner, parameter count, the convolution the model runs,
  the first step's loss and gradient norm, the setup)."""
  mesh = mesh_lib.from_config(config)
  rules = [tuple(r) for r in config.sharding_rules]
  setup = train_step.setup_training(config, latent_shape, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(setup.state_specs().params))
  b = config.train.batch_size
  rng = np.random.default_rng(0)
  z0 = rng.normal(size=(b,) + latent_shape).astype(np.float32)
  ctx = rng.normal(size=(b, config.k_train, config.retrieval.embed_dim)).astype(np.float32)
  z0, ctx = sharding.put_batch(mesh, rules, z0, ctx)
  key = jax.random.PRNGKey(1)
  box = {"state": perturbed(setup.init_state(jax.random.PRNGKey(0)))}

  def run(n: int) -> dict[str, float]:
    with jax.set_mesh(mesh):
      for _ in range(n):
        box["state"], m = setup.train_step(box["state"], z0, ctx, key)
      return {k: float(v) for k, v in jax.device_get(m).items()}

  t = time.perf_counter()
  first = run(1)  # compile
  print(f"  compiled and ran the first step in {time.perf_counter() - t:.0f} s", flush=True)
  return run, n_params, setup.model.conv, first, setup


def torch_runner(config, latent_shape, same_step: bool) -> tuple[Runner, int]:
  """The same UNet as diffusers' UNet2DConditionModel on CPU threads as available; `same_step`:
  the work of our train step (module docstring), else the plain AdamW step of earlier runs."""
  import contextlib

  import torch

  dev = torch.device("cuda" if on_gpu() and torch.cuda.is_available() else "cpu")
  torch.backends.cudnn.benchmark = True
  autocast = (
    torch.autocast(dev.type, dtype=torch.bfloat16)
    if config.model.dtype == "bfloat16" and dev.type == "cuda"
    else contextlib.nullcontext()
  )
  latent_shape = patch_grid(
    config, latent_shape
  )  # our patching is a reshape: diffusers' UNet on the grid
  model = diffusers_unet(config, latent_shape).to(dev)
  params = [p for p in model.parameters() if p.requires_grad]
  n_params = sum(p.numel() for p in params)
  b = config.train.batch_size
  gen = torch.Generator().manual_seed(0)
  x0 = torch.randn((b, latent_shape[2]) + tuple(latent_shape[:2]), generator=gen).to(dev)
  ctx = torch.randn(b, config.k_train, config.retrieval.embed_dim, generator=gen).to(dev)
  if not same_step:
    opt = torch.optim.AdamW(params, lr=1e-4)
    t_fixed = torch.randint(0, 1000, (b,), generator=gen).to(dev)
    noise_fixed = torch.randn(x0.shape, generator=gen).to(dev)

    def one() -> None:
      opt.zero_grad(set_to_none=True)
      with autocast:
        out = model(x0, t_fixed, encoder_hidden_states=ctx).sample
      loss = torch.nn.functional.mse_loss(out.float(), noise_fixed)
      loss.backward()
      opt.step()
  else:
    o, d = config.optim, config.diffusion
    opt = torch.optim.AdamW(
      params, lr=o.lr, betas=(o.b1, o.b2), weight_decay=o.weight_decay, eps=o.get("eps", 1e-8)
    )
    alphas = torch.tensor(
      np.asarray(factory.make_schedule(config).alphas_cumprod), dtype=torch.float32
    ).to(dev)
    prediction, weighting = d.get("prediction", "eps"), d.get("loss_weighting", "uniform")
    gamma = float(d.get("min_snr_gamma", 5.0))
    shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    num_updates = [0]

    def lit_ema() -> None:  # ldm/modules/ema.py LitEma.forward
      num_updates[0] += 1
      one_minus = 1.0 - min(o.ema_decay, (1 + num_updates[0]) / (10 + num_updates[0]))
      with torch.no_grad():
        for name, p in model.named_parameters():
          if p.requires_grad:
            shadow[name].sub_(one_minus * (shadow[name] - p))

    def one() -> None:
      t = torch.randint(0, d.num_timesteps, (b,), device=dev)
      noise = torch.randn_like(x0)
      a = alphas[t].view(-1, 1, 1, 1)
      x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
      c = torch.where(
        torch.rand(b, 1, 1, device=dev) >= config.train.p_uncond, ctx, torch.zeros_like(ctx)
      )
      target = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]
      opt.zero_grad(set_to_none=True)
      with autocast:
        out = model(x_t, t, encoder_hidden_states=c).sample
      per_example = (out.float() - target).square().mean(dim=(1, 2, 3))
      if weighting == "min_snr":
        s = (a / (1 - a)).flatten()
        per_example = (
          per_example
          * s.clamp(max=gamma)
          / {"eps": s, "v": s + 1, "x0": torch.ones_like(s)}[prediction]
        )
      loss = per_example.mean()
      loss.backward()
      norm = (
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        if o.grad_clip > 0
        else torch.nn.utils.get_total_norm([p.grad for p in params])
      )
      if torch.isfinite(loss) and torch.isfinite(norm):
        opt.step()
        lit_ema()

  def run(n: int) -> None:
    for _ in range(n):
      one()
    if dev.type == "cuda":
      torch.cuda.synchronize()

  run(2)  # the second step: AdamW's state exists, cuDNN has tuned
  return run, n_params


def interleaved(runners: dict[str, Runner], steps: int, rounds: int) -> dict[str, list[float]]:
  """Seconds per step of each runner in each round, the runners taking turns within a round."""
  secs: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      t = time.perf_counter()
      run(steps)
      secs[name].append((time.perf_counter() - t) / steps)
  return secs


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
  dev = jax.devices()[0]
  peak = PEAK_BF16_TFLOPS.get(dev.device_kind) if on_gpu() else None
  print(
    f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}) x{jax.device_count()}, "
    f"{os.cpu_count()} CPUs, {cpu()}, {allocator()}; {_ROUNDS.value} interleaved rounds of "
    f"{_STEPS.value} steps, median round (range)",
    flush=True,
  )
  for name, (config, latent_shape) in cases().items():
    if name not in _ONLY.value:
      continue
    b = config.train.batch_size
    runners, labels, firsts, flops = {}, {}, {}, 0.0
    for conv, attention in itertools.product(
      _CONV.value, _ATTENTION.value or [config.model.attention]
    ):
      config.model.update(conv=conv, attention=attention)
      key = f"jax:conv={conv},attention={attention}"
      print(f"[{name}] {key}", flush=True)
      runners[key], n, impl, firsts[key], setup = jax_runner(config, latent_shape)
      if peak and not flops:  # the model's count: the same for every variant, needed only for MFU
        flops = flops_lib.TRAIN_MULTIPLIER * aot.model_flops_per_example(config, setup) * b
      impl = impl if isinstance(impl, str) else f"mixed, {len(impl)} geometries on oneDNN"
      labels[key] = f"rdm_jax (conv={conv}: {impl}, attention={attention}), {n / 1e6:.2f}M params"
    base = next(iter(firsts))
    for key, first in firsts.items():
      print(
        f"[{name}] first step, {key}: loss {first['loss']:.6f}, grad norm {first['grad_norm']:.5f}"
        + (
          ""
          if key == base
          else f" (relative difference to {base[4:]}: "
          f"{abs(first['loss'] / firsts[base]['loss'] - 1):.1e}, "
          f"{abs(first['grad_norm'] / firsts[base]['grad_norm'] - 1):.1e})"
        )
      )
    if not _SKIP_TORCH.value:
      for key, same in (("torch:same", True), ("torch:adamw", False)):
        runners[key], tn = torch_runner(config, latent_shape, same)
        labels[key] = f"torch+diffusers, {_TORCH_REFS[key]}, {tn / 1e6:.2f}M params"
    secs = {k: sorted(v) for k, v in interleaved(runners, _STEPS.value, _ROUNDS.value).items()}
    med = {k: statistics.median(v) for k, v in secs.items()}
    for k, v in secs.items():
      mfu = (
        f", {flops / med[k] / 1e12:.0f} model TFLOP/s = {flops / med[k] / 1e12 / peak:.1%} "
        f"of {peak:.0f}"
        if peak
        else ""
      )
      print(
        f"[{name}] {labels[k]}, batch {b}: {med[k]:.4f} s/step ({v[0]:.4f}..{v[-1]:.4f}), "
        f"{b / med[k]:.1f} examples/s{mfu}"
      )
    for k in (k for k in med if k.startswith("torch:")):
      ratios = ", ".join(f"{j[4:]} x{med[k] / med[j]:.2f}" for j in med if j.startswith("jax:"))
      print(f"[{name}] rdm_jax speed against {_TORCH_REFS[k]}: {ratios}")
    if name == "demo":
      sec = min(v for k, v in med.items() if k.startswith("jax:"))
      eps = time_pipeline(config)
      if eps is not None:
        print(
          f"[{name}] input pipeline: {eps:.0f} examples/s vs train step consumption {b / sec:.1f} "
          f"examples/s -> headroom x{eps / (b / sec):.0f}"
        )


if __name__ == "__main__":
  app.run(main)
