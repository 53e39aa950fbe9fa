"""The held-out context ablation: a model's loss with its true neighbours, with zeros, and with
other examples' neighbours (rdm_jax.jobs.context_ablation)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax.data import pipeline
from rdm_jax.diffusion import ddim, schedule as schedule_lib
from rdm_jax.errors import fail
from rdm_jax.models import rarm


CONTEXTS = ("true_neighbors", "zeros_context", "shuffled_neighbors")


def context_losses(
  model,
  params,
  sched,
  data: pipeline.RetrievalData,
  k: int,
  num_examples: int,
  repeats: int,
  batch: int = 256,
  seed: int = 0,
  noise_buckets: int = 10,
  clip_x0: float | None = None,
) -> dict[str, Any]:
  """Held-out losses of the model with each context (CONTEXTS: the true k neighbours, zeros, the
  neighbours of other examples of the batch) over the first `num_examples` of `data`, in whole
  batches (a last partial batch would shuffle among fewer examples): `examples` says how many.

  Diffusion: the eps-MSE (paper Eq. 3, unweighted, whatever the network predicts), t ~ U{0..T-1}
  and the noise drawn as the training loss draws them; also ("x0_mse") the MSE of the clean
  latent the prediction implies, x0 = (z_t - sqrt(1 - a) eps) / sqrt(a); with `clip_x0` (the
  sampler's config.sample.clip_x0) both of the prediction the sampler steps with: x0 clipped to
  [-clip_x0, clip_x0] and eps re-derived from it; and
  ("by_noise") both in `noise_buckets` equal ranges of t. An x0 error weighs sqrt(SNR) times
  more in eps, so the eps-MSE is ruled by the low-noise steps, where the image shows through the
  noise, and the x0-MSE by the high-noise steps, where the neighbours are most of what the
  model knows. RARM: next-token NLL in nats per token (no noise, so its repeats agree).
  """
  n = min(num_examples, data.num_examples)
  autoregressive = isinstance(model, rarm.RARM)

  @jax.jit
  def losses(z0, context, perm, rng):
    """-> (t [B] or None, per-context per-example eps-MSE (RARM: NLL) [3, B], x0-MSE [3, B] or
    None)."""
    contexts = (context, jnp.zeros_like(context), context[perm])
    if autoregressive:

      def nll(ctx):
        logp = jax.nn.log_softmax(model.apply({"params": params}, z0, ctx), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, z0[..., None], axis=-1)[..., 0], axis=-1)

      return None, jnp.stack([nll(c) for c in contexts]), None
    t, noise = schedule_lib.draw_t_and_noise(sched, z0.shape, rng)
    z_t = schedule_lib.q_sample(sched, z0, t, noise)
    a = sched.alphas_cumprod[t].reshape((-1,) + (1,) * (z0.ndim - 1))
    mean = lambda x: jnp.mean(jnp.square(x), axis=tuple(range(1, z0.ndim)))
    predict_eps = schedule_lib.eps_fn(model, params, sched)
    eps_mse, x0_mse = [], []
    for c in contexts:
      eps = predict_eps(z_t, t, c)
      x0, eps = ddim.x0_and_eps(z_t, eps, a, clip_x0)
      eps_mse.append(mean(eps - noise))
      x0_mse.append(mean(x0 - z0.astype(jnp.float32)))
    return t, jnp.stack(eps_mse), jnp.stack(x0_mse)

  num_t = getattr(sched, "num_timesteps", 1)
  sums = np.zeros((2, 3, noise_buckets))  # (eps, x0) x context x bucket
  counts = np.zeros(noise_buckets)
  count = 0
  for r in range(repeats):
    for a in range(0, n - batch + 1, batch):
      rows = np.arange(a, a + batch)
      z0, context = pipeline.load_batch(data, rows, k, "first")
      perm = np.random.default_rng([seed, r, a]).permutation(batch)
      t, eps_mse, x0_mse = losses(
        jnp.asarray(z0),
        jnp.asarray(context),
        jnp.asarray(perm),
        jax.random.PRNGKey(seed * 1000003 + r * 7919 + a),
      )
      bucket = np.zeros(batch, np.int64) if t is None else np.asarray(t) * noise_buckets // num_t
      for i, per_example in enumerate((eps_mse, x0_mse)):
        if per_example is not None:  # [3, B] into the [3, buckets] sums, by each example's bucket
          np.add.at(sums[i], (slice(None), bucket), np.asarray(per_example, np.float64))
      np.add.at(counts, bucket, 1)
      count += batch
  if count == 0:
    fail(f"need at least {batch} test examples, have {n}")
  total = sums.sum(axis=2) / count
  result = {**dict(zip(CONTEXTS, total[0])), "examples": count // repeats, "repeats": repeats}
  if not autoregressive:
    result["x0_mse"] = dict(zip(CONTEXTS, total[1]))
    result["by_noise"] = [
      {
        "t_start": -(-b * num_t // noise_buckets),
        "t_stop": -(-(b + 1) * num_t // noise_buckets),
        "samples": int(counts[b]),
        "eps_mse": dict(zip(CONTEXTS, sums[0, :, b] / max(counts[b], 1))),
        "x0_mse": dict(zip(CONTEXTS, sums[1, :, b] / max(counts[b], 1))),
      }
      for b in range(noise_buckets)
    ]
  return result
