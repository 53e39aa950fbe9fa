"""RARM (rdm_jax/models/rarm.py): the transformer against an independent PyTorch reference, the KV
cache against the full forward pass, causality, guidance, logit filtering and the sampler
against the original's sampling algorithm (the whole prefix rerun for every token).

Reference: diffusers' BasicTransformerBlock (pre-norm self-attention, cross-attention, GEGLU
feed-forward: the original's block) stacked as the original's RetrievalPatchTransformer
(token embedding + learned positions -> blocks -> linear), float64, its self-attention given
an additive causal mask.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdm_jax.models import rarm

TINY = dict(num_codes=40, seq_len=10, heads=2, dim_head=8, depth=2)
K, D = 3, 12  # neighbours, their embedding width


@pytest.fixture(scope="module")
def model_and_params():
  model = rarm.RARM(**TINY)
  z = jax.random.randint(jax.random.PRNGKey(0), (4, TINY["seq_len"]), 0, TINY["num_codes"])
  ctx = jax.random.normal(jax.random.PRNGKey(1), (4, K, D))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(2), z, ctx))["params"]
  # every parameter non-trivial (biases and norm affines too), so that each one matters
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  params = jax.tree.unflatten(
    tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )
  return model, params, z, ctx


def _torch_reference(params, tokens, ctx):
  """Logits [B, S, V] of the reference stack."""
  torch = pytest.importorskip("torch")
  from tests.torch_references import reference

  attention = reference("diffusers.models.attention")
  inner = TINY["heads"] * TINY["dim_head"]
  p = jax.tree.map(lambda a: torch.from_numpy(np.asarray(a, np.float64)), params)
  blocks = []
  for i in range(TINY["depth"]):
    blk = attention.BasicTransformerBlock(
      inner,
      TINY["heads"],
      TINY["dim_head"],
      cross_attention_dim=D,
      activation_fn="geglu",
      attention_bias=False,
      norm_eps=1e-5,
    ).double()
    q = p[f"blocks_{i}"]
    sd = {}
    for n in ("norm1", "norm2", "norm3"):
      sd[f"{n}.weight"], sd[f"{n}.bias"] = q[n]["scale"], q[n]["bias"]
    for a in ("attn1", "attn2"):
      for w in ("to_q", "to_k", "to_v"):
        sd[f"{a}.{w}.weight"] = q[a][w]["kernel"].T
      sd[f"{a}.to_out.0.weight"], sd[f"{a}.to_out.0.bias"] = (
        q[a]["to_out"]["kernel"].T,
        q[a]["to_out"]["bias"],
      )
    sd["ff.net.0.proj.weight"], sd["ff.net.0.proj.bias"] = (
      q["ff"]["proj_in"]["kernel"].T,
      q["ff"]["proj_in"]["bias"],
    )
    sd["ff.net.2.weight"], sd["ff.net.2.bias"] = (
      q["ff"]["proj_out"]["kernel"].T,
      q["ff"]["proj_out"]["bias"],
    )
    blk.load_state_dict(sd, strict=True)
    blocks.append(blk.eval())
  sos = TINY["num_codes"] + 1
  inputs = np.concatenate([np.full((tokens.shape[0], 1), sos), np.asarray(tokens)[:, :-1]], axis=1)
  c = torch.from_numpy(np.asarray(ctx, np.float64))
  b, s = inputs.shape
  future = torch.triu(
    torch.full((s, s), -1e9, dtype=torch.float64), diagonal=1
  )  # additive causal mask
  with torch.no_grad():
    x = p["tok_emb"]["embedding"][torch.from_numpy(inputs)] + p["pos_emb"][:s]
    for blk in blocks:
      x = blk(x, attention_mask=future.expand(b, s, s), encoder_hidden_states=c)
    return (x @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]).numpy()


def test_logits_match_the_reference_transformer(model_and_params):
  model, params, z, ctx = model_and_params
  ours = np.asarray(model.apply({"params": params}, z, ctx))
  want = _torch_reference(params, z, ctx)
  assert ours.shape == (4, TINY["seq_len"], TINY["num_codes"])
  np.testing.assert_allclose(ours, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_cached_decoding_gives_the_full_forward_logits(model_and_params):
  model, params, z, ctx = model_and_params
  v = {"params": params}
  full = np.asarray(model.apply(v, z, ctx))
  cross = model.apply(v, ctx, method=rarm.RARM.cross_kv)
  cache = model.apply(v, z.shape[0], method=rarm.RARM.init_cache)
  step = jax.jit(
    lambda tok, t, cache: model.apply(v, tok, t, cache, cross, method=rarm.RARM.decode_step)
  )
  for t in range(z.shape[1]):
    tok = jnp.full((z.shape[0],), model.sos_token) if t == 0 else z[:, t - 1]
    logits, cache = step(tok, t, cache)
    np.testing.assert_allclose(
      np.asarray(logits), full[:, t], rtol=0, atol=1e-5 * np.abs(full).max()
    )


def test_a_future_token_never_changes_earlier_logits(model_and_params):
  model, params, z, ctx = model_and_params
  base = np.asarray(model.apply({"params": params}, z, ctx))
  for j in (0, 4, TINY["seq_len"] - 2):
    changed = z.at[:, j].set((z[:, j] + 1) % TINY["num_codes"])
    out = np.asarray(model.apply({"params": params}, changed, ctx))
    np.testing.assert_array_equal(
      out[:, : j + 1], base[:, : j + 1]
    )  # z_j is the input of position j + 1
    assert np.abs(out[:, j + 1] - base[:, j + 1]).max() > 1e-4


def test_guidance_with_scale_one_is_the_conditional_logits(model_and_params):
  model, params, z, ctx = model_and_params
  cond = model.apply({"params": params}, z, ctx)
  uncond = model.apply({"params": params}, z, jnp.zeros_like(ctx))
  assert np.abs(np.asarray(cond - uncond)).max() > 1e-3  # the context matters
  np.testing.assert_allclose(rarm.guide(cond, uncond, 1.0), cond, rtol=0, atol=1e-6)
  np.testing.assert_allclose(rarm.guide(cond, uncond, 3.0), uncond + 3 * (cond - uncond), rtol=1e-6)


def test_top_k_and_top_p_keep_the_hand_worked_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.05, 0.2, 0.25], [0.1, 0.2, 0.3, 0.4]]))
  kept = lambda out: (np.asarray(out) > rarm.NEG_INF / 2).astype(int).tolist()
  assert kept(rarm.filter_logits(logits, top_k=2)) == [[1, 0, 0, 1], [0, 0, 1, 1]]
  # top-p 0.69: 0.5 + 0.25 reach it in row 0, 0.4 + 0.3 in row 1; 0.71: row 1 needs 0.2 as well
  assert kept(rarm.filter_logits(logits, top_p=0.69)) == [[1, 0, 0, 1], [0, 0, 1, 1]]
  assert kept(rarm.filter_logits(logits, top_p=0.71)) == [[1, 0, 0, 1], [0, 1, 1, 1]]
  assert kept(rarm.filter_logits(logits, top_p=0.01)) == [
    [1, 0, 0, 0],
    [0, 0, 0, 1],
  ]  # the most likely stays


def test_greedy_sampling_is_the_original_algorithm_and_samples_are_per_key(model_and_params):
  """top_k=1 with the cache equals the original's loop (rerun the prefix, take the argmax of the
  last position), with and without guidance; a sample depends only on its key and context."""
  model, params, _, ctx = model_and_params
  v = {"params": params}
  keys = jax.random.split(jax.random.PRNGKey(9), ctx.shape[0])
  for scale in (1.0, 2.5):
    got = np.asarray(
      jax.jit(lambda c, k: rarm.sample(model, params, c, k, top_k=1, guidance_scale=scale))(
        ctx, keys
      )
    )
    want = np.zeros_like(got)
    for t in range(TINY["seq_len"]):  # the original: a full forward per token (z[t:] do not matter)
      cond = model.apply(v, jnp.asarray(want), ctx)[:, t]
      uncond = model.apply(v, jnp.asarray(want), jnp.zeros_like(ctx))[:, t]
      want[:, t] = np.argmax(np.asarray(rarm.guide(cond, uncond, scale)), axis=-1)
    np.testing.assert_array_equal(got, want)
  draw = jax.jit(
    lambda c, k: rarm.sample(model, params, c, k, temperature=1.0, top_p=0.9, guidance_scale=2.0)
  )
  all_at_once = np.asarray(draw(ctx, keys))
  one = np.asarray(draw(ctx[2:3], keys[2:3]))
  np.testing.assert_array_equal(all_at_once[2:3], one)
  assert len(np.unique(all_at_once)) > 3 and all_at_once.max() < TINY["num_codes"]


def test_nll_is_the_cross_entropy_worked_by_hand():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]]))
  np.testing.assert_allclose(
    rarm.nll(logits, jnp.array([[0, 2]])), -(np.log(0.5) + np.log(0.3)) / 2, rtol=1e-6
  )
