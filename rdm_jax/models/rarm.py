"""RARM: the retrieval-augmented autoregressive transformer (paper Sec. 3.2.2, Eq. 4) in Flax.

A port of the original `LatentImageRETRO` (rdm/models/autoregression/transformer.py) with its
`RetrievalPatchTransformer(continuous=False)` and `BasicTransformerBlock(causal=True)`
(rdm/modules/attention.py), as configs/rarm/{dogs,mammals,animals}.yaml set them:

  first-stage tokens z [B, S] (VQ-f16: S = 16 x 16, 16384 codes) in raster order; inputs are
  [sos, z_0, ..., z_{S-2}] (the unconditional model's cond_stage is a start token, 16385);
  token embedding (16386 rows: the codes, mask 16384, sos 16385) + learned positional
  encoding -> depth x pre-norm blocks [causal self-attention, cross-attention to the k
  neighbour embeddings (raw CLIP, 512-d), GEGLU feed-forward (4x, exact GELU)], each with
  a residual -> a linear layer (with bias) to the 16384 code logits.
  Heads 12 x 64, depth 18; q/k/v without bias, output projections with; attention scaled by
  d_head^-0.5; LayerNorm eps 1e-5 (torch's); no final norm before the logits (the original's
  RetrievalPatchTransformer has none: residual=False, proj_out straight after the blocks).
  Initialisation as torch's defaults there: embedding N(0, 1), positional N(0, 1/inner).

Departures, and why:
  * Sampling keeps a KV cache (`init_cache`, `decode_step`): the original reruns the whole
    prefix for every token (O(S^2) forwards); here self-attention keys/values are cached per
    layer and the cross-attention keys/values of the neighbours are computed once per sample.
    `sample` runs the whole decode loop in one `lax.fori_loop` (no per-token Python dispatch).
  * top-p (the original asserts top_p == 1) and temperature/top-k as the original's
    `sampling_util` (top_k 100 by default there; set it in config.sample).
  * The original's retro-masking (p_mask_max) is 0 in every released config and not ported.
  * Parameters carry logical axis names (vocab, embed, heads, mlp, context), so data / FSDP /
    tensor parallelism are config changes, as for the UNet.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rdm_jax.errors import fail
from rdm_jax.models import torch_convert
from rdm_jax.models.layers import Dense, GEGLUFeedForward

Dtype = Any
NEG_INF = -1e30


def _ln(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=1e-5,
    dtype=jnp.float32,
    name=name,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
  )


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Multi-head attention: q [B, Tq, H, D], k/v [B, Tk, H, D], mask broadcastable to [B, H, Tq, Tk]
  (True = attend) -> [B, Tq, H, D]; softmax in float32."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (q.shape[-1] ** -0.5)
  if mask is not None:
    logits = jnp.where(mask, logits, NEG_INF)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def per_token(layer, x: jax.Array) -> jax.Array:
  """layer(x) for a per-token layer (Dense, the feed-forward) applied on x [..., C] flattened to
  [N, C]. XLA:CPU otherwise transposes the output gradient of a dot over [B, T, C] into
  [C_out, B, T] for the kernel's gradient, a full copy of the 16384-way logits' gradient
  (benchmarks/RESULTS.md, "RARM")."""
  y = layer(x.reshape(-1, x.shape[-1]))
  return y.reshape(x.shape[:-1] + y.shape[-1:])


class Projections(nn.Module):
  """CrossAttention's q / k / v (no bias) and to_out (with bias) of one attention layer."""

  heads: int
  dim_head: int
  kv_names: tuple[str, str]
  dtype: Dtype = jnp.float32

  def setup(self):
    inner = self.heads * self.dim_head
    self.to_q = Dense(inner, ("embed", "heads"), use_bias=False, dtype=self.dtype)
    self.to_k = Dense(inner, self.kv_names, use_bias=False, dtype=self.dtype)
    self.to_v = Dense(inner, self.kv_names, use_bias=False, dtype=self.dtype)
    self.to_out = Dense(inner, ("heads", "embed"), dtype=self.dtype)

  def _split(self, t: jax.Array) -> jax.Array:
    return t.reshape(t.shape[:2] + (self.heads, self.dim_head))

  def q(self, x: jax.Array) -> jax.Array:
    return self._split(per_token(self.to_q, x))

  def kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self._split(per_token(self.to_k, x)), self._split(per_token(self.to_v, x))

  def out(self, o: jax.Array) -> jax.Array:
    return per_token(self.to_out, o.reshape(o.shape[:2] + (self.heads * self.dim_head,)))


