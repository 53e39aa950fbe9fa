"""Data safety: crafted indexes never run code, output paths never delete a user's files,
concurrent runs give one correct store, and stale data is never reused.

Everything is made in the test; each attack that would run code tries to create a sentinel.
"""

import contextlib
import gzip
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
from tests.conftest import REPO, make_tiny_stores, subprocess_env, tiny_config, train_command

from rdm_jax import checkpoint, files, untrusted
from rdm_jax.data import chunked, sources, store
from rdm_jax.retrieval import original_database
from rdm_jax.errors import UserError
from rdm_jax.metrics import sample_sets
from rdm_jax.retrieval import index

CONFIG = os.path.join(REPO, "configs", "fashion_mnist_rdm.py")


class _System:
  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


def unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _snapshot(root):
  """{relative path: bytes} of every file under root (what the user owns)."""
  out = {}
  for d, _, names in os.walk(root):
    for f in names:
      p = os.path.join(d, f)
      out[os.path.relpath(p, root)] = open(p, "rb").read()
  return out


def _user_dir(path):
  os.makedirs(os.path.join(path, "sub"))
  for name, text in (("thesis.tex", "chapter 1"), ("sub/results.csv", "1,2,3")):
    with open(os.path.join(path, name), "w") as f:
      f.write(text)
  return _snapshot(path)


@pytest.fixture
def scann_index(tmp_path):
  """A one-shard ScaNN (brute force) index over 300 random 8-d vectors."""
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(300, 8)).astype(np.float32)
  db = store.write(
    str(tmp_path / "db"),
    "database",
    {"embeddings": emb, "ids": np.arange(300)},
    encoder={"name": "test"},
    source={"dataset": "synthetic"},
  )
  cfg = tiny_config(str(tmp_path)).retrieval.index
  cfg.kind = "brute"
  built = index.build(db, cfg, 5, str(tmp_path / "db_index"))
  return db, cfg, built.path, rng.normal(size=(7, 8)).astype(np.float32)


def test_index_with_a_pickle_in_a_shard_is_refused(scann_index, tmp_path):
  db, cfg, path, q = scann_index
  sentinel = tmp_path / "pwned"
  assert index.load(path, db, cfg).search(unit(q), 5)[1].shape == (7, 5)
  with open(os.path.join(path, "shard_00000", "scann_docids.pkl"), "wb") as f:
    pickle.dump(_System(f"touch {sentinel}"), f)
  with pytest.raises(UserError, match="scann_docids.pkl"):
    index.load(path, db, cfg).search(unit(q), 5)
  assert not sentinel.exists()


def _edit_manifest(path, edit):
  m = json.load(open(os.path.join(path, "manifest.json")))
  edit(m)
  json.dump(m, open(os.path.join(path, "manifest.json"), "w"))


@pytest.mark.parametrize(
  "attack",
  ["traversal", "absolute", "symlinked_dir", "extra_file", "symlinked_file", "assets_outside"],
)
def test_index_shards_must_be_what_the_build_wrote(scann_index, tmp_path, attack):
  db, cfg, path, q = scann_index
  shard = os.path.join(path, "shard_00000")
  sentinel = tmp_path / "pwned"
  evil = tmp_path / "evil"
  shutil.copytree(shard, evil)
  with open(evil / "scann_docids.pkl", "wb") as f:
    pickle.dump(_System(f"touch {sentinel}"), f)
  if attack == "traversal":
    _edit_manifest(path, lambda m: m["shards"][0].update(dir="../evil"))
  elif attack == "absolute":
    _edit_manifest(path, lambda m: m["shards"][0].update(dir=str(evil)))
  elif attack == "symlinked_dir":
    shutil.rmtree(shard)
    os.symlink(evil, shard)
  elif attack == "extra_file":
    open(os.path.join(shard, "notes.txt"), "w").close()
  elif attack == "symlinked_file":
    os.remove(os.path.join(shard, "dataset.npy"))
    os.symlink(evil / "dataset.npy", os.path.join(shard, "dataset.npy"))
  elif attack == "assets_outside":
    pbtxt = os.path.join(shard, "scann_assets.pbtxt")
    text = open(pbtxt).read().replace('"dataset.npy"', f'"{evil}/dataset.npy"')
    open(pbtxt, "w").write(text)
    _edit_manifest(
      path, lambda m: m["shard_files"]["shard_00000"].update({"scann_assets.pbtxt": len(text)})
    )
  with pytest.raises(UserError, match="damaged or was not written by the index job"):
    index.load(path, db, cfg).search(unit(q), 5)
  assert not sentinel.exists()


