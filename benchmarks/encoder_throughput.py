r"""Retrieval-encoder throughput: EfficientNet-Lite0 images/s (embed job's hot loop) against the
reference PyTorch model in the same run, for both depthwise-conv implementations.

  python benchmarks/encoder_throughput.py [--image_size=64] [--batch=256]
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

from rdm_jax.models import efficientnet_lite  # noqa: E402

_SIZE = flags.DEFINE_integer("image_size", 64, "Encoder input size (the demo uses 64).")
_BATCH = flags.DEFINE_integer("batch", 256, "Images per call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls.")


def main(argv):
  del argv
  params = efficientnet_lite.load_params()
  x = (
    np.random.default_rng(0)
    .normal(size=(_BATCH.value, _SIZE.value, _SIZE.value, 3))
    .astype(np.float32)
  )
  rates = {}
  for impl in ("shift", "conv"):
    model = efficientnet_lite.EfficientNetLite0(depthwise_impl=impl)
    fn = jax.jit(lambda v: model.apply({"params": params}, v)[0])
    xj = jnp.asarray(x)
    fn(xj).block_until_ready()
    t = time.perf_counter()
    for _ in range(_REPEATS.value):
      fn(xj).block_until_ready()
    rates[impl] = _REPEATS.value * len(x) / (time.perf_counter() - t)
    print(
      f"rdm_jax EfficientNet-Lite0 ({impl} depthwise), {_SIZE.value}px: {rates[impl]:.0f} images/s"
    )
  try:
    import torch
    from efficientnet_lite_pytorch import EfficientNet
  except ImportError:
    print("torch reference not installed (make setup-test); skipped")
    return
  ref = EfficientNet.from_pretrained(
    "efficientnet-lite0",
    weights_path=efficientnet_lite.default_weights_path(),
    image_size=_SIZE.value,
  ).eval()
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    ref.extract_features(xt)
    t = time.perf_counter()
    for _ in range(_REPEATS.value):
      ref.extract_features(xt).mean(dim=(2, 3))
    torch_rate = _REPEATS.value * len(x) / (time.perf_counter() - t)
  print(
    f"torch reference: {torch_rate:.0f} images/s -> rdm_jax (shift) "
    f"x{rates['shift'] / torch_rate:.2f}, (conv) x{rates['conv'] / torch_rate:.2f}"
  )


if __name__ == "__main__":
  app.run(main)