class Block(nn.Module):
  """BasicTransformerBlock(causal=True): x + attn1(norm1 x), + attn2(norm2 x, ctx), + ff(norm3
  x)."""

  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.norm1, self.norm2, self.norm3 = _ln("norm1"), _ln("norm2"), _ln("norm3")
    self.attn1 = Projections(self.heads, self.dim_head, ("embed", "heads"), self.dtype)
    self.attn2 = Projections(self.heads, self.dim_head, ("context", "heads"), self.dtype)
    self.ff = GEGLUFeedForward(dtype=self.dtype)

  def cross_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.attn2.kv(context.astype(self.dtype))

  def _rest(self, x: jax.Array, cross: tuple[jax.Array, jax.Array]) -> jax.Array:
    h = self.norm2(x).astype(self.dtype)
    x = x + self.attn2.out(attend(self.attn2.q(h), *cross, None))
    return x + per_token(self.ff, self.norm3(x).astype(self.dtype))

  def __call__(self, x: jax.Array, cross: tuple[jax.Array, jax.Array]) -> jax.Array:
    """The whole sequence x [B, T, C] with a causal mask."""
    h = self.norm1(x).astype(self.dtype)
    k, v = self.attn1.kv(h)
    t = x.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    x = x + self.attn1.out(attend(self.attn1.q(h), k, v, causal))
    return self._rest(x, cross)

  def step(
    self,
    x: jax.Array,
    pos: jax.Array,
    cache: tuple[jax.Array, jax.Array],
    cross: tuple[jax.Array, jax.Array],
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One position x [B, 1, C] at `pos`; the self-attention cache [B, S, H, D] (k, v) gets its keys
    and values, and positions after `pos` are masked."""
    h = self.norm1(x).astype(self.dtype)
    k, v = self.attn1.kv(h)
    ck = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), pos, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), pos, axis=1)
    seen = (jnp.arange(ck.shape[1]) <= pos)[None, None, None, :]
    x = x + self.attn1.out(attend(self.attn1.q(h), ck, cv, seen))
    return self._rest(x, cross), (ck, cv)


class RARM(nn.Module):
  """logits [B, S, num_codes] of z [B, S] given the neighbours' embeddings context [B, k, d]."""

  num_codes: int = 16384
  seq_len: int = 256
  heads: int = 12
  dim_head: int = 64
  depth: int = 18
  dtype: Dtype = jnp.float32

  @property
  def mask_token(self) -> int:
    return self.num_codes

  @property
  def sos_token(self) -> int:
    return self.num_codes + 1

  def setup(self):
    inner = self.heads * self.dim_head
    self.tok_emb = nn.Embed(
      self.num_codes + 2,
      inner,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
    )
    self.pos_emb = self.param(
      "pos_emb",
      nn.with_logical_partitioning(nn.initializers.normal(inner**-0.5), (None, "embed")),
      (self.seq_len, inner),
    )
    self.blocks = [Block(self.heads, self.dim_head, self.dtype) for _ in range(self.depth)]
    self.proj_out = Dense(self.num_codes, ("embed", "vocab"), dtype=self.dtype)

  def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    return (self.tok_emb(tokens) + jnp.take(self.pos_emb, positions, axis=0)).astype(self.dtype)

  def cross_kv(self, context: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Every layer's cross-attention keys and values of the neighbours: computed once per sample."""
    return [b.cross_kv(context) for b in self.blocks]

  def __call__(self, z: jax.Array, context: jax.Array) -> jax.Array:
    """Teacher-forced logits: position i predicts z[:, i] from sos, z[:, :i] and the context."""
    b, s = z.shape
    inputs = jnp.concatenate([jnp.full((b, 1), self.sos_token, z.dtype), z[:, :-1]], axis=1)
    x = self._embed(inputs, jnp.arange(s))
    for block, cross in zip(self.blocks, self.cross_kv(context)):
      x = block(x, cross)
    return per_token(self.proj_out, x).astype(jnp.float32)

  def init_cache(self, batch: int) -> list[tuple[jax.Array, jax.Array]]:
    """Empty self-attention caches, one (k, v) [B, S, H, D] per layer."""
    shape = (batch, self.seq_len, self.heads, self.dim_head)
    return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(self.depth)]

  def decode_step(
    self, token: jax.Array, pos: jax.Array, cache: list, cross: list
  ) -> tuple[jax.Array, list]:
    """(logits [B, num_codes] of position `pos`, the updated cache) given the input token [B] at
    `pos` (sos at 0, else z[pos - 1])."""
    x = self._embed(token[:, None], jnp.reshape(pos, (1,)))
    new_cache = []
    for block, c, kv in zip(self.blocks, cache, cross):
      x, c = block.step(x, pos, c, kv)
      new_cache.append(c)
    return per_token(self.proj_out, x)[:, 0].astype(jnp.float32), new_cache


def from_config(config: Any) -> RARM:
  """The RARM of config.model over the first stage's tokens (codes = its codebook size, sequence =
  its latent grid at config.dataset.image_size)."""
  from rdm_jax.models import first_stage

  model_cfg = config.model
  spec = first_stage.spec(config.first_stage)
  if spec.kind != "vq":
    fail(
      "config.model.family='rarm' models VQ tokens but "
      f"config.first_stage.name={config.first_stage.name!r} "
      "is not a VQ model (use vq_f16, the original's, or vqgan_f16, its released weights')"
    )
  side = config.dataset.image_size // spec.factor
  return RARM(
    num_codes=spec.n_embed,
    seq_len=side * side,
    heads=model_cfg.heads,
    dim_head=model_cfg.dim_head,
    depth=model_cfg.depth,
    dtype=jnp.dtype(model_cfg.dtype),
  )


# ---------------------------------------------------------------------------------------
# Sampling


def guide(cond: jax.Array, uncond: jax.Array, scale: float) -> jax.Array:
  """Classifier-free guidance for autoregressive logits (the original's `sample`): u + s (c - u)."""
  return uncond + scale * (cond - uncond)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits [B, V] outside the top_k largest (0: all) or outside the smallest set whose
  probability reaches top_p (1: all) set to -inf-like; at least the most likely one is kept."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    drop_sorted = before >= top_p
    drop = (
      jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    )
    logits = jnp.where(drop, NEG_INF, logits)
  return logits


def sample(
  model: RARM,
  params: Any,
  context: jax.Array,
  keys: jax.Array,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  guidance_scale: float = 1.0,
) -> jax.Array:
  """Tokens [B, S] drawn one position at a time with the KV cache, in one lax.fori_loop.

  keys: [B] PRNG keys, one per sample (sample i's tokens depend only on its key and context);
  guidance_scale != 1 runs the zeros-context branch beside (the original's guidance).
  """
  b = context.shape[0]
  guided = guidance_scale != 1.0
  ctx = jnp.concatenate([context, jnp.zeros_like(context)]) if guided else context
  variables = {"params": params}
  cross = model.apply(variables, ctx, method=RARM.cross_kv)
  cache = model.apply(variables, ctx.shape[0], method=RARM.init_cache)

  def body(t, carry):
    tokens, cache = carry
    prev = jnp.where(
      t == 0, model.sos_token, jax.lax.dynamic_index_in_dim(tokens, jnp.maximum(t - 1, 0), 1, False)
    )
    inp = jnp.concatenate([prev, prev]) if guided else prev
    logits, cache = model.apply(variables, inp, t, cache, cross, method=RARM.decode_step)
    if guided:
      logits = guide(logits[:b], logits[b:], guidance_scale)
    logits = filter_logits(logits / temperature, top_k, top_p)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
    tok = jax.vmap(jax.random.categorical)(step_keys, logits).astype(tokens.dtype)
    return jax.lax.dynamic_update_index_in_dim(tokens, tok, t, 1), cache

  tokens = jnp.zeros((b, model.seq_len), jnp.int32)
  return jax.lax.fori_loop(0, model.seq_len, body, (tokens, cache))[0]


def nll(logits: jax.Array, z: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (nats) of logits [B, S, V] against tokens z [B, S]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, z[..., None].astype(jnp.int32), axis=-1))