def test_writers_refuse_a_directory_of_user_files(tmp_path):
  user = str(tmp_path / "experiment")
  before = _user_dir(user)
  computed = []

  def compute(a, b):
    computed.append(a)
    return {"x": np.zeros((b - a, 1))}

  with pytest.raises(UserError, match="not a 'thing' store; refusing to replace it"):
    chunked.write_chunked(user, "thing", 10, 5, compute, log=lambda m: None)
  assert computed == []  # refused before any work
  with pytest.raises(UserError, match="refusing"):
    store.write(user + "/", "thing", {"x": np.zeros(3)})
  db = store.write(
    str(tmp_path / "db"),
    "database",
    {"embeddings": np.eye(4, dtype=np.float32), "ids": np.arange(4)},
  )
  with pytest.raises(UserError, match="refusing"):
    index.ensure(db, tiny_config(str(tmp_path)).retrieval.index, 2, user)
  with pytest.raises(
    UserError, match="'database' store"
  ):  # another kind of store is not replaced either
    store.write(str(tmp_path / "db"), "neighbors", {"x": np.zeros(3)})
  os.makedirs(str(tmp_path / "s.partial"))
  open(str(tmp_path / "s.partial" / "mine.txt"), "w").close()
  with pytest.raises(UserError, match="not an unfinished"):
    store.write(str(tmp_path / "s"), "thing", {"x": np.zeros(3)})
  assert _snapshot(user) == before and os.path.exists(str(tmp_path / "s.partial" / "mine.txt"))


def test_a_job_killed_while_recording_its_inputs_resumes(tmp_path):
  """kill -9 between writing `<store>.partial/inputs.json.<hex>.tmp` and renaming it (found by the
  kill suite): the rerun takes the directory as its own, drops the temporary and finishes; a
  file of anyone else's beside such a temporary is still refused."""
  partial = tmp_path / "s.partial"
  os.makedirs(partial)
  (partial / "inputs.json.0123abcd.tmp").write_text('{"half": ')
  out = chunked.write_chunked(
    str(tmp_path / "s"), "thing", 10, 5, lambda a, b: {"x": np.arange(a, b)}, log=lambda m: None
  )
  np.testing.assert_array_equal(out["x"], np.arange(10))
  assert not os.path.exists(partial)
  os.makedirs(tmp_path / "t.partial")
  (tmp_path / "t.partial" / "inputs.json.0123abcd.tmp").write_text("")
  (tmp_path / "t.partial" / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="not an unfinished"):
    chunked.write_chunked(
      str(tmp_path / "t"), "thing", 10, 5, lambda a, b: {"x": np.arange(a, b)}, log=lambda m: None
    )
  assert (tmp_path / "t.partial" / "notes.txt").read_text() == "mine"
  # a metrics file's temporary left by a kill goes on the rerun; look-alikes of the user's stay
  for name in (
    "metrics.json",
    "metrics.json.0123abcd.tmp",
    "metrics.json.notes.tmp",
    "metrics.md.0123abcd.tmp",
  ):
    (tmp_path / name).write_text("x")
  store.remove_own_temporaries(str(tmp_path / "metrics.json"))
  assert sorted(p.name for p in tmp_path.glob("metrics*")) == [
    "metrics.json",
    "metrics.json.notes.tmp",
    "metrics.md.0123abcd.tmp",
  ]


def _neighbors_cmd(tmp_path, out, *extra):
  return [
    sys.executable,
    "-m",
    "rdm_jax.jobs.neighbors",
    f"--config={CONFIG}",
    f"--config.data_dir={tmp_path / 'data'}",
    "--config.retrieval.num_neighbors=5",
    "--config.retrieval.chunk_size=64",
    f"--database={tmp_path / 'db.npy'}",
    f"--queries={tmp_path / 'q.npy'}",
    f"--out={out}",
    *extra,
  ]


@pytest.fixture
def npy_inputs(tmp_path):
  rng = np.random.default_rng(1)
  db, q = (
    rng.normal(size=(500, 12)).astype(np.float32),
    rng.normal(size=(1500, 12)).astype(np.float32),
  )
  np.save(tmp_path / "db.npy", db)
  np.save(tmp_path / "q.npy", q)
  subprocess.run(
    [
      sys.executable,
      "-m",
      "rdm_jax.jobs.index",
      f"--config={CONFIG}",
      f"--config.data_dir={tmp_path / 'data'}",
      "--config.retrieval.num_neighbors=5",
      f"--database={tmp_path / 'db.npy'}",
    ],
    env=subprocess_env(devices=1),
    check=True,
    capture_output=True,
  )
  sims = unit(q.astype(np.float64)) @ unit(db.astype(np.float64)).T
  return np.argsort(-sims, axis=1, kind="stable")[:, :5]


