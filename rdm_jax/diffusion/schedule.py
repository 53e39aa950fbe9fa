"""DDPM noise schedule and the eps-prediction objective (paper Eq. 3; Ho et al. 2020).

The "linear" schedule of LDM/RDM: betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2
(linear in sqrt(beta)), alpha_bar_t = prod_{s<=t} (1 - beta_s).
Forward process (Ho et al. Eq. 4): z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Schedule:
  betas: jax.Array           # [T]
  alphas_cumprod: jax.Array  # [T] alpha_bar_t

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1.5e-3,
                    beta_end: float = 1.95e-2) -> Schedule:
  """LDM's "linear" schedule: betas linear in sqrt space, computed in float64 then cast."""
  betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  alphas_cumprod = np.cumprod(1.0 - betas)
  return Schedule(betas=jnp.asarray(betas, jnp.float32),
                  alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32))


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(schedule: Schedule, z0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """z_t ~ q(z_t | z_0): z0 [B, ...], t [B] int, noise like z0."""
  a = schedule.alphas_cumprod[t]
  return _bcast(jnp.sqrt(a), z0) * z0 + _bcast(jnp.sqrt(1.0 - a), z0) * noise


def eps_loss(eps_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule,
             z0: jax.Array, rng: jax.Array, reduce: bool = True) -> jax.Array:
  """L = E_{t, eps} || eps - eps_theta(z_t, t) ||^2 (paper Eq. 3), t ~ U{0..T-1}.

  Args:
    eps_fn: (z_t, t) -> predicted eps, with the conditioning already bound.
    z0: clean latents [B, H, W, C].
    reduce: mean over everything (True) or per-example means [B] (False).
  """
  t_rng, n_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (z0.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(n_rng, z0.shape, jnp.float32)
  pred = eps_fn(q_sample(schedule, z0, t, noise), t)
  per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - noise), axis=tuple(range(1, z0.ndim)))
  return per_example.mean() if reduce else per_example
