"""The paper's ImageNet RDM (Blattmann et al. 2022, Sec. 4; DESIGN.md
"Facts from the original code").

UNet: 192 channels, mult (1, 2, 3, 5), 2 res blocks per level, attention at downsampling
factors 2/4/8 (32/16/8 px of the 3x64x64 VQ-f4 latent) and in the middle block, head dim
32, transformer depth 1; context = k=4 raw CLIP ViT-B/32 image embeddings (512-d).
Diffusion: T=1000, linear schedule 1.5e-3..1.95e-2, eps-prediction. AdamW 1e-4 with a
short warm-up, EMA 0.9999, no conditioning dropout (as the released models).

Needs, in order (each job validates what the previous one wrote):

  python -m rdm_jax.jobs.encode    --config=configs/imagenet_rdm.py   # VQ-f4 latents
  python -m rdm_jax.jobs.embed     --config=configs/imagenet_rdm.py   # CLIP database + queries
  python -m rdm_jax.jobs.index     --config=configs/imagenet_rdm.py   # ScaNN, in shards of 16 GiB
  python -m rdm_jax.jobs.neighbors --config=configs/imagenet_rdm.py   # top-20 neighbours + p_D
  python -m rdm_jax.train          --config=configs/imagenet_rdm.py --workdir=$WORKDIR \
      --config.mesh.data=-1 --config.mesh.fsdp=4
  python -m rdm_jax.sample         --config=configs/imagenet_rdm.py --workdir=$WORKDIR \
      --config.sample.condition=proposal --config.sample.num_images=50000
  python -m rdm_jax.evaluate       --config=configs/imagenet_rdm.py --workdir=$WORKDIR \
      --config.eval.weights=/path/to/pt_inception-2015-12-05-6726825d.pth   # FID, IS, P/R

RDM-IN (`--config=configs/imagenet_rdm.py:in-db`; the released imagenet_in-db model): the same
model trained with ImageNet's own train images as the database (models/rdm/imagenet_in-db/
config.yaml:96, saved_embeddings database/imagenet: one CLIP embedding per train image), a
10,000-step warm-up (:25-26; RDM-OI's is 100) and nothing excluded from a query's neighbours, as
the original retrieves them (its QueryDataset takes the stored neighbours as they are, so every
train image's nearest entry is itself). `--config.retrieval.exclude=auto` is ours instead: each
query's own entry and its near-duplicates (cosine >= retrieval.duplicate_score) are dropped, so
the model never sees its target's own embedding in training; sampling from D's pseudo-queries
then conditions on entries the pseudo-query is not among. Its stores live in data/imagenet_in-db.

Needs, as local files (docs/paper_configuration.md): ImageNet prepared for TFDS
(`tfds build imagenet2012`), OpenImages' train images unpacked under data/openimages/train (the
database: 10 random 256-px crops per image resized to 1200 px, embedded as float16), LDM's
vq-f4 model.ckpt and OpenAI's ViT-B-32.pt at the paths below. Animal subsets as the RARM
configs: --config.dataset.label_range=(151,280) (dogs), (147,388) (mammals), (0,397) (animals).
"""

import ml_collections as mlc

from rdm_jax.config_base import base_config


