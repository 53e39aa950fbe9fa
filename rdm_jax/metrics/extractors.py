"""Feature extractors for evaluation: uint8 images -> features (and class logits), batched and
sharded over the local devices.

Every extractor has an identity (name, weights hash, preprocessing) that names the metrics
it feeds and keys the cache of reference features. Numbers from different extractors are
different metrics: only pytorch-fid's Inception gives "FID"; the offline EfficientNet-Lite0
gives an "FD (EfficientNet-Lite0)" and an "IS (EfficientNet-Lite0)", never "FID" or "IS" alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax.data import store
from rdm_jax.errors import fail
from rdm_jax.models import clip, efficientnet_lite, inception_fid
from rdm_jax.parallel.batched import BatchedApply


@dataclasses.dataclass
class Extractor:
  """name: short label used in metric names; identity: what makes two feature sets comparable.

  `apply(params, images)` maps a device batch (uint8 [B, H, W, C], after the optional
  host-side `host_preprocess`) to (features [B, d], logits [B, classes]; classes may be 0).
  """

  name: str
  identity: dict[str, Any]
  apply: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
  params: Any
  batch_size: int
  host_preprocess: Callable[[np.ndarray], np.ndarray] | None = None

  def __call__(
    self, images: np.ndarray, log: Callable[[str], None] | None = print, what: str = "images"
  ) -> dict[str, np.ndarray]:
    """{'features': [N, d], 'logits': [N, classes]} of uint8 images [N, H, W, 1|3], in batches
    split over every local device (parameters replicated)."""
    check_images(images, what)
    run = BatchedApply(self.apply, self.params, self.batch_size, self.host_preprocess)
    feats, logits = run(images, log=log and (lambda m: log(f"{self.name}: {m}")), what=what)
    return {"features": feats.astype(np.float32), "logits": logits.astype(np.float32)}


def check_images(images: np.ndarray, what: str) -> None:
  """uint8 [N, H, W, 1|3]; anything else is a clear error (a float array may hold NaNs)."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    fail(f"{what}: expected images [N, H, W, 1 or 3], got shape {list(images.shape)}")
  if images.dtype != np.uint8:
    fail(
      f"{what}: expected uint8 images in [0, 255], got {images.dtype}"
      + (
        " with NaN values"
        if np.issubdtype(images.dtype, np.floating) and np.isnan(images).any()
        else ""
      )
      + "; convert them (the sample job writes uint8)"
    )
  if len(images) == 0:
    fail(f"{what}: no images")


def efficientnet_lite0(
  weights: str = "", image_size: int = 224, batch_size: int = 256
) -> Extractor:
  """The offline EfficientNet-Lite0 (real ImageNet weights): 1280-d pooled features, 1000 logits.

  Preprocessing: grey to RGB, bilinear resize to image_size (no antialias), ImageNet mean/std.
  """
  path = weights or efficientnet_lite.default_weights_path()
  params = efficientnet_lite.load_params(path)
  model = efficientnet_lite.EfficientNetLite0()

  def apply(p, images):
    return model.apply({"params": p}, efficientnet_lite.preprocess(images, image_size))

  identity = {
    "name": "efficientnet_lite0",
    "weights_sha256": store.file_sha256(path),
    "preprocess": f"bilinear {image_size}, imagenet mean/std",
  }
  return Extractor("EfficientNet-Lite0", identity, apply, params, batch_size)


def clean_fid_resize(images: np.ndarray, size: int = 299) -> np.ndarray:
  """clean-fid's "clean" resize: each channel as a float image, PIL bicubic (antialiased) to
  size x size, clipped to [0, 255] (uint8 [B, H, W, 1|3] -> float32 [B, size, size, 3])."""
  from PIL import Image

  out = np.empty((len(images), size, size, 3), np.float32)
  for i, im in enumerate(images):
    im = np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im
    for c in range(3):
      ch = Image.fromarray(im[..., c].astype(np.float32), mode="F").resize(
        (size, size), resample=Image.BICUBIC
      )
      out[i, ..., c] = np.asarray(ch).clip(0, 255)
  return out


