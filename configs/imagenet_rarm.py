"""The paper's RARM on ImageNet subsets (Sec. 3.2.2, Eq. 4; CompVis
configs/rarm/{dogs,mammals,animals}.yaml).

  --config=configs/imagenet_rarm.py           # dogs, labels 151..280 (the default)
  --config=configs/imagenet_rarm.py:mammals   # 147..388
  --config=configs/imagenet_rarm.py:animals   # 0..397
  --config=configs/imagenet_rarm.py:dogs,fig5 # any subset, sampled as the paper's Fig. 5
  --config=configs/imagenet_rarm.py:dogs,released  # the released weights' first stage (below)

Model (rdm_jax/models/rarm.py, LatentImageRETRO / RetrievalPatchTransformer): tokens of LDM's
VQ-f16 (16384 codes, 16 x 16 = 256 per 256-px image) in raster order, embedding table of
16384 + mask + start tokens, learned positional encodings, 18 pre-norm blocks of 12 heads x
64 (causal self-attention, cross-attention to the k = 4 neighbours' raw CLIP ViT-B/32 image
embeddings, 512-d; GEGLU), a linear layer to the code logits.
Optimisation as the original: AdamW, betas (0.9, 0.95), torch's weight decay 0.01, no
gradient clipping, no scheduler, no EMA (ema_decay 0: the "EMA" parameters are the parameters).
Learning rate and batch per subset, as the original's training ran them (CompVis
configs/rarm/*.yaml; main.py:981-1000 sets lr = accumulate_grad_batches x num_gpus x
batch_size x base_learning_rate unless --scale_lr false; the released models' configs,
models/rarm/imagenet/*/config.yaml:2, all carry base_learning_rate 5e-6 with batch_size 50):
- dogs: lr 5e-4 (configs/rarm/dogs.yaml:2, "run with --scale_lr false"), 50 per GPU
  (:90) x accumulate_grad_batches 2 (:154) on one GPU = 100 images per update. 5e-4 is what
  --scale_lr would make of the released 5e-6: 2 x 1 x 50 x 5e-6.
- mammals, animals: base_learning_rate 5e-6 (configs/rarm/mammals.yaml:2, animals.yaml:2),
  50 per GPU (:89 / :92), no accumulation (:153 / :156), scaled by main.py's default
  --scale_lr on one GPU: lr 1 x 1 x 50 x 5e-6 = 2.5e-4, 50 images per update. (The README's
  training command adds --scale_lr false, which would leave 5e-6 with nothing to scale it.)
On a pod keep the original's rate and raise train.batch_size, or scale both: the train job
prints the global batch and learning rate it runs with.
Sampling as scripts/rarm_sample.py: pseudo-queries from the top 1% of the retrieved entries
(top_m 0.01, :177-181; sample_from_rdata -> get_qids, transformer.py:297-316, uniformly:
use_weights False), k = 4 neighbours, top-k 256 (:165-169), temperature 1, no guidance;
`:<subset>,fig5` gives Fig. 5's settings instead: top-k 2048, m = 0.05, guidance s = 3.0.
--config.sample.condition=zeros is the script's --unconditional (an all-zeros context).
First stage: LDM's VQ-f16 (embed 8), as the training configs set it (configs/rarm/dogs.yaml:
32-54, mammals.yaml and animals.yaml alike). The released weights (models/rarm/imagenet/<subset>/
model.ckpt) were trained on another one: taming's VQGAN f16 (embed 256, 16384 codes;
models/rarm/imagenet/dogs/config.yaml:29-50), kept only inside model.ckpt. `,released` sets it
(first_stage.name=vqgan_f16, its weights read from that model.ckpt's first_stage_model.*),
for rdm_jax.jobs.import_checkpoint and sampling from the imported run.
Departures: a one-step warm-up (optax's schedule needs >= 1 step), and top-p / a KV cache at
sampling (see rarm.py).
The database, retriever and data pipeline are the RDM's (configs/imagenet_rdm.py).
"""

import os

import ml_collections as mlc

from rdm_jax import config_base
from rdm_jax.config_base import config_file


SUBSETS = {"dogs": (151, 280), "mammals": (147, 388), "animals": (0, 397)}
# (learning rate, images per update) the original trained each subset with (see above)
OPTIMISATION = {"dogs": (5e-4, 100), "mammals": (2.5e-4, 50), "animals": (2.5e-4, 50)}


def get_config(arg: str = "dogs") -> mlc.ConfigDict:
  subset, *variants = arg.split(",")
  if subset not in SUBSETS or set(variants) - {"fig5", "released"}:
    raise ValueError(
      f"configs/imagenet_rarm.py:{arg}: use one of {', '.join(SUBSETS)}, optionally with ',fig5' "
      "and/or ',released'"
    )
  c = config_file(os.path.join(os.path.dirname(__file__), "imagenet_rdm.py"))
  c.data_dir = f"data/imagenet_{subset}"
  c.dataset.label_range = SUBSETS[subset]
  c.first_stage.update(
    name="vq_f16",
    latent_channels=8,
    weights="models/first_stage_models/vq-f16/model.ckpt",
    scale_factor=1.0,
  )
  c.model = config_base.rarm_model(heads=12, dim_head=64, depth=18, dtype="bfloat16")
  c.k_train = 4
  lr, batch = OPTIMISATION[subset]
  c.optim.update(
    lr=lr, b1=0.9, b2=0.95, weight_decay=0.01, grad_clip=0.0, warmup_steps=0, ema_decay=0.0
  )
  c.train.batch_size = batch
  c.train.p_uncond = 0.0
  c.sample.update(
    condition="proposal",
    top_m=0.01,
    top_m_of="retrieved",
    proposal_weighted=False,
    k=4,
    temperature=1.0,
    top_k=256,
    top_p=1.0,
    guidance_scale=1.0,
  )
  if "released" in variants:
    c.first_stage.update(
      name="vqgan_f16", latent_channels=256, weights=f"models/rarm/imagenet/{subset}/model.ckpt"
    )
  if "fig5" in variants:
    c.sample.update(top_k=2048, top_m=0.05, guidance_scale=3.0)
  return c
