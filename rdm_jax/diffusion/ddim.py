"""DDIM sampling (Song et al. 2021, Eq. 12) with classifier-free guidance against a zeros context.

Timesteps follow LDM's `make_ddim_timesteps(..., "uniform")` (ldm/modules/diffusionmodules/util.py),
used by RDM's `DDIMSampler.make_schedule` (rdm/models/diffusion/ddim.py, line 29): every c-th
timestep, c = T // S, plus one: `range(0, T, c) + 1`, not truncated to S, so an S that does not
divide T runs len(range(0, T, c)) steps (S = 400: 500 steps from 999). alpha_prev of the last
step is alpha_bar_0. One departure: for S > T/2 (c = 1) the original's last timestep is T, past
the end of alpha_bar, where it raises an IndexError; we drop it (S = T runs 999 steps from 999).

Guidance (Ho & Salimans 2022; RDM Sec. 3.3): e = e_u + s (e_c - e_u), where e_u is the
prediction with an all-zeros context [B, k, d]. Both branches run as one doubled batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax.diffusion.schedule import Schedule, eps_from_x0, x0_from_eps

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (z_t, t, context) -> eps


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The uniform DDIM sub-sequence of LDM, ascending ints in [1, T): range(0, T, T // S) + 1."""
  if not 0 < num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
  steps = np.arange(0, num_timesteps, num_timesteps // num_steps) + 1
  return steps[steps < num_timesteps]


def per_sample_keys(rng: jax.Array, n: int) -> jax.Array:
  """[n] PRNG keys, one per sample: `rng` itself when it already is n keys (raw uint32 [n, 2] or
  typed [n]), else split(rng, n). Per-sample keys make a sample
  independent of the batch it is in."""
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if rng.ndim == (1 if typed else 2):
    if rng.shape[0] != n:
      raise ValueError(f"{rng.shape[0]} per-sample keys for a batch of {n}")
    return rng
  return jax.random.split(rng, n)


def normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """N(0, I) of `shape` (B, ...): row b drawn from keys[b] alone."""
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)


def start(rng: jax.Array, shape: tuple[int, ...], z_init: jax.Array | None = None):
  """(z_T, per-sample keys [B] for the rest): z_T ~ N(0, I), row b from the first half of sample
  b's key (see per_sample_keys), or z_init as given."""
  init_keys, rest = jnp.swapaxes(jax.vmap(jax.random.split)(per_sample_keys(rng, shape[0])), 0, 1)
  z = normal(init_keys, shape) if z_init is None else jnp.asarray(z_init, jnp.float32)
  return z, rest


def step_keys(keys: jax.Array, num_steps: int) -> jax.Array:
  """[num_steps, B] keys for a scan over steps: step i's noise for sample b from keys[b]."""
  return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num_steps))(keys), 0, 1)


def x0_and_eps(z: jax.Array, e: jax.Array, a_t: jax.Array, clip_x0: float | None):
  """(x0, eps) at abar a_t: the x0 that eps implies; with clipping, x0 clipped to [-clip_x0,
  clip_x0] and eps re-derived from it (guided-diffusion's clip_denoised)."""
  x0 = x0_from_eps(z, e, a_t)
  if clip_x0 is not None:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
    e = eps_from_x0(z, x0, a_t)
  return x0, e


def guided_eps(
  eps_fn: EpsFn, z: jax.Array, t: jax.Array, context: jax.Array, guidance_scale: float
) -> jax.Array:
  """Classifier-free guided eps with the zeros context as the unconditional branch."""
  if guidance_scale == 1.0:
    return eps_fn(z, t, context)
  e = eps_fn(
    jnp.concatenate([z, z]),
    jnp.concatenate([t, t]),
    jnp.concatenate([jnp.zeros_like(context), context]),
  )
  e_u, e_c = jnp.split(e, 2)
  return e_u + guidance_scale * (e_c - e_u)


def ddim_sample(
  eps_fn: EpsFn,
  schedule: Schedule,
  context: jax.Array,
  shape: tuple[int, ...],
  rng: jax.Array,
  num_steps: int = 100,
  guidance_scale: float = 2.0,
  eta: float = 0.0,
  clip_x0: float | None = None,
  z_init: jax.Array | None = None,
  final_x0: bool = False,
) -> jax.Array:
  """Draws z_0 ~ p_theta(z | context) with DDIM. context: [B, k, d]; shape: (B, H, W, C).

  final_x0: the last step goes to alpha_bar = 1, i.e. returns its predicted z_0 (diffusers'
  `set_alpha_to_one=True`) instead of a point at alpha_bar_0, where the original ends and which
  still holds sqrt(1 - alpha_bar_0) = 0.039 of the predicted noise (invisible through a decoder,
  speckle on pixels).

  clip_x0: for pixel-space models (identity first stage), clip the predicted z_0 to
  [-clip_x0, clip_x0] and re-derive eps from it, as guided-diffusion's DDIM does with
  clip_denoised=True. None (latent models, as LDM) leaves the prediction as it is.
  z_init: the start z_T (default: drawn from rng).
  rng: one key, or one key per sample (then sample b depends on rng[b] only, see per_sample_keys).
  """
  taus = ddim_timesteps(schedule.num_timesteps, num_steps)
  a_all = schedule.alphas_cumprod
  alphas = a_all[taus]
  alphas_prev = jnp.concatenate(
    [jnp.ones((1,), a_all.dtype) if final_x0 else a_all[:1], a_all[taus[:-1]]]
  )
  z, rng = start(rng, shape, z_init)

  def step(z, inputs):
    tau, a_t, a_prev, key = inputs
    t = jnp.full((shape[0],), tau, jnp.int32)
    e = guided_eps(eps_fn, z, t, context, guidance_scale)
    pred_z0, e = x0_and_eps(z, e, a_t, clip_x0)
    sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    direction = jnp.sqrt(1.0 - a_prev - sigma**2) * e
    noise = sigma * normal(key, shape)
    return jnp.sqrt(a_prev) * pred_z0 + direction + noise, None

  xs = (jnp.asarray(taus[::-1]), alphas[::-1], alphas_prev[::-1], step_keys(rng, len(taus)))
  z, _ = jax.lax.scan(step, z, xs)
  return z
