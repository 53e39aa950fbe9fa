"""Importing the original's RARM checkpoint (rdm_jax/jobs/import_checkpoint.py,
configs/imagenet_rarm.py:
<subset>,released) against an independent PyTorch reference of the original model.

The reference is the original's LatentImageRETRO as its state dict names it: `transformer` is
RetrievalPatchTransformer(continuous=False, positional_encodings=True, causal=True,
cross_attend=True) transcribed from rdm/modules/attention.py:199-272 (nn.Embedding proj_in, the
[inner, S] positional_encoding parameter added in [b, c, t] layout, Conv1d
proj_out), its blocks diffusers'
BasicTransformerBlock (the same parameter names as ldm's: attn1/attn2 to_q/to_k/to_v/to_out.0,
ff.net.0.proj, ff.net.2, norm1..3) with an additive causal mask on the self-attention;
`first_stage_model` is taming's VQGAN (its Encoder, Decoder and VectorQuantizer2), and the
`sos_token` / `mask_token` buffers. Tokens are drawn as the original's `sample` draws them greedily
(transformer.py:223-265: the whole prefix rerun for every token, top-k 1), in float64.
"""

from __future__ import annotations

import json
import os

import ml_collections as mlc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("taming.modules.diffusionmodules.model")

from tests.conftest import repo_config  # noqa: E402

from tests.taming_reference import (  # noqa: E402
  TINY,
  TorchAutoencoder,
  nhwc,
  save_lightning_ckpt,
)
from tests.torch_references import reference  # noqa: E402

from rdm_jax.errors import UserError  # noqa: E402

