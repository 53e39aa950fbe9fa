"""The context ablation's three losses, worked by hand with an oracle model.

With alpha_bar_t = 1/2 at every t and the model eps(z_t, t, ctx) = (z_t - sqrt(a) X) / sqrt(1 - a),
X = the context reshaped to a latent, the error is sqrt(a / (1 - a)) (z0 - X) = z0 - X whatever
t and the noise: the loss is 0 with each example's own latent as its neighbour, mean(z0^2) with
the zeros context, and mean((z0 - z0 of the example the shuffle pairs it with)^2) with shuffled
neighbours (the job's documented pairing: permutation default_rng([seed, repeat, first row])).
The clean latent it implies is X itself, so the x0-MSE is mean((z0 - X)^2) at every alpha_bar,
while the eps-MSE scales it by a / (1 - a): worked by noise level with a schedule of two
alpha_bars.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from rdm_jax.data.pipeline import RetrievalData
from rdm_jax.diffusion.schedule import Schedule
from rdm_jax.metrics.context_ablation import context_losses


class OracleModel:
  def __init__(self, schedule):
    self.a = schedule.alphas_cumprod

  def apply(self, variables, z_t, t, ctx):
    a = self.a[t][:, None, None, None]
    return (z_t - jnp.sqrt(a) * ctx[:, 0].reshape(z_t.shape)) / jnp.sqrt(1 - a)


def test_context_losses_by_hand():
  rng = np.random.default_rng(0)
  n, batch, repeats, seed = 8, 4, 2, 3
  z0 = rng.normal(size=(n, 2, 2, 1)).astype(np.float32)
  data = RetrievalData(
    latents=z0,
    neighbor_ids=np.arange(n)[:, None],
    database=z0.reshape(n, 4),
    latents_store=None,
    neighbors_store=None,
    database_store=None,
  )
  half = Schedule(betas=jnp.zeros(10), alphas_cumprod=jnp.full(10, 0.5))
  got = context_losses(
    OracleModel(half), {}, half, data, k=1, num_examples=n, repeats=repeats, batch=batch, seed=seed
  )
  shuffled = []
  for r in range(repeats):
    for a in range(0, n, batch):
      perm = np.random.default_rng([seed, r, a]).permutation(batch)
      shuffled.append(np.mean((z0[a : a + batch] - z0[a : a + batch][perm]) ** 2, axis=(1, 2, 3)))
  assert got["true_neighbors"] == pytest.approx(0.0, abs=1e-10)
  assert got["zeros_context"] == pytest.approx(float(np.mean(z0.astype(np.float64) ** 2)), rel=1e-5)
  assert got["shuffled_neighbors"] == pytest.approx(float(np.mean(shuffled)), rel=1e-5)
  assert got["shuffled_neighbors"] > 0.5  # the pairing really moves examples
  # at alpha_bar 1/2 the x0 error, X - z0, is the eps error's negative
  for key in ("true_neighbors", "zeros_context", "shuffled_neighbors"):
    assert got["x0_mse"][key] == pytest.approx(got[key], rel=1e-5, abs=1e-10)
  assert (got["examples"], got["repeats"]) == (n, repeats)
  # 7 examples in batches of 4: one whole batch is used, and the result says so
  part = context_losses(
    OracleModel(half), {}, half, data, k=1, num_examples=7, repeats=1, batch=batch, seed=seed
  )
  assert part["examples"] == 4
  assert part["zeros_context"] == pytest.approx(
    float(np.mean(z0[:4].astype(np.float64) ** 2)), rel=1e-5
  )


def test_context_losses_by_noise_level():
  """alpha_bar 0.2 for t < 5 and 0.8 for t >= 5, latents of +-1: with the zeros context the eps-MSE
  is a / (1 - a) = 0.25 in the first half of t and 4 in the second, the x0-MSE 1 in both; the
  shuffled x0-MSE is the mean of (z0 - z0 of the paired example)^2 whatever t."""
  rng = np.random.default_rng(1)
  n, batch, repeats, seed = 16, 8, 3, 5
  z0 = rng.choice([-1.0, 1.0], size=(n, 2, 2, 1)).astype(np.float32)
  data = RetrievalData(
    latents=z0,
    neighbor_ids=np.arange(n)[:, None],
    database=z0.reshape(n, 4),
    latents_store=None,
    neighbors_store=None,
    database_store=None,
  )
  two = Schedule(betas=jnp.zeros(10), alphas_cumprod=jnp.asarray([0.2] * 5 + [0.8] * 5))
  got = context_losses(
    OracleModel(two),
    {},
    two,
    data,
    k=1,
    num_examples=n,
    repeats=repeats,
    batch=batch,
    seed=seed,
    noise_buckets=2,
  )
  low, high = got["by_noise"]
  assert (low["t_start"], low["t_stop"], high["t_start"], high["t_stop"]) == (0, 5, 5, 10)
  assert (
    low["samples"] + high["samples"] == n * repeats and min(low["samples"], high["samples"]) > 0
  )
  assert low["eps_mse"]["zeros_context"] == pytest.approx(0.25, rel=1e-5)
  assert high["eps_mse"]["zeros_context"] == pytest.approx(4.0, rel=1e-5)
  for b in (low, high):
    assert b["x0_mse"]["zeros_context"] == pytest.approx(1.0, rel=1e-5)
    assert b["eps_mse"]["true_neighbors"] == pytest.approx(0.0, abs=1e-10)
    assert b["x0_mse"]["true_neighbors"] == pytest.approx(0.0, abs=1e-10)
  assert got["zeros_context"] == pytest.approx(
    (0.25 * low["samples"] + 4.0 * high["samples"]) / (n * repeats), rel=1e-5
  )
  shuffled = [
    np.mean(
      (
        z0[a : a + batch]
        - z0[a : a + batch][np.random.default_rng([seed, r, a]).permutation(batch)]
      )
      ** 2
    )
    for r in range(repeats)
    for a in range(0, n, batch)
  ]
  assert got["x0_mse"]["shuffled_neighbors"] == pytest.approx(float(np.mean(shuffled)), rel=1e-5)
  assert got["x0_mse"]["shuffled_neighbors"] > 0.5


def test_the_job_writes_its_figures_to_the_runs_tensorboard(trained, tmp_path):
  """The job on a copy of the shared run: TensorBoard scalars of the figures it returns, at the
  checkpoint's step, read back with TensorFlow's reader."""
  import shutil

  from rdm_jax.jobs import context_ablation
  from tests.conftest import tensorboard_events, tiny_config

  data_dir, run = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(run, workdir)
  result = context_ablation.run(tiny_config(data_dir), workdir, 8, 1, 4, 2)
  scalars, _ = tensorboard_events(workdir)
  for key in ("true_neighbors", "zeros_context", "shuffled_neighbors"):
    assert scalars[f"context_ablation/eps_mse/{key}"] == {4: pytest.approx(result[key], rel=1e-6)}
    assert scalars[f"context_ablation/x0_mse/{key}"] == {
      4: pytest.approx(result["x0_mse"][key], rel=1e-6)
    }


def test_context_losses_of_the_clipped_prediction():
  """clip_x0=1 scores the prediction the sampler steps with. Latents of +-1 and a context of twice
  each latent: the oracle's x0 is 2 z0, an error of z0 (x0-MSE 1, eps-MSE a / (1 - a) = 1 at
  alpha_bar 1/2) unclipped, and clipped to [-1, 1] exactly z0 (both 0). The zeros context's x0 = 0
  lies inside the range, so clipping leaves its losses at 1."""
  rng = np.random.default_rng(2)
  n = 8
  z0 = rng.choice([-1.0, 1.0], size=(n, 2, 2, 1)).astype(np.float32)
  data = RetrievalData(
    latents=z0,
    neighbor_ids=np.arange(n)[:, None],
    database=2.0 * z0.reshape(n, 4),
    latents_store=None,
    neighbors_store=None,
    database_store=None,
  )
  half = Schedule(betas=jnp.zeros(10), alphas_cumprod=jnp.full(10, 0.5))

  def run(clip):
    return context_losses(
      OracleModel(half), {}, half, data, k=1, num_examples=n, repeats=1, batch=4, clip_x0=clip
    )

  plain, clipped = run(None), run(1.0)
  assert plain["true_neighbors"] == pytest.approx(1.0, rel=1e-5)
  assert plain["x0_mse"]["true_neighbors"] == pytest.approx(1.0, rel=1e-5)
  assert clipped["true_neighbors"] == pytest.approx(0.0, abs=1e-10)
  assert clipped["x0_mse"]["true_neighbors"] == pytest.approx(0.0, abs=1e-10)
  for got in (plain, clipped):
    assert got["zeros_context"] == pytest.approx(1.0, rel=1e-5)
    assert got["x0_mse"]["zeros_context"] == pytest.approx(1.0, rel=1e-5)
