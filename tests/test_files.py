"""The file layer (rdm_jax/files.py) on local paths and on a gs:// bucket.

The bucket is etils' own test double (`epath.testing.mock_epath`): gs:// paths go through
epath's backend interface as in production, with each backend call served by a local
directory (tensorflow's GCS client, which needs the network, is bypassed). The run-directory
code (PNG grids, sample sets, checkpoint digests, the workdir checks) is exercised on both;
references are computed independently (hashlib, PIL, np.savez on a local file). Stores refuse
a bucket in one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from rdm_jax import checkpoint, files
from rdm_jax.data import store, visualize
from rdm_jax.errors import UserError
from rdm_jax.metrics import sample_sets

_CALLS = (
  "copy",
  "exists",
  "isdir",
  "listdir",
  "makedirs",
  "mkdir",
  "remove",
  "rename",
  "replace",
  "rmtree",
  "stat",
)


@pytest.fixture
def fake_bucket(tmp_path):
  """gs://bucket/... served from tmp_path/gcs/bucket/... through epath's backend; yields the local
  root."""
  from etils.epath import gpath, testing

  root = str(tmp_path / "gcs")
  os.makedirs(root)
  local = lambda p: (
    os.fspath(p).replace("gs://", root + "/", 1) if os.fspath(p).startswith("gs://") else p
  )
  remote = lambda p: p.replace(root + "/", "gs://", 1) if isinstance(p, str) else p

  def call(fn, path, *args, **kwargs):
    return fn(
      local(path), *[local(a) if isinstance(a, (str, os.PathLike)) else a for a in args], **kwargs
    )

  def open_object(fn, path, mode, *args, **kwargs):  # objects need no parent directories
    if any(m in mode for m in "wax"):
      os.makedirs(os.path.dirname(local(path)), exist_ok=True)
    return fn(local(path), mode, *args, **kwargs)

  def glob(fn, pattern):
    return [remote(p) for p in fn(local(pattern))]

  def walk(fn, top, *args, **kwargs):
    for d, dirs, names in fn(local(top), *args, **kwargs):
      yield remote(d), dirs, names

  with (
    mock.patch.object(gpath, "_is_tf_installed", lambda: False),
    testing.mock_epath(**{c: call for c in _CALLS}, open=open_object, glob=glob, walk=walk),
  ):
    yield root


@pytest.fixture(params=["local", "gs"])
def base(request, tmp_path):
  if request.param == "local":
    yield str(tmp_path / "run")
  else:
    request.getfixturevalue("fake_bucket")
    yield "gs://bucket/run"


def test_paths_are_spelled_canonically():
  assert files.normpath("gs://b//runs/./x/") == "gs://b/runs/x"
  assert (
    files.normpath(os.path.normpath("gs://b/runs/x")) == "gs://b/runs/x"
  )  # os.path made it gs:/b/...
  assert files.join("gs://b/runs/", "x", "y.json") == "gs://b/runs/x/y.json"
  assert files.dirname("gs://b/runs/x") == "gs://b/runs" and files.basename("gs://b/runs/x") == "x"
  assert files.normpath("runs//x/") == "runs/x" and not files.is_uri("runs/gs:x")


def test_writes_reads_listings_and_moves(base):
  files.makedirs(files.join(base, "a", "b"))
  files.atomic_write_text(files.join(base, "a", "b", "x.json"), '{"k": 1}')
  data = os.urandom(3 << 20)  # several read blocks
  files.atomic_write(files.join(base, "a", "blob.bin"), lambda f: f.write(data))
  assert json.loads(files.read_text(files.join(base, "a", "b", "x.json"))) == {"k": 1}
  assert files.sha256(files.join(base, "a", "blob.bin")) == hashlib.sha256(data).hexdigest()[:16]
  assert files.isdir(files.join(base, "a")) and files.isfile(files.join(base, "a", "blob.bin"))
  assert not files.exists(files.join(base, "nothing"))
  assert sorted(files.listdir(files.join(base, "a"))) == ["b", "blob.bin"]
  assert files.walk_sizes(files.join(base, "a")) == {"b/x.json": 8, "blob.bin": len(data)}
  assert files.glob(files.join(base, "a", "b"), "*.json") == [files.join(base, "a", "b", "x.json")]
  arrays = {"images": np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "note": np.asarray("ü")}
  files.atomic_savez(files.join(base, "s.npz"), **arrays)
  with files.load_npz(files.join(base, "s.npz")) as z:
    np.testing.assert_array_equal(z["images"], arrays["images"])
    assert str(z["note"]) == "ü"
  files.move(files.join(base, "a"), files.join(base, "moved"))
  assert not files.exists(files.join(base, "a"))
  assert files.walk_sizes(files.join(base, "moved")) == {"b/x.json": 8, "blob.bin": len(data)}
  # nothing left under a temporary name
  assert all(".tmp" not in name for name in files.walk_sizes(base))


def test_png_grids_and_sample_sets_in_a_bucket_match_local_ones(fake_bucket, tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
  visualize.save_png("gs://bucket/run/samples/grid.png", image, scale=2)
  with open(os.path.join(fake_bucket, "bucket/run/samples/grid.png"), "rb") as f:
    np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO(f.read()))), image.repeat(2, 0).repeat(2, 1)
    )
  # a sample job's set: settings.json and its shards
  out = "gs://bucket/run/samples/exemplar"
  shards = [rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for n in (3, 2)]
  files.atomic_write_text(files.join(out, "settings.json"), json.dumps({"num_shards": 2}))
  for i, images in enumerate(shards):
    files.atomic_savez(
      files.join(out, f"shard-{i:05d}-of-00002.npz"),
      images=images,
      condition=np.asarray("exemplar"),
    )
  assert sample_sets.default_sample_sets("gs://bucket/run") == [out]
  label, images, captions = sample_sets.read_samples(out)
  assert label == "exemplar" and captions == []
  np.testing.assert_array_equal(images, np.concatenate(shards))
  files.remove(files.join(out, "shard-00001-of-00002.npz"))
  with pytest.raises(UserError, match="holds 1 of 2 shards"):
    sample_sets.read_samples(out)


class _Manager:
  """What checkpoint's digest functions use of an orbax CheckpointManager."""

  def __init__(self, directory, steps):
    self.directory, self._steps = directory, steps

  def all_steps(self):
    return list(self._steps)


