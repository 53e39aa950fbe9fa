"""Test set-up: 8 fake CPU devices (sharding tests need a multi-axis mesh), tiny stores and runs,
and the helpers tests in several folders share.

The temporary files of the tests and of the jobs they start go to one fresh folder for the
session (TMPDIR), removed at the end.

The tests and the jobs they start share one XLA compilation cache for the session (a fresh
temporary directory, removed at the end): many tests run the same tiny train step or sampler
in new processes, and a cached program is the program XLA would compile again. It makes the
jobs they start faster. `make test` runs the suite on two
pytest-xdist workers (`-n 2 --dist loadfile`): most tests wait on job subprocesses that keep
about one core busy.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile

# the controlling process: one temporary folder for the session
if "RDM_JAX_TESTS_TMPDIR" not in os.environ:
  # What the code under test puts in the temporary folder goes there and is removed at the end: TFDS
  # leaves an empty mkdtemp folder behind each time it looks for a mocked dataset's info in its
  # bucket (about 60 per run). pytest's own tmp_path folders stay where they were.
  os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
  _TMP = tempfile.tempdir = os.environ["TMPDIR"] = os.environ["RDM_JAX_TESTS_TMPDIR"] = (
    tempfile.mkdtemp(prefix="rdm_jax_tests_tmp_")
  )
else:
  _TMP = None
# conv=auto's choices
os.environ["RDM_JAX_CACHE"] = os.path.join(os.environ["RDM_JAX_TESTS_TMPDIR"], "rdm_jax_cache")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
    prefix="rdm_jax_tests_xla_cache_"
  )
else:
  _CACHE = None
# One cache for both pytest-xdist workers and every job they start. A size limit is what makes
# JAX take a file lock around each read and write of an entry (jax/_src/lru_cache.py): without
# it a process could read an entry another is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 << 30))


def pytest_sessionfinish(session, exitstatus):
  for builder in _BUILDER:  # a session stopped early (-x) does not wait for the shared run
    if builder.poll() is None:
      os.killpg(builder.pid, 9)  # its train job too
    builder.wait()
  for folder in (_CACHE, _TMP):
    if folder is not None:
      shutil.rmtree(folder, ignore_errors=True)


import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FMNIST_DB_START = 40000  # the demo config's database part of Fashion-MNIST's train split


def make_tiny_stores(
  data_dir: str,
  n_train: int = 64,
  n_db: int = 40,
  k: int = 6,
  d: int = 16,
  seed: int = 0,
  encoder: dict | None = None,
  fmnist_database: bool = False,
  tokens: dict | None = None,
) -> dict:
  """Writes latents / neighbours / database stores of random data as the jobs would.

  fmnist_database: the database entries claim Fashion-MNIST train rows 40000.. as their source
  (as the embed job records them), so jobs that show neighbour pixels can load them.
  tokens: {"first_stage": identity, "seq_len": S, "num_codes": V}: RARM token stores (int32
  [N, S], manifest tokens: true) instead of continuous latents.
  """
  from rdm_jax.data import store

  rng = np.random.default_rng(seed)
  encoder = encoder or {
    "name": "efficientnet_lite0",
    "weights_sha256": "test",
    "image_size": 32,
    "embed_dim": d,
  }
  source = {"dataset": "synthetic", "split": "train", "start": 0, "stop": n_train}
  first = FMNIST_DB_START if fmnist_database else 0
  db_source = {
    "dataset": "fashion_mnist" if fmnist_database else "synthetic",
    "split": "train" if fmnist_database else "db",
    "start": first,
    "stop": first + n_db,
  }
  db = store.write(
    os.path.join(data_dir, "database"),
    "database",
    {
      "embeddings": rng.normal(size=(n_db, d)).astype(np.float32),
      "ids": np.arange(first, first + n_db, dtype=np.int64),
      "labels": np.zeros(n_db, np.int32),
    },
    encoder=encoder,
    source=db_source,
  )
  for part, n in (("train", n_train), ("test", n_train // 2)):
    ids = np.arange(n, dtype=np.int64)
    if tokens:
      store.write(
        os.path.join(data_dir, f"latents_{part}"),
        "latents",
        {
          "latents": rng.integers(0, tokens["num_codes"], (n, tokens["seq_len"])).astype(np.int32),
          "ids": ids,
          "labels": np.zeros(n, np.int32),
        },
        source=source,
        first_stage=tokens["first_stage"],
        tokens=True,
        image_shape=[8, 8, 1],
      )
    else:
      store.write(
        os.path.join(data_dir, f"latents_{part}"),
        "latents",
        {
          "latents": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
          "ids": ids,
          "labels": np.zeros(n, np.int32),
        },
        source=source,
        first_stage={"name": "identity", "pad_to": 8},
        image_shape=[8, 8, 1],
      )
    store.write(
      os.path.join(data_dir, f"embeddings_{part}"),
      "embeddings",
      {
        "embeddings": rng.normal(size=(n, d)).astype(np.float32),
        "ids": ids,
        "labels": np.zeros(n, np.int32),
      },
      encoder=encoder,
      source=source,
    )
    store.write(
      os.path.join(data_dir, f"neighbors_{part}"),
      "neighbors",
      {
        "neighbor_ids": rng.integers(0, n_db, size=(n, k)).astype(np.int32),
        "scores": np.zeros((n, k), np.float32),
        "query_ids": ids,
      },
      database_fingerprint=db.fingerprint,
      encoder=encoder,
      num_neighbors=k,
    )
  return {"encoder": encoder, "d": d, "k": k}


TINY_OVERRIDES = [
  "--config.model.model_channels=32",
  "--config.model.channel_mult=(1,2)",
  "--config.model.attention_resolutions=(2,)",
  "--config.model.num_res_blocks=1",
  "--config.retrieval.embed_dim=16",
  "--config.first_stage.pad_to=8",
  "--config.train.batch_size=8",
  "--config.optim.warmup_steps=2",
  "--config.train.log_every=1",
  "--config.train.sample_every=0",
  "--config.k_train=4",
]


TRAIN_CONFIG = os.path.join(REPO, "configs", "fashion_mnist_rdm.py")
KILL_AT = os.path.join(REPO, "tests", "kill_at.py")
TRAINED_MESH = ("--config.mesh.data=4", "--config.mesh.fsdp=2")
TRAINED_STEPS = (*TRAINED_MESH, "--config.train.num_steps=4", "--config.train.checkpoint_every=2")
TRAINED_ARGS = (
  *TRAINED_STEPS,
  "--config.train.sample_every=2",
  "--config.train.num_sample_images=4",
  "--config.sample.num_steps=2",
)  # the shared `trained` run


def train_command(data_dir: str, workdir: str, *overrides: str) -> list[str]:
  """`python -m rdm_jax.train` on the tiny stores with the tiny model, plus `overrides`."""

  return [
    sys.executable,
    "-m",
    "rdm_jax.train",
    f"--config={TRAIN_CONFIG}",
    f"--workdir={workdir}",
    f"--config.data_dir={data_dir}",
    *TINY_OVERRIDES,
    *overrides,
  ]


def killable(cmd: list[str], kill_at: int | str = 0, count_file: str = "") -> list[str]:
  """`cmd` (python -m MODULE ARGS) under tests/kill_at.py: SIGKILLed at its kill_at-th commit, or at
  the first commit to a path containing TEXT for kill_at="path:TEXT" (0: never); the number of
  commits is written to count_file at a normal exit."""
  assert cmd[1] == "-m", cmd
  return [cmd[0], KILL_AT, str(kill_at), count_file, cmd[2], *cmd[3:]]


def one_line_error(cmd: list[str], env: dict | None = None) -> str:
  """Runs a job that must fail on bad input: exit status 2, no traceback, exactly one `error: `
  line."""

  out = subprocess.run(cmd, env=env or subprocess_env(), capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, out.stderr[-3000:]
  return errors[0]


def subprocess_env(devices: int | None = None) -> dict:
  """The test environment for a job in a subprocess, with this repo importable."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.fixture
