"""UNet: shapes, and parity of a res block and a spatial transformer with a NumPy reference.

The reference below re-implements the PyTorch modules of the original code
(ldm.modules.diffusionmodules.openaimodel.ResBlock, ldm.modules.attention.SpatialTransformer)
directly from their definitions, in NumPy, on the same random parameters.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from rdm_jax.models.unet import (
  ResBlock,
  SpatialTransformer,
  UNet,
  _softmax_attention,
  timestep_embedding,
)


def _randomize(params, seed=0):
  """Every parameter random, including the zero-initialised ones, so nothing hides."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
    treedef, [jnp.asarray(rng.normal(0, 0.2, leaf.shape), jnp.float32) for leaf in leaves]
  )


def ref_group_norm(x, p, eps, groups=32):
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p["bias"]


def ref_conv(x, p):
  """torch Conv2d(padding=k//2) in NHWC with an HWIO kernel, as explicit shifted sums."""
  k = p["kernel"].shape[0]
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (p["kernel"].shape[-1],))
  for i in range(k):
    for j in range(k):
      out += xp[:, i : i + h, j : j + w, :] @ p["kernel"][i, j]
  return out + p["bias"]


def ref_linear(x, p):
  return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


silu = lambda x: x / (1.0 + np.exp(-x))


def ref_layer_norm(x, p, eps=1e-5):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * p["scale"] + p[
    "bias"
  ]


def ref_attention(x, ctx, p, heads, dim_head):
  q, k, v = ref_linear(x, p["to_q"]), ref_linear(ctx, p["to_k"]), ref_linear(ctx, p["to_v"])
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, dim_head).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(k), split(v)
  sim = q @ k.transpose(0, 1, 3, 2) * dim_head**-0.5
  sim = np.exp(sim - sim.max(-1, keepdims=True))
  attn = sim / sim.sum(-1, keepdims=True)
  out = (attn @ v).transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], heads * dim_head)
  return ref_linear(out, p["to_out"])


def ref_res_block(x, emb, p):
  h = ref_conv(silu(ref_group_norm(x, p["in_norm"], 1e-5)), p["in_conv"])
  h = h + ref_linear(silu(emb), p["emb_proj"])[:, None, None, :]
  h = ref_conv(silu(ref_group_norm(h, p["out_norm"], 1e-5)), p["out_conv"])
  skip = ref_conv(x, p["skip"]) if "skip" in p else x
  return skip + h