def test_neighbors_job_out_at_user_files_and_with_a_trailing_slash(tmp_path, npy_inputs):
  user = str(tmp_path / "experiment")
  before = _user_dir(user)
  out = subprocess.run(
    _neighbors_cmd(tmp_path, user), env=subprocess_env(devices=1), capture_output=True, text=True
  )
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "refusing to replace it" in out.stderr
  assert _snapshot(user) == before and not os.path.exists(user + ".partial")
  # --out=nbrs/ names the store nbrs (before: nbrs/.partial inside it, deleted on publish)
  out = subprocess.run(
    _neighbors_cmd(tmp_path, str(tmp_path / "nbrs") + "/"),
    env=subprocess_env(devices=1),
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  result = store.read(str(tmp_path / "nbrs"), "neighbors", hint="")
  np.testing.assert_array_equal(result["neighbor_ids"], npy_inputs)
  assert sorted(os.listdir(tmp_path / "nbrs")) == sorted(
    ["inputs.json", "manifest.json", "neighbor_ids.npy", "query_ids.npy", "scores.npy"]
  )


def test_two_concurrent_runs_of_one_job_leave_one_correct_store(tmp_path, npy_inputs):
  out = str(tmp_path / "nbrs")
  procs = [
    subprocess.Popen(
      _neighbors_cmd(tmp_path, out),
      env=subprocess_env(devices=1),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for _ in range(2)
  ]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  result = store.read(out, "neighbors", hint="", verify=True)
  np.testing.assert_array_equal(result["neighbor_ids"], npy_inputs)
  leftovers = [
    f for f in os.listdir(tmp_path) if f.startswith("nbrs") and f not in ("nbrs", "nbrs_proposal")
  ]
  assert leftovers == [], leftovers


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_lock_breaks_stale_locks_and_waits_for_live_ones(tmp_path):
  path = str(tmp_path / "s")
  # a holder that died (same host) is stale: the write goes ahead and the lock is gone after
  with open(path + ".lock", "w") as f:
    json.dump({"pid": _dead_pid(), "host": os.uname().nodename, "start": None, "token": "x"}, f)
  store.write(path, "thing", {"x": np.arange(3)})
  assert not os.path.exists(path + ".lock")
  # another host's lock is judged by its age
  with open(path + ".lock", "w") as f:
    json.dump({"pid": 1, "host": "elsewhere", "start": None, "token": "y"}, f)
  os.utime(path + ".lock", (time.time() - 7200, time.time() - 7200))
  store.write(path, "thing", {"x": np.arange(4)})
  assert not os.path.exists(path + ".lock")
  # a live holder is waited for
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    with open(path + ".lock", "w") as f:
      json.dump({"pid": holder.pid, "host": os.uname().nodename, "start": None, "token": "z"}, f)
    done = threading.Event()
    writer = threading.Thread(
      target=lambda: (store.write(path, "thing", {"x": np.arange(5)}), done.set())
    )
    writer.start()
    assert not done.wait(1.5)  # still waiting: the holder is alive
    assert len(store.read(path, "thing", hint="")["x"]) == 4
  finally:
    holder.kill()
    holder.wait()
  writer.join(timeout=60)
  assert done.is_set() and len(store.read(path, "thing", hint="")["x"]) == 5
  # a file that is not a lock of ours is never removed
  open(path + ".lock", "w").write("my notes")
  with pytest.raises(UserError, match="not a lock of ours"):
    store.write(path, "thing", {"x": np.arange(3)})
  assert open(path + ".lock").read() == "my notes"


def test_chunks_of_other_inputs_never_enter_a_store(tmp_path):
  """A process started with another config (digest A) leaves chunks in the partial store of
  config B; B's merge uses only chunks named with its own inputs digest."""
  out = str(tmp_path / "s")
  log = lambda m: None
  inputs_b = {"count": 8, "chunk_size": 4, "encoder": "b"}
  partial = store.open_partial(out, inputs_b, log)
  digest_a = store.inputs_digest({"count": 8, "chunk_size": 4, "encoder": "a"})
  for start in (0, 4):
    np.save(os.path.join(partial, f"chunk_{digest_a}_{start:012d}_x.npy"), np.full((4, 1), -1.0))
    open(os.path.join(partial, f"chunk_{digest_a}_{start:012d}.done"), "w").write("x")
  computed = []

  def compute(a, b):
    computed.append(a)
    return {"x": np.full((b - a, 1), 2.0)}

  s = chunked.write_chunked(out, "thing", 8, 4, compute, log=log, encoder="b")
  assert computed == [0, 4]
  np.testing.assert_array_equal(s["x"][:, 0], 2.0)


def test_publish_keeps_the_old_store_until_the_new_one_is_in(tmp_path, monkeypatch):
  path = str(tmp_path / "s")
  store.write(path, "thing", {"x": np.arange(3)})
  partial = store.open_partial(path, {"v": 2}, log=lambda m: None)
  real_replace = os.replace

  def crash_moving_the_new_store_in(src, dst):
    if src == partial:
      raise KeyboardInterrupt  # killed between moving the old store aside and the new one in
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", crash_moving_the_new_store_in)
  with pytest.raises(KeyboardInterrupt):
    store.publish(partial, path, "thing")
  monkeypatch.undo()
  aside = [f for f in os.listdir(tmp_path) if ".replaced-" in f]
  assert len(aside) == 1  # the old store survives, whole
  np.testing.assert_array_equal(
    store.read(str(tmp_path / aside[0]), "thing", hint="")["x"], np.arange(3)
  )
  store.write(path, "thing", {"x": np.arange(5)})  # the next publish cleans up what the crash left
  assert [f for f in os.listdir(tmp_path) if ".replaced-" in f] == []
  np.testing.assert_array_equal(store.read(path, "thing", hint="")["x"], np.arange(5))


def test_reads_verify_checksums(tmp_path, monkeypatch):
  path = str(tmp_path / "s")
  store.write(path, "thing", {"x": np.arange(100, dtype=np.float32)})
  arr = np.load(os.path.join(path, "x.npy"), mmap_mode="r+")
  arr[7] = -1.0  # same shape and dtype: only the content changed
  arr.flush()
  del arr
  with pytest.raises(UserError, match="does not match the checksum"):
    store.read(path, "thing", hint="")  # small stores are always checked
  monkeypatch.setattr(store, "VERIFY_BELOW_BYTES", 0)  # a "large" store: checked on request
  assert store.read(path, "thing", hint="")["x"][7] == -1.0
  with pytest.raises(UserError, match="does not match the checksum"):
    store.read(path, "thing", hint="", verify=True)
  store.verify_all_stores(True)  # --verify
  try:
    with pytest.raises(UserError, match="does not match the checksum"):
      store.read(path, "thing", hint="")
  finally:
    store.verify_all_stores(False)
  monkeypatch.undo()
  assert (
    store.read_if_current(path, "thing", "h") is None
  )  # a changed store is recomputed, not reused


def test_array_names_in_a_manifest_cannot_leave_the_store(tmp_path):
  path = str(tmp_path / "s")
  store.write(path, "thing", {"x": np.arange(3)})
  np.save(str(tmp_path / "outside.npy"), np.arange(3))
  _edit_manifest(path, lambda m: m["arrays"].update({"../outside": m["arrays"]["x"]}))
  with pytest.raises(UserError, match="array names are letters"):
    store.read(path, "thing", hint="")


class _FakeExtractor:
  """Features = per-image means (what a cache must recompute when an image changes)."""

  identity = {"name": "fake"}

  def __call__(self, images, what=""):
    f = images.reshape(len(images), -1).astype(np.float32)
    return {
      "features": f.mean(axis=1, keepdims=True),
      "logits": np.zeros((len(images), 0), np.float32),
    }


def test_eval_cache_follows_image_content(tmp_path):
  from PIL import Image

  folder = tmp_path / "ref"
  os.makedirs(folder / "a" / "b")
  for i in range(3):
    Image.fromarray(np.full((4, 4), 10 * i, np.uint8)).save(folder / "a" / "b" / f"{i}.png")
  config = tiny_config(str(tmp_path / "data"))
  images, source = sample_sets.read_reference(config, str(folder))
  first = sample_sets.cached_features(config, _FakeExtractor(), images, source)
  times = [(p, os.stat(p)) for p in (folder, folder / "a", folder / "a" / "b")]
  Image.fromarray(np.full((4, 4), 200, np.uint8)).save(
    folder / "a" / "b" / "1.png"
  )  # edited in place
  for p, st in times:  # folders keep their modification times
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
  images, source = sample_sets.read_reference(config, str(folder))
  second = sample_sets.cached_features(config, _FakeExtractor(), images, source)
  assert first["features"][1, 0] == 10 and second["features"][1, 0] == 200

  class Doubled(_FakeExtractor):  # another extractor (other weights, size...): never its features
    identity = {"name": "fake", "image_size": 64}

    def __call__(self, images, what=""):
      out = super().__call__(images, what)
      return {"features": 2 * out["features"], "logits": out["logits"]}

  third = sample_sets.cached_features(config, Doubled(), images, source)
  assert third["features"][1, 0] == 400

  class Counting(_FakeExtractor):
    calls = 0

    def __call__(self, images, what=""):
      Counting.calls += 1
      return super().__call__(images, what)

  # the first extractor's features for these images are still cached: read, not recomputed
  assert sample_sets.cached_features(config, Counting(), images, source)["features"][1, 0] == 200
  assert Counting.calls == 0


def test_image_folders_do_not_follow_directory_links(tmp_path):
  from PIL import Image

  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "one.png")
  os.symlink(tmp_path, tmp_path / "loop")
  os.symlink(tmp_path / "one.png", tmp_path / "same.png")
  assert len(sample_sets.read_image_folder(str(tmp_path))) == 1


def test_sample_sets_of_one_condition_get_one_row_each(tmp_path):
  for seed in (0, 1):
    np.savez(
      tmp_path / f"seed{seed}.npz",
      images=np.full((2, 4, 4, 1), seed, np.uint8),
      condition="exemplar",
    )
  sets, _ = sample_sets.read_sample_sets([str(tmp_path / "seed0.npz"), str(tmp_path / "seed1.npz")])
  assert sorted(sets) == ["exemplar (seed0.npz)", "exemplar (seed1.npz)"]
  assert sets["exemplar (seed1.npz)"].max() == 1


def test_npz_and_gzip_sizes_are_checked_before_inflating(tmp_path, monkeypatch):
  # an .npz whose header claims far more than its member holds
  import io
  import zipfile

  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
    buf, {"descr": "|u1", "fortran_order": False, "shape": (9999999, 4, 4, 1)}
  )
  with zipfile.ZipFile(tmp_path / "lie.npz", "w") as z:
    z.writestr("images.npy", buf.getvalue() + bytes(32))
  with pytest.raises(UserError, match="declares"):
    sample_sets.read_samples(str(tmp_path / "lie.npz"))
  # a compressed member larger than this machine may inflate
  monkeypatch.setenv("RDM_MEMORY_BUDGET", str(1 << 19))
  np.savez_compressed(
    tmp_path / "bomb.npz", images=np.zeros((64, 128, 128, 1), np.uint8)
  )  # 1 MiB -> 1 KiB
  with pytest.raises(UserError, match="declares"):
    sample_sets.read_samples(str(tmp_path / "bomb.npz"))
  # an IDX .gz whose header declares more than the budget, and one padded past its header's size
  with gzip.open(tmp_path / "big-idx3-ubyte.gz", "wb") as f:
    f.write(bytes([0, 0, 0x08, 3]) + np.array([60000, 280, 280], ">u4").tobytes() + b"\0" * 100)
  with pytest.raises(UserError, match="declares"):
    sources.read_idx(str(tmp_path / "big-idx3-ubyte.gz"))
  with gzip.open(tmp_path / "pad-idx3-ubyte.gz", "wb") as f:
    f.write(bytes([0, 0, 0x08, 3]) + np.array([1, 2, 2], ">u4").tobytes() + b"\0" * (4 << 20))
  with pytest.raises(UserError, match="truncated or padded"):
    sources.read_idx(str(tmp_path / "pad-idx3-ubyte.gz"))


