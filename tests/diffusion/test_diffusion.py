"""Noise schedule, forward process, loss and DDIM against closed forms and hand-worked cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdm_jax.diffusion import ddim, schedule


def test_linear_schedule_closed_form():
  T, b0, b1 = 1000, 1.5e-3, 1.95e-2
  s = schedule.linear_schedule(T, b0, b1)
  t = np.arange(T)
  betas = (np.sqrt(b0) + t / (T - 1) * (np.sqrt(b1) - np.sqrt(b0))) ** 2
  np.testing.assert_allclose(np.asarray(s.betas), betas, rtol=1e-6)
  assert abs(float(s.betas[0]) - b0) < 1e-9 and abs(float(s.betas[-1]) - b1) < 1e-8
  a_bar = 1.0
  expected = []
  for beta in betas:
    a_bar *= 1.0 - beta
    expected.append(a_bar)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), expected, rtol=1e-5)


def test_q_sample_moments():
  s = schedule.linear_schedule()
  z0 = jnp.full((20000, 1), 0.7)
  t = jnp.full((20000,), 300)
  noise = jax.random.normal(jax.random.PRNGKey(0), z0.shape)
  zt = np.asarray(schedule.q_sample(s, z0, t, noise))
  a = float(s.alphas_cumprod[300])
  assert abs(zt.mean() - np.sqrt(a) * 0.7) < 0.02
  assert abs(zt.var() - (1 - a)) < 0.02


def test_eps_loss_of_oracle_is_zero_and_of_zero_predictor_is_one():
  s = schedule.linear_schedule()
  z0 = jax.random.normal(jax.random.PRNGKey(1), (512, 4, 4, 1))
  rng = jax.random.PRNGKey(2)

  # Oracle: knows z0, so eps = (z_t - sqrt(a) z0) / sqrt(1 - a) exactly.
  def oracle(z_t, t):
    a = s.alphas_cumprod[t][:, None, None, None]
    return (z_t - jnp.sqrt(a) * z0) / jnp.sqrt(1 - a)

  assert float(schedule.eps_loss(oracle, s, z0, rng)) < 1e-8
  zero = float(schedule.eps_loss(lambda z_t, t: jnp.zeros_like(z_t), s, z0, rng))
  assert abs(zero - 1.0) < 0.05  # E[eps^2] = 1


def test_ddim_is_exact_for_point_mass_data():
  """For data = a single point x0 the optimal eps(z_t) = (z_t - sqrt(a_t) x0)/sqrt(1-a_t). DDIM with
  eta=0 (Song et al. 2021, Eq. 12) then keeps eps constant, so the result is the closed form
  sqrt(a_0) x0 + sqrt(1 - a_0) eps, eps fixed by the start z_T at the first DDIM timestep."""
  s = schedule.linear_schedule()
  x0 = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4, 2)), jnp.float32)

  def eps_fn(z, t, context):
    a = s.alphas_cumprod[t][:, None, None, None]
    return (z - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

  rng = jax.random.PRNGKey(0)
  out = ddim.ddim_sample(
    eps_fn, s, jnp.ones((3, 2, 5)), x0.shape, rng, num_steps=20, guidance_scale=1.0
  )
  z_T = _z_T(rng, x0.shape)
  a_first = float(s.alphas_cumprod[ddim.ddim_timesteps(1000, 20)[-1]])
  a_0 = float(s.alphas_cumprod[0])
  eps = (z_T - np.sqrt(a_first) * np.asarray(x0)) / np.sqrt(1 - a_first)
  want = np.sqrt(a_0) * np.asarray(x0) + np.sqrt(1 - a_0) * eps
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-4)


def _z_T(rng, shape):
  """The start noise as the samplers document it: one key per sample, split(rng, B); sample b's
  z_T from the first half of split(key_b)."""
  keys = jax.random.split(rng, shape[0])
  return np.stack(
    [np.asarray(jax.random.normal(jax.random.split(k)[0], shape[1:]), np.float64) for k in keys]
  )


def test_one_ddim_step_by_hand():
  s = schedule.linear_schedule(10, 0.1, 0.2)
  rng = jax.random.PRNGKey(3)
  z_T = _z_T(rng, (1, 1, 1, 1))[0, 0, 0, 0]
  e = 0.3
  out = ddim.ddim_sample(
    lambda z, t, c: jnp.full_like(z, e),
    s,
    jnp.zeros((1, 1, 1)),
    (1, 1, 1, 1),
    rng,
    num_steps=1,
    guidance_scale=1.0,
  )
  a_t = float(s.alphas_cumprod[1])  # tau = [1]
  a_prev = float(s.alphas_cumprod[0])
  pred_x0 = (z_T - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
  want = np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev) * e
  np.testing.assert_allclose(float(out[0, 0, 0, 0]), want, rtol=1e-5)


def test_guidance_combines_zero_and_true_context():
  # eps_fn returns 1 for a zeros context and 3 otherwise: e = 1 + s (3 - 1)
  def eps_fn(z, t, c):
    is_cond = (jnp.abs(c).sum(axis=(1, 2)) > 0).astype(jnp.float32)
    return jnp.ones_like(z) * (1.0 + 2.0 * is_cond)[:, None, None, None]

  out = ddim.guided_eps(
    eps_fn, jnp.zeros((2, 1, 1, 1)), jnp.array([5, 5]), jnp.ones((2, 4, 3)), 2.5
  )
  np.testing.assert_allclose(np.asarray(out), 1.0 + 2.5 * 2.0)


def test_clipped_ddim_step_by_hand():
  """clip_x0: the predicted x0 is clipped and eps re-derived from it (guided-diffusion's DDIM
  with clip_denoised=True), worked by hand for one step."""
  s = schedule.linear_schedule(10, 0.1, 0.2)
  rng = jax.random.PRNGKey(3)
  z_T = float(_z_T(rng, (1, 1, 1, 1))[0, 0, 0, 0])
  e = 20.0  # a large eps drives the unclipped x0 prediction far below -1
  out = ddim.ddim_sample(
    lambda z, t, c: jnp.full_like(z, e),
    s,
    jnp.zeros((1, 1, 1)),
    (1, 1, 1, 1),
    rng,
    num_steps=1,
    guidance_scale=1.0,
    clip_x0=1.0,
  )
  a_t, a_prev = float(s.alphas_cumprod[1]), float(s.alphas_cumprod[0])
  x0 = float(np.clip((z_T - np.sqrt(1 - a_t) * e) / np.sqrt(a_t), -1, 1))
  assert x0 in (-1.0, 1.0)
  eps = (z_T - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
  np.testing.assert_allclose(
    float(out[0, 0, 0, 0]), np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps, rtol=1e-5
  )


def _gaussian_ddim_moments(s, mu, sd, eta, num_steps):
  """Exact mean and variance of DDIM's z_0 (Song et al. 2021, Eq. 12 with sigma of Eq. 16) for data
  N(mu, sd^2), whose optimal eps(z_t) = sqrt(1-a)(z_t - sqrt(a) mu)/(a sd^2 + 1 - a) is affine in
  z_t, so every step maps N(m, v) to N(A m + B, A^2 v + sigma^2); z_T ~
  N(0, 1). Float64 recurrence."""
  a_all = np.asarray(s.alphas_cumprod, np.float64)
  taus = ddim.ddim_timesteps(len(a_all), num_steps)[::-1]
  m, v = 0.0, 1.0
  for j, tau in enumerate(taus):
    a = a_all[tau]
    a_prev = a_all[taus[j + 1]] if j + 1 < len(taus) else a_all[0]
    g = np.sqrt(1 - a) / (a * sd**2 + 1 - a)  # eps = g z - g sqrt(a) mu
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    c = np.sqrt(1 - a_prev - sigma**2)
    slope = np.sqrt(a_prev / a) * (1 - np.sqrt(1 - a) * g) + c * g
    offset = (np.sqrt(a_prev / a) * np.sqrt(1 - a) - c) * g * np.sqrt(a) * mu
    m, v = slope * m + offset, slope**2 * v + sigma**2
  return m, v


def test_stochastic_ddim_moments_on_gaussian_data():
  """eta > 0 adds the noise of Eq. 16: on 1-D Gaussian data with the exact eps, the samples' mean
  and variance match the closed-form recurrence (5 steps, where eta 0, 0.5
  and 1 give variances 0.0231,
  0.0218 and 0.0143 apart by more than the 2% allowed; 1e5 samples: standard error 0.45%)."""
  s = schedule.linear_schedule()
  mu, sd, n = 0.5, 0.3, 100_000

  def eps_fn(z, t, context):
    a = s.alphas_cumprod[t][:, None, None, None]
    return jnp.sqrt(1 - a) * (z - jnp.sqrt(a) * mu) / (a * sd**2 + 1 - a)

  variances = {}
  for eta in (0.0, 0.5, 1.0):
    out = np.asarray(
      ddim.ddim_sample(
        eps_fn,
        s,
        jnp.zeros((n, 1, 1)),
        (n, 1, 1, 1),
        jax.random.PRNGKey(1),
        num_steps=5,
        guidance_scale=1.0,
        eta=eta,
      ),
      np.float64,
    )
    m, v = _gaussian_ddim_moments(s, mu, sd, eta, 5)
    assert abs(out.mean() - m) < 5 * np.sqrt(v / n), (eta, out.mean(), m)
    assert out.var() == pytest.approx(v, rel=0.02), (eta, out.var(), v)
    variances[eta] = v
  assert variances[0.0] > 1.05 * variances[0.5] > 1.05 * variances[1.0]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_the_loss_against_diffusers_targets_and_min_snr_weights(prediction, weighting):
  """schedule.diffusion_loss against diffusers' training recipe (train_text_to_image.py): the
  target is the noise, DDPMScheduler.get_velocity or the clean sample, the min-SNR-5 weights are
  min(compute_snr, 5) / snr for eps, / (snr + 1) for v and min(snr, 5) itself for x0 (Hang et al.
  2023, Sec. 3.4); and eps_of turns the true v or x0 back into the noise."""
  pytest.importorskip("torch")
  import torch
  from tests.torch_references import define_missing_torchvision_ops

  define_missing_torchvision_ops()
  from diffusers import DDPMScheduler
  from diffusers.training_utils import compute_snr

  s = schedule.linear_schedule(prediction=prediction)
  ref = DDPMScheduler(
    num_train_timesteps=1000,
    trained_betas=np.asarray(s.betas, np.float64),
    prediction_type={"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction],
  )
  z0 = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 2))
  seen = {}

  def model_fn(z_t, t):  # some fixed function of its inputs, remembered
    seen.update(z_t=np.asarray(z_t, np.float64), t=np.asarray(t))
    return 0.5 * z_t + 0.01 * t[:, None, None, None]

  got = schedule.diffusion_loss(
    model_fn, s, z0, jax.random.PRNGKey(3), weighting=weighting, min_snr_gamma=5.0, reduce=False
  )
  t, z_t = seen["t"], seen["z_t"]
  a = np.asarray(ref.alphas_cumprod, np.float64)[t][:, None, None, None]
  noise = (z_t - np.sqrt(a) * np.asarray(z0, np.float64)) / np.sqrt(1 - a)
  tt = torch.as_tensor(np.array(t))
  target = {
    "eps": lambda: noise,
    "x0": lambda: np.asarray(z0, np.float64),
    "v": lambda: ref.get_velocity(
      torch.as_tensor(np.asarray(z0, np.float64)), torch.as_tensor(noise), tt
    ).numpy(),
  }[prediction]()
  pred = 0.5 * z_t + 0.01 * t[:, None, None, None]
  want = ((pred - target) ** 2).mean(axis=(1, 2, 3))
  if weighting == "min_snr":
    snr = compute_snr(ref, tt).double()
    w = torch.minimum(snr, torch.full_like(snr, 5.0))
    want = want * {"eps": w / snr, "v": w / (snr + 1), "x0": w}[prediction].numpy()
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=1e-6)
  assert len(set(t.tolist())) > 8  # the batch spans many timesteps
  if prediction != "eps":
    eps = schedule.eps_of(
      s, jnp.asarray(target, jnp.float32), jnp.asarray(z_t, jnp.float32), jnp.asarray(t)
    )
    np.testing.assert_allclose(np.asarray(eps), noise, atol=2e-4)


def test_the_censored_x0_loss_by_hand():
  """x0_bound=1: a pixel whose target is on the bound (-1 or 1) and whose prediction lies beyond
  it counts no error; every other pixel counts its plain squared error. Worked by hand on six
  pixels with a model that ignores its input."""
  s = schedule.linear_schedule(prediction="x0")
  z0 = jnp.asarray([-1.0, 1.0, 0.5, -1.0, -0.5, 1.0]).reshape(1, 1, 6, 1)
  pred = jnp.asarray([-1.3, 1.2, 0.2, -0.9, -1.3, 0.8]).reshape(1, 1, 6, 1)
  draws = (jnp.asarray([500]), jnp.zeros_like(z0))

  def loss(bound):
    return float(
      schedule.diffusion_loss(lambda z_t, t: pred, s, z0, None, draws=draws, x0_bound=bound)
    )

  # beyond the bound: pixels 0 and 1; inside: 0.3^2, 0.1^2, 0.8^2 (target -0.5 is not on it), 0.2^2
  assert loss(1.0) == pytest.approx((0.09 + 0.01 + 0.64 + 0.04) / 6, rel=1e-6)
  assert loss(0.0) == pytest.approx((0.09 + 0.04 + 0.09 + 0.01 + 0.64 + 0.04) / 6, rel=1e-6)
  with pytest.raises(ValueError, match="x0_bound needs prediction='x0'"):
    schedule.diffusion_loss(
      lambda z_t, t: pred, schedule.linear_schedule(), z0, None, draws=draws, x0_bound=1.0
    )