# ---------------------------------------------------------------------------------------
# The original's weights: LatentImageRETRO's `transformer` (a RetrievalPatchTransformer)

TORCH_PREFIX = "transformer."
_TORCH_INNER = {"to_out": "to_out.0"}
_TORCH_FF = {"proj_in": "net.0.proj", "proj_out": "net.2"}


def torch_names(params: Any) -> dict[tuple[str, ...], str]:
  """{our parameter path: the original's state-dict key} for every leaf of `params`:
  tok_emb -> transformer.proj_in (nn.Embedding), pos_emb -> transformer.positional_encoding,
  blocks_i -> transformer.transformer_blocks.i (norm1..3, attn1/attn2 to_q/k/v/to_out.0,
  ff.net.0.proj and ff.net.2: ldm's CrossAttention and FeedForward), proj_out ->
  transformer.proj_out (Conv1d)."""
  names = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts = tuple(str(getattr(k, "key", k)) for k in path)
    if parts == ("pos_emb",):
      names[parts] = TORCH_PREFIX + "positional_encoding"
      continue
    top, *inner, leaf = parts
    leaf_name = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    if top.startswith("blocks_"):
      segments = ["transformer_blocks." + top[len("blocks_") :]]
      for parent, part in zip([top] + inner, inner):
        segments.append(_TORCH_FF[part] if parent == "ff" else _TORCH_INNER.get(part, part))
      key = ".".join(segments + [leaf_name])
    else:
      key = {"tok_emb": "proj_in"}.get(top, top) + "." + leaf_name
    names[(top, *inner, leaf)] = TORCH_PREFIX + key
  return names


def from_torch(state_dict: dict[str, Any], abstract: Any) -> dict[str, Any]:
  """Our parameters (of the shapes of `abstract`) from the original's state dict: its
  `transformer.*` entries, with the positional encoding's [inner, S] and the Conv1d output
  layer's [codes, inner, 1] put in our layouts. ValueError lists every key that is missing,
  unexpected or of another shape."""
  sd = {k: v for k, v in state_dict.items() if k.startswith(TORCH_PREFIX)}
  pe, w = sd.get(TORCH_PREFIX + "positional_encoding"), sd.get(TORCH_PREFIX + "proj_out.weight")
  if getattr(pe, "ndim", 0) == 2:
    sd[TORCH_PREFIX + "positional_encoding"] = pe.T
  if getattr(w, "ndim", 0) == 3 and w.shape[-1] == 1:
    sd[TORCH_PREFIX + "proj_out.weight"] = w[..., 0]
  return torch_convert.to_flax(sd, torch_convert.flat_shapes(abstract), torch_names(abstract))