def test_source_identity_names_the_image_files(tmp_path):
  c = tiny_config(str(tmp_path))
  c.dataset.name = "fashion_mnist"
  c.dataset.parts = {"train": {"split": "train", "start": 0, "stop": 10}}
  c.dataset.idx_dir = str(tmp_path / "one")
  os.makedirs(tmp_path / "one")
  os.makedirs(tmp_path / "two")
  a = sources.part_source(c.dataset, "train")
  c.dataset.idx_dir = str(tmp_path / "two")
  assert sources.part_source(c.dataset, "train") != a


def test_train_refuses_foreign_workdirs_and_runs_of_another_database(tmp_path, trained):
  data_dir = str(tmp_path / "data")
  shutil.copytree(trained[0], data_dir)
  user = str(tmp_path / "notes")
  before = _user_dir(user)

  def run(workdir, steps):
    return subprocess.run(
      train_command(
        data_dir, workdir, f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=2"
      ),
      env=subprocess_env(),
      capture_output=True,
      text=True,
      cwd=REPO,
    )

  out = run(user, 2)
  assert out.returncode == 2 and "no training run" in out.stderr and "Traceback" not in out.stderr
  assert _snapshot(user) == before
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[1], workdir)  # a run of 4 steps on these stores
  shutil.rmtree(data_dir)
  make_tiny_stores(
    data_dir, seed=1, fmnist_database=True
  )  # the database (and the rest) re-made with other content
  out = run(workdir, 6)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "trained with another database" in out.stderr


