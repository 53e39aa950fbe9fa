"""The train step against a hand-written PyTorch reference of LDM's training recipe.

`train_step.make_train_step` runs on a tiny linear eps-model; the reference repeats each step
in float64 PyTorch from what the model saw (t, z_t and the context after dropout, taken
with `jax.debug.callback`): the noise from the closed form of q(z_t | z_0) (Eq. 3), the
eps-MSE, autograd, `torch.nn.utils.clip_grad_norm_`, `torch.optim.AdamW` under a
`LambdaLR` with LDM's LambdaLinearScheduler warm-up (f_start 1e-6), and LitEma's update
(decay min(d, (1 + n) / (10 + n)), n counting the update), written out from
CompVis/latent-diffusion ldm/modules/ema.py and ldm/lr_scheduler.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from rdm_jax import config_base, train_step
from rdm_jax.models import factory

torch = pytest.importorskip("torch")

C, D, K, B = 3, 5, 2, 8


SEEN: list = []  # (z_t, t, context) of each forward pass of TinyEps


class TinyEps(nn.Module):
  """eps(z_t, t, c) = z_t W + b + <mean_k c, u> + s t / 1000, recording what it is given."""

  @nn.compact
  def __call__(self, z_t, t, context):
    jax.debug.callback(lambda *a: SEEN.append([np.array(x) for x in a]), z_t, t, context)
    w = self.param("w", nn.initializers.normal(0.5), (C, C))
    b = self.param("b", nn.initializers.normal(0.5), (C,))
    u = self.param("u", nn.initializers.normal(0.5), (D,))
    s = self.param("s", nn.initializers.normal(0.5), ())
    cond = jnp.mean(context, axis=1) @ u
    return (
      z_t @ w
      + b
      + cond[:, None, None, None]
      + s * t[:, None, None, None].astype(jnp.float32) / 1000
    )


def config(
  p_uncond: float,
  warmup: int = 3,
  grad_clip: float = 0.05,
  update_clip: float = 0.0,
  decay: str = "none",
) -> mlc.ConfigDict:
  c = config_base.base_config()
  c.update(
    dict(
      train=dict(p_uncond=p_uncond, num_steps=8),
      optim=dict(
        lr=3e-2,
        warmup_steps=warmup,
        b1=0.9,
        b2=0.999,
        weight_decay=0.01,
        grad_clip=grad_clip,
        ema_decay=0.9999,
        update_clip=update_clip,
        decay=decay,
        min_lr_ratio=0.2,
      ),
      diffusion=dict(num_timesteps=1000, beta_start=1.5e-3, beta_end=1.95e-2),
    )
  )
  return c


def run_jax(cfg, steps: int, seed: int = 0):
  record = SEEN
  model = TinyEps()
  rng = np.random.default_rng(seed)
  z0 = [rng.normal(size=(B, 4, 4, C)).astype(np.float32) for _ in range(steps)]
  ctx = [rng.normal(size=(B, K, D)).astype(np.float32) for _ in range(steps)]
  params = model.init(
    jax.random.PRNGKey(seed), jnp.asarray(z0[0]), jnp.zeros((B,), jnp.int32), jnp.asarray(ctx[0])
  )["params"]
  record.clear()
  tx = train_step.make_optimizer(cfg)
  state = train_step.new_state(params, tx, 200)
  step = jax.jit(train_step.make_train_step(cfg, model, tx, factory.make_schedule(cfg)))
  states, losses, seen = [state], [], []
  for i in range(steps):
    state, metrics = step(state, jnp.asarray(z0[i]), jnp.asarray(ctx[i]), jax.random.PRNGKey(7))
    jax.block_until_ready(state)
    seen.append(record[-1])  # the forward pass of this step's loss
    states.append(state)
    losses.append(float(metrics["loss"]))
  return z0, ctx, states, losses, seen


def torch_reference(cfg, z0, ctx, seen, params0):
  """LDM's recipe in float64 PyTorch, fed what the JAX model saw."""
  betas = np.linspace(cfg.diffusion.beta_start**0.5, cfg.diffusion.beta_end**0.5, 1000) ** 2
  abar = np.cumprod(1 - betas)
  p = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in params0.items()}
  ema = {k: v.detach().clone() for k, v in p.items()}
  o = cfg.optim
  opt = torch.optim.AdamW(
    list(p.values()), lr=o.lr, betas=(o.b1, o.b2), eps=1e-8, weight_decay=o.weight_decay
  )
  f_start, warm, total = 1e-6, o.warmup_steps, cfg.train.num_steps

  def factor(
    n,
  ):  # LDM's warm-up, then 1 or SGDR's cosine (Loshchilov & Hutter 2017, Eq. 5) to min_lr_ratio
    if n < warm:
      return (1 - f_start) / warm * n + f_start
    if o.decay == "none":
      return 1.0
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (
      1 + np.cos(np.pi * min(n - warm, total - warm) / (total - warm))
    )

  sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
  out, num_updates = [], 0
  adam = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in p.items()}
  for z, c_full, (z_t, t, c_used) in zip(z0, ctx, seen):
    a = abar[t][:, None, None, None]
    noise = (z_t.astype(np.float64) - np.sqrt(a) * z) / np.sqrt(
      1 - a
    )  # Eq. 3's z_t, solved for eps
    zt, cu = torch.tensor(z_t, dtype=torch.float64), torch.tensor(c_used, dtype=torch.float64)
    pred = (
      zt @ p["w"]
      + p["b"]
      + (cu.mean(1) @ p["u"])[:, None, None, None]
      + p["s"] * torch.tensor(t, dtype=torch.float64)[:, None, None, None] / 1000
    )
    loss = ((pred - torch.tensor(noise)) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(list(p.values()), o.grad_clip)
    if o.update_clip > 0:
      stable_adamw_step(p, adam, num_updates + 1, opt.param_groups[0]["lr"], o)
    else:
      opt.step()
    sched.step()
    num_updates += 1  # LitEma.forward: increment, then decay
    decay = min(o.ema_decay, (1 + num_updates) / (10 + num_updates))
    with torch.no_grad():
      for k in ema:
        ema[k] -= (1 - decay) * (ema[k] - p[k])
    out.append(
      (
        loss.item(),
        {k: v.detach().numpy().copy() for k, v in p.items()},
        {k: v.numpy().copy() for k, v in ema.items()},
      )
    )
  return out


def stable_adamw_step(p, adam, n, lr, o):
  """AdamW (Loshchilov & Hutter 2019, Alg. 2, bias-corrected) whose update of each tensor is divided
  by max(1, RMS(update) / update_clip) before the weight decay (StableAdamW's update clipping,
  Wortsman et al. 2023), written out in float64."""
  with torch.no_grad():
    for k, v in p.items():
      m, s = adam[k]
      m.mul_(o.b1).add_((1 - o.b1) * v.grad)
      s.mul_(o.b2).add_((1 - o.b2) * v.grad**2)
      u = (m / (1 - o.b1**n)) / (torch.sqrt(s / (1 - o.b2**n)) + 1e-8)
      u = u / max(1.0, float(torch.sqrt(torch.mean(u**2))) / o.update_clip)
      v -= lr * (u + o.weight_decay * v)


@pytest.mark.parametrize(
  "p_uncond,grad_clip,update_clip,decay",
  [
    (0.0, 0.05, 0.0, "none"),
    (0.5, 0.0, 0.0, "none"),
    (0.0, 0.05, 0.3, "none"),
    (0.0, 0.0, 0.0, "cosine"),
  ],
)
def test_train_step_equals_the_torch_reference(p_uncond, grad_clip, update_clip, decay):
  cfg = config(p_uncond, warmup=3, grad_clip=grad_clip, update_clip=update_clip, decay=decay)
  z0, ctx, states, losses, seen = run_jax(cfg, steps=8)
  ref = torch_reference(cfg, z0, ctx, seen, jax.device_get(states[0].params))
  for i, (loss, params, ema) in enumerate(ref):
    np.testing.assert_allclose(losses[i], loss, rtol=1e-5, err_msg=f"loss, step {i}")
    for k in params:
      np.testing.assert_allclose(
        np.asarray(states[i + 1].params[k]),
        params[k],
        rtol=2e-4,
        atol=2e-6,
        err_msg=f"params[{k}] after step {i}",
      )
      np.testing.assert_allclose(
        np.asarray(states[i + 1].ema_params[k]),
        ema[k],
        rtol=2e-4,
        atol=2e-6,
        err_msg=f"ema[{k}] after step {i}",
      )
  if update_clip:  # the clip acted (else this case tests nothing more): unclipped, the steps differ
    unclipped = run_jax(config(p_uncond, warmup=3, grad_clip=grad_clip), steps=6)[2]
    assert not np.allclose(
      np.asarray(unclipped[-1].params["w"]), np.asarray(states[-1].params["w"]), rtol=1e-3
    )
  if p_uncond:  # the dropout happened: some examples saw zeros (else this case tests nothing more)
    assert any((s[2] == 0).all(axis=(1, 2)).any() for s in seen)


def test_conditioning_dropout_rate_and_unit():
  """p_uncond = 0.3: whole examples (all k neighbours) become zeros, at that rate."""
  cfg = config(0.3)
  _, ctx, _, _, seen = run_jax(cfg, steps=60, seed=1)
  dropped = kept = 0
  for c_full, (_, _, c_used) in zip(ctx, seen):
    zero = (c_used == 0).all(axis=(1, 2))
    assert np.array_equal(c_used[~zero], c_full[~zero])  # the others are untouched
    dropped += int(zero.sum())
    kept += int((~zero).sum())
  rate = dropped / (dropped + kept)  # 480 draws: sd 0.021
  assert abs(rate - 0.3) < 0.07, rate
