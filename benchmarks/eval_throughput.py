r"""Evaluation speed: features/s of each extractor, and the wall time of a 10k x 10k
precision/recall (k=3) against torch-fidelity's implementation on the same features, in
the same run.

  python benchmarks/eval_throughput.py [--n=10000] [--d=2048] [--images=512]

The FID Inception runs on random weights (same architecture and cost as the real ones).
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

from rdm_jax import metrics  # noqa: E402
from rdm_jax.metrics import extractors  # noqa: E402
from rdm_jax.models import inception_fid  # noqa: E402

_N = flags.DEFINE_integer("n", 10_000, "Real and fake feature vectors for precision/recall.")
_D = flags.DEFINE_integer("d", 2048, "Feature width (Inception pool3: 2048).")
_IMAGES = flags.DEFINE_integer("images", 512, "Images per extractor timing.")


def rate(ex: extractors.Extractor, images: np.ndarray) -> float:
  ex(images[: ex.batch_size], log=None)  # compile
  t = time.perf_counter()
  ex(images, log=None)
  return len(images) / (time.perf_counter() - t)


def main(argv):
  del argv
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}")
  images = np.random.default_rng(0).integers(
    0, 256, size=(_IMAGES.value, 28, 28, 1), dtype=np.uint8
  )
  for size in (64, 224):
    r = rate(extractors.efficientnet_lite0(image_size=size, batch_size=128), images)
    print(f"EfficientNet-Lite0 at {size}px: {r:.0f} images/s")
  params = jax.jit(inception_fid.FIDInceptionV3().init)(
    jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3))
  )["params"]
  model = inception_fid.FIDInceptionV3()
  ex = extractors.Extractor(
    "Inception",
    {"name": "random"},
    lambda p, x: model.apply({"params": p}, inception_fid.preprocess(x)),
    params,
    64,
  )
  print(f"FID Inception at 299px: {rate(ex, images[:256]):.1f} images/s")
  from transformers import CLIPConfig, FlaxCLIPModel

  clip = FlaxCLIPModel(CLIPConfig(), seed=0)  # the default config is ViT-B/32 (random weights)
  clip_ex = extractors.Extractor(
    "CLIP",
    {"name": "random"},
    lambda p, x: (
      (
        clip.get_image_features(
          jnp.transpose((x / 255.0 - extractors.CLIP_MEAN) / extractors.CLIP_STD, (0, 3, 1, 2)),
          params=p,
        ),
      )
      * 2
    ),
    clip.params,
    64,
    host_preprocess=lambda imgs: extractors.clip_resize_crop(imgs, 224),
  )
  print(
    f"CLIP ViT-B/32 at 224px (clean-fid preprocessing): {rate(clip_ex, images[:256]):.1f} images/s"
  )

  rng = np.random.default_rng(1)
  real = rng.normal(size=(_N.value, _D.value)).astype(np.float32)
  fake = (rng.normal(size=(_N.value, _D.value)) * 1.05 + 0.05).astype(np.float32)
  metrics.precision_recall(real[:500], fake[:500])  # compile the block shapes once
  t = time.perf_counter()
  ours = metrics.precision_recall(real, fake)
  ours_s = time.perf_counter() - t
  print(f"rdm_jax precision_recall {_N.value} x {_N.value} x {_D.value}: {ours_s:.1f} s -> {ours}")
  try:
    import torch

    sys.path.insert(
      0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    )
    from torch_references import reference

    prc = reference("torch_fidelity.metric_prc")
  except Exception as e:  # noqa: BLE001
    print(f"torch-fidelity reference unavailable ({e}); make setup-test installs it")
    return
  t = time.perf_counter()
  ref = prc.calculate_precision_recall_part(
    torch.from_numpy(fake), torch.from_numpy(real), 3, 10000
  )
  ref_s = time.perf_counter() - t
  print(
    f"torch-fidelity (batched 'part' variant): {ref_s:.1f} s -> {ref}; rdm_jax "
    f"x{ref_s / ours_s:.2f} faster"
  )


if __name__ == "__main__":
  app.run(main)
