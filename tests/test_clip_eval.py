"""CLIP features for CLIP-FID and the CLIP score, on a tiny random CLIP saved to a local directory.

References: clean-fid's `img_preprocess_clip` (its six lines, written out below with the same
torchvision transforms: importing clean-fid's module needs OpenAI's `clip` package), and
transformers' FlaxCLIPModel called directly.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tests.conftest import REPO, subprocess_env
from tests.torch_references import reference

from rdm_jax import metrics
from rdm_jax.errors import UserError
from rdm_jax.metrics import extractors


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  """A random CLIP (32 px images, 16-d projections) and a byte-level tokenizer, saved to a dir."""
  from transformers import CLIPConfig, CLIPTokenizer, FlaxCLIPModel
  from transformers.models.clip.tokenization_clip import bytes_to_unicode

  path = tmp_path_factory.mktemp("clip")
  chars = list(bytes_to_unicode().values())
  vocab = {
    t: i
    for i, t in enumerate(
      chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    )
  }
  (path / "vocab.json").write_text(json.dumps(vocab))
  (path / "merges.txt").write_text("#version: 0.2\n")
  CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(str(path))
  config = CLIPConfig(
    text_config=dict(
      vocab_size=len(vocab),
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=77,
      eos_token_id=vocab["<|endoftext|>"],
    ),
    vision_config=dict(
      image_size=32,
      patch_size=8,
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=2,
      num_attention_heads=2,
    ),
    projection_dim=16,
  )
  FlaxCLIPModel(config, seed=0).save_pretrained(str(path))
  return str(path)


def clean_fid_clip_preprocess(img_np, size):
  """cleanfid.clip_features.img_preprocess_clip, with the model's input size."""
  from PIL import Image

  reference("torch_fidelity")  # makes torchvision importable on CPU-only torch
  import torchvision.transforms as transforms

  x = Image.fromarray(img_np.astype(np.uint8)).convert("RGB")
  t = transforms.Compose(
    [
      transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
      transforms.CenterCrop(size),
    ]
  )
  return np.asarray(t(x)).clip(0, 255).astype(np.uint8)


def test_clip_image_features_follow_clean_fid_preprocessing(tiny_clip):
  import jax.numpy as jnp
  from transformers import FlaxCLIPModel

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(5, 28, 40, 3), dtype=np.uint8)  # not square: resize + crop
  want_pixels = np.stack([clean_fid_clip_preprocess(im, 32) for im in images])
  np.testing.assert_array_equal(extractors.clip_resize_crop(images, 32), want_pixels)
  grey = rng.integers(0, 256, size=(2, 28, 28, 1), dtype=np.uint8)
  np.testing.assert_array_equal(
    extractors.clip_resize_crop(grey, 32),
    np.stack([clean_fid_clip_preprocess(im[..., 0], 32) for im in grey]),
  )
  model = FlaxCLIPModel.from_pretrained(tiny_clip, local_files_only=True)
  x = (want_pixels / 255.0 - extractors.CLIP_MEAN) / extractors.CLIP_STD
  want = np.asarray(model.get_image_features(jnp.asarray(x.transpose(0, 3, 1, 2), jnp.float32)))
  got = extractors.clip_image(tiny_clip, batch_size=8)(images, log=None)  # sharded over 8 devices
  np.testing.assert_allclose(got["features"], want, rtol=1e-4, atol=1e-5)
  assert got["logits"].shape == (5, 0)


def torch_clip(path):
  """transformers' PyTorch CLIPModel and tokenizer on the same saved weights (the reference)."""
  reference("torch")
  from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, FlaxCLIPModel
  from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

  model = CLIPModel(CLIPConfig.from_pretrained(path, local_files_only=True))
  flax_params = FlaxCLIPModel.from_pretrained(path, local_files_only=True).params
  return load_flax_weights_in_pytorch_model(
    model, flax_params
  ).eval(), CLIPTokenizer.from_pretrained(path, local_files_only=True)


def torch_text_features(model, tok, captions):
  """Padded only to the longest caption (ours pads to 77 positions): padding must not matter."""
  import torch

  t = tok(list(captions), padding=True, return_tensors="pt")
  with torch.no_grad():
    return model.get_text_features(**t).numpy()


