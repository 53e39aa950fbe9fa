"""The Flax FID Inception against pytorch-fid's InceptionV3 on the same random weights.

pytorch-fid's constructor downloads its weights; the test stops that (the loaded state dict
is replaced by the random initialisation), randomises every BatchNorm statistic too, saves
the state dict with torch.save and converts it with our torch-free reader, as a user's
local pt_inception-2015-12-05-6726825d.pth would be.
"""

import numpy as np
import pytest
from tests.torch_references import reference

from rdm_jax.errors import UserError
from rdm_jax.metrics import extractors
from rdm_jax.models import inception_fid


@pytest.fixture(scope="module")
def torch_fid_model():
  """(pytorch-fid's InceptionV3 up to pool3, the Inception3 it is built from, with fc)."""
  import torch

  fid_inception = reference("pytorch_fid.inception")
  mp = pytest.MonkeyPatch()
  mp.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: None)
  mp.setattr(
    torch.nn.Module, "load_state_dict", lambda self, sd, *a, **k: None
  )  # no download, keep random
  try:
    full = fid_inception.fid_inception_v3()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
      for name, t in full.state_dict().items():
        if name.endswith("running_var"):
          t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif name.endswith(("running_mean", "bn.bias")):
          t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
        elif name.endswith("bn.weight"):
          t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.75)
    mp.setattr(
      fid_inception, "fid_inception_v3", lambda: full
    )  # InceptionV3 wraps these very layers
    model = fid_inception.InceptionV3(
      [3], resize_input=True, normalize_input=True, use_fid_inception=True
    )
  finally:
    mp.undo()
  # A deep random network forgets its input unless its BatchNorm statistics fit the activations:
  # set them to those of a calibration batch (cumulative average over one pass), then perturb them.
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.reset_running_stats()
      m.momentum = None
  with torch.no_grad():
    model.train()(torch.rand(8, 3, 64, 64, generator=gen))
    for name, t in full.state_dict().items():
      if name.endswith(("running_mean", "running_var")):
        t.mul_(1 + 0.05 * torch.randn(t.shape, generator=gen))
  return model.eval(), full.eval()


def test_features_and_logits_match_pytorch_fid(tmp_path, torch_fid_model):
  import torch

  model, full = torch_fid_model
  torch.save(full.state_dict(), tmp_path / "pt_inception.pth")
  params = inception_fid.load_params(str(tmp_path / "pt_inception.pth"))
  rng = np.random.default_rng(0)
  for shape in ((2, 28, 28, 1), (2, 320, 336, 3)):  # up- and down-sampling to 299
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    images[1] //= 3  # a darker second image: features must tell them apart
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    if shape[-1] == 1:
      x = x.repeat(1, 3, 1, 1)
    with torch.no_grad():
      pool3 = model(x)[0][:, :, 0, 0].numpy()
      logits = full.fc(torch.from_numpy(pool3)).numpy()
    feats, out_logits = inception_fid.FIDInceptionV3().apply(
      {"params": params}, inception_fid.preprocess(images)
    )
    scale = np.abs(pool3).max()
    assert (
      scale > 1e-2 and np.abs(pool3[0] - pool3[1]).mean() > 1e-2 * scale
    )  # a non-degenerate check
    np.testing.assert_allclose(np.asarray(feats), pool3, atol=1e-4 * scale, rtol=1e-4)
    np.testing.assert_allclose(
      np.asarray(out_logits), logits, atol=1e-4 * np.abs(logits).max(), rtol=1e-4
    )


def test_fid_extractor_sharded_matches_pytorch_fid(tmp_path, torch_fid_model):
  import torch

  model, full = torch_fid_model
  torch.save(full.state_dict(), tmp_path / "pt_inception.pth")
  ex = extractors.inception_v3_fid(
    str(tmp_path / "pt_inception.pth"), batch_size=8
  )  # 1 image per device
  images = np.random.default_rng(1).integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8)
  images[1] //= 3
  out = ex(images, log=None)
  x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2).repeat(1, 3, 1, 1)
  with torch.no_grad():
    pool3 = model(x)[0][:, :, 0, 0].numpy()
  np.testing.assert_allclose(out["features"], pool3, atol=1e-4 * np.abs(pool3).max(), rtol=1e-4)
  assert ex.name == "Inception" and ex.identity["name"] == "inception_v3_fid"


def test_clean_fid_resize_matches_clean_fid(tmp_path, torch_fid_model):
  import torch

  make_resizer = reference("cleanfid.resize").make_resizer
  resizer = make_resizer("PIL", False, "bicubic", (299, 299))
  images = np.random.default_rng(2).integers(0, 256, size=(2, 28, 28, 3), dtype=np.uint8)
  np.testing.assert_array_equal(
    extractors.clean_fid_resize(images), np.stack([resizer(im) for im in images])
  )
  model, full = torch_fid_model
  torch.save(full.state_dict(), tmp_path / "pt_inception.pth")
  out = extractors.inception_v3_fid(
    str(tmp_path / "pt_inception.pth"), batch_size=8, resize="clean"
  )(images, log=None)
  x = torch.from_numpy(np.stack([resizer(im) for im in images]) / 255.0).permute(0, 3, 1, 2).float()
  with (
    torch.no_grad()
  ):  # pytorch-fid's network on clean-resized inputs (its own resize is a no-op at 299)
    pool3 = model(x)[0][:, :, 0, 0].numpy()
  np.testing.assert_allclose(out["features"], pool3, atol=1e-4 * np.abs(pool3).max(), rtol=1e-4)


def test_load_params_refuses_missing_or_foreign_files(tmp_path):
  import torch

  with pytest.raises(UserError, match="download pytorch-fid"):
    inception_fid.load_params(str(tmp_path / "missing.pth"))
  torch.save({"fc.weight": torch.zeros(3, 2)}, tmp_path / "other.pth")
  with pytest.raises(UserError, match="not pytorch-fid's FID Inception"):
    inception_fid.load_params(str(tmp_path / "other.pth"))
