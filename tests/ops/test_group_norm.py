"""rdm_jax.ops.group_norm: values and gradients against torch's GroupNorm (+ SiLU) with autograd,
and hand-worked cases. The op's gradient is written by hand, so every cotangent is checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rdm_jax.ops.group_norm import group_norm


def _torch_reference(x, scale, bias, groups, eps, silu, cotangent):
  """Output and (dx, d_scale, d_bias) of sum(cotangent * f(x)) by torch autograd; x [B, ..., C]."""
  xt = torch.tensor(np.moveaxis(x, -1, 1), dtype=torch.float64, requires_grad=True)  # [B, C, ...]
  st = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
  bt = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
  y = torch.nn.functional.group_norm(xt, groups, st, bt, eps)
  if silu:
    y = torch.nn.functional.silu(y)
  (y * torch.tensor(np.moveaxis(cotangent, -1, 1), dtype=torch.float64)).sum().backward()
  return (
    np.moveaxis(y.detach().numpy(), 1, -1),
    np.moveaxis(xt.grad.numpy(), 1, -1),
    st.grad.numpy(),
    bt.grad.numpy(),
  )


@pytest.mark.parametrize(
  "shape,groups,eps,silu",
  [
    ((4, 8, 8, 64), 32, 1e-5, True),  # 2 channels per group, as the UNet's 64-channel levels
    ((2, 5, 7, 96), 32, 1e-6, True),  # odd spatial size, 3 channels per group
    ((3, 6, 6, 32), 32, 1e-5, False),  # one channel per group, no SiLU (the transformer's norm)
    ((2, 12, 48), 8, 1e-5, True),  # one spatial axis, 6 channels per group
  ],
)
def test_matches_torch_group_norm_and_its_gradients(shape, groups, eps, silu):
  rng = np.random.default_rng(0)
  c = shape[-1]
  # Per-channel offsets and spreads, so that the group statistics matter.
  x = rng.normal(size=shape) * rng.uniform(0.5, 3.0, c) + rng.normal(0, 2.0, c)
  scale, bias, cot = rng.normal(size=c), rng.normal(size=c), rng.normal(size=shape)
  ref_y, ref_dx, ref_ds, ref_db = _torch_reference(x, scale, bias, groups, eps, silu, cot)

  f = lambda x, s, b: group_norm(x, s, b, groups, eps, silu)
  args = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
  y, vjp = jax.vjp(f, *args)
  dx, ds, db = vjp(jnp.asarray(cot, jnp.float32))
  np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-4, atol=1e-4 * np.abs(ref_dx).max())
  np.testing.assert_allclose(np.asarray(ds), ref_ds, rtol=1e-4, atol=1e-4 * np.abs(ref_ds).max())
  np.testing.assert_allclose(np.asarray(db), ref_db, rtol=1e-4, atol=1e-4 * np.abs(ref_db).max())


def test_gradient_of_a_large_offset_keeps_float32_precision():
  """x = 1000 + N(0, 1) per channel: the gradient is formed from x - mean, so float32 keeps
  (almost) all its digits; from x itself, sum dy x - mean sum dy cancels about 3 of them."""
  rng = np.random.default_rng(2)
  shape = (2, 8, 8, 64)
  x = 1000.0 + rng.normal(size=shape)
  scale, bias, cot = rng.normal(size=64), rng.normal(size=64), rng.normal(size=shape)
  _, ref_dx, ref_ds, _ = _torch_reference(x, scale, bias, 32, 1e-5, True, cot)
  _, vjp = jax.vjp(
    lambda x, s, b: group_norm(x, s, b, silu=True),
    *[jnp.asarray(a, jnp.float32) for a in (x, scale, bias)],
  )
  dx, ds, _ = vjp(jnp.asarray(cot, jnp.float32))
  np.testing.assert_allclose(np.asarray(dx), ref_dx, atol=1e-4 * np.abs(ref_dx).max())
  np.testing.assert_allclose(np.asarray(ds), ref_ds, atol=1e-4 * np.abs(ref_ds).max())


def test_hand_worked_group():
  """One group of the values 1 and 3 at two positions: mean 2, variance 1, so the normalised
  values are -+1/sqrt(1 + eps); then scale 2, bias 0.5 and SiLU (y sigmoid(y))."""
  x = jnp.asarray([[[1.0], [3.0]]])  # [B=1, L=2, C=1]
  eps = 1e-5
  y = group_norm(x, jnp.asarray([2.0]), jnp.asarray([0.5]), num_groups=1, eps=eps)
  n = 1 / np.sqrt(1 + eps)
  np.testing.assert_allclose(np.asarray(y).ravel(), [0.5 - 2 * n, 0.5 + 2 * n], rtol=1e-6)
  y = group_norm(x, jnp.asarray([2.0]), jnp.asarray([0.5]), num_groups=1, eps=eps, silu=True)
  pre = np.array([0.5 - 2 * n, 0.5 + 2 * n])
  np.testing.assert_allclose(np.asarray(y).ravel(), pre / (1 + np.exp(-pre)), rtol=1e-6)
  # A constant group normalises to 0, so the output is the bias; its input gradient is 0
  # (shifting a constant group leaves its normalised values at 0).
  flat = jnp.full((2, 3, 3, 4), 7.0)
  out, vjp = jax.vjp(lambda x: group_norm(x, jnp.ones(4), jnp.arange(4.0), num_groups=2), flat)
  np.testing.assert_allclose(
    np.asarray(out), np.broadcast_to(np.arange(4.0), (2, 3, 3, 4)), atol=1e-6
  )
  np.testing.assert_allclose(np.asarray(vjp(jnp.ones_like(flat))[0]), 0.0, atol=1e-6)


def test_bfloat16_keeps_float32_statistics():
  """bf16 in, bf16 out; the statistics of a large offset (1000 + N(0, 1)) are float32's,
  so the result matches the float32 op on the same (bf16-rounded) input to bf16 precision."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(1000.0 + rng.normal(size=(2, 4, 4, 64)), jnp.bfloat16)
  s, b = jnp.ones(64), jnp.zeros(64)
  y = group_norm(x, s, b, silu=True)
  assert y.dtype == jnp.bfloat16
  ref = group_norm(x.astype(jnp.float32), s, b, silu=True)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.02, rtol=0.02)
  dx = jax.grad(lambda x: jnp.sum(group_norm(x, s, b, silu=True).astype(jnp.float32)))(x)
  assert dx.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(dx.astype(jnp.float32))))


def test_channels_not_divisible_by_groups_is_an_error():
  with pytest.raises(ValueError, match="divisible by 32 groups"):
    group_norm(jnp.zeros((1, 2, 2, 48)), jnp.ones(48), jnp.zeros(48))
