"""The paper's ImageNet configuration end to end, offline: `configs/imagenet_rdm.py` with size
overrides runs encode -> embed (the database as random crops of an image folder) -> index ->
neighbours -> train (8 fake devices, fsdp=2) -> sample -> evaluate, from the command lines a
user types, with TFDS's mock standing in for imagenet2012 (tests/with_mock_tfds.py) and tiny
random-weight VQ-f4 and CLIP converted through the same converters from PyTorch references
(a Lightning .ckpt of taming's modules; a TorchScript archive of OpenAI's CLIP).

Checked against independent references: the latents store against the PyTorch VQ-f4 encoder
applied to the same mock images (read back through TFDS directly, resized by hand with PIL),
and the database entries against OpenAI's CLIP on the crops cut by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from tests.conftest import REPO, subprocess_env

torch = pytest.importorskip("torch")
pytest.importorskip("taming.modules.diffusionmodules.model")

from tests.chains.conftest import MOCK, N_MOCK, config_of, mock_images, overrides, run  # noqa: E402
from tests.taming_reference import nhwc, save_lightning_ckpt  # noqa: E402

from rdm_jax.data import store  # noqa: E402
from rdm_jax.models import factory  # noqa: E402


@pytest.mark.slow  # CI's budget: see docs/development.md, Tests
def test_the_imagenet_config_runs_end_to_end_on_mock_imagenet(assets):
  root, vq, clip_model = assets
  data = f"{root}/data"
  run(root, "rdm_jax.jobs.encode")
  latents = store.read(f"{data}/latents_train", "latents", hint="")
  images = mock_images("train", 24, 32)
  with torch.no_grad():
    want = vq.encode(torch.as_tensor(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2))
  assert latents["latents"].shape == (24, 8, 8, 3)
  np.testing.assert_allclose(
    latents["latents"], nhwc(want), atol=1e-4 * float(np.abs(nhwc(want)).max())
  )
  assert latents.manifest["source"]["images_from"] == "tfds"
  assert (
    latents.manifest["first_stage"]["name"] == "vq_f4"
    and latents.manifest["first_stage"]["weights_sha256"]
  )

  run(root, "rdm_jax.jobs.embed")
  db = store.read(f"{data}/database", "database", hint="")
  assert db["embeddings"].dtype == np.float16 and db["embeddings"].shape == (24, 48)
  assert db.manifest["encoder"]["name"] == "clip_vit_b32"
  from PIL import Image

  files = sorted(f"{d}/{f}" for d in ("a", "b") for f in os.listdir(f"{root}/openimages/{d}"))
  row = 9  # image 2, its second crop
  x0, y0, x1, y1 = db["boxes"][row]
  crop = np.asarray(Image.open(f"{root}/openimages/{files[db['ids'][row]]}").convert("RGB"))[
    y0:y1, x0:x1
  ]
  x = torch.as_tensor(crop[None].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
  x = (
    torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=True) + 1
  ) / 2
  from rdm_jax.models import clip

  x = (x - torch.as_tensor(clip.CLIP_MEAN)[:, None, None]) / torch.as_tensor(clip.CLIP_STD)[
    :, None, None
  ]
  with torch.no_grad():
    ref = clip_model.encode_image(x).numpy()[0]
  np.testing.assert_allclose(
    db["embeddings"][row].astype(np.float32), ref, atol=2e-3 * np.abs(ref).max()
  )

  run(root, "rdm_jax.jobs.index")
  run(root, "rdm_jax.jobs.neighbors")
  nb = store.read(f"{data}/neighbors_train", "neighbors", hint="")
  assert nb["neighbor_ids"].shape == (24, 8)
  run(root, "rdm_jax.train", f"--workdir={root}/run")
  out = run(root, "rdm_jax.sample", f"--workdir={root}/run")
  shards = [f for f in os.listdir(f"{root}/run/samples/exemplar") if f.startswith("shard-")]
  assert shards, out.stderr[-2000:]
  with np.load(f"{root}/run/samples/exemplar/{shards[0]}") as z:
    assert z["images"].shape == (8, 32, 32, 3) and z["images"].dtype == np.uint8
  run(root, "rdm_jax.evaluate", f"--workdir={root}/run")
  assert os.path.exists(f"{root}/run/eval/metrics.md")

  # A published RDM checkpoint: this run's UNet (raw weights and EMA) written in the original's
  # Lightning format, keys as openaimodel.UNetModel names them (diffusers' LDM converter agrees:
  # test_unet_diffusers.py), with its first stage and noise schedule, imports and samples the
  # same images as the run itself.
  _export_in_the_original_format(root, vq, f"{root}/rdm.ckpt")
  out = run(
    root,
    "rdm_jax.jobs.import_checkpoint",
    f"--checkpoint={root}/rdm.ckpt",
    f"--workdir={root}/imported",
  )
  assert "step 1000, EMA and raw weights" in out.stdout, out.stdout
  run(root, "rdm_jax.sample", f"--workdir={root}/imported")
  for shard in shards:
    with (
      np.load(f"{root}/run/samples/exemplar/{shard}") as a,
      np.load(f"{root}/imported/samples/exemplar/{shard}") as b,
    ):
      np.testing.assert_array_equal(a["images"], b["images"])
  # another schedule or UNet than the config's: one line, and nothing written
  for bad, says in (
    ("--config.diffusion.beta_end=0.02", "another noise schedule"),
    ("--config.model.model_channels=64", "its UNet is not config.model's"),
  ):
    cmd = [
      sys.executable,
      MOCK,
      str(N_MOCK),
      "rdm_jax.jobs.import_checkpoint",
      f"--config={REPO}/configs/imagenet_rdm.py",
      *overrides(root),
      bad,
      f"--checkpoint={root}/rdm.ckpt",
      f"--workdir={root}/refused",
    ]
    out = subprocess.run(
      cmd, env=subprocess_env(devices=8), capture_output=True, text=True, cwd=REPO
    )
    assert (
      out.returncode == 2 and says in out.stderr and len(out.stderr.strip().splitlines()) == 1
    ), out.stderr
    assert not os.path.exists(f"{root}/refused")


def _export_in_the_original_format(root: str, vq, path: str) -> None:
  """The trained run as the original's model.ckpt: model.diffusion_model.* (here 2x the EMA, so that
  importing the raw weights instead of the EMA would sample other images), model_ema.* (LitEma's
  dot-less names), first_stage_model.*, and the DDPM's betas buffer
  (float32, as LDM registers it)."""
  from rdm_jax import checkpoint
  from rdm_jax.models import torch_convert, unet

  config = config_of(root)
  model, ema, _, _ = checkpoint.load_trained(config, f"{root}/run")
  names = unet.ldm_names(model, ema)
  sd = {}
  for key, value in torch_convert.to_torch(ema, names).items():
    sd["model.diffusion_model." + key] = torch.from_numpy(2 * np.array(value))
    sd["model_ema.diffusion_model" + key.replace(".", "")] = torch.from_numpy(np.array(value))
  sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(2)})
  sd.update({"first_stage_model." + k: v for k, v in vq.state_dict().items()})
  sd["betas"] = torch.tensor(np.asarray(factory.make_schedule(config).betas), dtype=torch.float32)
  save_lightning_ckpt(path, sd)