def get_config(arg: str = "") -> mlc.ConfigDict:
  if arg not in ("", "in-db"):
    raise ValueError(
      f"configs/imagenet_rdm.py:{arg}: use no argument (RDM-OI) or ':in-db' (RDM-IN)"
    )
  c = base_config()
  c.data_dir = "data/imagenet"
  c.dataset.name = "imagenet2012"  # TFDS, prepared once with `tfds build imagenet2012`
  c.dataset.image_size = 256  # shorter side to 256, centre crop (the original's ImageNet size 256)
  c.dataset.parts = mlc.ConfigDict(
    dict(
      train=dict(split="train", start=0, stop=1281167),
      # RDM-OI: the database is OpenImages, as an image folder (its train images, unpacked),
      # cut into random 256-px crops of images resized to 1200 px (config.database_build)
      database=dict(split="folder:data/openimages/train", start=0, stop=0),
      test=dict(split="validation", start=0, stop=50000),
    )
  )
  # LDM VQ-f4 (vq-f4.zip of the latent-diffusion README, unpacked where the original's configs
  # expect it); 256 px images -> 3x64x64 latents, scale factor 1.0 (as the RDM release).
  c.first_stage.update(
    name="vq_f4",
    pad_to=0,
    latent_channels=3,
    weights="models/first_stage_models/vq-f4/model.ckpt",
    scale_factor=1.0,
  )
  c.dataset.folder.update(image_size=256, channels=3, background="white")
  c.database_build.update(
    crops_per_image=10, crop_size=256, resize_to=1200, embeddings_dtype="float16"
  )
  c.retrieval.encoder = "clip_vit_b32"
  c.retrieval.weights = "models/clip/ViT-B-32.pt"  # OpenAI's file, or a saved transformers CLIP dir
  c.retrieval.embed_dim = 512
  c.retrieval.image_size = 224
  c.retrieval.num_neighbors = 20
  c.k_train = 4

  c.model.update(
    dict(
      model_channels=192,
      channel_mult=(1, 2, 3, 5),
      num_res_blocks=2,
      attention_resolutions=(2, 4, 8),
      num_head_channels=32,
      transformer_depth=1,
      dropout=0.0,
      dtype="bfloat16",
      patch_size=1,
    )
  )
  # diffusion (T=1000, linear 1.5e-3..1.95e-2) and sampling (DDIM 100,
  # guidance 2.0) are the defaults
  c.optim.lr = 1e-4
  c.optim.warmup_steps = (
    100  # CompVis RDM configs/rdm/imagenet.yaml: LambdaLinearScheduler warm_up_steps 100
  )
  c.optim.ema_decay = 0.9999
  c.optim.grad_clip = 0.0
  # Global batch: 1280 as we read the paper's hyper-parameter table (appendix, not in
  # shared/paper/); lower it with --config.train.batch_size for smaller pods.
  c.train.batch_size = 1280
  c.train.num_steps = 400000
  c.train.p_uncond = 0.0
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.sample_every = 20000
  c.sample.include_query = (
    True  # exemplars: the query's own embedding, then its k-1 neighbours (the
  )
  # original's sample_with_query, omit_query=False: rdm/models/diffusion/
  # ddpm.py:693, 779-781; scripts/rdm_sample.py:119); False = k neighbours
  # Class-conditional samples (condition=class, Sec. 3.3, Fig. 10): the OpenImages database has no
  # labels, so each class's pool is the l entries nearest to the CLIP text embedding of this prompt
  # with the class's name (labels name ImageNet's classes: --config.sample.classes=207 is "golden
  # retriever"). The paper gives no l (class_pool_size); class_context="prompt_and_pool" is Fig.
  # 10's caption (the prompt's embedding and k-1 pool entries), "pool" Sec. 3.3's k pool entries.
  c.sample.class_prompt = "An image of a {}."
  c.sample.top_m = 0.01  # the paper's top-m for unconditional samples
  c.sample.top_m_of = (
    "retrieved"  # m as the original code reads it (get_qids: a fraction of the entries
  )
  # retrieved at least once), which made the paper's tables
  # The paper's quantitative results sample with DDIM, 100 steps, eta = 1 (Sec. 4, first paragraph);
  # its Fig. 5 samples use guidance s = 2.0 and 100 DDIM steps. --config.sample.sampler=dpm_solver++
  # --config.sample.num_steps=20 is the fast alternative (eta does not apply to it).
  c.sample.sampler = "ddim"
  c.sample.num_steps = 100
  c.sample.eta = 1.0
  c.sample.guidance_scale = 2.0
  c.sample.batch_size = 256
  c.eval.extractor = (
    "inception_v3_fid"  # FID / IS / precision-recall on pool3 (weights: a local path)
  )
  c.eval.image_size = 299
  c.eval.reference = "train"  # the ImageNet training images (a config part)
  c.eval.num_reference = 50000
  if arg == "in-db":
    c.data_dir = "data/imagenet_in-db"
    # D = the train split's images, whole (256-px centre crops, as the queries): the released
    # database/ImageNet parts (1281200 x 512) import into it with rdm_jax.jobs.import_database
    c.dataset.parts.database = mlc.ConfigDict(dict(split="train", start=0, stop=1281167))
    c.dataset.database_overlaps_train = True
    c.database_build.update(crops_per_image=0, crop_size=0, resize_to=0)
    c.retrieval.exclude = "never"  # the original excludes nothing; "auto" is ours (see above)
    c.optim.warmup_steps = 10000  # models/rdm/imagenet_in-db/config.yaml:25-26
  return c
