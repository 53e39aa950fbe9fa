r"""The paper's FFHQ RDM (Sec. 4.1, Tab. 3: "an exact replicate of our ImageNet RDM-OI on FFHQ";
CompVis configs/rdm/ffhq.yaml and the released models/rdm/ffhq/config.yaml).

  python -m rdm_jax.jobs.encode    --config=configs/ffhq_rdm.py  # VQ-f4 latents, 60k train faces
  python -m rdm_jax.jobs.embed     --config=configs/ffhq_rdm.py  # CLIP queries (D: RDM-OI's)
  python -m rdm_jax.jobs.neighbors --config=configs/ffhq_rdm.py
  python -m rdm_jax.train          --config=configs/ffhq_rdm.py --workdir=$WORKDIR
  python -m rdm_jax.sample         --config=configs/ffhq_rdm.py --workdir=$WORKDIR \
      --config.sample.condition=proposal

What differs from configs/imagenet_rdm.py, each as the original's file has it:
- UNet: 224 channels, mult (1, 2, 3, 4) (configs/rdm/ffhq.yaml:41, 47-51); attention at 8/4/2,
  2 res blocks, head channels 32, transformer depth 1, context 512 as ImageNet's (:42-56).
- Warm-up 10,000 steps (LambdaLinearScheduler, :22-34); lr 1e-4 (:2), unscaled as the ImageNet
  RDM's (its yaml: "run with --scale_lr false"); 50 images per update (:86), one GPU's batch, the
  only one the file gives (the ImageNet preset's 1280 comes from the paper's table, which has no
  FFHQ column in our copy): on a pod raise --config.train.batch_size.
- Data: the original's FFHQ split (taming's FFHQTrain / FFHQValidation, rdm/data/faces.py:1-12):
  the images under data/ffhq named by data/ffhqtrain.txt (60,000) and data/ffhqvalidation.txt
  (10,000), the two lists of the original repository (fetch them with the images;
  docs/paper_configuration.md), each resized to 256 (FFHQ is square, so SmallestMaxSize + CenterCrop
  is a resize; ours is Lanczos).
- Database: RDM-OI's OpenImages crops (models/rdm/ffhq/config.yaml:96, saved_embeddings
  database/openimages): `config.database` is the ImageNet preset's store, made once for both.
- Evaluation: CLIP-FID / precision / recall on CLIP image features (Tab. 3 measures FFHQ with
  CLIP-based metrics, FID being insensitive to faces): --config.eval.weights=<a saved
  transformers CLIP ViT-B/32 directory>.
FFHQ has no labels: class-conditional sampling does not apply.
"""

import os

import ml_collections as mlc

from rdm_jax.config_base import config_file


def get_config() -> mlc.ConfigDict:
  c = config_file(os.path.join(os.path.dirname(__file__), "imagenet_rdm.py"))
  c.data_dir = "data/ffhq"
  c.database = "data/imagenet/database"  # RDM-OI's store (and its index), shared
  c.dataset.name = "ffhq"
  c.dataset.label_range = ()
  c.dataset.parts = mlc.ConfigDict(
    dict(
      train=dict(split="folder:data/ffhq", start=0, stop=0, files="data/ffhqtrain.txt"),
      database=c.dataset.parts.database.to_dict(),
      test=dict(split="folder:data/ffhq", start=0, stop=0, files="data/ffhqvalidation.txt"),
    )
  )
  c.model.update(model_channels=224, channel_mult=(1, 2, 3, 4))
  c.optim.warmup_steps = 10000
  c.train.batch_size = 50
  c.sample.class_prompt = ""
  c.eval.update(extractor="clip_image", image_size=224, reference="train", num_reference=50000)
  return c
