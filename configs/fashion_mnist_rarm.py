r"""The offline demo's RARM: an autoregressive transformer over palette tokens of Fashion-MNIST.

No pretrained VQ model ships offline, so the first stage is the palette tokenizer
(rdm_jax/models/palette.py, as ImageGPT): 2x2 average pooling and the nearest of 16 grey
levels that k-means fits on the train images (the encode job writes the palette once), i.e.
14 x 14 = 196 tokens of 16 codes per image. The data, retrieval encoder, database and
neighbours are the RDM demo's (configs/fashion_mnist_rdm.py: EfficientNet-Lite0's block-10 map
at 96 px in 3 x 3 cells), in their own data_dir.

  python -m rdm_jax.jobs.encode    --config=configs/fashion_mnist_rarm.py  # palette and tokens
  python -m rdm_jax.jobs.embed     --config=configs/fashion_mnist_rarm.py
  python -m rdm_jax.jobs.index     --config=configs/fashion_mnist_rarm.py
  python -m rdm_jax.jobs.neighbors --config=configs/fashion_mnist_rarm.py
  python -m rdm_jax.train          --config=configs/fashion_mnist_rarm.py --workdir=runs/fmnist_rarm
  python -m rdm_jax.jobs.context_ablation --config=configs/fashion_mnist_rarm.py \
      --workdir=runs/fmnist_rarm
  python -m rdm_jax.sample         --config=configs/fashion_mnist_rarm.py --workdir=runs/fmnist_rarm

Departures from configs/imagenet_rarm.py for 2 CPU cores, each for the time budget: a small
transformer (4 heads x 32, depth 4), lr 1e-3 with a 100-step warm-up, batch 32, an EMA of
0.999 (short runs), conditioning dropout 0.1 (so that the zeros context is a trained
unconditional branch and guidance is possible).
"""

import os

import ml_collections as mlc

from rdm_jax import config_base
from rdm_jax.config_base import config_file


def get_config() -> mlc.ConfigDict:
  c = config_file(os.path.join(os.path.dirname(__file__), "fashion_mnist_rdm.py"))
  c.data_dir = "data/fashion_mnist_rarm"
  c.dataset.image_size = 28  # the token grid: 28 / 2 = 14 per side
  c.first_stage.update(
    name="palette", pad_to=0, latent_channels=1, weights="data/fashion_mnist_rarm/palette_16.npy"
  )
  c.first_stage.palette_size = 16
  c.first_stage.palette_factor = 2
  c.model = config_base.rarm_model(heads=4, dim_head=32, depth=4, dtype="float32")
  c.optim.update(
    lr=1e-3, warmup_steps=100, b1=0.9, b2=0.95, weight_decay=0.01, grad_clip=1.0, ema_decay=0.999
  )
  c.train.batch_size = 32
  c.train.num_steps = 1500
  c.train.p_uncond = 0.1
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.sample_every = 0
  c.sample.update(
    temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0, num_images=16, batch_size=16
  )
  return c
