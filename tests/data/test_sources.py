"""IDX reading of the real Fashion-MNIST files (Debian dataset-fashion-mnist) and bad-file
errors."""

import gzip
import os

import numpy as np
import pytest

from tests.conftest import config_section

from rdm_jax.data import sources
from rdm_jax.errors import UserError

IDX_DIR = sources.FASHION_MNIST_IDX_DIR


@pytest.mark.skipif(not os.path.isdir(IDX_DIR), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_idx():
  images, labels = sources.load_idx_split(IDX_DIR, "test")
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
  assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced


def test_idx_by_hand_and_truncation(tmp_path):
  body = np.arange(2 * 3 * 4, dtype=np.uint8)
  raw = (
    bytes([0, 0, 0x08, 3])
    + (2).to_bytes(4, "big")
    + (3).to_bytes(4, "big")
    + (4).to_bytes(4, "big")
    + body.tobytes()
  )
  path = str(tmp_path / "x-idx3-ubyte.gz")
  with gzip.open(path, "wb") as f:
    f.write(raw)
  np.testing.assert_array_equal(sources.read_idx(path), body.reshape(2, 3, 4))
  with gzip.open(path, "wb") as f:
    f.write(raw[:-5])
  with pytest.raises(UserError, match="truncated"):
    sources.read_idx(path)
  with open(path, "wb") as f:
    f.write(b"\x01\x02")
  with pytest.raises(UserError):
    sources.read_idx(path)


def test_overlapping_parts_are_refused():

  ds = config_section(
    "dataset",
    name="fashion_mnist",
    parts=dict(
      train=dict(split="train", start=0, stop=100),
      database=dict(split="train", start=50, stop=200),
      test=dict(split="test", start=0, stop=10),
    ),
  )
  with pytest.raises(UserError, match="overlap"):
    sources.check_disjoint(ds)
  ds.parts.database.start = 100
  sources.check_disjoint(ds)


def _folder_dataset(path, size=4, channels=1, max_pixels=8, stop=0):

  return config_section(
    "dataset",
    name="fashion_mnist",
    parts=dict(database=dict(split=f"folder:{path}", start=0, stop=stop)),
    folder=dict(image_size=size, channels=channels, background="white", max_pixels=max_pixels),
  )


def test_image_folder_source_worked_by_hand(tmp_path):
  """A 4x2 RGBA image, left half opaque black, right half transparent: composited on white,
  padded to 4x4 with white rows above and below; labels are the top-level folders (sorted), -1
  at the top; an unreadable file and one over max_pixels are skipped and listed; a changed folder
  is refused."""
  from PIL import Image

  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  rgba = np.zeros((2, 4, 4), np.uint8)
  rgba[:, :2, 3] = (
    255  # opaque black on the left; the right is transparent (its colour must not show)
  )
  rgba[:, 2:, :3] = 7
  Image.fromarray(rgba, "RGBA").save(tmp_path / "b" / "x.png")
  Image.fromarray(np.full((2, 2), 100, np.uint8)).save(tmp_path / "a" / "y.png")
  Image.fromarray(np.full((2, 1), 50, np.uint8)).save(tmp_path / "z.png")
  Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "a" / "big.png")  # 9 pixels > 8
  (tmp_path / "a" / "broken.png").write_bytes(b"not a png")

  images, labels, source = sources.part_arrays(_folder_dataset(tmp_path), "database")
  assert source["files"] == 3 and source["stop"] == 3 and source["classes"] == ["a", "b"]
  assert sorted(source["skipped"]) == [
    "a/big.png: 3x3 pixels",
    "a/broken.png: UnidentifiedImageError",
  ]
  assert images.shape == (3, 4, 4, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [0, 1, -1])  # a/y.png, b/x.png, z.png
  np.testing.assert_array_equal(images[0, ..., 0], np.full((4, 4), 100))  # 2x2 -> 4x4, one grey
  want = np.full((4, 4), 255)
  want[1:3, :2] = 0
  np.testing.assert_array_equal(images[1, ..., 0], want)
  rgb, _, _ = sources.part_arrays(_folder_dataset(tmp_path, channels=3), "database")
  np.testing.assert_array_equal(rgb[1], np.repeat(want[..., None], 3, axis=2))

  Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "b" / "new.png")
  with pytest.raises(
    UserError, match="changed .4 usable files now, 3 then.*embed the folder again"
  ):
    sources.folder_files(source)
  with pytest.raises(UserError, match="give image_size > 0, channels 1 or 3"):
    sources.part_arrays(_folder_dataset(tmp_path, channels=2), "database")


