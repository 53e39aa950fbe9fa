"""CLIP as the retrieval encoder, converted from OpenAI's checkpoint format, against OpenAI's
own model code on random weights.

Reference: `clip/model.py` of the PyPI package clip-anytorch (OpenAI's CLIP code, installed
--no-deps; loaded as a file because its package __init__ needs pkg_resources), a tiny ViT CLIP
with random weights saved both as a TorchScript archive (`torch.jit.trace(...).save`, the
format of OpenAI's ViT-B-32.pt) and as a plain state dict; the RDM retriever's preprocessing
(`rdm/modules/retrievers.py` ClipImageRetriever: kornia's bicubic resize with align_corners,
which is torch's `F.interpolate`) written with torch.
"""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.conftest import config_section  # noqa: E402
from tests.torch_references import openai_clip_module  # noqa: E402

from rdm_jax.data import store  # noqa: E402
from rdm_jax.errors import UserError  # noqa: E402
from rdm_jax.models import clip  # noqa: E402
from rdm_jax.retrieval import encoders  # noqa: E402

VOCAB, CONTEXT, SIZE = 100, 16, 32


@pytest.fixture(scope="module")
def openai(tmp_path_factory):
  """A tiny OpenAI CLIP (widths 128: two heads of 64, as build_model infers them) with random
  weights, saved as a TorchScript archive and as a plain state dict."""
  cm = openai_clip_module()
  torch.manual_seed(0)
  model = (
    cm.CLIP(
      embed_dim=48,
      image_resolution=SIZE,
      vision_layers=2,
      vision_width=128,
      vision_patch_size=8,
      context_length=CONTEXT,
      vocab_size=VOCAB,
      transformer_width=128,
      transformer_heads=2,
      transformer_layers=2,
    )
    .float()
    .eval()
  )
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(
        ("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")
      ):
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif p.ndim == 1 or name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("openai")
  jit_path, sd_path = str(path / "ViT-tiny.pt"), str(path / "state_dict.pt")
  torch.jit.trace(
    model, (torch.zeros(1, 3, SIZE, SIZE), torch.zeros(1, CONTEXT, dtype=torch.long))
  ).save(jit_path)
  torch.save(model.state_dict(), sd_path)
  return model, jit_path, sd_path


def tokens(rng, n):
  ids = np.zeros((n, CONTEXT), np.int64)
  for i in range(n):
    length = rng.integers(2, CONTEXT)  # start, words, end-of-text (the largest id), then zeros
    ids[i, 0] = VOCAB - 2
    ids[i, 1 : length - 1] = rng.integers(1, VOCAB - 2, size=length - 2)
    ids[i, length - 1] = VOCAB - 1
  return ids


@pytest.mark.parametrize("fmt", ["jit", "state_dict"])
def test_converted_image_and_text_features_match_openai_clip(openai, fmt):
  import jax.numpy as jnp

  model, jit_path, sd_path = openai
  c = clip.load(jit_path if fmt == "jit" else sd_path)
  assert c.image_size == SIZE and c.embed_dim == 48
  rng = np.random.default_rng(1)
  pixels = rng.normal(size=(3, SIZE, SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    want = model.encode_image(torch.as_tensor(pixels.transpose(0, 3, 1, 2))).numpy()
  got = np.asarray(c.image_features(c.params, jnp.asarray(pixels)))
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
  ids = tokens(rng, 4)
  with torch.no_grad():
    want_t = model.encode_text(torch.as_tensor(ids)).numpy()
  got_t = np.asarray(c.text_features(c.params, jnp.asarray(ids, jnp.int32)))
  np.testing.assert_allclose(got_t, want_t, atol=1e-4 * np.abs(want_t).max(), rtol=0)


def test_retriever_preprocessing_is_torch_bicubic_with_align_corners():
  import jax.numpy as jnp
  import torch.nn.functional as F

  rng = np.random.default_rng(2)
  for shape in ((2, 28, 28, 1), (2, 75, 50, 3)):  # upscaling grey, downscaling a non-square image
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    x = (
      torch.as_tensor(images.astype(np.float32) / 127.5 - 1)
      .permute(0, 3, 1, 2)
      .expand(-1, 3, -1, -1)
    )
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", align_corners=True)
    x = ((x + 1) / 2 - torch.as_tensor(clip.CLIP_MEAN)[:, None, None]) / torch.as_tensor(
      clip.CLIP_STD
    )[:, None, None]
    got = np.asarray(clip.retriever_preprocess(jnp.asarray(images), SIZE))
    np.testing.assert_allclose(got, x.permute(0, 2, 3, 1).numpy(), atol=2e-5)


def retrieval_config(weights, **kw):
  c = config_section(
    "retrieval",
    encoder="clip_vit_b32",
    weights=weights,
    image_size=SIZE,
    embed_dim=48,
    batch_size=8,
  )
  c.update(kw)
  return c


def test_clip_retrieval_encoder_embeds_uint8_images_as_the_rdm_retriever(openai):
  import torch.nn.functional as F

  model, jit_path, _ = openai
  cfg = retrieval_config(jit_path)
  images = np.random.default_rng(3).integers(0, 256, size=(11, 40, 40, 3), dtype=np.uint8)
  got = encoders.make_encoder(cfg)(images)  # 11 = 8 + 3: the last batch is padded
  x = torch.as_tensor(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
  x = (F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", align_corners=True) + 1) / 2
  x = (x - torch.as_tensor(clip.CLIP_MEAN)[:, None, None]) / torch.as_tensor(clip.CLIP_STD)[
    :, None, None
  ]
  with torch.no_grad():
    want = model.encode_image(x).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
  identity = encoders.encoder_identity(cfg)
  assert identity["name"] == "clip_vit_b32" and identity["embed_dim"] == 48
  assert identity["weights_sha256"] == store.file_sha256(jit_path)
  ids = tokens(np.random.default_rng(4), 2)
  with torch.no_grad():
    want_t = model.encode_text(torch.as_tensor(ids)).numpy()
  np.testing.assert_allclose(
    encoders.make_text_encoder(cfg)(ids), want_t, atol=1e-4 * np.abs(want_t).max()
  )


def test_clip_settings_and_files_that_do_not_fit_are_one_line(openai, tmp_path):
  _, jit_path, _ = openai
  with pytest.raises(UserError, match="set image_size=32"):
    encoders.encoder_identity(retrieval_config(jit_path, image_size=224))
  with pytest.raises(UserError, match="embeds to 48"):
    encoders.make_encoder(retrieval_config(jit_path, embed_dim=512))
  with pytest.raises(UserError, match="ViT-B-32.pt"):
    clip.load(str(tmp_path / "missing.pt"))
  torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
  with pytest.raises(UserError, match="not an OpenAI CLIP ViT checkpoint"):
    clip.load(str(tmp_path / "other.pt"))
  with pytest.raises(UserError, match="has no text tower"):
    encoders.make_text_encoder(
      config_section(
        "retrieval",
        encoder="efficientnet_lite0",
        weights="",
        image_size=32,
        embed_dim=1280,
        batch_size=8,
      )
    )
