"""First stages E/D that map images to the latents the diffusion model works on.

`config.first_stage.name`:
- `identity`: pixels scaled to [-1, 1] and padded (with -1) to a square of `pad_to`: honest
  for 28x28 Fashion-MNIST.
- the LDM autoencoders (`rdm_jax.models.autoencoder.PRESETS`): `vq_f4` (the paper's ImageNet
  RDM, 3x64x64 latents at 256 px), `vq_f8`, `vq_f16` (RARM's tokens in the original's training
  configs), `vqgan_f16` (taming's VQGAN, the released RARM weights' tokens), `kl_f4`, `kl_f8`,
  `kl_f16`, with weights read from the published PyTorch Lightning `.ckpt`
  (`config.first_stage.weights`) through the restricted reader, which never runs code. The
  `.ckpt` of a whole RDM or RARM serves as well: its `first_stage_model.*` are the weights.
  `config.first_stage.arch` overrides fields of the preset (tests use tiny ones; 0 or () keeps
  the preset's value, attn_resolutions=(0,) means no attention).

As `LatentDiffusion.get_first_stage_encoding` / `decode_first_stage`: latents are the first
stage's encoding times `scale_factor` (1.0 for the RDM's VQ-f4), decoded after dividing by
it. Images enter as uint8 [B, H, W, C] (grey is repeated to RGB), scaled to [-1, 1], padded
to `pad_to` when it is set; decoded images are clipped to [-1, 1] and rounded to uint8 (the
original's image logger truncates; rounding is the unbiased choice).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from rdm_jax import files
from rdm_jax.errors import fail
from rdm_jax.models import autoencoder, palette, torch_legacy
from rdm_jax.parallel.batched import BatchedApply

ARCH_FIELDS = (
  "ch",
  "ch_mult",
  "num_res_blocks",
  "attn_resolutions",
  "embed_dim",
  "z_channels",
  "n_embed",
  "resolution",
)


def _pads(size: int, target: int) -> tuple[int, int]:
  if size > target:
    fail(f"images of size {size} do not fit first_stage.pad_to={target}")
  lo = (target - size) // 2
  return lo, target - size - lo


def _to_unit(images: np.ndarray, pad_to: int) -> np.ndarray:
  x = images.astype(np.float32) / 127.5 - 1.0
  if pad_to:
    ph, pw = _pads(x.shape[1], pad_to), _pads(x.shape[2], pad_to)
    x = np.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=-1.0)
  return x


def _from_unit(x: np.ndarray, image_hw: tuple[int, int], pad_to: int) -> np.ndarray:
  if pad_to:
    (top, _), (left, _) = _pads(image_hw[0], pad_to), _pads(image_hw[1], pad_to)
    x = x[:, top : top + image_hw[0], left : left + image_hw[1]]
  return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def spec(cfg: Any) -> autoencoder.Spec | palette.Spec:
  """The autoencoder `config.first_stage` names: its preset with `arch` overrides (or the demo's
  palette tokenizer's)."""
  name = cfg["name"]
  if name == "palette":
    return palette.spec(cfg)
  if name not in autoencoder.PRESETS:
    fail(f"config.first_stage.name={name!r}; available: identity, {', '.join(autoencoder.PRESETS)}")
  arch = {k: v for k, v in dict(cfg.arch).items() if v not in (None, 0, (), [])}
  unknown = sorted(set(arch) - set(ARCH_FIELDS))
  if unknown:
    fail(f"config.first_stage.arch has unknown fields {unknown}; known: {', '.join(ARCH_FIELDS)}")
  arch = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in arch.items()}
  s = dataclasses.replace(autoencoder.PRESETS[name], **arch)
  if any((s.ch * m) % 32 for m in s.ch_mult):
    fail(
      f"first stage {name}: channel widths {[s.ch * m for m in s.ch_mult]} must be multiples of 32 "
      "(GroupNorm with 32 groups)"
    )
  return s


MODEL_PREFIX = "first_stage_model."  # where an LDM / RDM / RARM model.ckpt keeps its first stage


