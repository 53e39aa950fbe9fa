"""The paper's presets against the original's files (CompVis/retrieval-augmented-diffusion-models):
each value worked out here by hand from the original's configs and
main.py, not read back from ours."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, repo_config, subprocess_env
from rdm_jax import train_step


def _lightning_lr(
  base_lr: float, batch_per_gpu: int, accumulate: int, gpus: int, scale_lr: bool
) -> float:
  """main.py:981-1000: model.learning_rate = accumulate_grad_batches * ngpu * bs * base_lr when
  --scale_lr (its default, main.py:122-127), else base_lr."""
  return accumulate * gpus * batch_per_gpu * base_lr if scale_lr else base_lr


# (base_learning_rate, data batch_size per GPU, accumulate_grad_batches, --scale_lr), one GPU:
# configs/rarm/dogs.yaml:2 (5e-4, "run with --scale_lr false"), :90, :154;
# configs/rarm/mammals.yaml:2, :89, :153 and animals.yaml:2, :92, :156 (main.py's default
# --scale_lr)
ORIGINAL_RARM = {
  "dogs": (5e-4, 50, 2, False),
  "mammals": (5e-6, 50, 1, True),
  "animals": (5e-6, 50, 1, True),
}


@pytest.mark.parametrize("subset", sorted(ORIGINAL_RARM))
def test_rarm_presets_optimise_as_the_original_trained_each_subset(subset):
  base_lr, per_gpu, accumulate, scale_lr = ORIGINAL_RARM[subset]
  c = repo_config("imagenet_rarm", subset)
  assert c.optim.lr == pytest.approx(_lightning_lr(base_lr, per_gpu, accumulate, 1, scale_lr))
  assert c.train.batch_size == per_gpu * accumulate  # images per update on one GPU
  assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.grad_clip, c.optim.ema_decay) == (
    0.9,
    0.95,
    0.01,
    0,
    0,
  )
  # the released weights' configs (models/rarm/imagenet/*/config.yaml:2, batch_size 50) give dogs'
  # rate too: 5e-6 scaled by 2 x 1 x 50
  assert _lightning_lr(5e-6, 50, 2, 1, True) == pytest.approx(
    repo_config("imagenet_rarm", "dogs").optim.lr
  )
  # sampling as scripts/rarm_sample.py's defaults (:165-213): top-m 0.01 proposal, unweighted,
  # 4 neighbours, top-k 256, temperature 1, guidance 1
  s = c.sample
  assert (
    s.condition,
    s.top_m,
    s.proposal_weighted,
    s.k,
    s.top_k,
    s.temperature,
    s.guidance_scale,
  ) == ("proposal", 0.01, False, 4, 256, 1.0, 1.0)


def test_rarm_fig5_variant_and_bad_arguments():
  """Fig. 5's RARM samples (the paper's caption): m = 0.05, s = 3.0, top-k 2048."""
  s = repo_config("imagenet_rarm", "mammals,fig5").sample
  assert (s.top_m, s.guidance_scale, s.top_k) == (0.05, 3.0, 2048)
  with pytest.raises(ValueError, match="use one of dogs, mammals, animals"):
    repo_config("imagenet_rarm", "cats")


@pytest.mark.parametrize(
  "preset, line",
  [
    # mammals: configs/rarm/mammals.yaml:2, 89, 153 through main.py's scale_lr (1 x 1 x 50 x 5e-6)
    ("imagenet_rarm.py:mammals", "global batch 50 per update, learning rate 0.00025 "),
    # configs/rdm/ffhq.yaml:2 (1e-4), :86 (50), :25-26 (10k warm-up)
    (
      "ffhq_rdm.py",
      "global batch 50 per update, learning rate 0.0001 (AdamW b1 0.9 b2 0.999, weight decay 0.01) "
      "after 10000 warm-up steps",
    ),
    # configs/rdm/imagenet.yaml:2, 26 (1e-4 unscaled, 100 warm-up steps); the paper's batch 1280
    (
      "imagenet_rdm.py",
      "global batch 1280 per update, learning rate 0.0001 (AdamW b1 0.9 b2 0.999, weight decay "
      "0.01) after 100 warm-up steps",
    ),
    # models/rdm/imagenet_in-db/config.yaml:2, :25-26; the batch as RDM-OI's
    (
      "imagenet_rdm.py:in-db",
      "global batch 1280 per update, learning rate 0.0001 (AdamW b1 0.9 b2 0.999, weight "
      "decay 0.01) after 10000 warm-up steps",
    ),
  ],
)
def test_a_preset_prints_its_optimisation_and_stops_in_one_line_without_data(
  tmp_path, preset, line
):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "rdm_jax.train",
      f"--config=configs/{preset}",
      f"--workdir={tmp_path / 'run'}",
      f"--config.data_dir={tmp_path / 'no_data'}",
    ],
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert line in out.stderr, out.stderr[-3000:]
  assert len([x for x in out.stderr.splitlines() if x.startswith("error: ")]) == 1, out.stderr[
    -3000:
  ]
  assert train_step.optimisation_line(repo_config("imagenet_rarm", "dogs")).startswith(
    "global batch 100 per update, learning rate 0.0005 "
  )


def test_ffhq_and_in_db_presets_are_the_original_files():
  """configs/rdm/ffhq.yaml:41, 47-51 (224 channels, mult 1,2,3,4), taming's FFHQ lists; RDM-IN:
  D = ImageNet train (models/rdm/imagenet_in-db/config.yaml:96, database/imagenet), nothing
  excluded (the original's neighbours are the searcher's, unfiltered), ours one flag away."""
  ffhq = repo_config("ffhq_rdm")
  assert (ffhq.model.model_channels, tuple(ffhq.model.channel_mult)) == (224, (1, 2, 3, 4))
  assert tuple(ffhq.model.attention_resolutions) == (2, 4, 8) and ffhq.model.num_head_channels == 32
  assert (
    ffhq.dataset.parts.train.files == "data/ffhqtrain.txt"
    and ffhq.dataset.parts.test.files == "data/ffhqvalidation.txt"
  )
  assert ffhq.dataset.parts.train.split == ffhq.dataset.parts.test.split == "folder:data/ffhq"
  in_db, oi = repo_config("imagenet_rdm", "in-db"), repo_config("imagenet_rdm")
  assert in_db.dataset.parts.database.split == in_db.dataset.parts.train.split == "train"
  assert in_db.retrieval.exclude == "never" and oi.retrieval.exclude == "auto"
  assert in_db.data_dir != oi.data_dir and in_db.model == oi.model
  with pytest.raises(ValueError, match="in-db"):
    repo_config("imagenet_rdm", "in_db")


def test_imagenet_class_prompts_name_the_classes_in_tfds_label_order():
  """The ImageNet preset samples classes as Sec. 3.3 ("An image of a {}." with the class's name):
  labels 0, 207, 281, 999 are TFDS's WordNet ids n01440764, n02099601, n02123045, n15075141,
  which WordNet names tench, golden retriever, tabby (cat) and toilet tissue."""
  import importlib.util

  from rdm_jax.data import sources

  config = repo_config("imagenet_rdm")
  assert config.sample.class_prompt == "An image of a {}." and config.sample.class_context == "pool"
  names = sources.class_names(config.dataset)
  tfds_dir = os.path.dirname(importlib.util.find_spec("tensorflow_datasets").origin)
  with open(os.path.join(tfds_dir, "datasets", "imagenet2012", "labels.txt")) as f:
    wnids = f.read().split()
  assert len(names) == len(set(names)) == len(wnids) == 1000
  assert [wnids[i] for i in (0, 207, 281, 999)] == [
    "n01440764",
    "n02099601",
    "n02123045",
    "n15075141",
  ]
  assert [names[i] for i in (0, 207, 281, 999)] == [
    "tench",
    "golden retriever",
    "tabby",
    "toilet tissue",
  ]
  from rdm_jax import conditioning

  assert conditioning.prompt_classes("207, Tabby,unicorn", names) == (
    [207, 281, 2],
    ["golden retriever", "Tabby", "unicorn"],
  )


@pytest.mark.parametrize("name", ["fashion_mnist_rdm", "fashion_mnist_rarm"])
def test_the_demo_configs_retrieval_encoder_gives_the_context_width_they_declare(name):
  """The offline demos' EfficientNet-Lite0 settings as the embed job reads them (its grid divides
  the feature map at the config's input size) make embeddings of retrieval.embed_dim: a config
  that inherits another's grid with its own input size is refused before any data is read."""
  from rdm_jax.retrieval import encoders

  config = repo_config(name)
  assert encoders.encoder_identity(config.retrieval)["embed_dim"] == config.retrieval.embed_dim