def test_a_file_list_names_a_folders_images_in_its_order(tmp_path):
  """The original's FFHQ split: data/ffhqtrain.txt names the train images of one folder. A part
  with `files` reads exactly the listed images, in the list's order (grey levels worked by hand);
  a listed file the folder lacks, a path leaving it, or a list changed after the stores were made
  is one line; two lists over one folder overlap only when they share a file."""
  from PIL import Image

  for i in range(5):
    Image.fromarray(np.full((2, 2), 10 * i, np.uint8)).save(tmp_path / f"{i:05d}.png")
  (tmp_path / "train.txt").write_text("00003.png\n00000.png\n\n00004.png\n")
  (tmp_path / "val.txt").write_text("00001.png\n")
  ds = _folder_dataset(tmp_path, max_pixels=100)
  ds.parts.database.files = str(tmp_path / "train.txt")
  images, _, source = sources.part_arrays(ds, "database")
  assert source["files"] == 3 and source["stop"] == 3 and source["file_list_sha256"]
  np.testing.assert_array_equal(images[:, 0, 0, 0], [30, 0, 40])
  assert (
    sources.part_source(ds, "database")["files_sha256"]
    != sources.part_source(_folder_dataset(tmp_path, max_pixels=100), "database")["files_sha256"]
  )
  for text, says in (
    ("00009.png\n", "1 of the 1 images .* lists are not usable images of the folder .00009.png"),
    ("../00001.png\n", "must list image paths relative to the folder"),
    ("00001.png\n00001.png\n", "lists 1 paths twice"),
  ):
    (tmp_path / "bad.txt").write_text(text)
    ds.parts.database.files = str(tmp_path / "bad.txt")
    with pytest.raises(UserError, match=says):
      sources.part_arrays(ds, "database")
  (tmp_path / "train.txt").write_text("00003.png\n")
  with pytest.raises(UserError, match="file list .*train.txt changed or went away"):
    sources.folder_files(source)
  split = f"folder:{tmp_path}"
  parts = config_section(
    "dataset",
    name="ffhq",
    parts=dict(
      train=dict(split=split, start=0, stop=0, files=str(tmp_path / "train.txt")),
      database=dict(split=split, start=0, stop=0, files=str(tmp_path / "val.txt")),
    ),
  )
  sources.check_disjoint(parts)
  (tmp_path / "val.txt").write_text("00001.png\n00003.png\n")
  with pytest.raises(UserError, match="overlap.*database_overlaps_train=True"):
    sources.check_disjoint(parts)
  parts.database_overlaps_train = True  # RDM-IN retrieves from its own training images
  sources.check_disjoint(parts)


def test_label_range_is_read_as_the_original_subset_sampler():
  """rdm/data/base.py SubsetSampler: two values that are not neighbours are an inclusive range
  from min to max; anything else is the list of labels itself."""
  np.testing.assert_array_equal(
    sources.label_set([151, 280]), np.arange(151, 281)
  )  # dogs: 130 classes
  np.testing.assert_array_equal(sources.label_set((280, 151)), np.arange(151, 281))
  np.testing.assert_array_equal(sources.label_set([3, 4]), [3, 4])
  np.testing.assert_array_equal(sources.label_set([9, 1, 5]), [1, 5, 9])
  assert sources.label_set(()) is None


