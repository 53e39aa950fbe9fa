"""Defaults shared by every experiment config; each `configs/*.py` edits a copy.

Store paths derive from `config.data_dir` (see `paths`); `config.database` names the
database store to retrieve from and may point anywhere (databases are swappable).
"""

from __future__ import annotations

import os

import ml_collections as mlc

from rdm_jax.errors import fail

# Logical axis -> mesh axes. Activations' batch goes over data and fsdp; FSDP shards the
# input side of weights, tensor parallelism the output features / heads / MLP width.
DEFAULT_SHARDING_RULES = (
  ("batch", ("data", "fsdp")),
  ("conv_in", "fsdp"),
  ("embed", "fsdp"),
  ("context", "fsdp"),
  ("conv_out", "tensor"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("vocab", "tensor"),  # RARM's token embedding rows and logits
  ("norm", None),
)


# A dataset part: `split` of the dataset (a TFDS split, "folder:PATH", or an IDX split), examples
# [start, stop) of it (stop 0 = to the end); `files`: a text file of relative paths, for folders.
PART = dict(split="", start=0, stop=0, files="")

# Accelerator levers of either model family (same parameters, same results up to rounding;
# rdm_jax.compile reports them).
LEVERS = dict(
  dtype="float32",  # compute
  param_dtype="float32",  # parameters, gradients, EMA
  remat="none",  # none | full (the original's use_checkpoint) | dots (matmul outputs kept)
  # xla | dot_product (jax.nn's, XLA) | cudnn (cuDNN flash, GPU) | flash (Pallas TPU)
  attention="xla",
  flash_min_seq_len=1024,  # flash: self-attention over this many tokens or more; fewer: dot_product
  conv="xla",  # xla | onednn (oneDNN custom calls, CPU) | auto (onednn on one CPU device if built)
)


def rarm_model(**fields) -> mlc.ConfigDict:
  """config.model of the autoregressive family (rdm_jax/models/rarm.py): a transformer of `depth`
  blocks, `heads` x `dim_head` wide, over the first stage's VQ tokens; the levers as LEVERS."""
  m = mlc.ConfigDict(dict(family="rarm", heads=8, dim_head=64, depth=8, **LEVERS))
  m.update(**fields)
  return m


def base_config() -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.data_dir = "data/experiment"
  c.database = ""  # database store to retrieve from; "" = <data_dir>/database (see `paths`)

  c.dataset = mlc.ConfigDict(
    dict(
      name="",
      idx_dir="",
      allow_tfds=True,
      # part name (train, test, database) -> {split, start, stop, files}: fields as PART
      parts={},
      class_names=(),  # the labels' names ("" = the known ones: Fashion-MNIST's, ImageNet-1k's)
      # TFDS splits ("tfds:NAME/SPLIT", or any split of a dataset other than
      # fashion_mnist): shorter side to image_size, centre crop; prepared locally
      image_size=0,
      tfds_data_dir="",
      # labels kept, as the original SubsetSampler reads label_range:
      # (151, 280) = ImageNet dogs 151..280 inclusive; () = all
      label_range=(),
      # the database part may share images with the train part (RDM-IN's D is
      # ImageNet train); else overlapping parts are refused
      database_overlaps_train=False,
      # the train part of a TFDS source as `crops` random crops per image (shorter
      # side to image_size, a uniform square along the longer side: the original's
      # SmallestMaxSize + RandomCrop), x2 with `flips`; each encoded and embedded
      # (its own neighbours), training draws one per example per epoch. 0 / False:
      # one centre crop
      augment=dict(crops=0, flips=False, seed=0),
      # TFDS captions: "auto" (a "caption" or coco_captions' "captions/text"
      # feature when present), "" (none) or a feature path; image folders:
      # folder.captions, a JSON-lines side file {"file": ..., "caption": ...}
      caption_feature="auto",
      # parts with split "folder:PATH" (stop 0 = every file; a part's `files`: a
      # text file of relative paths, only those, in its order): images converted to
      folder=dict(
        image_size=0,
        channels=0,
        background="white",
        max_pixels=50_000_000,
        captions="captions.jsonl",
      ),
    )
  )
  # First stage: identity, or an LDM autoencoder (rdm_jax/models/first_stage.py) read from its
  # published .ckpt; `arch` overrides fields of the named preset (0 or () = the preset's;
  # attn_resolutions=(0,) = no attention).
  c.first_stage = mlc.ConfigDict(
    dict(
      name="identity",
      pad_to=32,
      latent_channels=1,
      weights="",
      scale_factor=1.0,
      batch_size=16,
      chunk_size=8192,  # latents per resumable unit of the encode job
      palette_size=16,  # name=palette: colours in the codebook
      palette_factor=2,  # name=palette: pixels per token side
      arch=dict(
        ch=0,
        ch_mult=(),
        num_res_blocks=0,
        attn_resolutions=(),
        embed_dim=0,
        z_channels=0,
        n_embed=0,
        resolution=0,
      ),
    )
  )
  c.retrieval = mlc.ConfigDict(
    dict(
      encoder="efficientnet_lite0",  # or clip_vit_b32 (the paper's; text tower too)
      weights="",  # local checkpoint; "" = the installed weights package
      tokenizer="",  # clip_vit_b32 text: a saved CLIPTokenizer dir ("" = weights, if a dir)
      image_size=96,
      # efficientnet_lite0: head (pooled, the classifier's input) | block_N (N < 16)
      features="head",
      grid=1,  # ... that layer's map averaged over grid x grid cells (embed_dim = C * grid^2)
      embed_dim=1280,
      batch_size=256,
      num_neighbors=20,  # K stored per example (the paper's 20)
      chunk_size=4096,  # rows per resumable unit of the embed / neighbour jobs
      exclude="auto",  # drop self / near-duplicates: auto (when D and X overlap) | always | never
      duplicate_score=0.995,  # near-duplicate: cosine >= this (when excluding; 0 = ids only)
      recall_sample=1000,  # queries checked against exact search; recall@K goes in the manifest
      proposal_k=0,  # k of p_D (Eq. 5); 0 = k_train
    )
  )
  # The database as random crops of its images (rdm_jax/retrieval/crops.py; the paper's OpenImages
  # recipe); crops_per_image 0 = one entry per whole image, as the parts' other stores.
  c.database_build = mlc.ConfigDict(
    dict(crops_per_image=0, crop_size=0, resize_to=0, seed=0, embeddings_dtype="float16")
  )
  # Nearest-neighbour index over the database (rdm_jax/retrieval/index.py for the recipe).
  c.retrieval.index = mlc.ConfigDict(
    dict(
      kind="auto",  # auto (by size, as below) | exact | brute | ah | tree_ah
      exact_below=20000,
      ah_below=100000,
      num_leaves=0,
      leaves_to_search=0,
      training_sample=0,  # 0 = sqrt(n), num_leaves/20, n/10
      dims_per_block=2,
      anisotropic_threshold=0.2,
      reorder=0,  # candidates re-scored exactly; 0 = 10K (original: 2K)
      spherical=True,  # spherical k-means tree (needed on unit-norm data)
      max_memory_gb=16.0,  # peak RAM (GiB) of one shard's build: sets the shard size
      search_memory_gb=0.0,  # RAM for shards loaded at once while searching; 0 = max_memory_gb
      shard_size=0,  # 0 = derived from max_memory_gb
      threads=0,  # search threads, and training threads when not deterministic; 0 = all cores
      deterministic=True,  # train on one thread: same index and neighbours on every run
      # widen each shard's search until recall@K (against exact search) reaches this; 0 = off
      target_recall=0.97,
      tune_queries=1000,  # shard rows used as queries to measure it
      tune_seed=0,
      max_reorder=0,  # widest reorder the tuning may choose; 0 = 100 per neighbour
      path="",  # "" = <database>_index
    )
  )
  c.k_train = 4
  c.k_select = "first"  # "first": the k_train nearest of the stored K; "random": k_train of K

  c.model = mlc.ConfigDict(
    dict(
      family="unet",  # unet (an RDM, rdm_jax/models/unet.py) | rarm (see rarm_model)
      model_channels=64,
      channel_mult=(1, 2, 2),
      num_res_blocks=2,
      attention_resolutions=(2, 4),
      num_head_channels=32,
      transformer_depth=1,
      dropout=0.0,
      patch_size=1,
      **LEVERS,
    )
  )
  c.diffusion = mlc.ConfigDict(
    dict(
      num_timesteps=1000,
      beta_start=1.5e-3,
      beta_end=1.95e-2,
      prediction="eps",  # what the UNet outputs: eps (the paper's) | v (Salimans & Ho 2022) | x0
      # uniform (Eq. 3) | min_snr: min(SNR, gamma)-weighted (Hang et al. 2023)
      loss_weighting="uniform",
      min_snr_gamma=5.0,
      # > 0 with prediction x0: no error where the target is on the data's bound +-x0_bound and the
      # prediction beyond it (sample.clip_x0 maps both to the bound); 0 = the plain MSE
      x0_bound=0.0,
    )
  )
  c.optim = mlc.ConfigDict(
    dict(
      lr=1e-4,
      warmup_steps=1000,
      b1=0.9,
      b2=0.999,
      weight_decay=0.01,
      grad_clip=1.0,
      ema_decay=0.9999,
      eps=1e-8,
      update_clip=0.0,  # > 0: each tensor's Adam update clipped to this RMS (StableAdamW)
      decay="none",  # after the warm-up: none (LDM's constant rate) | cosine
      min_lr_ratio=0.0,  # cosine: the rate at train.num_steps, as a fraction of lr
      mu_dtype="",  # Adam's first moment dtype; "" = the parameters'; bfloat16 halves it
    )
  )

  c.train = mlc.ConfigDict(
    dict(
      batch_size=64,
      num_steps=1000,
      seed=0,
      p_uncond=0.0,
      log_every=50,
      checkpoint_every=500,
      keep_checkpoints=3,
      sample_every=0,
      num_sample_images=16,
      # a step with NaN/inf loss or gradients: stop (before any checkpoint) | skip it
      nonfinite="stop",
      # a loss or gradient norm above spike_factor x its median over the last spike_window steps:
      # warn (train on it) | skip (the step changes nothing) | stop (before any checkpoint of it);
      # each names the step and its batch's example ids
      on_spike="warn",
      spike_factor=5.0,
      spike_window=200,
    )
  )
  c.input = mlc.ConfigDict(dict(prefetch=4, num_parallel_calls=-1))  # -1 = tf.data.AUTOTUNE
  c.sample = mlc.ConfigDict(
    dict(
      sampler="ddim",  # ddim | ddpm (ancestral, respaced to num_steps) | dpm_solver++ (2M)
      num_steps=100,
      guidance_scale=2.0,
      eta=0.0,
      num_images=16,
      batch_size=64,  # eta: DDIM only
      k=0,  # neighbours per sample (the original's --k_nn); 0 = k_train
      temperature=1.0,
      top_k=0,
      top_p=1.0,  # RARM (config.model.family="rarm") token sampling; 0 / 1.0 = off
      seed=-1,  # sample i's noise: fold_in(PRNGKey(seed), i), and the proposal / class
      # draws; -1 = train.seed + 7
      shard_size=1024,  # samples per .npz shard of the sample job (its unit of resumption)
      # dpm_solver++: logsnr (uniform in log-SNR) | linspace (diffusers')
      timestep_spacing="logsnr",
      # exemplar: queries from query_part | proposal: x~ ~ p_D (top-m) |
      # class: k adjacent entries of a class pool | embeddings: a .npy |
      # text: CLIP text embeddings of `prompts` (the caption, then its k-1 neighbours) |
      # zeros: one all-zeros entry (the unconditional branch alone)
      condition="exemplar",
      prompts=(),  # text: captions, cycled over the samples
      prompts_from="",  # text: "train" | "test" = the captions of that part's embeddings store
      # text: caption_and_neighbors | caption (alone, k=1) | neighbors (its k)
      text_mode="caption_and_neighbors",
      query_part="test",
      classes="",  # class: names or labels, comma-separated ("" = all)
      # class: pool size l (the paper states none, only k <= l; the original has no class sampling)
      class_pool_size=16,
      # class: "An image of a {}." = pools from CLIP text (Sec. 3.3); "" = from labels
      class_prompt="",
      # class: pool = k adjacent pool entries (Sec. 3.3) | prompt_and_pool = the prompt's text
      # embedding + k-1 adjacent pool entries (Fig. 10's caption)
      class_context="pool",
      embeddings_path="",  # embeddings: float [N, d] queries from the database's encoder
      # exemplar, embeddings: the query's own embedding + its k-1 neighbours (the original's
      # default, omit_query=False) instead of k neighbours
      include_query=False,
      top_m=0.01,  # proposal: the top fraction m of D by p_D (or the top count)
      top_count=0,
      # m of all of D (Sec. 3.3) | "retrieved": of the entries with p_D > 0 (original code)
      top_m_of="database",
      proposal_weighted=False,  # proposal: draw by p_D within the top set (else uniformly)
      clip_x0=0.0,  # clip_x0 > 0: pixel-space clipping
      # ddim, dpm_solver++: end at alpha_bar_0 (the original) | x0: the last step returns its
      # predicted z_0 (no leftover noise; pixel-space models)
      final_step="abar0",
    )
  )

  # rdm_jax.evaluate: metrics of sample sets against a reference set, on one extractor's features.
  c.eval = mlc.ConfigDict(
    dict(
      # efficientnet_lite0 | inception_v3_fid (FID; weights: pytorch-fid's .pth, local path)
      # | clip_image (CLIP-FID, CLIP score; weights: a saved transformers CLIP dir)
      extractor="efficientnet_lite0",
      weights="",
      image_size=224,
      batch_size=256,  # inception_v3_fid: image_size 299
      # inception_v3_fid: pytorch_fid (bilinear) | clean (clean-fid's PIL bicubic)
      resize="pytorch_fid",
      reference="test",  # a dataset part | tfds:NAME/SPLIT | image folder | .npz with images
      num_reference=0,  # 0 = all reference images
      baseline_part="train",  # real images scored like a sample set ("" = skip)
      metrics=("fd", "precision_recall", "is", "kid", "clip_score"),  # clip_score: with captions
      k=3,
      is_splits=10,
      kid_subsets=100,
      kid_subset_size=1000,
      # (set, metric, low, high) bands a recipe's figures must fall in: outside, the job fails
      expect=(),
    )
  )

  # fsdp_outer: FSDP gathers each weight in two stages, within fsdp_outer groups of the fsdp axis
  # and then across them (parallel/fsdp.py: split_mesh); 0 = on accelerators, the split whose
  # compiled gradients all-reduce least (TPU all-reduces a reduce-scatter over a square slice)
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1, fsdp_outer=0))
  c.sharding_rules = DEFAULT_SHARDING_RULES
  return c


