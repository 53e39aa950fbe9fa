"""The ImageNet chains' shared assets and commands: mock ImageNet through TFDS's mock
(tests/with_mock_tfds.py), a tiny random-weight VQ-f4 and CLIP saved in the original formats, and
the command lines a user types with size overrides."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from tests.conftest import REPO, subprocess_env

MOCK = os.path.join(REPO, "tests", "with_mock_tfds.py")
N_MOCK = 24  # examples in every mocked split


RARM_OVERRIDES = [  # configs/imagenet_rarm.py:mammals on the same tiny VQ (its tokens) and database
  "--config.first_stage.name=vq_f4",
  "--config.first_stage.latent_channels=3",
  "--config.dataset.label_range=()",
  "--config.model.heads=2",
  "--config.model.dim_head=16",
  "--config.model.depth=2",
  "--config.model.dtype=float32",
  "--config.sample.top_k=20",
  "--config.sample.condition=exemplar",
]  # (the preset's default, proposal, needs p_D of a neighbour run)


def overrides(root: str, rarm: bool = False) -> list[str]:
  """The size overrides of every job's command line (RDM, or the RARM preset's with `rarm`)."""
  from tests.taming_reference import TINY

  a = TINY["vq_f4"]
  model = (
    RARM_OVERRIDES
    if rarm
    else [
      "--config.model.model_channels=32",
      "--config.model.channel_mult=(1,2)",
      "--config.model.attention_resolutions=(2,)",
      "--config.model.num_res_blocks=1",
      "--config.model.dtype=float32",
    ]
  )
  return [
    f"--config.data_dir={root}/data",
    "--config.dataset.image_size=32",
    "--config.dataset.parts.train.stop=24",
    "--config.dataset.parts.test.stop=8",
    f"--config.dataset.parts.database.split=folder:{root}/openimages",
    "--config.dataset.folder.image_size=32",
    "--config.database_build.crops_per_image=4",
    "--config.database_build.crop_size=24",
    "--config.database_build.resize_to=0",
    f"--config.first_stage.weights={root}/vq-f4.ckpt",
    f"--config.first_stage.arch.ch={a['ch']}",
    "--config.first_stage.arch.ch_mult=(1,2,2)",
    f"--config.first_stage.arch.num_res_blocks={a['num_res_blocks']}",
    "--config.first_stage.arch.attn_resolutions=(0,)",
    f"--config.first_stage.arch.n_embed={a['n_embed']}",
    "--config.first_stage.arch.resolution=32",
    "--config.first_stage.batch_size=8",
    f"--config.retrieval.weights={root}/ViT-tiny.pt",
    "--config.retrieval.image_size=32",
    "--config.retrieval.embed_dim=48",
    "--config.retrieval.num_neighbors=8",
    "--config.retrieval.batch_size=8",
    "--config.retrieval.chunk_size=16",
    "--config.k_train=4",
    *model,
    "--config.train.batch_size=8",
    "--config.train.num_steps=2",
    "--config.train.checkpoint_every=2",
    "--config.train.log_every=1",
    "--config.train.sample_every=0",
    "--config.optim.warmup_steps=1",
    "--config.mesh.data=-1",
    "--config.mesh.fsdp=2",
    "--config.sample.num_images=8",
    "--config.sample.num_steps=3",
    "--config.sample.batch_size=8",
    "--config.eval.extractor=clip_image",
    f"--config.eval.weights={root}/ViT-tiny.pt",
    "--config.eval.image_size=32",
    "--config.eval.num_reference=24",
    "--config.eval.batch_size=8",
  ] + (
    [f"--config.data_dir={root}/data_rarm", f"--config.database={root}/data/database"]
    if rarm
    else []
  )


def run(root, module, *args, rarm=False):
  """Runs `module` as the user would, under TFDS's mock, and asserts it succeeded."""
  config = f"{REPO}/configs/imagenet_rarm.py:mammals" if rarm else f"{REPO}/configs/imagenet_rdm.py"
  cmd = [
    sys.executable,
    MOCK,
    str(N_MOCK),
    module,
    f"--config={config}",
    *overrides(root, rarm),
    *args,
  ]
  out = subprocess.run(cmd, env=subprocess_env(devices=8), capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, f"{module}: {out.stderr[-4000:]}"
  return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """(root, the PyTorch VQ, the TorchScript CLIP) of one module's chain."""
  import torch
  from PIL import Image
  from tests.taming_reference import TINY, TorchAutoencoder, save_lightning_ckpt
  from tests.torch_references import openai_clip_module

  root = tmp_path_factory.mktemp("imagenet_chain")
  vq = TorchAutoencoder("vq", TINY["vq_f4"], seed=7)
  save_lightning_ckpt(root / "vq-f4.ckpt", dict(vq.state_dict()))
  cm = openai_clip_module()
  torch.manual_seed(1)
  clip_model = (
    cm.CLIP(
      embed_dim=48,
      image_resolution=32,
      vision_layers=2,
      vision_width=128,
      vision_patch_size=8,
      context_length=16,
      vocab_size=100,
      transformer_width=128,
      transformer_heads=2,
      transformer_layers=2,
    )
    .float()
    .eval()
  )
  torch.jit.trace(
    clip_model, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.long))
  ).save(str(root / "ViT-tiny.pt"))
  rng = np.random.default_rng(0)
  for i in range(6):  # the "OpenImages" folder: 6 images, 4 crops each = 24 database entries
    sub = root / "openimages" / ("a" if i < 3 else "b")
    sub.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)).save(
      sub / f"{i}.jpg", quality=95
    )
  return str(root), vq, clip_model


def mock_images(split, n, size):
  """The first n mocked images of imagenet2012/split: their stored (encoded) bytes read through
  TFDS, decoded by TensorFlow (libjpeg builds differ by a grey level or two) and resized by hand
  (shorter side to size, PIL bicubic, centre crop)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  from PIL import Image

  out = []
  with tfds.testing.mock_data(num_examples=N_MOCK):
    ds = tfds.builder("imagenet2012").as_dataset(
      split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    for ex in list(tfds.as_numpy(ds))[:n]:
      im = Image.fromarray(tf.io.decode_image(ex["image"], channels=3).numpy())
      w, h = im.size
      s = size / min(w, h)
      nw, nh = max(size, round(w * s)), max(size, round(h * s))
      im = im.resize((nw, nh), Image.Resampling.BICUBIC)
      left, top = (nw - size) // 2, (nh - size) // 2
      out.append(np.asarray(im.crop((left, top, left + size, top + size))))
  return np.stack(out)


def config_of(root: str, rarm: bool = False):
  """The config the jobs run with: the file's, with the overrides applied as --config.a.b=value."""
  from rdm_jax.config_base import with_overrides
  from tests.conftest import repo_config

  return with_overrides(
    repo_config("imagenet_rarm", "mammals") if rarm else repo_config("imagenet_rdm"),
    overrides(root, rarm),
  )
