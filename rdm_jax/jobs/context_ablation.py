r"""Does the model use its neighbours? Held-out eps-loss with true, zeros and shuffled context.

  python -m rdm_jax.jobs.context_ablation --config=configs/fashion_mnist_rdm.py --workdir=runs/fmnist

The three losses share the same test examples, timesteps and noise; only the context
differs: the true k_train neighbours, an all-zeros context (the unconditional branch),
or the neighbours of other test examples (shuffled within the batch). Writes
<workdir>/context_ablation.json.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from rdm_jax import checkpoint, training
from rdm_jax.data import pipeline
from rdm_jax.diffusion import schedule as schedule_lib
from rdm_jax.errors import fail
from rdm_jax.jobs import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_EXAMPLES = flags.DEFINE_integer("num_examples", 2048, "Test examples to average over.")
_REPEATS = flags.DEFINE_integer("repeats", 4, "Noise draws per example.")


def context_losses(model, params, sched, data: pipeline.RetrievalData, k: int, num_examples: int,
                   repeats: int, batch: int = 256, seed: int = 0) -> dict[str, float]:
  """Mean eps-MSE over the first `num_examples` of `data` for each context variant."""
  n = min(num_examples, data.num_examples)

  @jax.jit
  def losses(z0, context, perm, rng):
    def loss(ctx):
      eps_fn = lambda z_t, t: model.apply({"params": params}, z_t, t, ctx)
      return schedule_lib.eps_loss(eps_fn, sched, z0, rng, reduce=False)
    return loss(context), loss(jnp.zeros_like(context)), loss(context[perm])

  totals = np.zeros(3)
  count = 0
  for r in range(repeats):
    for a in range(0, n - batch + 1, batch):
      rows = np.arange(a, a + batch)
      z0, context = pipeline.load_batch(data, rows, k, "first")
      perm = np.random.default_rng([seed, r, a]).permutation(batch)
      out = losses(jnp.asarray(z0), jnp.asarray(context), jnp.asarray(perm),
                   jax.random.PRNGKey(seed * 1000003 + r * 7919 + a))
      totals += np.array([float(np.sum(o)) for o in out])
      count += batch
  if count == 0:
    fail(f"need at least {batch} test examples, have {n}")
  true, zeros, shuffled = totals / count
  return {"true_neighbors": true, "zeros_context": zeros, "shuffled_neighbors": shuffled, "examples": n,
          "repeats": repeats}


def main(argv):
  del argv
  config = cli.CONFIG.value
  workdir = _WORKDIR.value or fail("--workdir is required")
  model, params, info, step = checkpoint.load_trained(config, workdir)
  data = pipeline.load_retrieval_data(config, "test", encoder=info["encoder"])
  result = context_losses(model, params, training.make_schedule(config), data, config.k_train,
                          _EXAMPLES.value, _REPEATS.value, seed=config.train.seed)
  result["checkpoint_step"] = step
  tmp = os.path.join(workdir, "context_ablation.json.tmp")
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, os.path.join(workdir, "context_ablation.json"))
  print(f"held-out eps-MSE at step {step} ({result['examples']} test examples x {result['repeats']} noise draws):")
  print(f"  true neighbours     {result['true_neighbors']:.4f}")
  print(f"  zeros context       {result['zeros_context']:.4f}")
  print(f"  shuffled neighbours {result['shuffled_neighbors']:.4f}")


if __name__ == "__main__":
  cli.run(main)