def inception_v3_fid(
  weights: str = "", image_size: int = 299, batch_size: int = 256, resize: str = "pytorch_fid"
) -> Extractor:
  """pytorch-fid's FID InceptionV3 (weights: a local pt_inception-2015-12-05-6726825d.pth):
  pool3 features (2048-d, for FID, precision/recall, KID) and the 1008 logits (for IS).

  resize "pytorch_fid": bilinear to 299 without antialias (pytorch-fid's numbers);
  "clean": clean-fid's antialiased PIL bicubic resize. Then [0, 1] -> [-1, 1].
  """
  if image_size != 299:
    fail(f"config.eval.image_size={image_size}: the FID Inception takes 299x299 inputs (set 299)")
  if resize not in ("pytorch_fid", "clean"):
    fail(f"config.eval.resize={resize!r}; use pytorch_fid or clean")
  params = inception_fid.load_params(weights)
  model = inception_fid.FIDInceptionV3()

  def apply(p, images):
    x = inception_fid.preprocess(images) if resize == "pytorch_fid" else images / 127.5 - 1.0
    return model.apply({"params": p}, x)

  identity = {
    "name": "inception_v3_fid",
    "weights_sha256": store.file_sha256(weights),
    "preprocess": "pytorch-fid: bilinear 299, 2x-1"
    if resize == "pytorch_fid"
    else "clean-fid: PIL bicubic 299, 2x-1",
  }
  return Extractor(
    "Inception",
    identity,
    apply,
    params,
    batch_size,
    host_preprocess=clean_fid_resize if resize == "clean" else None,
  )


CLIP_MEAN, CLIP_STD = clip.CLIP_MEAN, clip.CLIP_STD


def clip_resize_crop(images: np.ndarray, size: int) -> np.ndarray:
  """clean-fid's `img_preprocess_clip`: RGB, PIL bicubic resize of the shorter side to `size`,
  centre crop `size` x `size` (uint8 [B, H, W, 1|3] -> uint8 [B, size, size, 3])."""
  from PIL import Image

  out = np.empty((len(images), size, size, 3), np.uint8)
  for i, im in enumerate(images):
    x = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert("RGB")
    w, h = x.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # torchvision Resize(int): the shorter side becomes `size`
    x = x.resize(
      (size, new_long) if w < h else (new_long, size) if w > h else (size, size), Image.BICUBIC
    )
    left, top = int(round((x.size[0] - size) / 2.0)), int(round((x.size[1] - size) / 2.0))
    out[i] = np.asarray(x.crop((left, top, left + size, top + size)))
  return out


def clip_image(weights: str = "", image_size: int = 224, batch_size: int = 256) -> Extractor:
  """CLIP image embeddings (the projected `get_image_features`, as OpenAI's `encode_image`) with
  clean-fid's `clip_vit_b_32` preprocessing: features for CLIP-FID and for the CLIP score.
  weights: a saved transformers CLIP directory or OpenAI's .pt (`rdm_jax.models.clip.load`)."""
  model = clip.load(weights)
  size = model.image_size

  def apply(p, images):
    feats = model.image_features(p, (images.astype(jnp.float32) / 255.0 - CLIP_MEAN) / CLIP_STD)
    return feats, feats[:, :0]  # no class logits

  identity = {
    "name": "clip_image",
    "projection_dim": model.embed_dim,
    "image_size": size,
    "weights_sha256": model.weights_sha256,
    "preprocess": f"clean-fid clip: bicubic {size}, crop",
  }
  return Extractor(
    "CLIP",
    identity,
    apply,
    model.params,
    batch_size,
    host_preprocess=lambda imgs: clip_resize_crop(imgs, size),
  )


def clip_text_features(weights: str, captions: list[str], batch_size: int = 256) -> np.ndarray:
  """CLIP text embeddings (projected, as OpenAI's `encode_text`) of captions, tokenised by the
  tokenizer saved in the same local directory (padded to the model's 77 positions)."""
  model = clip.load(weights)
  tok = clip.load_tokenizer(weights, "save it there with CLIPTokenizer.save_pretrained")
  length = model.model.config.text_config.max_position_embeddings
  fn = jax.jit(model.text_features)
  out = []
  for a in range(0, len(captions), batch_size):
    t = tok(
      list(captions[a : a + batch_size]),
      padding="max_length",
      truncation=True,
      max_length=length,
      return_tensors="np",
    )
    out.append(np.asarray(fn(model.params, t["input_ids"], t["attention_mask"])))
  return np.concatenate(out).astype(np.float32)


EXTRACTORS = {
  "efficientnet_lite0": efficientnet_lite0,
  "inception_v3_fid": inception_v3_fid,
  "clip_image": clip_image,
}


def make_extractor(cfg: Any) -> Extractor:
  """config.eval -> Extractor."""
  if cfg.extractor not in EXTRACTORS:
    fail(f"config.eval.extractor={cfg.extractor!r}; available: {', '.join(EXTRACTORS)}")
  if cfg.extractor == "inception_v3_fid":
    return inception_v3_fid(cfg.weights, cfg.image_size, cfg.batch_size, cfg.resize)
  return EXTRACTORS[cfg.extractor](cfg.weights, cfg.image_size, cfg.batch_size)
