"""DDPM noise schedule and the denoising objective (paper Eq. 3; Ho et al. 2020).

The "linear" schedule of LDM/RDM: betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2
(linear in sqrt(beta)), alpha_bar_t = prod_{s<=t} (1 - beta_s).
Forward process (Ho et al. Eq. 4): z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps.

The network predicts eps (the paper's and the original code's choice, `prediction="eps"`) or
v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) z_0 (Salimans & Ho 2022, `"v"`) or z_0 itself (`"x0"`,
diffusers' "sample"); samplers always see eps (`eps_of`). The loss may weight timesteps by
min-SNR-gamma (Hang et al. 2023).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


PREDICTIONS = ("eps", "v", "x0")
WEIGHTINGS = ("uniform", "min_snr")


@flax.struct.dataclass
class Schedule:
  betas: jax.Array  # [T]
  alphas_cumprod: jax.Array  # [T] alpha_bar_t
  prediction: str = flax.struct.field(pytree_node=False, default="eps")  # what the network outputs

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def linear_schedule(
  num_timesteps: int = 1000,
  beta_start: float = 1.5e-3,
  beta_end: float = 1.95e-2,
  prediction: str = "eps",
) -> Schedule:
  """LDM's "linear" schedule: betas linear in sqrt space, computed in float64 then cast."""
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction={prediction!r}; choose from {PREDICTIONS}")
  betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
  alphas_cumprod = np.cumprod(1.0 - betas)
  return Schedule(
    betas=jnp.asarray(betas, jnp.float32),
    alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
    prediction=prediction,
  )


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(schedule: Schedule, z0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """z_t ~ q(z_t | z_0): z0 [B, ...], t [B] int, noise like z0."""
  a = schedule.alphas_cumprod[t]
  return _bcast(jnp.sqrt(a), z0) * z0 + _bcast(jnp.sqrt(1.0 - a), z0) * noise


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of timesteps t."""
  a = schedule.alphas_cumprod[t]
  return a / (1.0 - a)


def eps_from_x0(z_t: jax.Array, x0: jax.Array, a: jax.Array) -> jax.Array:
  """eps = (z_t - sqrt(a) x0) / sqrt(1 - a), the forward process solved for eps; a (alpha_bar)
  broadcasts against z_t."""
  return (z_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)


def x0_from_eps(z_t: jax.Array, eps: jax.Array, a: jax.Array) -> jax.Array:
  """x0 = (z_t - sqrt(1 - a) eps) / sqrt(a), the forward process solved for x0; a (alpha_bar)
  broadcasts against z_t."""
  return (z_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)


def eps_of(schedule: Schedule, out: jax.Array, z_t: jax.Array, t: jax.Array) -> jax.Array:
  """The eps a network output means: itself; from v, eps = sqrt(a) v + sqrt(1 - a) z_t; from x0,
  eps_from_x0."""
  if schedule.prediction == "eps":
    return out
  a = schedule.alphas_cumprod[t]
  if schedule.prediction == "x0":
    return eps_from_x0(z_t, out.astype(jnp.float32), _bcast(a, z_t))
  return _bcast(jnp.sqrt(a), z_t) * out.astype(jnp.float32) + _bcast(jnp.sqrt(1.0 - a), z_t) * z_t


def draw_t_and_noise(
  schedule: Schedule, shape: tuple[int, ...], rng: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The training loss's draw: t ~ U{0..T-1} per example [B] and eps ~ N(0, I) of `shape`."""
  t_rng, n_rng = jax.random.split(rng)
  return (
    jax.random.randint(t_rng, (shape[0],), 0, schedule.num_timesteps),
    jax.random.normal(n_rng, shape, jnp.float32),
  )


def diffusion_loss(
  model_fn: Callable[[jax.Array, jax.Array], jax.Array],
  schedule: Schedule,
  z0: jax.Array,
  rng: jax.Array | None,
  weighting: str = "uniform",
  min_snr_gamma: float = 5.0,
  reduce: bool = True,
  draws: tuple[jax.Array, jax.Array] | None = None,
  x0_bound: float = 0.0,
) -> jax.Array:
  """The training loss: E_{t, eps} w(t) || target - model(z_t, t) ||^2, t ~ U{0..T-1}.

  target is eps, v or z_0 (schedule.prediction). w = 1 ("uniform": Eq. 3 for eps), or min-SNR-gamma
  (Hang et al. 2023, Eq. 9 and Sec. 3.4): min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1)
  for v, min(SNR, gamma) for x0, i.e. the x0-MSE weighted by min(SNR, gamma) in every case.
  `draws`: (t, noise) drawn already (`draw_t_and_noise` of the whole batch; rng unused).

  x0_bound > 0 (x0 prediction only): a censored loss for data that lives in [-b, b] with mass on
  the bounds (black backgrounds). Where the target sits on a bound and the prediction lies
  beyond it, the error is zero: the sampler clips x0 to [-b, b] (`sample.clip_x0`), so such a
  prediction samples exactly the target. Elsewhere the error is the plain one.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting={weighting!r}; choose from {WEIGHTINGS}")
  t, noise = draw_t_and_noise(schedule, z0.shape, rng) if draws is None else draws
  pred = model_fn(q_sample(schedule, z0, t, noise), t)
  a = schedule.alphas_cumprod[t]
  if schedule.prediction == "eps":
    target = noise
  elif schedule.prediction == "x0":
    target = z0.astype(jnp.float32)
  else:
    target = _bcast(jnp.sqrt(a), z0) * noise - _bcast(jnp.sqrt(1.0 - a), z0) * z0.astype(
      jnp.float32
    )
  err = pred.astype(jnp.float32) - target
  if x0_bound:
    if schedule.prediction != "x0":
      raise ValueError(f"x0_bound needs prediction='x0', not {schedule.prediction!r}")
    beyond = ((target <= -x0_bound) & (err < 0)) | ((target >= x0_bound) & (err > 0))
    err = jnp.where(beyond, 0.0, err)
  per_example = jnp.mean(jnp.square(err), axis=tuple(range(1, z0.ndim)))
  if weighting == "min_snr":
    s = snr(schedule, t)
    per_example = (
      per_example
      * jnp.minimum(s, min_snr_gamma)
      / {"eps": s, "v": s + 1.0, "x0": 1.0}[schedule.prediction]
    )
  return per_example.mean() if reduce else per_example


def eps_loss(
  eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
  schedule: Schedule,
  z0: jax.Array,
  rng: jax.Array,
  reduce: bool = True,
) -> jax.Array:
  """L = E_{t, eps} || eps - eps_theta(z_t, t) ||^2 (paper Eq. 3), t ~ U{0..T-1}.

  Args:
    eps_fn: (z_t, t) -> predicted eps, with the conditioning already bound.
    z0: clean latents [B, H, W, C].
    reduce: mean over everything (True) or per-example means [B] (False).
  """
  return diffusion_loss(eps_fn, schedule.replace(prediction="eps"), z0, rng, reduce=reduce)


def eps_fn(model: Any, params: Any, sched: Schedule):
  """(z_t, t, context) -> the eps the UNet's output means (converted from v or x0)."""
  return lambda z_t, t, c: eps_of(sched, model.apply({"params": params}, z_t, t, c), z_t, t)