def tiny_data(tmp_path):
  info = make_tiny_stores(str(tmp_path / "data"))
  info["data_dir"] = str(tmp_path / "data")
  return info


def repo_config(name: str, *args: str):
  """`configs/<name>.py`'s get_config(*args) (the part after ':' in
  --config=configs/<name>.py:arg)."""
  from rdm_jax.config_base import config_file

  return config_file(os.path.join(REPO, "configs", f"{name}.py"), *args)


def config_section(section_name: str, /, **fields):
  """config_base's defaults of the config section `section_name` (first_stage, retrieval, ...) with
  `fields` set (a dict merged into a sub-section: folder=dict(image_size=4) keeps folder's other
  fields): a section a test builds carries every field the library reads."""
  import ml_collections as mlc

  from rdm_jax import config_base

  section = config_base.base_config()[section_name]
  for key, value in fields.items():
    if isinstance(section.get(key), mlc.ConfigDict) and isinstance(value, dict):
      section[key].update(value)
    else:
      section[key] = value
  return section


def final_state(config, workdir: str, latent_shape: tuple, step: int | None = None):
  """The whole train state (step, params, optimizer state, EMA) of a run's checkpoint at `step`
  (None: the latest), restored as `rdm_jax.train` restores it."""
  from rdm_jax import checkpoint, train_step
  from rdm_jax.parallel import mesh as mesh_lib

  setup = train_step.setup_training(config, latent_shape, mesh_lib.from_config(config))
  return checkpoint.restore(
    checkpoint.manager(workdir, create=False), setup.abstract, setup.state_sh, step
  )


