"""CLIP (ViT) through transformers' FlaxCLIPModel, from local weights only.

`load(path)` takes either
- a directory holding a saved transformers CLIP (`save_pretrained` of FlaxCLIPModel or
  CLIPModel: config.json plus flax_model.msgpack or model.safetensors), or
- OpenAI's checkpoint file (`ViT-B-32.pt`: a TorchScript archive, or a plain state dict), read
  by the restricted reader (nothing in it runs) and converted here.

The conversion follows OpenAI's `clip/model.py` (`build_model` infers the sizes from the
state dict: width from conv1, layers from the resblocks, heads = width // 64, image size =
patch x grid) and maps its names to transformers': `in_proj_weight` split into q/k/v,
`c_fc`/`c_proj` -> fc1/fc2, `ln_pre` -> pre_layrnorm, `proj` / `text_projection` -> the
projections; QuickGELU and LayerNorm eps 1e-5 as in OpenAI's model; the text feature is read
at the end-of-text token, the largest id (OpenAI: `text.argmax(dim=-1)`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax import files, untrusted
from rdm_jax.errors import fail
from rdm_jax.models import torch_legacy

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@dataclasses.dataclass
class Clip:
  """A FlaxCLIPModel (built without weights) and its parameters."""

  model: Any
  params: Any
  weights_sha256: str

  @property
  def image_size(self) -> int:
    return self.model.config.vision_config.image_size

  @property
  def embed_dim(self) -> int:
    return self.model.config.projection_dim

  def image_features(self, params: Any, pixels: jax.Array) -> jax.Array:
    """Projected image embeddings (OpenAI's encode_image) of CLIP-normalised pixels [B, S, S, 3]."""
    return self.model.get_image_features(jnp.transpose(pixels, (0, 3, 1, 2)), params=params)

  def text_features(
    self, params: Any, token_ids: jax.Array, mask: jax.Array | None = None
  ) -> jax.Array:
    """Projected text embeddings (OpenAI's encode_text) of token ids [B, context_length]."""
    mask = jnp.ones_like(token_ids) if mask is None else mask
    return self.model.get_text_features(token_ids, attention_mask=mask, params=params)


def _openai_config(sd: dict[str, np.ndarray]):
  from transformers import CLIPConfig

  if "visual.conv1.weight" not in sd or "visual.proj" not in sd:
    fail(
      "not an OpenAI CLIP ViT checkpoint (no visual.conv1.weight / visual.proj; the ResNet CLIPs "
      "are not supported)"
    )

  def layers(prefix):
    return len(
      {m.group(1) for k in sd for m in [re.match(prefix + r"\.resblocks\.(\d+)\.", k)] if m}
    )

  vw, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
  grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
  tw, vocab = sd["ln_final.weight"].shape[0], sd["token_embedding.weight"].shape[0]
  return CLIPConfig(
    projection_dim=int(sd["text_projection"].shape[1]),
    text_config=dict(
      vocab_size=int(vocab),
      hidden_size=int(tw),
      intermediate_size=int(4 * tw),
      num_hidden_layers=layers("transformer"),
      num_attention_heads=int(tw // 64),
      max_position_embeddings=int(sd["positional_embedding"].shape[0]),
      hidden_act="quick_gelu",
      layer_norm_eps=1e-5,
      bos_token_id=int(vocab - 2),
      eos_token_id=int(vocab - 1),
      pad_token_id=0,
    ),
    vision_config=dict(
      hidden_size=int(vw),
      intermediate_size=int(4 * vw),
      num_hidden_layers=layers("visual.transformer"),
      num_attention_heads=int(vw // 64),
      image_size=int(patch * grid),
      patch_size=int(patch),
      hidden_act="quick_gelu",
      layer_norm_eps=1e-5,
    ),
  )


def convert_openai_state_dict(sd: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
  """(transformers CLIPConfig, FlaxCLIPModel params) of an OpenAI CLIP ViT state dict."""
  config = _openai_config(sd)
  used = set()

  def get(k):
    if k not in sd:
      fail(f"OpenAI CLIP checkpoint lacks {k}")
    used.add(k)
    return np.asarray(sd[k], np.float32)

  def ln(k):
    return {"scale": get(k + ".weight"), "bias": get(k + ".bias")}

  def dense(k, bias=True):  # torch Linear [out, in] -> kernel [in, out]
    d = {"kernel": get(k + ".weight").T}
    if bias:
      d["bias"] = get(k + ".bias")
    return d

  def encoder(prefix, n):
    out = {}
    for i in range(n):
      p = f"{prefix}.resblocks.{i}"
      w, b = get(p + ".attn.in_proj_weight"), get(p + ".attn.in_proj_bias")
      ws, bs = np.split(w, 3), np.split(b, 3)  # q, k, v stacked along the output features
      attn = {f"{n}_proj": {"kernel": wi.T, "bias": bi} for n, wi, bi in zip("qkv", ws, bs)}
      out[str(i)] = {
        "self_attn": {**attn, "out_proj": dense(p + ".attn.out_proj")},
        "layer_norm1": ln(p + ".ln_1"),
        "layer_norm2": ln(p + ".ln_2"),
        "mlp": {"fc1": dense(p + ".mlp.c_fc"), "fc2": dense(p + ".mlp.c_proj")},
      }
    return {"layers": out}

  params = {
    "text_model": {
      "embeddings": {
        "token_embedding": {"embedding": get("token_embedding.weight")},
        "position_embedding": {"embedding": get("positional_embedding")},
      },
      "encoder": encoder("transformer", config.text_config.num_hidden_layers),
      "final_layer_norm": ln("ln_final"),
    },
    "vision_model": {
      "embeddings": {
        "class_embedding": get("visual.class_embedding"),
        "patch_embedding": {"kernel": get("visual.conv1.weight").transpose(2, 3, 1, 0)},
        "position_embedding": {"embedding": get("visual.positional_embedding")},
      },
      "pre_layrnorm": ln("visual.ln_pre"),
      "encoder": encoder("visual.transformer", config.vision_config.num_hidden_layers),
      "post_layernorm": ln("visual.ln_post"),
    },
    "visual_projection": {"kernel": get("visual.proj")},
    "text_projection": {"kernel": get("text_projection")},
    "logit_scale": get("logit_scale").reshape(()),
  }
  left = sorted(set(sd) - used - {"input_resolution", "context_length", "vocab_size"})
  if left:
    fail(f"OpenAI CLIP checkpoint has weights this conversion does not place: {left[:8]}")
  return config, params


def _init_shapes(model) -> Any:
  """The parameter tree a FlaxCLIPModel would initialise, as ShapeDtypeStructs (nothing
  allocated)."""
  return jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), model.input_shape))


def _check_shapes(model, params, what: str, expected: Any = None) -> None:
  expected = _init_shapes(model) if expected is None else expected
  got = jax.tree.map(lambda a: tuple(np.shape(a)), params)
  want = jax.tree.map(lambda a: tuple(a.shape), expected)
  if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
    fail(f"{what}: the converted parameters do not fit the inferred CLIP architecture")


def load(path: str) -> Clip:
  """A CLIP from a saved transformers directory or an OpenAI checkpoint file (see the module
  doc)."""
  from transformers import FlaxCLIPModel

  if path and os.path.isdir(path):
    model, params = _load_dir(path)
    return Clip(model, jax.tree.map(jnp.asarray, params), dir_sha256(path))
  obj = torch_legacy.load_weights(
    path,
    "CLIP",
    "give a directory with a saved transformers CLIP (save_pretrained) "
    "or OpenAI's ViT-B-32.pt (docs/paper_configuration.md)",
  )
  with torch_legacy.converting(path, "OpenAI CLIP checkpoint"):
    sd = torch_legacy.script_state_dict(obj) if isinstance(obj, dict) else {}
    config, params = convert_openai_state_dict(sd)
    model = FlaxCLIPModel(config, _do_init=False)
    _check_shapes(model, params, path)
  return Clip(model, jax.tree.map(jnp.asarray, params), files.sha256(path))


# Sane ranges of the architecture fields a transformers CLIP config.json
# declares (ViT-bigG is well inside).
_CONFIG_RANGES = {
  "vocab_size": (1, 1 << 20),
  "hidden_size": (1, 16384),
  "intermediate_size": (1, 1 << 16),
  "num_hidden_layers": (1, 128),
  "num_attention_heads": (1, 256),
  "max_position_embeddings": (1, 1 << 16),
  "image_size": (1, 4096),
  "patch_size": (1, 4096),
  "num_channels": (1, 16),
  "projection_dim": (1, 16384),
}
_WEIGHT_FILES = ("flax_model.msgpack", "model.safetensors")


def _load_dir(path: str) -> tuple[Any, dict]:
  """(FlaxCLIPModel, params) of a saved transformers directory, nothing initialised: config.json's
  sizes are checked against sane ranges and the parameters they declare against the weights
  file's size before the file is read; transformers then checks every array's shape."""
  from transformers import CLIPConfig, FlaxCLIPModel

  untrusted.check_directory(path)
  weights = next(
    (os.path.join(path, w) for w in _WEIGHT_FILES if os.path.isfile(os.path.join(path, w))), None
  )
  if weights is None:
    fail(
      f"{path} holds no {' or '.join(_WEIGHT_FILES)}: save the model with "
      "FlaxCLIPModel.save_pretrained, or give OpenAI's ViT-B-32.pt"
    )
  raw = untrusted.read_json(os.path.join(path, "config.json"))
  if not isinstance(raw, dict):
    fail(f"{path}/config.json is not a transformers CLIP config")
  for tower in ("text_config", "vision_config"):
    fields = {**raw, **raw.get(tower, {})} if isinstance(raw.get(tower, {}), dict) else None
    if fields is None:
      fail(f"{path}/config.json: {tower} is not an object")
    for name, (lo, hi) in _CONFIG_RANGES.items():
      value = fields.get(name)
      if value is not None and not (type(value) is int and lo <= value <= hi):
        fail(
          f"{path}/config.json: {tower}.{name} = {str(value)[:40]}; a CLIP has an integer "
          f"in [{lo}, {hi}] there"
        )
  with torch_legacy.converting(os.path.join(path, "config.json"), "transformers CLIP config"):
    model = FlaxCLIPModel(CLIPConfig.from_dict(raw), _do_init=False)
    expected = _init_shapes(model)
  declared = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(expected))
  size = os.path.getsize(weights)
  if declared > size + (1 << 20):
    fail(
      f"{path}/config.json declares {declared / 2**20:.1f} MiB of parameters but {weights} holds "
      f"{size / 2**20:.1f} MiB: the config is not the weights' (re-save the model)"
    )
  try:  # every file in `path` was checked to be regular above
    model, params = FlaxCLIPModel.from_pretrained(path, local_files_only=True, _do_init=False)
  except (OSError, ValueError, TypeError, KeyError, EnvironmentError) as e:
    fail(f"could not load a Flax CLIP model from {path} ({type(e).__name__}: {str(e)[:200]})")
  _check_shapes(model, params, path, expected)
  return model, params