def torch_clip_score(model, tok, images, captions):
  """clean-fid pixels -> PyTorch image features; cosine with the PyTorch text features, averaged."""
  import torch

  pixels = np.stack(
    [clean_fid_clip_preprocess(im.squeeze(-1) if im.shape[-1] == 1 else im, 32) for im in images]
  )
  from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

  x = torch.from_numpy(
    ((pixels / 255.0 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)).transpose(
      0, 3, 1, 2
    )
  ).float()
  with torch.no_grad():
    img = model.get_image_features(pixel_values=x)
  txt = torch.from_numpy(torch_text_features(model, tok, captions))
  return float(torch.nn.functional.cosine_similarity(img, txt, dim=1).mean())


def test_clip_score_hand_worked_and_text_features(tiny_clip):
  a = np.array([[1.0, 0.0], [0.0, 2.0]])
  b = np.array([[1.0, 1.0], [0.0, 3.0]])
  assert metrics.clip_score(a, b) == pytest.approx((1 / np.sqrt(2) + 1) / 2)
  with pytest.raises(UserError, match="pair up"):
    metrics.clip_score(a, b[:1])
  captions = ["a shirt", "a shoe", "a long-sleeved shirt with buttons", "a shirt"]
  t = extractors.clip_text_features(tiny_clip, captions, batch_size=3)  # two batches
  model, tok = torch_clip(tiny_clip)
  want = torch_text_features(model, tok, captions)
  assert t.shape == (4, 16)
  np.testing.assert_allclose(t, want, rtol=1e-4, atol=1e-5)