def assert_same_state(got, want, step: int) -> None:
  """Two train states are both at `step` and equal leaf for leaf, bit for bit."""
  import jax

  assert int(got.step) == int(want.step) == step, (int(got.step), int(want.step), step)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def tiny_config(data_dir: str):
  """The fashion_mnist config shrunk to the tiny stores (in-process tests)."""
  c = repo_config("fashion_mnist_rdm")
  c.data_dir = data_dir
  c.model.model_channels = 32
  c.model.channel_mult = (1, 2)
  c.model.attention_resolutions = (2,)
  c.model.num_res_blocks = 1
  c.retrieval.embed_dim = 16
  c.first_stage.pad_to = 8
  c.train.batch_size = 8
  c.optim.warmup_steps = 2
  c.k_train = 4
  return c


def build_trained() -> tuple[str, str]:
  """(data_dir, workdir) of the shared run (the `trained` fixture), trained under a file lock in
  the session's temporary folder by the first process to ask; the others wait and read it."""
  import fcntl

  root = os.path.join(os.environ["RDM_JAX_TESTS_TMPDIR"], "trained")
  data_dir, workdir = os.path.join(root, "data"), os.path.join(root, "run")
  done = os.path.join(root, "train.stderr")
  with open(root + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not os.path.exists(done):
      shutil.rmtree(root, ignore_errors=True)  # a build that failed part-way
      make_tiny_stores(data_dir, fmnist_database=True)
      out = subprocess.run(
        train_command(data_dir, workdir, *TRAINED_ARGS),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        cwd=REPO,
      )
      assert out.returncode == 0, out.stderr[-3000:]
      with open(done + ".tmp", "w") as f:
        f.write(out.stderr)
      os.replace(done + ".tmp", done)
  return data_dir, workdir


@pytest.fixture(scope="session")
def trained():
  """(data_dir, workdir) of one tiny training run (TRAINED_ARGS: a (data=4, fsdp=2) mesh,
  checkpoints and training-time samples at steps 2 and 4, 4 images, 2 DDIM steps), its database
  sourced from Fashion-MNIST rows. Its stderr is `trained_log(workdir)`.

  One run for the whole session (`build_trained`), started in the background as the session
  starts when a test needs it (`pytest_collection_modifyitems`), so no worker waits idle for it.
  Shared: tests copy it before changing it."""
  return build_trained()


_BUILDER: list[subprocess.Popen] = []


def pytest_collection_modifyitems(session, config, items):
  """The tests that need the shared run go last (the order is otherwise kept), and the first (or
  only) worker starts building it in a subprocess when any selected test needs it: the other
  tests run meanwhile, and `trained` waits on the build's lock."""
  needs = lambda item: "trained" in getattr(item, "fixturenames", ())  # noqa: E731
  items.sort(key=needs)  # stable
  if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0" or _BUILDER:
    return
  if any(needs(item) for item in items):
    _BUILDER.append(
      subprocess.Popen(
        [sys.executable, "-c", "from tests.conftest import build_trained; build_trained()"],
        env=subprocess_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # one process group with its train job
      )
    )


def trained_log(workdir: str) -> str:
  """What the shared `trained` run printed (stderr)."""
  return open(os.path.join(os.path.dirname(workdir), "train.stderr")).read()


@pytest.fixture
def small_disk(tmp_path):
  """mount(size, read_only=False) -> the path of a fresh tmpfs of `size` (e.g. "64m") under
  tmp_path, unmounted at the end; resize(path, size) and read_only(path, on) remount it. Skips where
  this user may not mount (a tmpfs is how a test gets a disk that really fills up or is really
  read-only: root ignores file permissions)."""

  mounted = []

  def remount(path: str, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", path], check=True, capture_output=True)

  def mount(size: str, read_only: bool = False) -> str:
    path = str(tmp_path / f"disk{len(mounted)}")
    os.makedirs(path)
    done = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""), "tmpfs", path],
      capture_output=True,
      text=True,
    )
    if done.returncode:
      pytest.skip(
        f"cannot mount a tmpfs here ({done.stderr.strip()}); these tests need root or CAP_SYS_ADMIN"
      )
    mounted.append(path)
    return path

  mount.resize = lambda path, size: remount(path, f"size={size}")
  mount.read_only = lambda path, on=True: remount(path, "ro" if on else "rw")
  yield mount
  for path in mounted:
    subprocess.run(["umount", "-l", path], capture_output=True)


