"""Feature extractors for evaluation: uint8 images -> features (and class logits), batched and
sharded over the local devices.

Every extractor has an identity (name, weights hash, preprocessing) that names the metrics
it feeds and keys the cache of reference features. Numbers from different extractors are
different metrics: only pytorch-fid's Inception gives "FID"; the offline EfficientNet-Lite0
gives an "FD (EfficientNet-Lite0)" and an "IS (EfficientNet-Lite0)", never "FID" or "IS" alone.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rdm_jax.errors import fail
from rdm_jax.models import efficientnet_lite, inception_fid
from rdm_jax.retrieval import encoders


@dataclasses.dataclass
class Extractor:
  """name: short label used in metric names; identity: what makes two feature sets comparable."""

  name: str
  identity: dict[str, Any]
  apply: Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # uint8 [B, H, W, C] -> (features, logits)
  batch_size: int

  def __call__(self, images: np.ndarray, log: Callable[[str], None] | None = print,
               what: str = "images") -> dict[str, np.ndarray]:
    """{'features': [N, d], 'logits': [N, classes]} of uint8 images [N, H, W, 1|3], in batches
    split over every local device."""
    check_images(images, what)
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    batch = -(-self.batch_size // len(devices)) * len(devices)  # a multiple of the device count
    fn = jax.jit(self.apply, in_shardings=sharded, out_shardings=(sharded, sharded))
    feats, logits = [], []
    t0 = last = time.time()
    for a in range(0, len(images), batch):
      chunk = np.asarray(images[a:a + batch])
      n = len(chunk)
      if n < batch:  # pad the last batch: one compiled shape
        chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
      f, lg = fn(jax.device_put(chunk, sharded))
      feats.append(np.asarray(f)[:n])
      logits.append(np.asarray(lg)[:n])
      if log and time.time() - last > 10:
        last = time.time()
        log(f"{self.name}: {a + n}/{len(images)} {what} ({(a + n) / (last - t0):.0f}/s)")
    return {"features": np.concatenate(feats).astype(np.float32),
            "logits": np.concatenate(logits).astype(np.float32)}


def check_images(images: np.ndarray, what: str) -> None:
  """uint8 [N, H, W, 1|3]; anything else is a clear error (a float array may hold NaNs)."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    fail(f"{what}: expected images [N, H, W, 1 or 3], got shape {list(images.shape)}")
  if images.dtype != np.uint8:
    fail(f"{what}: expected uint8 images in [0, 255], got {images.dtype}"
         + (" with NaN values" if np.issubdtype(images.dtype, np.floating) and np.isnan(images).any() else "")
         + "; convert them (the sample job writes uint8)")
  if len(images) == 0:
    fail(f"{what}: no images")


def efficientnet_lite0(weights: str = "", image_size: int = 224, batch_size: int = 256) -> Extractor:
  """The offline EfficientNet-Lite0 (real ImageNet weights): 1280-d pooled features, 1000 logits.

  Preprocessing: grey to RGB, bilinear resize to image_size (no antialias), ImageNet mean/std.
  """
  path = weights or efficientnet_lite.default_weights_path()
  params = efficientnet_lite.load_params(path)
  model = efficientnet_lite.EfficientNetLite0()

  def apply(images):
    return model.apply({"params": params}, efficientnet_lite.preprocess(images, image_size))

  identity = {"name": "efficientnet_lite0", "weights_sha256": encoders.file_sha256(path),
              "preprocess": f"bilinear {image_size}, imagenet mean/std"}
  return Extractor("EfficientNet-Lite0", identity, apply, batch_size)


def inception_v3_fid(weights: str = "", image_size: int = 299, batch_size: int = 256) -> Extractor:
  """pytorch-fid's FID InceptionV3 (weights: a local pt_inception-2015-12-05-6726825d.pth):
  pool3 features (2048-d, for FID, precision/recall, KID) and the 1008 logits (for IS).

  Preprocessing as pytorch-fid: bilinear resize to 299 (no antialias), [0, 1] -> [-1, 1].
  """
  if image_size != 299:
    fail(f"config.eval.image_size={image_size}: the FID Inception takes 299x299 inputs (set 299)")
  params = inception_fid.load_params(weights)
  model = inception_fid.FIDInceptionV3()

  def apply(images):
    return model.apply({"params": params}, inception_fid.preprocess(images))

  identity = {"name": "inception_v3_fid", "weights_sha256": encoders.file_sha256(weights),
              "preprocess": "pytorch-fid: bilinear 299, 2x-1"}
  return Extractor("Inception", identity, apply, batch_size)


EXTRACTORS = {"efficientnet_lite0": efficientnet_lite0, "inception_v3_fid": inception_v3_fid}


def make_extractor(cfg: Any) -> Extractor:
  """config.eval -> Extractor."""
  if cfg.extractor not in EXTRACTORS:
    fail(f"config.eval.extractor={cfg.extractor!r}; available: {', '.join(EXTRACTORS)}")
  return EXTRACTORS[cfg.extractor](cfg.weights, cfg.image_size, cfg.batch_size)
