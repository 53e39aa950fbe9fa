"""The evaluate job: extractor sharding, the reference cache, the table, and bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tests.conftest import REPO, subprocess_env
from tests.torch_references import reference

from rdm_jax import metrics
from rdm_jax.errors import UserError
from rdm_jax.metrics import extractors, sample_sets
from rdm_jax.models import efficientnet_lite

CONFIG = os.path.join(REPO, "configs", "fashion_mnist_rdm.py")


def shapes_images(n: int, seed: int, size: int = 28) -> np.ndarray:
  """Blurry random rectangles: images with some structure for features to tell apart."""
  rng = np.random.default_rng(seed)
  out = np.zeros((n, size, size, 1), np.uint8)
  for i in range(n):
    a, b = sorted(rng.integers(0, size, 2))
    c, d = sorted(rng.integers(0, size, 2))
    out[i, a : b + 1, c : d + 1] = rng.integers(80, 255)
  return out


def test_extractor_is_sharded_and_matches_the_model():
  assert jax.local_device_count() == 8
  ex = extractors.efficientnet_lite0(
    image_size=32, batch_size=12
  )  # 12 -> 16 per call, 2 per device
  images = shapes_images(21, 0)
  out = ex(images, log=None)
  params = efficientnet_lite.load_params()
  x = efficientnet_lite.preprocess(images, 32)
  feats, logits = efficientnet_lite.EfficientNetLite0().apply({"params": params}, x)
  np.testing.assert_allclose(out["features"], feats, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-4)
  assert out["features"].shape == (21, 1280) and out["logits"].shape == (21, 1000)


def run_evaluate(tmp_path, *args):
  cmd = [
    sys.executable,
    "-m",
    "rdm_jax.evaluate",
    f"--config={CONFIG}",
    f"--config.data_dir={tmp_path}/data",
    "--config.eval.image_size=32",
    "--config.eval.baseline_part=",
    "--config.eval.kid_subsets=5",
    *args,
  ]
  return subprocess.run(
    cmd, env=subprocess_env(devices=2), capture_output=True, text=True, timeout=300
  )


def test_evaluate_job_writes_table_and_caches_reference(tmp_path):
  ref, fake = shapes_images(80, 1), shapes_images(60, 2)
  np.savez(tmp_path / "ref.npz", images=ref)
  np.savez(tmp_path / "fake.npz", images=fake, condition=np.asarray("proposal"))
  args = [
    f"--samples={tmp_path}/fake.npz",
    f"--config.eval.reference={tmp_path}/ref.npz",
    f"--out={tmp_path}/eval",
  ]
  first = run_evaluate(tmp_path, *args)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "| proposal | 60 |" in first.stdout and "FD (EfficientNet-Lite0)" in first.stdout
  result = json.load(open(tmp_path / "eval" / "metrics.json"))
  row = result["sets"]["proposal"]
  # the job's numbers are the metric functions on the extractor's features
  ex = extractors.efficientnet_lite0(image_size=32)
  f_ref, f_fake = ex(ref, log=None), ex(fake, log=None)
  assert row["fd"] == pytest.approx(
    metrics.frechet_distance(
      *metrics.feature_statistics(f_fake["features"]),
      *metrics.feature_statistics(f_ref["features"]),
    ),
    rel=1e-4,
  )
  assert (row["precision"], row["recall"]) == pytest.approx(
    metrics.precision_recall(f_ref["features"], f_fake["features"]), abs=0.02
  )
  assert row["kid_subset_size"] == 60 and any("singular" in w for w in row["warnings"])
  # IS and KID are torch-fidelity's on the same features (splits 10, 5 subsets of 60, seed 2020)
  import torch

  want_is = reference("torch_fidelity.metric_isc").isc_features_to_metric(
    torch.from_numpy(np.asarray(f_fake["logits"], np.float64)), splits=10
  )
  assert (row["is_mean"], row["is_std"]) == pytest.approx(
    (want_is["inception_score_mean"], want_is["inception_score_std"]), rel=1e-4
  )
  want_kid = reference("torch_fidelity.metric_kid").kid_features_to_metric(
    torch.from_numpy(np.asarray(f_fake["features"], np.float64)),
    torch.from_numpy(np.asarray(f_ref["features"], np.float64)),
    kid_subsets=5,
    kid_subset_size=60,
    rng_seed=2020,
    verbose=False,
  )
  assert (row["kid_mean"], row["kid_std"]) == pytest.approx(
    (want_kid["kernel_inception_distance_mean"], want_kid["kernel_inception_distance_std"]),
    rel=1e-3,
  )
  assert "not comparable with Inception" in result["note"]
  from PIL import Image

  with Image.open(tmp_path / "eval" / "metrics.png") as chart:  # beside the table
    assert chart.format == "PNG" and chart.width > 200
  second = run_evaluate(tmp_path, *args)
  assert (
    second.returncode == 0 and "exists and matches" in second.stdout
  )  # cached reference features
  assert json.load(open(tmp_path / "eval" / "metrics.json"))["sets"]["proposal"]["fd"] == row["fd"]


def test_the_chart_has_each_sets_precision_recall_and_fd():
  """evaluate.chart's bars are the rows' numbers, left to right: each set's precision then recall
  (0 to 1), and its FD in a panel of its own, titled with the extractor."""
  from rdm_jax import evaluate

  rows = {
    "exemplar": {"precision": 0.5, "recall": 0.25, "fd": 100.0},
    "proposal": {"precision": 0.75, "recall": 0.125, "fd": 50.0},
  }
  pr, fd = evaluate.chart(rows, "EfficientNet-Lite0", "test, 80 images").axes
  bars = sorted((b.get_x(), b.get_height()) for b in pr.patches)
  assert [h for _, h in bars] == [0.5, 0.25, 0.75, 0.125]
  assert [b.get_height() for b in sorted(fd.patches, key=lambda b: b.get_x())] == [100.0, 50.0]
  assert fd.get_title() == "FD (EfficientNet-Lite0)" and pr.get_ylim() == (0, 1.1)
  assert [t.get_text() for t in fd.get_xticklabels()] == ["exemplar", "proposal"]


@pytest.mark.parametrize(
  "fake,message",
  [
    (np.full((10, 28, 28, 1), np.nan, np.float32), "NaN"),
    (np.zeros((10, 32, 32, 1), np.uint8), "32x32x1 but the reference images are 28x28x1"),
    (np.zeros((10, 28, 28, 3), np.uint8), "28x28x3 but the reference images are 28x28x1"),
  ],
)
def test_evaluate_refuses_bad_samples(tmp_path, fake, message):
  np.savez(tmp_path / "ref.npz", images=shapes_images(20, 1))
  np.savez(tmp_path / "fake.npz", images=fake)
  out = run_evaluate(
    tmp_path,
    f"--samples={tmp_path}/fake.npz",
    f"--config.eval.reference={tmp_path}/ref.npz",
    f"--out={tmp_path}/eval",
  )
  assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
  assert not os.path.exists(tmp_path / "eval" / "metrics.json")


def test_check_images_messages():
  with pytest.raises(UserError, match=r"\[N, H, W, 1 or 3\]"):
    extractors.check_images(np.zeros((4, 28, 28), np.uint8), "x")


def test_image_folder_samples(tmp_path):
  from PIL import Image

  images = shapes_images(3, 4)
  (tmp_path / "imgs" / "sub").mkdir(parents=True)
  for i, im in enumerate(images):
    Image.fromarray(im[..., 0]).save(tmp_path / "imgs" / ("sub" if i else "") / f"{i}.png")
  name, got, captions = sample_sets.read_samples(str(tmp_path / "imgs"))
  assert name == "imgs" and captions == [] and got.shape == (3, 28, 28, 1)
  np.testing.assert_array_equal(got, images[[0, 1, 2]])  # sorted paths: 0.png, sub/1.png, sub/2.png
  Image.fromarray(np.zeros((30, 28), np.uint8)).save(tmp_path / "imgs" / "sub" / "3.png")
  with pytest.raises(UserError, match="must share size and channels"):
    sample_sets.read_samples(str(tmp_path / "imgs"))


def test_the_sample_jobs_sets_are_found_and_read_in_shard_order(tmp_path):
  """<workdir>/samples/<set>/ with settings.json and shards: found by default (not the training
  run's PNGs, not a folder without settings), labelled by the folder, shards in index order."""
  samples = tmp_path / "samples"
  images = shapes_images(5, 7)
  for name in ("proposal", "exemplar"):
    (samples / name).mkdir(parents=True)
    (samples / name / "settings.json").write_text(
      json.dumps({"made_by": "rdm_jax.sample", "num_shards": 3})
    )
    for i, (a, b) in enumerate([(0, 2), (2, 4), (4, 5)]):
      np.savez(
        samples / name / f"shard-{i:05d}-of-00003.npz",
        images=images[a:b],
        condition=np.asarray(name),
      )
  (samples / "other").mkdir()
  np.savez(samples / "other" / "x.npz", images=images)
  (samples / "samples_0000002.png").write_bytes(b"")
  paths = sample_sets.default_sample_sets(str(tmp_path))
  assert paths == [str(samples / "exemplar"), str(samples / "proposal")]
  sets, _ = sample_sets.read_sample_sets(paths)
  assert list(sets) == ["exemplar", "proposal"]
  np.testing.assert_array_equal(sets["exemplar"], images)


def test_a_figure_outside_the_configs_expected_band_fails_the_job(tmp_path):
  """config.eval.expect: images like the reference's pass a recall floor, 60 blank images do not
  (k=3 recall, Kynkaanniemi et al. 2019: identical samples have 3-NN balls of radius 0, which hold
  no real image: recall 0, the collapsed demo of issue 36); the job writes its metrics, then
  names the figure outside its band in one line and fails."""
  np.savez(tmp_path / "ref.npz", images=shapes_images(80, 1))
  np.savez(tmp_path / "good.npz", images=shapes_images(60, 2))
  np.savez(tmp_path / "blank.npz", images=np.zeros((60, 28, 28, 1), np.uint8))
  out = run_evaluate(
    tmp_path,
    f"--samples={tmp_path}/good.npz,{tmp_path}/blank.npz",
    f"--config.eval.reference={tmp_path}/ref.npz",
    f"--out={tmp_path}/eval",
    "--config.eval.metrics=('fd','precision_recall')",
    "--config.eval.expect=(('good','recall',0.5,1.0),('blank','recall',0.5,1.0))",
  )
  sets = json.load(open(tmp_path / "eval" / "metrics.json"))["sets"]
  assert sets["good"]["recall"] >= 0.5 and sets["blank"]["recall"] < 0.5
  assert out.returncode == 2, out.stdout[-2000:]
  line = out.stderr.strip().splitlines()[-1]
  assert (
    "outside this recipe's expected band" in line and "blank recall" in line and "good" not in line
  ), line
  out = run_evaluate(
    tmp_path,
    f"--samples={tmp_path}/good.npz",
    f"--config.eval.reference={tmp_path}/ref.npz",
    f"--out={tmp_path}/eval2",
    "--config.eval.metrics=('fd','precision_recall')",
    "--config.eval.expect=(('good','recall',0.5,1.0),('blank','recall',0.5,1.0))",
  )
  assert out.returncode == 0 and "within this recipe's expected band" in out.stdout, out.stderr[
    -2000:
  ]
