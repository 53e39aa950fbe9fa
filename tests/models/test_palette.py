"""The demo's palette tokenizer (rdm_jax/models/palette.py) on hand-worked images."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import config_section

from rdm_jax.errors import UserError
from rdm_jax.models import first_stage, palette


def _cfg(path="", k=3, f=2):
  return config_section(
    "first_stage",
    name="palette",
    pad_to=0,
    latent_channels=1,
    weights=str(path),
    palette_size=k,
    palette_factor=f,
  )


def test_pooling_fitting_encoding_and_decoding_by_hand(tmp_path):
  levels = np.array([0, 128, 255], np.uint8)  # -1, ~0, 1 in unit space
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 3, (6, 4, 4))  # 6 images of 4 x 4 blocks
  images = levels[blocks].repeat(2, 1).repeat(2, 2)[..., None]  # 8 x 8, constant 2 x 2 blocks
  np.testing.assert_allclose(
    palette.pooled(images, 2)[0, 0, 0, 0], levels[blocks[0, 0, 0]] / 127.5 - 1
  )
  cfg = _cfg(tmp_path / "p.npy")
  colours = palette.fit(images, cfg)
  np.testing.assert_allclose(
    np.sort(colours[:, 0]), levels / 127.5 - 1, atol=1e-6
  )  # k-means finds the 3 levels
  palette.save(cfg.weights, colours)
  tokens = first_stage.encode_tokens(cfg, images)
  assert tokens.shape == (6, 16) and tokens.dtype == np.int32
  np.testing.assert_allclose(
    colours[tokens.reshape(6, 4, 4), 0], levels[blocks] / 127.5 - 1, atol=1e-6
  )
  np.testing.assert_array_equal(
    first_stage.decode(cfg, tokens, (8, 8)), images
  )  # round trip, exactly
  assert first_stage.identity(cfg)["palette_sha256"]
  # a mixed block goes to the nearest colour: mean of (0, 0, 255, 255) = 127.5 -> the middle level
  mixed = np.array([[0, 255], [0, 255]], np.uint8).reshape(1, 2, 2, 1)
  assert int(first_stage.encode_tokens(cfg, mixed)[0, 0]) == int(
    np.argmin(np.abs(colours[:, 0] - 0))
  )


def test_bad_palettes_and_tokens_are_one_line(tmp_path):
  cfg = _cfg(tmp_path / "p.npy")
  with pytest.raises(UserError, match="not found: the encode job fits it"):
    first_stage.encode_tokens(cfg, np.zeros((1, 4, 4, 1), np.uint8))
  np.save(tmp_path / "p.npy", np.zeros((5, 1), np.float32))
  with pytest.raises(
    UserError, match=r"holds float32\[5, 1\]; a palette of config.first_stage is float32 \[3, 1\]"
  ):
    first_stage.encode_tokens(cfg, np.zeros((1, 4, 4, 1), np.uint8))
  np.save(tmp_path / "p.npy", np.zeros((3, 1), np.float32))
  with pytest.raises(UserError, match=r"token ids must lie in \[0, 3\)"):
    first_stage.decode(cfg, np.array([[0, 1, 2, 3]], np.int32), (4, 4))
  with pytest.raises(UserError, match="do not split into 2x2 blocks"):
    first_stage.encode_tokens(cfg, np.zeros((1, 5, 4, 1), np.uint8))