# Untrusted input, round three: bounded memory and time, special files, images that would run a
# program, files of the user's, and malformed files as one line.


@contextlib.contextmanager
def _within(seconds: float):
  """Fails the test (TimeoutError) instead of hanging when the block blocks, e.g. opening a FIFO."""

  def timeout(*_):
    raise TimeoutError(f"blocked for {seconds} s")

  old = signal.signal(signal.SIGALRM, timeout)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def test_npz_arrays_together_past_the_budget_are_refused(tmp_path, monkeypatch):
  """Three arrays, each under the budget, together over it: refused when the file is opened."""
  monkeypatch.setenv("RDM_MEMORY_BUDGET", str(1 << 20))
  each = np.zeros((600 << 10,), np.uint8)  # 600 KiB each, ~1 KiB compressed
  np.savez_compressed(
    tmp_path / "set.npz", images=each.reshape(-1, 8, 8, 1), latents=each, more=each
  )
  assert os.path.getsize(tmp_path / "set.npz") < 20 << 10
  with pytest.raises(UserError, match="3 arrays together declares"):
    sample_sets.read_samples(str(tmp_path / "set.npz"))
  np.savez_compressed(
    tmp_path / "part_0.npz",
    embedding=np.zeros((1000, 400), np.float32),
    img_id=np.zeros(1000, np.int64),
    patch_coords=np.zeros((1000, 4), np.int64),
  )
  with pytest.raises(UserError, match="together declares"):
    original_database.part_rows(str(tmp_path / "part_0.npz"), 400)
  # what a job keeps of several files counts together: two shards of 600 KiB images each
  for i in range(2):
    np.savez(tmp_path / f"shard_{i}.npz", images=np.zeros((600, 32, 32, 1), np.uint8))
  os.makedirs(tmp_path / "shards")
  for i in range(2):
    os.replace(tmp_path / f"shard_{i}.npz", tmp_path / "shards" / f"shard_{i}.npz")
  with pytest.raises(UserError, match="may still take"):
    sample_sets.read_sample_sets([str(tmp_path / "shards")])


