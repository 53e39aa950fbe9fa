r"""Does the model use its neighbours? Held-out eps-loss (RARM: next-token NLL) with true, zeros and
shuffled context.

  python -m rdm_jax.jobs.context_ablation --config=configs/fashion_mnist_rdm.py --workdir=runs/fmnist

The three losses share the same test examples, timesteps and noise; only the context
differs: the true k_train neighbours, an all-zeros context (the unconditional branch),
or the neighbours of other test examples (shuffled within the batch). Writes
<workdir>/context_ablation.json.
"""

from __future__ import annotations

import json

from absl import flags

from rdm_jax import checkpoint, files, training
from rdm_jax.data import pipeline
from rdm_jax.errors import fail
from rdm_jax.jobs import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_EXAMPLES = flags.DEFINE_integer("num_examples", 2048, "Test examples to average over.")
_REPEATS = flags.DEFINE_integer("repeats", 4, "Noise draws per example.")
_BATCH = flags.DEFINE_integer("batch", 256, "Examples per batch (the shuffled context is shuffled within one).")


def main(argv):
  del argv
  config = cli.CONFIG.value
  workdir = _WORKDIR.value or fail("--workdir is required")
  model, params, info, step = checkpoint.load_trained(config, workdir)
  data = pipeline.load_retrieval_data(config, "test", encoder=info["encoder"])
  result = training.context_losses(model, params, training.make_schedule(config), data, config.k_train,
                          _EXAMPLES.value, _REPEATS.value, batch=_BATCH.value, seed=config.train.seed)
  result["checkpoint_step"] = step
  files.atomic_write_text(files.join(workdir, "context_ablation.json"), json.dumps(result, indent=1))
  print(f"held-out eps-MSE at step {step} ({result['examples']} test examples x {result['repeats']} noise draws):")
  print(f"  true neighbours     {result['true_neighbors']:.4f}")
  print(f"  zeros context       {result['zeros_context']:.4f}")
  print(f"  shuffled neighbours {result['shuffled_neighbors']:.4f}")


if __name__ == "__main__":
  cli.run(main)
