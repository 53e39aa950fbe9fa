"""Images/s of the VQ-f4 first stage (encode, 256 px) and of the CLIP ViT-B/32 retriever (image
embeddings, 224 px): rdm_jax against the PyTorch references on the same machine, same run.

References: taming-transformers' Encoder + LDM's quant_conv (VQModelInterface.encode) and OpenAI's
CLIP (clip-anytorch's model.py; on a GPU, `clip.load` runs it in float16, as the RDM retriever
does). Both networks get the published architectures with random weights (speed does not
depend on the values); ours are converted from theirs. Also prints the bytes per 1M database
vectors (512-d, float16 as the embed job stores them, and float32).

  python benchmarks/encoder_speed.py [--vq_batch=32] [--clip_batch=256] [--steps=10]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, steps: int, sync) -> float:
  """Seconds per call, after two warm-up calls (compilation, autotuning)."""
  for _ in range(2):
    sync(fn())
  t = time.perf_counter()
  for _ in range(steps):
    out = fn()
  sync(out)
  return (time.perf_counter() - t) / steps


def openai_clip_module():
  spec = importlib.util.find_spec("clip")
  s = importlib.util.spec_from_file_location(
    "openai_clip_model", os.path.join(os.path.dirname(spec.origin), "model.py")
  )
  m = importlib.util.module_from_spec(s)
  s.loader.exec_module(m)
  return m


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--vq_batch", type=int, default=32)
  ap.add_argument("--clip_batch", type=int, default=256)
  ap.add_argument("--steps", type=int, default=10)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import torch
  from taming.modules.diffusionmodules.model import Encoder

  from rdm_jax.models import autoencoder, clip

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  tsync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
  jsync = jax.block_until_ready
  print(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on {dev}"
  )
  torch.backends.cudnn.benchmark = True

  # VQ-f4 encode
  spec = autoencoder.PRESETS["vq_f4"]
  enc = Encoder(
    double_z=False,
    z_channels=3,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=(1, 2, 4),
    num_res_blocks=2,
    attn_resolutions=(),
    dropout=0.0,
  )
  quant_conv = torch.nn.Conv2d(3, 3, 1)
  sd = {f"encoder.{k}": v.numpy() for k, v in enc.state_dict().items()}
  sd.update({f"quant_conv.{k}": v.numpy() for k, v in quant_conv.state_dict().items()})
  # the decoder and codebook are not timed; give them their shapes so the
  # converter sees a whole model
  shapes = autoencoder.init_shapes(spec)
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    key = autoencoder.torch_name([str(getattr(p, "key", p)) for p in path])
    if key not in sd:
      shape = (
        leaf.shape
        if len(leaf.shape) != 4
        else (leaf.shape[3], leaf.shape[2], leaf.shape[0], leaf.shape[1])
      )
      sd[key] = np.zeros(shape, np.float32)
  params = jax.device_put(autoencoder.convert_state_dict(sd, spec))
  model = autoencoder.Autoencoder(spec)
  x = np.random.default_rng(0).uniform(-1, 1, (args.vq_batch, 256, 256, 3)).astype(np.float32)
  xj = jax.device_put(x)
  encode = jax.jit(
    lambda p, x: model.apply({"params": p}, x, method=autoencoder.Autoencoder.encode)
  )
  ours = timed(lambda: encode(params, xj), args.steps, jsync)
  enc, quant_conv = enc.to(dev).eval(), quant_conv.to(dev).eval()
  xt = torch.as_tensor(x.transpose(0, 3, 1, 2)).to(dev)
  b = args.vq_batch
  for channels_last in (False, True) if dev == "cuda" else (False,):
    if channels_last:
      enc, xt = enc.to(memory_format=torch.channels_last), xt.to(memory_format=torch.channels_last)
    with torch.no_grad():
      ref = timed(lambda: quant_conv(enc(xt)), args.steps, tsync)
    print(
      f"VQ-f4 encode 256px, batch {b}, float32: rdm_jax {b / ours:.1f} img/s, torch"
      f"{' channels-last' if channels_last else ''} {b / ref:.1f} img/s, ratio {ref / ours:.2f}x"
    )

  # CLIP ViT-B/32 image embeddings
  cm = openai_clip_module()
  torch.manual_seed(0)
  tm = cm.CLIP(
    embed_dim=512,
    image_resolution=224,
    vision_layers=12,
    vision_width=768,
    vision_patch_size=32,
    context_length=77,
    vocab_size=49408,
    transformer_width=512,
    transformer_heads=8,
    transformer_layers=12,
  ).eval()
  config, cparams = clip.convert_openai_state_dict(
    {k: v.numpy() for k, v in tm.state_dict().items()}
  )
  from transformers import FlaxCLIPModel

  images = np.random.default_rng(1).integers(0, 256, (args.clip_batch, 256, 256, 3), dtype=np.uint8)
  ij = jax.device_put(images)
  b = args.clip_batch
  for dtype, tdtype in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.float16)):
    fm = FlaxCLIPModel(config, dtype=dtype, _do_init=False)
    p = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, dtype), cparams))

    def embed(p, im, fm=fm, dtype=dtype):
      x = clip.retriever_preprocess(im, 224).astype(dtype)
      return fm.get_image_features(jnp.transpose(x, (0, 3, 1, 2)), params=p)

    f = jax.jit(embed)
    ours = timed(lambda: f(p, ij), args.steps, jsync)
    if dev == "cpu" and tdtype == torch.float16:
      print(
        f"CLIP ViT-B/32 {jnp.dtype(dtype).name}: rdm_jax {b / ours:.1f} img/s (no float16 "
        "torch on CPU)"
      )
      continue
    tmd = tm.to(dev).float()
    if tdtype == torch.float16:
      cm.convert_weights(
        tmd
      )  # what clip.load does on a GPU: float16 weights, LayerNorms in float32
    it = torch.as_tensor(images).to(dev)
    mean = torch.as_tensor(clip.CLIP_MEAN, device=dev)[:, None, None]
    std = torch.as_tensor(clip.CLIP_STD, device=dev)[:, None, None]

    def ref_embed():  # ClipImageRetriever.forward on [-1, 1] images
      x = it.permute(0, 3, 1, 2).float() / 127.5 - 1
      x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=True)
      return tmd.encode_image((((x + 1) / 2 - mean) / std).to(tdtype))

    for tf32 in (False, True) if tdtype == torch.float32 and dev == "cuda" else (False,):
      torch.backends.cuda.matmul.allow_tf32 = tf32  # XLA uses TF32 for float32 matmuls by default
      with torch.no_grad():
        ref = timed(ref_embed, args.steps, tsync)
      print(
        f"CLIP ViT-B/32 retriever 256->224px, batch {b}: rdm_jax {jnp.dtype(dtype).name} "
        f"{b / ours:.1f} img/s, torch "
        f"{str(tdtype).split('.')[-1]}{' (TF32 matmuls)' if tf32 else ''} {b / ref:.1f} img/s, "
        f"ratio {ref / ours:.2f}x"
      )
    torch.backends.cuda.matmul.allow_tf32 = False

  for name, itemsize in (("float16", 2), ("float32", 4)):
    print(
      f"database of 1M x 512 embeddings, {name}: {1_000_000 * 512 * itemsize / 1e9:.3f} GB "
      "(+ ids int64 8 MB, labels int32 4 MB)"
    )


if __name__ == "__main__":
  main()
