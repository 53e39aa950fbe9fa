r"""Sample from a trained RDM: queries -> neighbours in config.database -> DDIM/DDPM/DPM-Solver++ + guidance.

Queries are embedded held-out images (`--config.sample.condition=exemplar`, default),
pseudo-queries drawn from the proposal p_D with top-m truncation (`=proposal`,
unconditional sampling as in the paper's Eq. 6; needs the neighbour job's train part),
class pools from the database's labels (`=class`, Sec. 3.3: k adjacent entries of the
class's pool), or embeddings from a .npy (`=embeddings`).

  python -m rdm_jax.sample --config=configs/fashion_mnist_rdm.py --workdir=runs/fmnist \
      [--config.sample.num_images=16] [--config.sample.guidance_scale=2.0] [--config.database=...]
      [--config.sample.condition=proposal --config.sample.top_m=0.01]
      [--config.sample.condition=class --config.sample.classes=Dress,Sneaker]
      [--config.sample.condition=embeddings --config.sample.embeddings_path=q.npy]
      [--config.sample.sampler=dpm_solver++ --config.sample.num_steps=20]  # or ddim (eta) | ddpm

Writes <workdir>/samples/final_samples.png, final_neighbors_and_samples.png (each row: the k
retrieved neighbours that conditioned it, then the sample) and samples.npz (latents,
images, neighbour rows, query rows, database path, checkpoint step and sampler settings);
the other conditions write <condition>_samples.png, <condition>_neighbors_and_samples.png
and <condition>_samples.npz.
"""

from __future__ import annotations

import os

import numpy as np

from absl import flags

from rdm_jax import inference
from rdm_jax.data import visualize
from rdm_jax.errors import fail
from rdm_jax.jobs import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


NUM_SHOWN = 16


def main(argv):
  del argv
  config = cli.CONFIG.value
  workdir = _WORKDIR.value or fail("--workdir is required")
  rdm = inference.RDM(config, workdir, _STEP.value)  # checks the sampler settings before any retrieval
  s = config.sample
  out_samples = rdm.sample(rdm.from_config())
  cond, z, images, step = out_samples.conditioning, out_samples.latents, out_samples.images, rdm.step
  out = os.path.join(workdir, "samples")
  os.makedirs(out, exist_ok=True)
  prefix = "final" if s.condition == "exemplar" else s.condition
  npz = os.path.join(out, "samples.npz" if s.condition == "exemplar" else f"{prefix}_samples.npz")
  tmp = npz[:-4] + ".tmp.npz"
  np.savez(tmp, latents=z, images=images, neighbor_rows=cond.neighbor_rows, query_rows=cond.query_rows,
           condition=np.asarray(s.condition), database=np.asarray(cond.database.path),
           checkpoint_step=np.asarray(step), sampler=np.asarray(s.sampler), num_steps=np.asarray(s.num_steps),
           guidance_scale=np.asarray(s.guidance_scale), eta=np.asarray(s.eta))
  os.replace(tmp, npz)  # the samples are safe before anything is drawn
  shown = min(len(images), NUM_SHOWN)  # the PNGs show the first samples; the .npz holds all
  grid_png = os.path.join(out, f"{prefix}_samples.png")
  panel_png = os.path.join(out, f"{prefix}_neighbors_and_samples.png")
  visualize.save_png(grid_png, visualize.grid(images[:shown], 4), scale=2)
  visualize.save_png(panel_png, rdm.panel(out_samples, shown), scale=2)
  print(f"step {step}: {len(images)} {s.condition}-conditioned samples with guidance {s.guidance_scale}, "
        f"{s.sampler}, {s.num_steps} steps\n  {grid_png}\n  {panel_png}  (rows: the {config.k_train} conditioning entries | sample)")

if __name__ == "__main__":
  cli.run(main)