def ref_spatial_transformer(x, ctx, p, heads, dim_head):
  b, hh, ww, c = x.shape
  y = ref_conv(ref_group_norm(x, p["norm"], 1e-6), p["proj_in"]).reshape(b, hh * ww, -1)
  blk = p["block_0"]
  y = y + ref_attention(
    ref_layer_norm(y, blk["norm1"]), ref_layer_norm(y, blk["norm1"]), blk["attn1"], heads, dim_head
  )
  y = y + ref_attention(ref_layer_norm(y, blk["norm2"]), ctx, blk["attn2"], heads, dim_head)
  hdn = ref_linear(ref_layer_norm(y, blk["norm3"]), blk["ff"]["proj_in"])
  a, gate = np.split(hdn, 2, axis=-1)
  y = y + ref_linear(a * 0.5 * gate * (1.0 + erf(gate / np.sqrt(2.0))), blk["ff"]["proj_out"])
  return x + ref_conv(y.reshape(b, hh, ww, -1), p["proj_out"])


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("in_ch,out_ch", [(64, 64), (32, 64)])
def test_res_block_matches_reference(in_ch, out_ch):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 8, 8, in_ch)).astype(np.float32)
  emb = rng.normal(size=(2, 128)).astype(np.float32)
  block = ResBlock(out_ch)
  params = _randomize(nn.meta.unbox(block.init(jax.random.PRNGKey(0), x, emb))["params"])
  got = np.asarray(block.apply({"params": params}, x, emb))
  want = ref_res_block(x.astype(np.float64), emb.astype(np.float64), _np(params))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_spatial_transformer_matches_reference():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 4, 4, 64)).astype(np.float32)
  ctx = rng.normal(size=(2, 3, 24)).astype(np.float32)  # k=3 neighbours of width 24
  st = SpatialTransformer(heads=2, dim_head=32)
  params = _randomize(nn.meta.unbox(st.init(jax.random.PRNGKey(0), x, ctx))["params"])
  got = np.asarray(st.apply({"params": params}, x, ctx))
  want = ref_spatial_transformer(x.astype(np.float64), ctx.astype(np.float64), _np(params), 2, 32)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "q_len,kv_len,heads,dtype",
  [(64, 64, 2, "float32"), (64, 4, 3, "float32"), (16, 16, 2, "bfloat16")],
)
def test_softmax_attention_values_and_gradients_match_torch(q_len, kv_len, heads, dtype):
  """Heads-first einsums with the softmax's division moved to the output, against torch's
  softmax(q k^T * scale) v and its autograd in float64 on the same (rounded) inputs; in float32 the
  logits reach ~+-60, where exp overflows without the max shift."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(q_len + kv_len)
  d, scale = 16, 16**-0.5
  big = (
    4 if dtype == "float32" else 1
  )  # bfloat16 logits of +-60 are off by ~0.1 whatever the formulation
  q, k, v, w = (
    rng.normal(0, s, size=(2, n, heads, d))
    for s, n in ((big, q_len), (big, kv_len), (1, kv_len), (1, q_len))
  )
  q, k, v, w = (
    np.asarray(jnp.asarray(a, dtype), np.float64) for a in (q, k, v, w)
  )  # the inputs both sides see
  tq, tk, tv = (
    torch.tensor(a.transpose(0, 2, 1, 3), requires_grad=True) for a in (q, k, v)
  )  # [B, H, N, D]
  t_out = torch.softmax(tq @ tk.transpose(-1, -2) * scale, -1) @ tv
  (t_out * torch.tensor(w.transpose(0, 2, 1, 3))).sum().backward()
  want = [t.detach().numpy().transpose(0, 2, 1, 3) for t in (t_out, tq.grad, tk.grad, tv.grad)]
  assert (
    dtype != "float32" or np.abs(np.einsum("bqhd,bkhd->bhqk", q, k) * scale).max() > 30
  )  # needs the shift

  jq, jk, jv, jw = (jnp.asarray(a, dtype) for a in (q, k, v, w))
  loss = lambda q, k, v: jnp.sum(
    _softmax_attention(q, k, v, scale).astype(jnp.float32) * jw.astype(jnp.float32)
  )
  out = _softmax_attention(jq, jk, jv, scale)
  assert out.dtype == jnp.dtype(dtype)
  got = [out] + list(jax.grad(loss, argnums=(0, 1, 2))(jq, jk, jv))
  tol = 1e-4 if dtype == "float32" else 2e-2
  for g, want_ in zip(got, want):
    np.testing.assert_allclose(
      np.asarray(g, np.float64), want_, rtol=tol, atol=tol * np.abs(want_).max()
    )


def test_timestep_embedding_closed_form():
  t = jnp.array([0, 7, 999])
  got = np.asarray(timestep_embedding(t, 8))
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  want = np.concatenate(
    [np.cos(np.outer([0, 7, 999], freqs)), np.sin(np.outer([0, 7, 999], freqs))], 1
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "shape,mult,attn", [((32, 32, 1), (1, 2, 2), (2, 4)), ((16, 16, 3), (1, 2), (1,))]
)
def test_unet_shapes_and_zero_init(shape, mult, attn):
  model = UNet(32, mult, 1, attn)
  x = jnp.ones((2,) + shape)
  t = jnp.array([1, 500])
  ctx = jnp.ones((2, 4, 16))
  variables = model.init(jax.random.PRNGKey(0), x, t, ctx)
  params = nn.meta.unbox(variables)["params"]
  out = model.apply({"params": params}, x, t, ctx)
  assert out.shape == x.shape
  # conv_out is zero-initialised (as in the original): the fresh model predicts eps = 0.
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  # No attention at the top level when 1 is not in attention_resolutions.
  names = set(params)
  assert ("down_0_attn_0" in names) == (1 in attn)
  assert "mid_attn" in names


def test_unet_uses_the_context():
  model = UNet(32, (1, 2), 1, (2,))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  t = jnp.array([3, 400])
  params = _randomize(
    nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, t, jnp.zeros((2, 4, 16))))["params"]
  )
  a = model.apply({"params": params}, x, t, jnp.zeros((2, 4, 16)))
  b = model.apply({"params": params}, x, t, jnp.ones((2, 4, 16)))
  # permuting the k neighbours does not change the output (cross-attention is a set function)
  ctx = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 16))
  c1 = model.apply({"params": params}, x, t, ctx)
  c2 = model.apply({"params": params}, x, t, ctx[:, ::-1])
  assert float(jnp.abs(a - b).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(c1), np.asarray(c2), rtol=1e-4, atol=1e-4)


def test_patching_is_pixel_unshuffle_and_the_patched_unet_keeps_its_shapes():
  """model.patch_size=p: the UNet sees each p x p patch as channels (torch's pixel_unshuffle order
  for one channel, worked by hand for a 4 x 4 image), depth_to_space inverts it for any channel
  count, and the patched UNet maps [B, 32, 32, 1] to the same shape, zero at init (conv_out)."""
  from rdm_jax.models.unet import depth_to_space, space_to_depth

  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(
    np.asarray(space_to_depth(x, 2))[0],
    [[[0, 1, 4, 5], [2, 3, 6, 7]], [[8, 9, 12, 13], [10, 11, 14, 15]]],
  )
  torch = pytest.importorskip("torch")
  y = np.random.default_rng(0).normal(size=(2, 8, 12, 1)).astype(np.float32)
  ref = (
    torch.nn.functional.pixel_unshuffle(torch.as_tensor(y).permute(0, 3, 1, 2), 2)
    .permute(0, 2, 3, 1)
    .numpy()
  )
  np.testing.assert_array_equal(np.asarray(space_to_depth(jnp.asarray(y), 2)), ref)
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 12, 3))
  np.testing.assert_array_equal(np.asarray(depth_to_space(space_to_depth(z, 2), 2)), np.asarray(z))
  with pytest.raises(ValueError, match="patch_size"):
    space_to_depth(jnp.zeros((1, 5, 4, 1)), 2)
  model = UNet(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    patch_size=2,
  )
  x, t, c = jnp.ones((2, 32, 32, 1)), jnp.array([3, 500]), jnp.ones((2, 4, 16))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, t, c)["params"])
  assert (
    params["conv_in"]["kernel"].shape[-2:] == (4, 32)
    and params["conv_out"]["kernel"].shape[-1] == 4
  )
  out = model.apply({"params": params}, x, t, c)
  assert out.shape == x.shape and not np.any(np.asarray(out))