def test_image_readers_cap_pixels_and_charge_the_job(tmp_path, monkeypatch):
  from PIL import Image

  bomb = tmp_path / "bomb"
  os.makedirs(bomb)
  Image.new("L", (8000, 8000)).save(bomb / "big.png")  # 64M pixels in ~60 KiB
  assert os.path.getsize(bomb / "big.png") < 1 << 20
  with pytest.raises(UserError, match="8000x8000 pixels"):
    sample_sets.read_image_folder(str(bomb))
  assert sources.usable_images(str(bomb), untrusted.MAX_IMAGE_PIXELS) == (
    [],
    ["big.png: 8000x8000 pixels"],
  )
  many = tmp_path / "many"
  os.makedirs(many)
  for i in range(5):
    Image.fromarray(np.full((64, 64, 3), i, np.uint8)).save(many / f"{i}.png")
  monkeypatch.setenv("RDM_MEMORY_BUDGET", str(4 * 64 * 64 * 3 + 100))  # four of the five
  with pytest.raises(UserError, match="4.png: its pixels declares"):
    sample_sets.read_image_folder(str(many))


def test_captions_are_bounded_and_each_costs_only_itself(tmp_path):
  names = [f"{i}.png" for i in range(300)]

  def captions(lines):
    path = tmp_path / "captions.jsonl"
    path.write_bytes(b"".join(lines))
    return sources.folder_captions(
      {"captions_file": str(path), "captions_sha256": store.file_sha256(str(path))}, names
    )

  huge = json.dumps({"file": "0.png", "caption": "x" * (1 << 20)}).encode() + b"\n"
  with pytest.raises(UserError, match="captions.jsonl:1"):
    captions([huge])
  longest = (
    json.dumps({"file": "1.png", "caption": "y" * untrusted.MAX_CAPTION_CHARS}).encode() + b"\n"
  )
  got = captions([longest, b'{"file": "2.png", "caption": "a dress"}\n'])
  assert got.dtype == object and len(got) == 300
  assert got[1] == "y" * untrusted.MAX_CAPTION_CHARS and got[2] == "a dress" and got[0] == ""


def test_special_files_are_refused_not_read(tmp_path):
  """FIFOs where a job reads a part, a manifest, a lock or an array: one line, never a hang."""
  parts = tmp_path / "parts"
  os.makedirs(parts)
  np.savez(
    parts / "10x4-part_0.npz",
    embedding=np.zeros((10, 4), np.float32),
    img_id=np.arange(10),
    patch_coords=np.zeros((10, 4), np.int64),
  )
  os.mkfifo(parts / "10x4-part_1.npz")
  found = original_database.npz_files([str(parts)])
  with _within(10), pytest.raises(UserError, match="not a regular file"):
    [original_database.part_rows(f, 4) for f in found]

  out = tmp_path / "db"
  os.makedirs(out)
  os.mkfifo(out / "manifest.json")
  with _within(10), pytest.raises(UserError, match="not a store"):
    store.check_output(str(out), "database")
  os.mkfifo(tmp_path / "db2.lock")
  with _within(10), pytest.raises(UserError, match="not a lock of ours"):
    store.check_output(str(tmp_path / "db2"), "database")

  s = store.write(str(tmp_path / "db3"), "database", {"embeddings": np.zeros((3, 4), np.float32)})
  os.remove(os.path.join(s.path, "embeddings.npy"))
  os.mkfifo(os.path.join(s.path, "embeddings.npy"))
  with _within(10), pytest.raises(UserError, match="not a regular file"):
    store.read(s.path, "database", hint="make it")


def test_links_to_devices_are_refused_not_read(tmp_path):
  """`/dev/zero` linked in as a manifest or a lock would be read until memory runs out: run where
  memory is capped, so that a reader that follows it fails with MemoryError instead of taking the
  machine down."""
  for name in ("db/manifest.json", "db2.lock"):
    os.makedirs(
      tmp_path / os.path.dirname(name) if os.path.dirname(name) else tmp_path, exist_ok=True
    )
    os.symlink("/dev/zero", tmp_path / name)
  script = (
    "import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
    "from rdm_jax.data import store\nfrom rdm_jax.errors import UserError\n"
    "for out in sys.argv[1:]:\n  try:\n    store.check_output(out, 'database'); print('ACCEPTED')\n"
    "  except UserError as e:\n    print('REFUSED', e)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", script, str(tmp_path / "db"), str(tmp_path / "db2")],
    env=subprocess_env(),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  lines = out.stdout.splitlines()
  assert len(lines) == 2 and all(line.startswith("REFUSED") for line in lines), (
    out.stdout + out.stderr[-2000:]
  )