def load_state_dict(path: str, what: str) -> dict[str, np.ndarray]:
  """A first stage's PyTorch state dict (a Lightning `.ckpt`'s "state_dict", or a bare one; of a
  whole model, its `first_stage_model.*` entries) read without running anything in the file; any
  failure is one line naming the file."""
  obj = torch_legacy.load_weights(
    path,
    what,
    "set config.first_stage.weights to the local .ckpt (docs/paper_configuration.md)",
  )
  sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
  if isinstance(sd, dict) and not any(str(k).startswith("encoder.") for k in sd):
    sd = {k[len(MODEL_PREFIX) :]: v for k, v in sd.items() if str(k).startswith(MODEL_PREFIX)} or sd
  if not isinstance(sd, dict) or not sd or not all(isinstance(v, np.ndarray) for v in sd.values()):
    fail(f"{what}: {path} holds no state dict of tensors")
  return sd


@dataclasses.dataclass
class FirstStage:
  """A loaded LDM autoencoder: host-array encode / decode in batches over the local devices."""

  name: str
  spec: autoencoder.Spec
  params: Any
  scale_factor: float
  pad_to: int
  batch_size: int
  weights_sha256: str

  def __post_init__(self):
    model = autoencoder.Autoencoder(self.spec)
    s = self.scale_factor

    def enc(p, x):
      return model.apply({"params": p}, x, method=autoencoder.Autoencoder.encode) * s

    def dec(p, z):
      return jnp.clip(
        model.apply({"params": p}, z / s, method=autoencoder.Autoencoder.decode), -1.0, 1.0
      )

    def tok(p, x):
      return model.apply({"params": p}, x, method=autoencoder.Autoencoder.encode_tokens)

    def untok(p, t):
      return jnp.clip(
        model.apply({"params": p}, t, method=autoencoder.Autoencoder.decode_tokens), -1.0, 1.0
      )

    self._fns = {
      k: BatchedApply(f, self.params, self.batch_size)
      for k, f in dict(encode=enc, decode=dec, tokens=tok, untokens=untok).items()
    }

  def _images(self, images: np.ndarray) -> np.ndarray:
    if images.ndim != 4 or images.dtype != np.uint8:
      fail(
        f"first stage {self.name}: expected uint8 images [B, H, W, C], got {images.dtype} "
        f"{list(images.shape)}"
      )
    x = _to_unit(images, self.pad_to)
    if x.shape[-1] == 1 and self.spec.in_channels == 3:
      x = np.repeat(x, 3, axis=-1)
    f = self.spec.factor
    if x.shape[1] % f or x.shape[2] % f or x.shape[-1] != self.spec.in_channels:
      fail(
        f"first stage {self.name} takes images whose sides are multiples of {f} with "
        f"{self.spec.in_channels} channels, got {list(x.shape[1:])}; set config.dataset's image "
        "size (or config.first_stage.pad_to)"
      )
    return x

  def encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 images [B, H, W, C] -> float32 latents [B, H/f, W/f, embed_dim] (times
    scale_factor)."""
    return self._fns["encode"](self._images(images), what="images")

  def decode(self, latents: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """latents [B, h, w, embed_dim] -> uint8 images [B, H, W, out_ch]."""
    return _from_unit(
      self._fns["decode"](np.asarray(latents, np.float32), what="latents"), image_hw, self.pad_to
    )

  def encode_tokens(self, images: np.ndarray) -> np.ndarray:
    """VQ: uint8 images -> int32 code indices [B, H/f, W/f]."""
    self._need_vq()
    return self._fns["tokens"](self._images(images), what="images")

  def decode_tokens(self, tokens: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """VQ: code indices [B, h, w] -> uint8 images."""
    self._need_vq()
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.spec.n_embed):
      fail(f"token ids must lie in [0, {self.spec.n_embed}); got [{tokens.min()}, {tokens.max()}]")
    return _from_unit(
      self._fns["untokens"](tokens.astype(np.int32), what="token maps"), image_hw, self.pad_to
    )

  def _need_vq(self):
    if self.spec.kind != "vq":
      fail(
        f"first stage {self.name} is a KL autoencoder: it has no tokens (use a vq_* first stage)"
      )


@functools.lru_cache(maxsize=4)
def _load(cfg_json: str) -> FirstStage:
  cfg = mlc.ConfigDict(json.loads(cfg_json))
  s = spec(cfg)
  what = f"first stage {cfg['name']}"
  sd = load_state_dict(cfg.weights, what)
  try:
    params = autoencoder.convert_state_dict(sd, s)
  except ValueError as e:
    fail(f"{what}: {cfg['weights']} is not a checkpoint of this architecture ({s}): {e}")
  if cfg.latent_channels != s.embed_dim:
    fail(
      f"config.first_stage.latent_channels={cfg['latent_channels']} but {cfg['name']} makes "
      f"{s.embed_dim}-channel latents; set latent_channels={s.embed_dim}"
    )
  return FirstStage(
    cfg["name"],
    s,
    jax.tree.map(jnp.asarray, params),
    float(cfg.scale_factor),
    int(cfg.pad_to),
    int(cfg.batch_size),
    files.sha256(cfg["weights"]),
  )


def load(cfg: Any) -> FirstStage:
  """The LDM first stage `config.first_stage` describes, loaded once per process."""
  return _load(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg), sort_keys=True))


def identity(cfg: Any) -> dict[str, Any]:
  """What a latents store records about the first stage that made it: for an autoencoder its
  resolved architecture, scale factor and the sha256 of its weights (not their path)."""
  d = {"name": cfg.name, "pad_to": int(cfg.pad_to), "latent_channels": int(cfg.latent_channels)}
  if cfg.name == "palette":
    palette.load(cfg.weights, cfg)  # checked
    s = palette.spec(cfg)
    d.update(
      palette_sha256=files.sha256(cfg.weights), palette_size=s.n_embed, palette_factor=s.factor
    )
  elif cfg.name != "identity":
    fs = load(cfg)
    arch = json.loads(
      json.dumps(dataclasses.asdict(fs.spec))
    )  # as the manifest holds it (lists, not tuples)
    d.update(weights_sha256=fs.weights_sha256, scale_factor=fs.scale_factor, arch=arch)
  return d


def encode(cfg: Any, images: np.ndarray) -> np.ndarray:
  """uint8 images [B, H, W, C] -> float32 latents [B, h, w, c]."""
  if cfg.name == "identity":
    return _to_unit(images, cfg.pad_to)
  return load(cfg).encode(images)


def decode(cfg: Any, latents: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
  """float latents [B, h, w, c] -> uint8 images [B, H, W, C] (inverse of `encode`); integer
  tokens [B, S] (RARM's, raster order) are decoded through the VQ codebook."""
  latents = np.asarray(latents)
  if latents.dtype.kind in "iu":
    return decode_tokens(cfg, latents, image_hw)
  if cfg.name == "identity":
    return _from_unit(latents, image_hw, cfg.pad_to)
  return load(cfg).decode(latents, image_hw)


def encode_tokens(cfg: Any, images: np.ndarray) -> np.ndarray:
  """VQ first stage: uint8 images [B, H, W, C] -> int32 tokens [B, (H/f)(W/f)] in raster order."""
  if cfg.name == "identity":
    fail(
      "config.first_stage.name='identity' has no tokens; RARM needs a VQ first stage "
      "(vq_f16 or vqgan_f16)"
    )
  if cfg.name == "palette":
    return palette.encode(images, palette.load(cfg.weights, cfg), palette.spec(cfg).factor)
  tokens = load(cfg).encode_tokens(images)
  return tokens.reshape(tokens.shape[0], -1).astype(np.int32)


def decode_tokens(cfg: Any, tokens: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
  """int tokens [B, S] in raster order (S a square) -> uint8 images [B, H, W, C]."""
  tokens = np.asarray(tokens)
  side = int(round(tokens.shape[1] ** 0.5))
  if side * side != tokens.shape[1]:
    fail(f"{tokens.shape[1]} tokens per image do not make a square latent grid")
  if cfg.name == "palette":
    colours = palette.load(cfg.weights, cfg)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= len(colours)):
      fail(f"token ids must lie in [0, {len(colours)}); got [{tokens.min()}, {tokens.max()}]")
    return _from_unit(palette.decode(tokens, colours, palette.spec(cfg).factor), image_hw, 0)
  return load(cfg).decode_tokens(tokens.reshape(tokens.shape[0], side, side), image_hw)