def test_tfds_parts_stream_rows_and_keep_a_label_range(tmp_path):
  """A mocked TFDS split read by row ranges in any order equals the whole split read at once, the
  label range keeps exactly the examples whose label is in it, and a dataset that is not there
  is one line."""
  import tensorflow_datasets as tfds

  ds = config_section(
    "dataset",
    name="imagenet2012",
    image_size=12,
    tfds_data_dir="",
    label_range=(),
    parts=dict(train=dict(split="train", start=2, stop=14)),
  )
  with tfds.testing.mock_data(num_examples=16):
    part = sources.open_part(ds, "train")
    whole = part.images()
    assert whole.shape == (12, 12, 12, 3) and whole.dtype == np.uint8
    np.testing.assert_array_equal(part.images(7, 10), whole[7:10])
    np.testing.assert_array_equal(part.images(1, 3), whole[1:3])  # backwards: the stream restarts
    labels = part.labels
    ds.label_range = (int(labels.min()), int(np.median(labels)))
    kept = sources.open_part(ds, "train")
    inside = (labels >= labels.min()) & (labels <= np.median(labels))
    np.testing.assert_array_equal(kept.ids, np.arange(2, 14)[inside])
    np.testing.assert_array_equal(kept.images(), whole[inside])
    assert kept.source["label_range"] == list(ds.label_range)
  ds.name, ds.tfds_data_dir = "no_such_dataset_here", str(tmp_path)
  with pytest.raises(UserError, match="not available"):
    sources.open_part(ds, "train")
  ds.name = "mnist"  # a real TFDS dataset, not prepared in this directory
  with pytest.raises(UserError, match="tfds build mnist"):
    sources.open_part(ds, "train")


def test_image_folder_captions_come_from_its_side_file(tmp_path):
  """captions.jsonl ({"file", "caption"} per line) gives each listed file its caption and the others
  ""; a malformed line names itself; a side file changed after the stores were made is refused."""
  import json

  from PIL import Image

  for name in ("a/1.png", "a/2.png", "b/3.png"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / name)
  lines = [
    {"file": "b/3.png", "caption": "a sneaker, ünïcode"},
    {"file": "a/1.png", "caption": "a red dress"},
  ]
  (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  ds = _folder_dataset(tmp_path, max_pixels=100)
  part = sources.open_part(ds, "database")
  assert list(part.captions) == ["a red dress", "", "a sneaker, ünïcode"]
  assert part.source["captions_sha256"]
  (tmp_path / "captions.jsonl").write_text('{"file": "a/1.png", "caption": "changed"}\n')
  with pytest.raises(UserError, match="changed or went away"):
    sources.folder_captions(part.source, ["a/1.png"])
  (tmp_path / "captions.jsonl").write_text(
    '{"file": "a/1.png", "caption": "ok"}\n{"file": "a/2.png"}\n'
  )
  with pytest.raises(UserError, match=r"captions.jsonl:2 is not a JSON object"):
    sources.open_part(ds, "database")
  (tmp_path / "captions.jsonl").unlink()
  assert sources.open_part(ds, "database").captions is None


def _captioned_builder(data_dir: str):
  """A tiny TFDS dataset prepared locally, captioned as coco_captions is (`captions/text`, a
  list)."""
  import tensorflow_datasets as tfds

  class CaptionedSquares(tfds.core.GeneratorBasedBuilder):
    # a one-segment module name: TFDS then looks for no code beside the class (inside a package
    # it would go through importlib_resources, which tensorflow-datasets does not install)
    __module__ = "captioned_squares"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"val": self._generate_examples()}

    def _generate_examples(self):
      for i in range(10):
        image = np.full((6 + i, 9, 3), 20 * i, np.uint8)
        texts = [f"square {i}, caption {j}" for j in range(i % 3)]  # 0, 1 or 2 captions
        yield i, {"image": image, "captions": {"text": texts}}

  builder = CaptionedSquares(data_dir=data_dir)
  builder.download_and_prepare()
  return builder


def test_tfds_captions_are_the_first_caption_of_each_example(tmp_path):
  """A locally prepared TFDS dataset captioned like coco_captions: a part's captions are each
  example's first `captions/text` ("" for none), aligned with its images in file order."""

  builder = _captioned_builder(str(tmp_path))
  ds = config_section(
    "dataset",
    name=builder.name,
    image_size=4,
    tfds_data_dir=str(tmp_path),
    label_range=(),
    caption_feature="auto",
    parts=dict(test=dict(split="val", start=3, stop=9)),
  )
  part = sources.open_part(ds, "test")
  means = part.images().reshape(6, -1).mean(-1)  # the images say which example each row is
  order = [int(round(m / 20)) for m in means]
  assert len(set(order)) == 6
  assert list(part.captions) == [f"square {i}, caption 0" if i % 3 else "" for i in order]
  ds.caption_feature = "captions/id"
  with pytest.raises(UserError, match="no feature 'captions/id'"):
    sources.open_part(ds, "test")
  ds.caption_feature = ""
  assert sources.open_part(ds, "test").captions is None