def tiny_token_run(tmp_path) -> list[str]:
  """configs/fashion_mnist_rarm.py shrunk: random palette tokens (4 x 4 of 16 codes) in tiny stores;
  the train command's arguments after the module."""
  from rdm_jax.models import first_stage

  palette = str(tmp_path / "palette_16.npy")
  np.save(palette, np.linspace(-1, 1, 16, dtype=np.float32)[:, None])
  config = repo_config("fashion_mnist_rarm")
  config.first_stage.weights = palette
  data_dir = str(tmp_path / "data")
  make_tiny_stores(
    data_dir,
    tokens={
      "first_stage": first_stage.identity(config.first_stage),
      "seq_len": 16,
      "num_codes": 16,
    },
  )
  return [
    "--config=configs/fashion_mnist_rarm.py",
    f"--config.data_dir={data_dir}",
    f"--config.first_stage.weights={palette}",
    *RARM_TINY,
  ]


def rarm_final_state(args: list[str], workdir: str, step: int):
  """The whole train state of the tiny RARM run at `step` (the config its job ran with)."""
  from rdm_jax.config_base import with_overrides

  return final_state(with_overrides(repo_config("fashion_mnist_rarm"), args), workdir, (16,), step)


def run_processes(
  make_cmd, num_processes: int, env: dict, tries: int = 3
) -> list[tuple[subprocess.Popen, str]]:
  """Runs `make_cmd(port, process_id)` for every process; (process, stderr) of each.

  A port found free can be taken by someone else before the coordinator (process 0) binds
  it; the coordinator then dies with "Failed to add port". That attempt is stopped and run
  again on another port, so the test never depends on what else runs on the machine.
  """
  for _ in range(tries):
    port = free_port()
    procs = [
      subprocess.Popen(
        make_cmd(port, i), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )
      for i in range(num_processes)
    ]
    _, err0 = procs[0].communicate(timeout=600)
    if procs[0].returncode != 0 and "Failed to add port" in err0:
      for p in procs[1:]:
        p.kill()
        p.communicate()
      continue
    return [(procs[0], err0)] + [(p, p.communicate(timeout=600)[1]) for p in procs[1:]]
  raise AssertionError(f"no free port for the coordinator in {tries} tries")


def processes_said(outs: list[tuple[subprocess.Popen, str]], chars: int = 2500) -> str:
  """Each process's exit status and the end of its stderr without stack frames: a process killed
  because another died prints a thread dump that would hide the first process's error."""
  said = []
  for i, (p, err) in enumerate(outs):
    lines = [line for line in err.splitlines() if not line.startswith("  File ")]
    said.append(f"--- process {i}: exit status {p.returncode}\n" + "\n".join(lines)[-chars:])
  return "\n".join(said)


def tensorboard_events(logdir: str) -> tuple[dict[str, dict[int, float]], dict[str, set[int]]]:
  """What the event files in `logdir` hold, read with TensorFlow's own reader: ({scalar tag:
  {step: value}}, {image tag: steps})."""
  import glob

  import tensorflow as tf

  scalars, images = {}, {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        plugin = v.metadata.plugin_data.plugin_name
        if plugin == "images":
          images.setdefault(v.tag, set()).add(event.step)
        elif plugin == "scalars" or v.HasField("simple_value"):
          value = v.simple_value if v.HasField("simple_value") else tf.make_ndarray(v.tensor)
          scalars.setdefault(v.tag, {})[event.step] = float(value)
  return scalars, images


def brute_force_neighbors(queries, database, k):
  """[N, k]: each query's k nearest database rows by cosine similarity, in float64 (ties: lower
  row first)."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = unit(np.asarray(queries, np.float64)) @ unit(np.asarray(database, np.float64)).T
  return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def tiny_run_state(data_dir: str, workdir: str, step: int | None = None):
  """`final_state` of a run of `tiny_config(data_dir)` (8x8x1 latents)."""
  return final_state(tiny_config(data_dir), workdir, (8, 8, 1), step)


RARM_TINY = [
  "--config.dataset.image_size=8",
  "--config.model.heads=2",
  "--config.model.dim_head=8",
  "--config.model.depth=1",
  "--config.retrieval.embed_dim=16",
  "--config.k_train=4",
  "--config.train.batch_size=8",
  "--config.optim.warmup_steps=2",
  "--config.train.log_every=1",
  "--config.train.num_steps=4",
  "--config.train.checkpoint_every=2",
  "--config.mesh.data=4",
  "--config.mesh.fsdp=2",
]


def free_port() -> int:
  """A TCP port free on localhost now (another process may take it before it is used)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def job_modules() -> set[str]:
  """Repo-relative paths of the job entry points: the modules of rdm_jax/ and rdm_jax/jobs/ with a
  `main(argv)`."""
  found = set()
  for folder in ("rdm_jax", "rdm_jax/jobs"):
    for name in os.listdir(os.path.join(REPO, folder)):
      path = f"{folder}/{name}"
      if name.endswith(".py") and "def main(argv" in open(os.path.join(REPO, path)).read():
        found.add(path)
  return found
