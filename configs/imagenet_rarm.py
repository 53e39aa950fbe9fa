"""The paper's RARM on ImageNet subsets (Sec. 3.2.2, Eq. 4; CompVis configs/rarm/{dogs,mammals,animals}.yaml).

  --config=configs/imagenet_rarm.py           # dogs, labels 151..280 (the default)
  --config=configs/imagenet_rarm.py:mammals   # 147..388
  --config=configs/imagenet_rarm.py:animals   # 0..397

Model (rdm_jax/models/rarm.py, LatentImageRETRO / RetrievalPatchTransformer): tokens of LDM's
VQ-f16 (16384 codes, 16 x 16 = 256 per 256-px image) in raster order, embedding table of
16384 + mask + start tokens, learned positional encodings, 18 pre-norm blocks of 12 heads x
64 (causal self-attention, cross-attention to the k = 4 neighbours' raw CLIP ViT-B/32 image
embeddings, 512-d; GEGLU), a linear layer to the code logits.
Optimisation as the original: AdamW, lr 5e-4 (base_learning_rate with --scale_lr false),
betas (0.9, 0.95), torch's weight decay 0.01, no gradient clipping, no scheduler, no EMA
(ema_decay 0: the "EMA" parameters are the parameters). Batch: 50 per GPU with
accumulate_grad_batches 2 there, i.e. 100 images per update on one GPU; here
train.batch_size = 100 per update (raise it with the pod). Departures: a one-step warm-up
(optax's schedule needs >= 1 step), and top-p / a KV cache at sampling (see rarm.py).
The database, retriever and data pipeline are the RDM's (configs/imagenet_rdm.py).
"""

import os

import ml_collections as mlc

from rdm_jax.config_base import config_file


SUBSETS = {"dogs": (151, 280), "mammals": (147, 388), "animals": (0, 397)}


def get_config(subset: str = "dogs") -> mlc.ConfigDict:
  if subset not in SUBSETS:
    raise ValueError(f"subset {subset!r}: use one of {', '.join(SUBSETS)}")
  c = config_file(os.path.join(os.path.dirname(__file__), "imagenet_rdm.py"))
  c.data_dir = f"data/imagenet_{subset}"
  c.dataset.label_range = SUBSETS[subset]
  c.first_stage.update(name="vq_f16", latent_channels=8, weights="models/first_stage_models/vq-f16/model.ckpt",
                       scale_factor=1.0)
  c.model = mlc.ConfigDict(dict(family="rarm", heads=12, dim_head=64, depth=18, dtype="bfloat16"))
  c.k_train = 4
  c.optim.update(lr=5e-4, b1=0.9, b2=0.95, weight_decay=0.01, grad_clip=0.0, warmup_steps=0, ema_decay=0.0)
  c.train.batch_size = 100
  c.train.p_uncond = 0.0
  # sampling: the original's sampling_util draws with top_k 100, temperature 1
  c.sample.update(temperature=1.0, top_k=100, top_p=1.0, guidance_scale=1.0)
  return c