ARCH = TINY["vqgan_f16"]  # 32 px images -> 4 x 4 tokens of 64 codes
CODES, SEQ = ARCH["n_embed"], (32 // 8) ** 2
HEADS, DIM_HEAD, DEPTH, CONTEXT, K = (
  2,
  8,
  2,
  1280,
  4,
)  # context: EfficientNet-Lite0's 1280-d embeddings


class RetrievalPatchTransformer(torch.nn.Module):
  """The original's transformer (rdm/modules/attention.py:199-272) for discrete tokens."""

  def __init__(self):
    super().__init__()
    attention = reference("diffusers.models.attention")
    inner = HEADS * DIM_HEAD
    self.proj_in = torch.nn.Embedding(CODES + 2, inner)
    self.positional_encoding = torch.nn.Parameter(torch.randn(inner, SEQ) / inner**0.5)
    self.transformer_blocks = torch.nn.ModuleList(
      attention.BasicTransformerBlock(
        inner,
        HEADS,
        DIM_HEAD,
        cross_attention_dim=CONTEXT,
        activation_fn="geglu",
        attention_bias=False,
        norm_eps=1e-5,
      )
      for _ in range(DEPTH)
    )
    self.proj_out = torch.nn.Conv1d(inner, CODES, 1)

  def forward(self, x, context):
    x = self.proj_in(x).permute(0, 2, 1)  # b t c -> b c t
    x = x + self.positional_encoding[None, :, : x.shape[2]]
    x = x.permute(0, 2, 1)
    t = x.shape[1]
    causal = torch.triu(torch.full((t, t), -1e9, dtype=x.dtype), diagonal=1).expand(
      x.shape[0], t, t
    )
    for block in self.transformer_blocks:
      x = block(x, attention_mask=causal, encoder_hidden_states=context)
    return self.proj_out(x.permute(0, 2, 1)).permute(0, 2, 1)


class LatentImageRETRO(torch.nn.Module):
  """What the original's RARM state dict holds (no EMA: LatentCrossTransformer keeps none)."""

  def __init__(self):
    super().__init__()
    torch.manual_seed(0)
    self.transformer = RetrievalPatchTransformer()
    self.first_stage_model = TorchAutoencoder("vq", ARCH, seed=1)
    self.register_buffer("sos_token", torch.LongTensor([CODES + 1]))
    self.register_buffer("mask_token", torch.LongTensor([CODES]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # every norm affine and bias away from its init, so that each one matters
      for name, p in self.transformer.named_parameters():
        if p.ndim == 1:
          p.add_(0.2 * torch.randn(p.shape, generator=g))
    self.double().eval()

  @torch.no_grad()
  def greedy(self, context):
    """LatentImageRETRO.sample(sample=False) with the unconditional model's start token."""
    x = self.sos_token.repeat(context.shape[0], 1)
    for _ in range(SEQ):
      logits = self.transformer(x, context)[:, -1, :]
      x = torch.cat([x, logits.argmax(-1, keepdim=True)], dim=1)
    return x[:, 1:]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  root = tmp_path_factory.mktemp("rarm_import")
  ref = LatentImageRETRO()
  sd = {k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
  save_lightning_ckpt(root / "model.ckpt", sd)
  (root / "encoder-weights").write_bytes(
    b"only hashed: the run records the encoder it was imported for"
  )
  return root, ref


def released_config(root, **model):
  c = repo_config("imagenet_rarm", "dogs,released")
  c.dataset.image_size = 32
  c.first_stage.weights = str(root / "model.ckpt")
  c.first_stage.latent_channels = ARCH["embed_dim"]
  c.first_stage.batch_size = 4
  c.first_stage.arch = mlc.ConfigDict(ARCH)
  c.retrieval.update(
    encoder="efficientnet_lite0",
    weights=str(root / "encoder-weights"),
    embed_dim=CONTEXT,
    image_size=224,
  )
  c.model.update(heads=HEADS, dim_head=DIM_HEAD, depth=DEPTH, dtype="float32")
  c.model.update(model)
  return c


def test_a_released_rarm_imports_and_samples_the_originals_tokens(released):
  import jax
  import jax.numpy as jnp

  from rdm_jax import checkpoint, config_base
  from rdm_jax.jobs import import_checkpoint
  from rdm_jax.models import first_stage, rarm

  root, ref = released
  config = released_config(root)
  import_checkpoint.import_run(config, str(root / "model.ckpt"), str(root / "run"))
  with open(root / "run" / "model_info.json") as f:
    info = json.load(f)
  assert info["imported_from"]["global_step"] == 1000 and info["latent_shape"] == [SEQ]
  model, params, _, step = checkpoint.load_trained(config, str(root / "run"))
  assert step == 1000 and isinstance(model, rarm.RARM)
  context = np.random.default_rng(0).standard_normal((3, K, CONTEXT)).astype(np.float32)
  tokens = np.random.default_rng(1).integers(0, CODES, (3, SEQ))
  ctx64 = torch.from_numpy(context.astype(np.float64))
  with torch.no_grad():  # teacher-forced logits: [sos, z_0 .. z_{S-2}] in, z's logits out
    inputs = torch.cat([ref.sos_token.repeat(3, 1), torch.from_numpy(tokens[:, :-1])], dim=1)
    want = ref.transformer(inputs, ctx64).numpy()
  got = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(context)))
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), np.abs(got - want).max()
  sampled = np.asarray(
    rarm.sample(
      model, params, jnp.asarray(context), jax.random.split(jax.random.PRNGKey(0), 3), top_k=1
    )
  )
  want_tokens = ref.greedy(ctx64).numpy()
  np.testing.assert_array_equal(sampled, want_tokens)
  assert len(np.unique(want_tokens)) > 4  # not one code everywhere
  # the first stage comes out of the same model.ckpt (first_stage_model.*)
  # and decodes them as taming does
  images = first_stage.decode(config.first_stage, sampled, (32, 32))
  with torch.no_grad():
    fs = ref.first_stage_model.float()
    decoded = fs.decode_code(
      torch.from_numpy(want_tokens.reshape(-1)), (3, 4, 4, ARCH["embed_dim"])
    )
    ref.double()
  want_images = (np.clip(nhwc(decoded), -1, 1) + 1) * 127.5
  assert images.dtype == np.uint8 and np.abs(images - want_images).max() <= 0.51
  assert config_base.model_family(config) == "rarm" and not checkpoint.function_record(config)


def test_another_architecture_or_family_is_one_line_and_writes_nothing(released):
  from rdm_jax.jobs import import_checkpoint

  root, ref = released
  for config, says in (
    (
      released_config(root, depth=3),
      "its transformer is not config.model's (20 missing (transformer.transformer_blocks.2.",
    ),
    (
      repo_config("imagenet_rdm"),
      "holds no RDM state dict (no model.diffusion_model.* keys; "
      "config.model.family='unet'): it is a RARM: use its config",
    ),
  ):
    with pytest.raises(UserError) as e:
      import_checkpoint.import_run(config, str(root / "model.ckpt"), str(root / "refused"))
    assert "\n" not in str(e.value) and says in str(e.value), str(e.value)
    assert not os.path.exists(root / "refused")
  sd = {k: v.float() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
  sd["sos_token"] = torch.LongTensor([7])
  save_lightning_ckpt(root / "other_sos.ckpt", sd)
  config = released_config(root)
  with pytest.raises(UserError, match="its sos_token is 7 but a RARM over 64 codes has 65"):
    import_checkpoint.import_run(config, str(root / "other_sos.ckpt"), str(root / "refused"))
  assert not os.path.exists(root / "refused")