def test_checkpoint_digests_and_workdir_checks_in_a_bucket(fake_bucket):
  workdir = "gs://bucket/runs/r1"
  step_dir = files.join(workdir, "checkpoints", "7")
  files.makedirs(files.join(step_dir, "default"))
  files.atomic_write(files.join(step_dir, "default", "array.bin"), lambda f: f.write(b"\x01" * 100))
  files.atomic_write_text(files.join(step_dir, "_CHECKPOINT_METADATA"), "{}")
  mngr = _Manager(files.join(workdir, "checkpoints"), [7])
  with mock.patch.object(checkpoint.jax, "process_index", lambda: 0):
    checkpoint.record_digests(mngr)
  record = json.loads(files.read_text(files.join(workdir, checkpoint.DIGESTS, "7.json")))
  assert record["files"]["default/array.bin"] == [
    100,
    hashlib.sha256(b"\x01" * 100).hexdigest()[:16],
  ]
  assert checkpoint._damage(mngr, 7) is None
  files.atomic_write(files.join(step_dir, "default", "array.bin"), lambda f: f.write(b"\x02" * 100))
  assert "changed since it was written" in checkpoint._damage(mngr, 7)
  checkpoint.check_workdir(workdir)  # a run: accepted
  files.atomic_write_text("gs://bucket/other/notes.txt", "mine")
  with pytest.raises(UserError, match="holds files but no training run"):
    checkpoint.check_workdir("gs://bucket/other")


def test_stores_refuse_a_bucket_in_one_line():
  for call in (
    lambda: store.read("gs://bucket/data/database", "database", hint=""),
    lambda: store.check_output(os.path.normpath("gs://bucket/data/latents_train"), "latents"),
  ):
    with pytest.raises(UserError, match="gcsfuse") as e:
      call()
    assert "\n" not in str(e.value)


def test_npy_files_read_into_memory_and_mapped_alike(tmp_path):
  """untrusted.load_npy, in memory or memory-mapped, gives np.load's array (C and Fortran order)."""
  from rdm_jax import untrusted

  for order in ("C", "F"):
    a = np.asarray(np.arange(60, dtype=np.float32).reshape(3, 4, 5), order=order)
    np.save(tmp_path / f"{order}.npy", a)
    for mmap in (False, True):
      got = untrusted.load_npy(str(tmp_path / f"{order}.npy"), mmap=mmap)
      np.testing.assert_array_equal(got, np.load(tmp_path / f"{order}.npy"))