def test_images_never_make_a_program_run(tmp_path, monkeypatch):
  """A PostScript file named .png: PIL would hand it to Ghostscript. A fake `gs` on PATH records a
  call."""
  from PIL import EpsImagePlugin

  sentinel = tmp_path / "gs_ran"
  bin_dir = tmp_path / "bin"
  os.makedirs(bin_dir)
  (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {sentinel}\nexit 1\n")
  os.chmod(bin_dir / "gs", 0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setattr(EpsImagePlugin, "gs_binary", None, raising=False)
  folder = tmp_path / "images"
  os.makedirs(folder / "a")
  (folder / "a" / "x.png").write_text(
    "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
  )
  with pytest.raises(UserError, match="not a PNG or JPEG"):
    sample_sets.read_image_folder(str(folder))
  assert sources.usable_images(str(folder), 1 << 30)[1] == ["a/x.png: UnidentifiedImageError"]
  assert isinstance(
    sources._folder_image(str(folder / "a" / "x.png"), 8, 3, 255, lenient=True), str
  )
  assert not sentinel.exists()


def test_jobs_delete_only_files_they_wrote(tmp_path):
  path = str(tmp_path / "db")
  store.write(path, "database", {"embeddings": np.zeros((3, 4), np.float32)})
  with open(os.path.join(path, "notes.txt"), "w") as f:
    f.write("the user's")
  with pytest.raises(UserError, match=r"notes\.txt"):
    store.write(path, "database", {"embeddings": np.ones((3, 4), np.float32)})
  assert open(os.path.join(path, "notes.txt")).read() == "the user's"
  assert not store.read(path, "database", hint="make it")[
    "embeddings"
  ].any()  # the old store, intact

  other = str(tmp_path / "db2")
  os.makedirs(other + ".partial")
  with open(os.path.join(other + ".partial", "inputs.json"), "w") as f:
    f.write('{"kind": "database", "something": "else"}')
  with open(os.path.join(other + ".partial", "draft.tex"), "w") as f:
    f.write("chapter 2")
  with pytest.raises(UserError, match=r"draft\.tex"):
    store.write(other, "database", {"embeddings": np.ones((3, 4), np.float32)})
  assert open(os.path.join(other + ".partial", "draft.tex")).read() == "chapter 2"


def _npz_variants(tmp_path) -> dict[str, bytes]:
  """A stored .npz with a bad CRC, the encrypted flag, and a deflated one with corrupt data."""
  np.savez(tmp_path / "good.npz", images=np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1))
  raw = (tmp_path / "good.npz").read_bytes()
  at = raw.index(bytes(range(10, 20)))
  out = {"bad_crc": raw[:at] + b"\xff" + raw[at + 1 :]}
  enc = bytearray(raw)
  for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
    i = enc.find(sig)
    enc[i + off : i + off + 2] = struct.pack("<H", 1)
  out["encrypted"] = bytes(enc)
  np.savez_compressed(
    tmp_path / "deflated.npz", images=np.arange(4096, dtype=np.uint16).reshape(8, 8, 8, 8)
  )
  raw = bytearray((tmp_path / "deflated.npz").read_bytes())
  info = zipfile.ZipFile(tmp_path / "deflated.npz").infolist()[0]
  start = info.header_offset + 30 + len(info.filename) + 20
  raw[start : start + 40] = os.urandom(40)
  out["bad_deflate"] = bytes(raw)
  return out


def test_malformed_inputs_are_one_line(tmp_path, monkeypatch):
  for name, data in _npz_variants(tmp_path).items():
    (tmp_path / f"{name}.npz").write_bytes(data)
    with pytest.raises(UserError, match=f"{name}.npz"):
      sample_sets.read_samples(str(tmp_path / f"{name}.npz"))
  # an array header declaring 2**200 rows
  s = store.write(str(tmp_path / "db"), "database", {"embeddings": np.zeros((3, 4), np.float32)})
  header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, 4), }" % 2**200
  with open(os.path.join(s.path, "embeddings.npy"), "wb") as f:
    np.lib.format.write_array_header_1_0(
      f, {"descr": "<f4", "fortran_order": False, "shape": (3, 4)}
    )
  raw = open(os.path.join(s.path, "embeddings.npy"), "rb").read()
  h = header.encode() + b" " * (len(raw) - 10 - len(header) - 1) + b"\n"
  open(os.path.join(s.path, "embeddings.npy"), "wb").write(
    raw[:8] + struct.pack("<H", len(h)) + h + bytes(48)
  )
  with pytest.raises(UserError, match="embeddings.npy"):
    store.read(s.path, "database", hint="make it")
  # a manifest nested 100000 deep, and one that is not UTF-8
  for text in (b"[" * 100_000 + b"]" * 100_000, b'{"kind": "\xff"}'):
    with open(os.path.join(s.path, "manifest.json"), "wb") as f:
      f.write(text)
    with pytest.raises(UserError, match="manifest.json"):
      store.read(s.path, "database", hint="make it")
  # captions: invalid UTF-8, deep nesting
  cap = tmp_path / "captions.jsonl"
  for line in (b'{"file": "a.png", "caption": "\xff\xfe"}\n', b"[" * 100_000 + b"\n"):
    cap.write_bytes(line)
    with pytest.raises(UserError, match="captions.jsonl:1"):
      sources.folder_captions(
        {"captions_file": str(cap), "captions_sha256": store.file_sha256(str(cap))}, ["a.png"]
      )
  # an undecodable image in an evaluated folder
  from PIL import Image

  os.makedirs(tmp_path / "set")
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "set" / "0.png")
  (tmp_path / "set" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
  with pytest.raises(UserError, match="1.png"):
    sample_sets.read_image_folder(str(tmp_path / "set"))
  # a bucket that cannot be reached (no network here): one line, not the object store's traceback
  with pytest.raises(UserError, match="cannot be reached"):
    checkpoint.check_workdir("gs://rdm-jax-test-no-such-bucket/run")
  # `~/runs` given quoted, as a config value or through a wrapper, is the home directory's
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert files.normpath("~/runs") == str(tmp_path / "home" / "runs")
  assert store.normalize("~/data/db/") == str(tmp_path / "home" / "data" / "db")


def _npz_mutations(data: bytes, rng: np.random.Generator, count: int):
  for _ in range(count):
    b = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:
      for i in rng.integers(0, len(b), rng.integers(1, 8)):
        b[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:
      b = b[: int(rng.integers(0, len(b)))]
    elif kind == 2:
      i = int(rng.integers(0, max(1, len(b) - 4)))
      b[i : i + 4] = struct.pack("<I", [2**31, 2**32 - 1, 1 << 20, 0][int(rng.integers(4))])
    else:
      i, j = sorted(rng.integers(0, len(b), 2))
      b[i:i] = b[i:j]
    yield bytes(b)


def test_fuzzed_npz_files_load_or_fail_in_one_line(tmp_path):
  import tracemalloc

  arrays = dict(
    images=np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8, 1),
    condition=np.asarray("exemplar"),
    latents=np.linspace(0, 1, 48, dtype=np.float32).reshape(3, 4, 4),
    seed=np.arange(3),
  )
  np.savez(tmp_path / "stored.npz", **arrays)
  np.savez_compressed(tmp_path / "deflated.npz", **arrays)
  rng = np.random.default_rng(0)
  outcomes = {"loaded": 0, "refused": 0}
  target = str(tmp_path / "mutant.npz")
  tracemalloc.start()
  try:
    for seed in ("stored.npz", "deflated.npz"):
      for mutant in _npz_mutations((tmp_path / seed).read_bytes(), rng, 1000):
        with open(target, "wb") as f:
          f.write(mutant)
        tracemalloc.reset_peak()
        try:
          with files.load_npz(target) as z:
            got = {name: z[name] for name in z.files}
          outcomes["loaded"] += 1
          assert all(isinstance(a, np.ndarray) for a in got.values())
        except UserError as e:
          outcomes["refused"] += 1
          assert "\n" not in str(e)
        assert tracemalloc.get_traced_memory()[1] < 64 * len(mutant) + (2 << 20)
  finally:
    tracemalloc.stop()
  assert outcomes["loaded"] > 20 and outcomes["refused"] > 1000, outcomes


def test_saved_transformers_directories_with_special_files_are_refused(tmp_path):
  """transformers opens a model's or tokenizer's files by name: a FIFO among them is refused
  first."""
  from transformers import CLIPConfig, FlaxCLIPModel

  from rdm_jax.models import clip

  config = CLIPConfig(
    text_config=dict(
      vocab_size=99,
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=1,
      num_attention_heads=2,
      max_position_embeddings=16,
    ),
    vision_config=dict(
      image_size=32,
      patch_size=8,
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=1,
      num_attention_heads=2,
    ),
    projection_dim=16,
  )
  FlaxCLIPModel(config, seed=0).save_pretrained(str(tmp_path / "clip"))
  assert clip.load(str(tmp_path / "clip")).model.config.projection_dim == 16
  os.mkfifo(tmp_path / "clip" / "vocab.json")
  with _within(30), pytest.raises(UserError, match="vocab.json is a FIFO"):
    clip.load(str(tmp_path / "clip"))
  with _within(30), pytest.raises(UserError, match="vocab.json is a FIFO"):
    clip.load_tokenizer(str(tmp_path / "clip"), "save one")