def load_tokenizer(path: str, hint: str) -> Any:
  """The CLIPTokenizer saved in the local directory `path`, its files checked first
  (`untrusted.check_directory`); one line with `hint` (what to do) when there is none."""
  from transformers import CLIPTokenizer

  untrusted.check_directory(path)
  try:
    return CLIPTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError, TypeError, KeyError) as e:
    fail(f"no CLIP tokenizer in {path!r} ({type(e).__name__}: {str(e)[:200]}); {hint}")


def dir_sha256(path: str) -> str:
  """sha256 of the weights file in a saved transformers model directory."""
  entries = os.listdir(path)
  names = sorted(f for f in entries if f.endswith((".msgpack", ".safetensors", ".bin"))) or sorted(
    f for f in entries if f.endswith(".json")
  )
  return files.sha256(os.path.join(path, names[0])) if names else ""


def cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """[n_out, n_in] weights of torch's bicubic interpolation with align_corners=True (Keys'
  kernel with a = -0.75, border indices clamped): `F.interpolate(..., mode="bicubic",
  align_corners=True)` as kornia's resize calls it in the RDM retriever."""
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    x = i * scale
    x0 = int(np.floor(x))
    t = x - x0
    for j, d in zip(range(x0 - 1, x0 + 3), (1 + t, t, 1 - t, 2 - t)):
      d = abs(d)
      w = (
        ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
      )
      m[i, min(max(j, 0), n_in - 1)] += w
  return m.astype(np.float32)


def retriever_preprocess(images: jax.Array, size: int) -> jax.Array:
  """The RDM `ClipImageRetriever`: uint8 [B, H, W, 1|3] -> [-1, 1] -> bicubic resize to size x size
  (align_corners, no antialias) -> [0, 1] -> CLIP mean / std."""
  x = images.astype(jnp.float32) / 127.5 - 1.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  mh = jnp.asarray(cubic_matrix(x.shape[1], size))
  mw = jnp.asarray(cubic_matrix(x.shape[2], size))
  x = jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw, precision=jax.lax.Precision.HIGHEST)
  return ((x + 1.0) / 2.0 - CLIP_MEAN) / CLIP_STD