def test_evaluate_with_clip_and_captions(tmp_path, tiny_clip):
  rng = np.random.default_rng(1)
  np.savez(tmp_path / "ref.npz", images=rng.integers(0, 256, size=(40, 28, 28, 1), dtype=np.uint8))
  np.savez(
    tmp_path / "text.npz",
    images=rng.integers(0, 256, size=(30, 28, 28, 1), dtype=np.uint8),
    captions=np.array(["a shirt"] * 15 + ["a bag"] * 15),
    condition=np.asarray("text"),
  )
  cmd = [
    sys.executable,
    "-m",
    "rdm_jax.evaluate",
    f"--config={os.path.join(REPO, 'configs', 'fashion_mnist_rdm.py')}",
    f"--config.data_dir={tmp_path}/data",
    "--config.eval.extractor=clip_image",
    f"--config.eval.weights={tiny_clip}",
    "--config.eval.baseline_part=",
    "--config.eval.kid_subsets=3",
    f"--samples={tmp_path}/text.npz",
    f"--config.eval.reference={tmp_path}/ref.npz",
    f"--out={tmp_path}/eval",
  ]
  out = subprocess.run(
    cmd, env=subprocess_env(devices=2), capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "CLIP-FID" in out.stdout and "CLIP score (cosine)" in out.stdout
  row = json.load(open(tmp_path / "eval" / "metrics.json"))["sets"]["text"]
  assert "is_mean" not in row  # CLIP has no class logits
  text = np.load(tmp_path / "text.npz")
  want = torch_clip_score(*torch_clip(tiny_clip), text["images"], text["captions"])
  assert row["clip_score"] == pytest.approx(want, abs=1e-5)


def test_text_conditioning_is_the_caption_then_its_nearest_database_entries(tiny_clip, tmp_path):
  """condition=text: context row 0 is the caption's CLIP text embedding (transformers' FlaxCLIPModel
  and tokenizer called directly), rows 1..k-1 the database entries nearest to it by cosine
  (numpy brute force); the captions travel with the conditioning."""
  from transformers import CLIPTokenizer, FlaxCLIPModel

  from rdm_jax import conditioning, config_base
  from rdm_jax.data import store
  from rdm_jax.retrieval import encoders

  c = config_base.base_config()
  c.update(
    dict(
      data_dir=str(tmp_path),
      database=str(tmp_path / "database"),
      retrieval=dict(
        encoder="clip_vit_b32",
        weights=tiny_clip,
        tokenizer="",
        image_size=32,
        embed_dim=16,
        batch_size=8,
        index=dict(path=""),
      ),
      sample=dict(text_mode="caption_and_neighbors"),
      dataset=dict(name="synthetic"),
    )
  )
  db = np.random.default_rng(0).normal(size=(30, 16)).astype(np.float32)
  store.write(
    c.database,
    "database",
    {"embeddings": db, "ids": np.arange(30), "labels": np.zeros(30, np.int32)},
    encoder=encoders.encoder_identity(c.retrieval),
    source={"dataset": "synthetic"},
  )
  prompts = ["a red dress", "two cats on a mat"]
  cond = conditioning.text_conditioning(c, prompts, k=3)
  model = FlaxCLIPModel.from_pretrained(tiny_clip)
  tok = CLIPTokenizer.from_pretrained(tiny_clip)(
    prompts, padding="max_length", max_length=77, return_tensors="np"
  )
  want = np.asarray(model.get_text_features(tok["input_ids"], attention_mask=tok["attention_mask"]))
  np.testing.assert_allclose(cond.context[:, 0], want, rtol=1e-5, atol=1e-6)
  unit = db / np.linalg.norm(db, axis=1, keepdims=True)
  q = want / np.linalg.norm(want, axis=1, keepdims=True)
  nearest = np.argsort(-(q @ unit.T), axis=1)[:, :2]
  np.testing.assert_array_equal(cond.neighbor_rows[:, 1:], nearest)
  np.testing.assert_array_equal(cond.neighbor_rows[:, 0], [-1, -1])
  np.testing.assert_allclose(cond.context[:, 1:], db[nearest])
  assert list(cond.captions) == prompts
  alone = conditioning.text_conditioning(
    c, prompts, k=3, mode="caption"
  )  # (i) the text embedding alone
  assert alone.context.shape == (2, 1, 16) and (alone.neighbor_rows == -1).all()
  np.testing.assert_allclose(alone.context[:, 0], want, rtol=1e-5, atol=1e-6)
  only = conditioning.text_conditioning(
    c, prompts, k=3, mode="neighbors"
  )  # (iii) its k neighbours alone
  np.testing.assert_array_equal(only.neighbor_rows, np.argsort(-(q @ unit.T), axis=1)[:, :3])
  # class pools from the prompt template (Sec. 3.3): the l entries nearest to "An image of a {c}."
  c.sample.update(dict(classes="cat,dog", class_pool_size=5, class_prompt="An image of a {}."))
  cls = conditioning.class_conditioning(c, 6, 2, np.random.default_rng(0))
  tok = CLIPTokenizer.from_pretrained(tiny_clip)(
    ["An image of a cat.", "An image of a dog."],
    padding="max_length",
    max_length=77,
    return_tensors="np",
  )
  t = np.asarray(model.get_text_features(tok["input_ids"], attention_mask=tok["attention_mask"]))
  pools = np.argsort(-((t / np.linalg.norm(t, axis=1, keepdims=True)) @ unit.T), axis=1)[:, :5]
  np.testing.assert_array_equal(cls.query_rows, [0, 1, 0, 1, 0, 1])
  for i, rows in enumerate(cls.neighbor_rows):  # k adjacent entries of the class's pool
    pool = list(pools[i % 2])
    start = pool.index(rows[0])
    assert list(rows) == pool[start : start + 2]
  assert list(cls.captions) == ["An image of a cat.", "An image of a dog."] * 3
  # Fig. 10's reading: the prompt's text embedding, then k-1 adjacent entries of the same pool;
  # labels name the classes through the dataset's names ("1" is "dog") and stay the query rows
  c.dataset.class_names = ("cat", "dog")
  c.sample.update(dict(classes="1,0", class_context="prompt_and_pool"))
  fig10 = conditioning.class_conditioning(c, 4, 3, np.random.default_rng(0))
  np.testing.assert_array_equal(fig10.query_rows, [1, 0, 1, 0])
  np.testing.assert_array_equal(fig10.neighbor_rows[:, 0], -1)
  np.testing.assert_allclose(fig10.context[:, 0], t[[1, 0, 1, 0]], rtol=1e-5, atol=1e-6)
  for i, rows in enumerate(fig10.neighbor_rows[:, 1:]):
    pool = list(pools[[1, 0][i % 2]])
    assert list(rows) == pool[pool.index(rows[0]) : pool.index(rows[0]) + 2]
  np.testing.assert_allclose(fig10.context[:, 1:], db[fig10.neighbor_rows[:, 1:]])
  assert list(fig10.captions) == ["An image of a dog.", "An image of a cat."] * 2
  c.sample.update(dict(classes="2"))
  with pytest.raises(UserError, match="the dataset names 2 classes"):
    conditioning.class_conditioning(c, 4, 3, np.random.default_rng(0))
  c.sample.update(dict(classes="cat", class_prompt=""))
  with pytest.raises(UserError, match="prompt_and_pool' puts the class prompt"):
    conditioning.class_conditioning(c, 4, 3, np.random.default_rng(0))
  with pytest.raises(UserError, match="text_mode"):
    conditioning.text_conditioning(c, prompts, k=3, mode="both")
