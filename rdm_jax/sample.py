r"""Sample from a trained RDM: exemplar queries -> neighbours in config.database -> DDIM + guidance.

  python -m rdm_jax.sample --config=configs/fashion_mnist_rdm.py --workdir=runs/fmnist \
      [--config.sample.num_images=16] [--config.sample.guidance_scale=2.0] [--config.database=...]

Writes <workdir>/samples/final_samples.png, final_neighbors_and_samples.png (each row: the k
retrieved neighbours that conditioned it, then the sample) and samples.npz (latents,
images, neighbour rows, database path).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax import checkpoint, conditioning, training
from rdm_jax.data import visualize
from rdm_jax.errors import fail
from rdm_jax.jobs import cli
from rdm_jax.models import first_stage
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def main(argv):
  del argv
  config = cli.CONFIG.value
  workdir = _WORKDIR.value or fail("--workdir is required")
  model, params, info, step = checkpoint.load_trained(config, workdir, _STEP.value)
  s = config.sample
  cond = conditioning.exemplar_conditioning(config, s.num_images, config.k_train, s.query_part,
                                            encoder=info["encoder"])
  sampler = training.make_sampler(model, training.make_schedule(config), info["latent_shape"], s)
  z = np.asarray(jax.device_get(sampler(params, jnp.asarray(cond.context),
                                        jax.random.PRNGKey(config.train.seed + 7))))
  images = first_stage.decode(config.first_stage, z, tuple(info["image_hw"]))
  neighbors = conditioning.database_images(cond.database, config.dataset, cond.neighbor_rows)
  out = os.path.join(workdir, "samples")
  visualize.save_png(os.path.join(out, "final_samples.png"), visualize.grid(images, 4), scale=2)
  visualize.save_png(os.path.join(out, "final_neighbors_and_samples.png"),
                     visualize.neighbor_panel(neighbors, images), scale=2)
  tmp = os.path.join(out, "samples.tmp.npz")
  np.savez(tmp, latents=z, images=images, neighbor_rows=cond.neighbor_rows,
           database=np.asarray(cond.database.path), checkpoint_step=np.asarray(step))
  os.replace(tmp, os.path.join(out, "samples.npz"))
  print(f"step {step}: {len(images)} samples with guidance {s.guidance_scale}, {s.num_steps} DDIM steps\n"
        f"  {os.path.join(out, 'final_samples.png')}\n  {os.path.join(out, 'final_neighbors_and_samples.png')}"
        f"  (rows: {config.k_train} retrieved neighbours | sample)")


if __name__ == "__main__":
  cli.run(main)
