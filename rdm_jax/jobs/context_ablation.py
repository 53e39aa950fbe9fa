r"""Does the model use its neighbours? Held-out losses with true, zeros and shuffled context.

  python -m rdm_jax.jobs.context_ablation --config=configs/fashion_mnist_rdm.py \
      --workdir=runs/fmnist

The three losses share the same test examples, timesteps and noise; only the context
differs: the true k_train neighbours, an all-zeros context (the unconditional branch),
or the neighbours of other test examples (shuffled within the batch). A diffusion model gets
the eps-MSE (paper Eq. 3) and the x0-MSE of the clean latent it implies, overall and by noise
level (`--noise_buckets` ranges of t): the eps-MSE shows the low-noise steps, the x0-MSE the
high-noise ones, where the neighbours matter most (see `context_ablation.context_losses`). RARM gets
its next-token NLL. Writes <workdir>/context_ablation.json, and the overall figures as TensorBoard
scalars (context_ablation/<measure>/<context>) at the checkpoint's step, beside the training's.
"""

from __future__ import annotations

import json
from typing import Any

from absl import flags
from clu import metric_writers

from rdm_jax import checkpoint, files
from rdm_jax.data import pipeline
from rdm_jax.errors import fail
from rdm_jax.jobs import cli
from rdm_jax.metrics import context_ablation
from rdm_jax.models import factory

_WORKDIR = cli.define_once(flags.DEFINE_string, "workdir", None, "The training run's directory.")
_EXAMPLES = cli.define_once(
  flags.DEFINE_integer, "num_examples", 2048, "Test examples to average over."
)
_REPEATS = cli.define_once(flags.DEFINE_integer, "repeats", 4, "Noise draws per example.")
_BATCH = cli.define_once(
  flags.DEFINE_integer,
  "batch",
  256,
  "Examples per batch (the shuffled context is shuffled within one).",
)
_BUCKETS = cli.define_once(
  flags.DEFINE_integer,
  "noise_buckets",
  10,
  "Ranges of t the diffusion losses are also reported in.",
)


def run(
  config: Any, workdir: str, examples: int, repeats: int, batch: int, noise_buckets: int
) -> dict[str, Any]:
  """The ablation of the run in `workdir` (its latest checkpoint) on the test part's first
  `examples`, written to <workdir>/context_ablation.json and returned."""
  if noise_buckets < 1:
    fail(f"--noise_buckets={noise_buckets}: give at least 1")
  cli.check_platform(config)
  model, params, info, step = checkpoint.load_trained(config, workdir)
  data = pipeline.load_retrieval_data(config, "test", encoder=info["encoder"])
  result = context_ablation.context_losses(
    model,
    params,
    factory.make_schedule(config),
    data,
    config.k_train,
    examples,
    repeats,
    batch=batch,
    seed=config.train.seed,
    noise_buckets=noise_buckets,
    clip_x0=config.sample.clip_x0 or None,
  )
  result["checkpoint_step"] = step
  files.atomic_write_text(
    files.join(workdir, "context_ablation.json"), json.dumps(result, indent=1)
  )
  writer = metric_writers.create_default_writer(workdir, asynchronous=False)
  writer.write_scalars(step, scalars(result))
  writer.close()
  return result


CONTEXTS = ("true_neighbors", "zeros_context", "shuffled_neighbors")


def scalars(result: dict[str, Any]) -> dict[str, float]:
  """The overall losses by context as TensorBoard scalars: context_ablation/eps_mse/<context>
  and context_ablation/x0_mse/<context> of a diffusion model, context_ablation/nll/<context> of
  RARM."""
  diffusion = "x0_mse" in result
  out = {f"context_ablation/{'eps_mse' if diffusion else 'nll'}/{k}": result[k] for k in CONTEXTS}
  if diffusion:
    out.update({f"context_ablation/x0_mse/{k}": result["x0_mse"][k] for k in CONTEXTS})
  return {k: float(v) for k, v in out.items()}


def main(argv):
  del argv
  workdir = _WORKDIR.value or fail("--workdir is required")
  result = run(
    cli.CONFIG.value, workdir, _EXAMPLES.value, _REPEATS.value, _BATCH.value, _BUCKETS.value
  )
  print(report(result))


def report(result: dict) -> str:
  """The ablation as text: the losses per context, and by noise level when there are any."""
  what = "eps-MSE" if "x0_mse" in result else "next-token NLL (nats per token)"
  lines = [
    f"held-out {what} at step {result['checkpoint_step']} ({result['examples']} test examples x "
    f"{result['repeats']} noise draws):"
  ]
  names = dict(zip(CONTEXTS, ("true neighbours", "zeros context", "shuffled neighbours")))
  for key, name in names.items():
    lines.append(
      f"  {name:20s}{result[key]:.4f}"
      + (f"   x0-MSE {result['x0_mse'][key]:.4f}" if "x0_mse" in result else "")
    )
  if "by_noise" in result:
    lines.append(
      "by noise level (t range, samples): eps-MSE true / zeros / shuffled (gap) | "
      "x0-MSE true / zeros / shuffled (gap)"
    )
    for b in result["by_noise"]:
      e, x = b["eps_mse"], b["x0_mse"]
      lines.append(
        f"  t {b['t_start']:4d}-{b['t_stop'] - 1:<4d} {b['samples']:6d}: "
        f"{e['true_neighbors']:.4f} / {e['zeros_context']:.4f} / {e['shuffled_neighbors']:.4f} "
        f"({e['shuffled_neighbors'] - e['true_neighbors']:+.4f}) | "
        f"{x['true_neighbors']:.4f} / {x['zeros_context']:.4f} / {x['shuffled_neighbors']:.4f} "
        f"({x['shuffled_neighbors'] - x['true_neighbors']:+.4f})"
      )
  return "\n".join(lines)


if __name__ == "__main__":
  cli.run(main)
