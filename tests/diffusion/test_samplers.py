"""DDIM timesteps, DDPM and DPM-Solver++(2M) against the original formulas, diffusers' scheduler and
the exact probability-flow solution for Gaussian data.

For data N(mu, sd^2) the optimal eps is affine in z_t: eps(z_t) = sqrt(1-a)(z_t - sqrt(a) mu) /
(a sd^2 + 1 - a), a = abar_t. Its probability-flow ODE keeps the standardised coordinate
u = (z_t - sqrt(a) mu) / sqrt(a sd^2 + 1 - a) constant, so the exact solution from any start to any
end is known in closed form, and an ODE sampler's error can be measured exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdm_jax.diffusion import ddim, samplers, schedule
from tests.torch_references import reference

MU, SD = 0.5, 0.3
SCHED = schedule.linear_schedule()
A_BAR = np.asarray(SCHED.alphas_cumprod, np.float64)


def _gaussian_eps(mu, sched=SCHED):
  def eps_fn(z, t, context):
    a = sched.alphas_cumprod[t][:, None, None, None]
    return jnp.sqrt(1 - a) * (z - jnp.sqrt(a) * mu) / (a * SD**2 + 1 - a)

  return eps_fn


def _context_mean_eps(z, t, context):
  """Gaussian-data eps whose mean is the context's mean: the zeros context (the unconditional
  branch of guidance) means mu = 0."""
  return _gaussian_eps(context.mean(axis=(1, 2))[:, None, None, None])(z, t, context)


def _flow(z, a_start, a_end, mu=MU):
  """The exact probability-flow map from abar a_start to abar a_end for N(mu, SD^2) data."""
  u = (z - np.sqrt(a_start) * mu) / np.sqrt(a_start * SD**2 + 1 - a_start)
  return np.sqrt(a_end) * mu + np.sqrt(a_end * SD**2 + 1 - a_end) * u


def ldm_make_ddim_timesteps(num_ddim_timesteps, num_ddpm_timesteps):
  """LDM's make_ddim_timesteps("uniform", ...) as written in
  ldm/modules/diffusionmodules/util.py."""
  c = num_ddpm_timesteps // num_ddim_timesteps
  ddim_timesteps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
  return ddim_timesteps + 1


@pytest.mark.parametrize("num_steps", [10, 50, 100, 250, 400, 1000])
def test_ddim_timesteps_equal_the_originals(num_steps):
  want = ldm_make_ddim_timesteps(num_steps, 1000)
  if num_steps > 500:  # the original's last timestep is T = 1000, past alpha_bar: dropped
    assert want[-1] == 1000
    want = want[:-1]
  np.testing.assert_array_equal(ddim.ddim_timesteps(1000, num_steps), want)
  if num_steps == 400:  # 1000 // 400 = 2: every other step, 500 of them, from 999 (not 799)
    assert len(want) == 500 and want[-1] == 999


def test_ddim_runs_every_original_timestep():
  """T = 10, S = 3: c = 3, timesteps 1, 4, 7 (10 dropped), three steps, each checked by hand with
  the eps of Gaussian data: z <- sqrt(a_prev) x0 + sqrt(1 - a_prev) eps (eta = 0)."""
  s = schedule.linear_schedule(10, 0.1, 0.2)
  a_all = np.asarray(s.alphas_cumprod, np.float64)

  def eps_np(z, a):
    return np.sqrt(1 - a) * (z - np.sqrt(a) * MU) / (a * SD**2 + 1 - a)

  z_T = np.linspace(-2, 2, 5).reshape(5, 1, 1, 1)
  out = ddim.ddim_sample(
    _gaussian_eps(MU, s),
    s,
    jnp.zeros((5, 1, 1)),
    z_T.shape,
    jax.random.PRNGKey(0),
    num_steps=3,
    guidance_scale=1.0,
    z_init=z_T,
  )
  z = z_T
  for tau, prev in ((7, 4), (4, 1), (1, 0)):
    a, a_prev = a_all[tau], a_all[prev] if prev else a_all[0]
    e = eps_np(z, a)
    z = np.sqrt(a_prev) * (z - np.sqrt(1 - a) * e) / np.sqrt(a) + np.sqrt(1 - a_prev) * e
  np.testing.assert_allclose(np.asarray(out), z, rtol=1e-5, atol=1e-6)


def _diffusers_solve(sch, z_T, mu_c, scale):
  """diffusers' scheduler `sch` run from z_T on Gaussian data around the context means mu_c,
  guided with `scale` against the zero-mean unconditional branch (float64)."""
  torch = reference("torch")
  x = torch.tensor(z_T, dtype=torch.float64)
  for t in sch.timesteps:
    a = float(A_BAR[int(t)])
    e_c = np.sqrt(1 - a) * (x.numpy() - np.sqrt(a) * mu_c) / (a * SD**2 + 1 - a)
    e_u = np.sqrt(1 - a) * x.numpy() / (a * SD**2 + 1 - a)
    x = sch.step(torch.tensor(e_u + scale * (e_c - e_u)), t, x).prev_sample
  return x


@pytest.mark.parametrize(
  "num_steps,spacing,final_x0",
  [(5, "linspace", False), (20, "linspace", False), (20, "logsnr", False), (20, "logsnr", True)],
)
def test_dpm_solver_pp_equals_diffusers(num_steps, spacing, final_x0):
  """Ours against diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, ending at
  abar_0: final_sigmas_type="sigma_min", or with final_x0 at sigma = 0: "zero") on the same betas,
  guided with s = 3; 5 steps end with a first-order step, 20 with a second-order one (to abar_0)."""
  reference("torch")
  diffusers = reference("diffusers")
  sch = diffusers.DPMSolverMultistepScheduler(
    num_train_timesteps=1000,
    trained_betas=np.asarray(SCHED.betas),
    algorithm_type="dpmsolver++",
    solver_order=2,
    solver_type="midpoint",
    lower_order_final=True,
    final_sigmas_type="zero" if final_x0 else "sigma_min",
    timestep_spacing="linspace",
    prediction_type="epsilon",
    thresholding=False,
  )
  ours_t = samplers.dpm_solver_timesteps(A_BAR, num_steps, spacing)
  if spacing == "linspace":  # diffusers' own spacing
    sch.set_timesteps(num_steps)
    np.testing.assert_array_equal(ours_t, sch.timesteps.numpy())
  else:
    sch.set_timesteps(timesteps=ours_t.tolist())

  n, scale = 6, 3.0
  context = np.linspace(-1, 1, n * 2 * 3).reshape(n, 2, 3).astype(np.float32)
  mu_c = context.mean(axis=(1, 2)).reshape(n, 1, 1, 1)
  z_T = np.random.default_rng(0).normal(size=(n, 1, 1, 1)).astype(np.float32)
  x = _diffusers_solve(sch, z_T, mu_c, scale)
  ours = samplers.sample(
    _context_mean_eps,
    SCHED,
    jnp.asarray(context),
    z_T.shape,
    jax.random.PRNGKey(0),
    sampler="dpm_solver++",
    num_steps=num_steps,
    guidance_scale=scale,
    z_init=z_T,
    timestep_spacing=spacing,
    final_x0=final_x0,
  )
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=2e-4, atol=2e-5)


def _ode_samples(sampler, steps):
  z_T = np.linspace(-2.5, 2.5, 11).reshape(11, 1, 1, 1)
  errors, outs = [], []
  for s in steps:
    out = samplers.sample(
      _gaussian_eps(MU),
      SCHED,
      jnp.zeros((11, 1, 1)),
      z_T.shape,
      jax.random.PRNGKey(0),
      sampler=sampler,
      num_steps=s,
      guidance_scale=1.0,
      z_init=z_T,
    )
    first = ddim.ddim_timesteps(1000, s)[-1] if sampler == "ddim" else 999
    want = _flow(z_T, A_BAR[first], A_BAR[0])  # both end at abar_0
    outs.append(np.asarray(out, np.float64))
    errors.append(float(np.abs(outs[-1] - want).max()))
  return errors, outs


def test_ddim_with_final_x0_equals_diffusers_ddim_with_alpha_one():
  """sample.final_step="x0": DDIM (eta = 0, guidance 3) against diffusers' DDIMScheduler with
  set_alpha_to_one=True on LDM's timesteps (steps_offset=1, "leading"), where the last step
  returns the predicted z_0; without it (set_alpha_to_one=False, our default) both end at abar_0."""
  reference("torch")
  diffusers = reference("diffusers")
  n, scale = 6, 3.0
  context = np.linspace(-1, 1, n * 2 * 3).reshape(n, 2, 3).astype(np.float32)
  mu_c = context.mean(axis=(1, 2)).reshape(n, 1, 1, 1)
  z_T = np.random.default_rng(1).normal(size=(n, 1, 1, 1)).astype(np.float32)
  for final_x0 in (True, False):
    sch = diffusers.DDIMScheduler(
      num_train_timesteps=1000,
      trained_betas=np.asarray(SCHED.betas),
      clip_sample=False,
      set_alpha_to_one=final_x0,
      steps_offset=1,
      timestep_spacing="leading",
      prediction_type="epsilon",
    )
    sch.set_timesteps(10)
    x = _diffusers_solve(sch, z_T, mu_c, scale)
    ours = samplers.sample(
      _context_mean_eps,
      SCHED,
      jnp.asarray(context),
      z_T.shape,
      jax.random.PRNGKey(0),
      sampler="ddim",
      num_steps=10,
      guidance_scale=scale,
      z_init=z_T,
      final_x0=final_x0,
    )
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=2e-4, atol=2e-5)


def test_ode_samplers_converge_to_the_exact_flow():
  """DDIM (eta = 0) and DPM-Solver++(2M) both solve the probability-flow ODE from t = 999 to abar_0:
  their error against the exact solution falls as steps grow, DDIM's as about 1/S (first order),
  DPM-Solver++'s faster; 20 DPM-Solver++ steps beat 100 DDIM steps, and the two samplers converge
  to the same samples."""
  steps = [10, 20, 50, 100]
  (e_ddim, ddim_out), (e_dpm, dpm_out) = (
    _ode_samples("ddim", steps + [1000]),
    _ode_samples("dpm_solver++", steps),
  )
  assert all(a > b for a, b in zip(e_ddim, e_ddim[1:])), e_ddim
  assert all(a > b for a, b in zip(e_dpm, e_dpm[1:])), e_dpm
  assert 5 < e_ddim[0] / e_ddim[3] < 20, e_ddim  # 10x the steps: ~10x smaller
  assert e_dpm[1] < e_ddim[3] / 4, (e_dpm, e_ddim)
  assert e_dpm[3] < 2e-3, e_dpm
  assert np.abs(ddim_out[4] - dpm_out[3]).max() < 0.01  # DDIM 1000 (from 999) and DPM-Solver++ 100


def _ddpm_moments(taus, mu):
  """Mean and variance of the ancestral DDPM chain's output for N(mu, SD^2) data with the exact eps:
  each step z <- coef_x0 x0(z) + coef_z z + sqrt(beta~) n (Ho et al. 2020, Eqs. 6-7) on the chain
  respaced to `taus` (beta'_i = 1 - abar_i / abar_{i-1}), affine in z, so N(m, v) stays Gaussian."""
  m, v = 0.0, 1.0
  for j in range(len(taus) - 1, -1, -1):
    a = A_BAR[taus[j]]
    a_prev = A_BAR[taus[j - 1]] if j > 0 else 1.0
    beta = 1 - a / a_prev
    g = np.sqrt(1 - a) / (a * SD**2 + 1 - a)  # eps = g z - g sqrt(a) mu
    x0_slope, x0_offset = (1 - np.sqrt(1 - a) * g) / np.sqrt(a), np.sqrt(1 - a) * g * mu
    c_x0 = np.sqrt(a_prev) * beta / (1 - a)
    c_z = np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
    var = beta * (1 - a_prev) / (1 - a)
    slope, offset = c_x0 * x0_slope + c_z, c_x0 * x0_offset
    m, v = slope * m + offset, slope**2 * v + var
  return m, v


@pytest.mark.parametrize("num_steps", [1000, 10])
def test_ddpm_moments_on_gaussian_data(num_steps):
  """The full chain (LDM's p_sample_loop) and a 10-step respaced one: mean and variance of 1e5
  samples match the closed form. The full chain lands near the data's N(0.5, 0.09): its variance is
  6% short, as the reverse variance beta~ is the lower of Ho et al.'s two choices (Sec. 3.2) and
  the last step returns E[x0 | z_0]."""
  n = 100_000
  out = np.asarray(
    samplers.sample(
      _gaussian_eps(MU),
      SCHED,
      jnp.zeros((n, 1, 1)),
      (n, 1, 1, 1),
      jax.random.PRNGKey(4),
      sampler="ddpm",
      num_steps=num_steps,
      guidance_scale=1.0,
    ),
    np.float64,
  )
  taus = np.arange(1000) if num_steps == 1000 else np.round(np.linspace(0, 999, 10)).astype(int)
  m, v = _ddpm_moments(taus, MU)
  assert abs(out.mean() - m) < 5 * np.sqrt(v / n), (out.mean(), m)
  assert out.var() == pytest.approx(v, rel=0.02), (out.var(), v)
  if num_steps == 1000:
    assert m == pytest.approx(MU, abs=1e-3) and 0.92 < v / SD**2 < 0.96, (m, v)
  else:  # 10 coarse steps: the chain's variance is far off the data's
    assert v / SD**2 < 0.3, v


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_every_sampler_guides_against_the_zeros_context(sampler):
  """With scale s the sampler must follow e_u + s (e_c - e_u), e_u at the all-zeros context: the
  same as an unguided run on that combination computed by hand; s = 1 is the conditional model."""
  n = 4
  context = jnp.asarray(np.linspace(0.2, 1.0, n * 2 * 3).reshape(n, 2, 3), jnp.float32)
  rng = jax.random.PRNGKey(5)

  def by_hand(scale):
    def eps_fn(z, t, c):
      e_c = _context_mean_eps(z, t, c)
      e_u = _context_mean_eps(z, t, jnp.zeros_like(c))
      return e_u + scale * (e_c - e_u)

    return eps_fn

  for scale in (1.0, 3.0):
    guided = samplers.sample(
      _context_mean_eps,
      SCHED,
      context,
      (n, 2, 2, 1),
      rng,
      sampler=sampler,
      num_steps=8,
      guidance_scale=scale,
      eta=0.5,
    )
    want = samplers.sample(
      by_hand(scale),
      SCHED,
      context,
      (n, 2, 2, 1),
      rng,
      sampler=sampler,
      num_steps=8,
      guidance_scale=1.0,
      eta=0.5,
    )
    np.testing.assert_allclose(np.asarray(guided), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_unknown_sampler_is_a_clear_error():
  with pytest.raises(ValueError, match="use one of ddim, ddpm, dpm_solver\\+\\+"):
    samplers.sample(
      _context_mean_eps,
      SCHED,
      jnp.zeros((1, 1, 1)),
      (1, 1, 1, 1),
      jax.random.PRNGKey(0),
      sampler="euler",
    )


@pytest.mark.parametrize("sampler,eta", [("ddim", 1.0), ("ddpm", 0.0), ("dpm_solver++", 0.0)])
def test_each_sample_draws_its_noise_from_its_own_key(sampler, eta):
  """Given one key per sample, a sample drawn alone equals the same sample drawn in a batch of
  others (start noise, and DDIM eta=1 / DDPM noise at every step); rows with the same context
  but different keys differ."""
  n = 3
  context = jnp.ones((n, 2, 3), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(9), n)
  run = lambda c, k: np.asarray(
    samplers.sample(
      _context_mean_eps,
      SCHED,
      c,
      (len(c), 2, 2, 1),
      k,
      sampler=sampler,
      num_steps=6,
      guidance_scale=2.0,
      eta=eta,
    )
  )
  batch = run(context, keys)
  for i in range(n):
    np.testing.assert_allclose(
      run(context[i : i + 1], keys[i : i + 1])[0], batch[i], rtol=1e-5, atol=1e-6
    )
  assert np.abs(batch[0] - batch[1]).min() > 1e-4
  with pytest.raises(ValueError, match="2 per-sample keys for a batch of 3"):
    run(context, keys[:2])