def config_file(path: str, *args: str) -> mlc.ConfigDict:
  """get_config(*args) of a config file, loaded by path (configs/ is not a package): how one
  config builds on another (configs/imagenet_rarm.py on configs/imagenet_rdm.py)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def with_overrides(config: mlc.ConfigDict, overrides: list[str]) -> mlc.ConfigDict:
  """`config` changed in place by overrides written as the jobs take them on the command line,
  `--config.a.b=value` (a Python literal, else a string), and returned; other arguments are
  skipped. For notebooks and scripts that load a config as a job would."""
  import ast

  for override in overrides:
    if not override.startswith("--config."):
      continue
    key, value = override[len("--config.") :].split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  return config


FAMILIES = ("unet", "rarm")


def model_family(config: mlc.ConfigDict) -> str:
  """config.model.family: "unet" (an RDM: latents stores) or "rarm" (the autoregressive
  transformer: token stores)."""
  name = config.model.family
  if name not in FAMILIES:
    fail(f"config.model.family={name!r}; use {' or '.join(FAMILIES)}")
  return name


def paths(config: mlc.ConfigDict) -> dict[str, str]:
  """Where each job reads and writes; all under `config.data_dir` but the database."""
  d = os.path.normpath(config.data_dir)  # "data/" and "data" name the same stores
  database = os.path.normpath(config.database or os.path.join(d, "database"))
  return {
    "database": database,
    "index": os.path.normpath(config.retrieval.index.path or database + "_index"),
    "proposal": os.path.join(d, "proposal"),
    "latents_train": os.path.join(d, "latents_train"),
    "latents_test": os.path.join(d, "latents_test"),
    "embeddings_train": os.path.join(d, "embeddings_train"),
    "embeddings_test": os.path.join(d, "embeddings_test"),
    "neighbors_train": os.path.join(d, "neighbors_train"),
    "neighbors_test": os.path.join(d, "neighbors_test"),
  }
