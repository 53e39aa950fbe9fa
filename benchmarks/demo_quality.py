r"""How convincing the demo's samples are: do they follow their neighbours, and are they garments?

  python benchmarks/demo_quality.py --workdir=runs/fashion_mnist [--seeds=0,1,2] [--num_images=256]
      [--config=configs/fashion_mnist_rdm.py] [--sets=exemplar,proposal] [--no_sample]

1. A Fashion-MNIST classifier of our own (a small CNN, Flax + optax, seeded; 8 epochs, about 6
   minutes here, cached in data/fashion_mnist/eval_cache) is trained on the train split's rows
   0..40000 (the RDM's training part, outside the database rows 40000..60000) and its accuracy on
   the 10k test images is printed (0.9192).
2. For every seed, the sample job draws `num_images` samples of each conditioning set from the
   run's checkpoint (`--config.sample.seed=S`, into <workdir>/samples/quality/<set>_seed<S>),
   and the evaluation job scores them (precision / recall k=3 and FID on the config's extractor,
   against the config's reference); --no_sample scores sets already there.
3. Label agreement: the classifier's label for each sample against the majority label of the
   k database entries that conditioned it (ties: the first neighbour's label among the tied);
   also on the samples whose k neighbours all carry one label ("unanimous"), where the label a
   sample should show is not in doubt. The same for the real test images against their own
   neighbours, all 10k and the first `num_images` (the exemplar samples' queries: the ceiling to
   compare them with). Then the agreement by how the k neighbours' labels split (4, 3+1, 2+2, ...),
   also counting either label of a tie ("any top label"), beside the real queries' own.
4. Near-black pixels: the fraction of pixels in grey levels 1..15, for the samples and for the
   real test images (whose backgrounds are exactly 0).

Prints a row per set and seed, then the mean and the spread (min..max) over seeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from label_agreement import agreement, by_split, split_order  # noqa: E402
from rdm_jax.data import sources  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = flags.DEFINE_string("config", "configs/fashion_mnist_rdm.py", "The demo's config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/fashion_mnist", "The trained demo run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Sampling seeds.")
_NUM = flags.DEFINE_integer("num_images", 256, "Samples per set and seed.")
_SETS = flags.DEFINE_list(
  "sets", ["exemplar", "proposal"], "Conditioning sets (config.sample.condition)."
)
_NO_SAMPLE = flags.DEFINE_bool("no_sample", False, "Score the sets already sampled; do not sample.")
_TAG = flags.DEFINE_string(
  "tag", "", "Suffix of the sample sets' directory (one per variant of the settings)."
)
_STEP = flags.DEFINE_integer("step", None, "Sample this checkpoint step (default: the latest).")
_OVERRIDES = flags.DEFINE_list(
  "overrides", [], "Extra --config.* overrides for the sample and eval jobs."
)

IDX = "/usr/share/datasets/fashion-mnist"
TRAIN_STOP = 40000  # the demo's training part; the database is rows 40000..60000


class Classifier(nn.Module):
  """Two stages of two 3x3 convs and a max-pool, then dropout and two dense layers: 91.9% on
  Fashion-MNIST's test split after `train_classifier`'s 8 epochs."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(jnp.float32) / 127.5 - 1.0
    for ch in (32, 64):
      x = nn.relu(nn.Conv(ch, (3, 3))(x))
      x = nn.relu(nn.Conv(ch, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.Dropout(0.4, deterministic=not train)(x.reshape(x.shape[0], -1))
    x = nn.Dropout(0.4, deterministic=not train)(nn.relu(nn.Dense(256)(x)))
    return nn.Dense(10)(x)


def train_classifier(
  images: np.ndarray, labels: np.ndarray, epochs: int = 8, batch: int = 128, seed: int = 0
):
  """Params of `Classifier` after `epochs` of Adam (lr 1e-3, cosine decay to 0) on uint8
  [N, 28, 28, 1] images, each flipped left-right with probability 1/2 (garments are
  mirror-symmetric classes)."""
  model = Classifier()
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28, 1), jnp.uint8))
  tx = optax.adam(optax.cosine_decay_schedule(1e-3, epochs * (len(images) // batch)))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y, key):
    def loss(p):
      logits = model.apply(p, x, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    updates, opt = tx.update(jax.grad(loss)(params), opt, params)
    return optax.apply_updates(params, updates), opt

  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed + 1)
  for _ in range(epochs):
    order = rng.permutation(len(images))
    for i in range(0, len(order) - batch + 1, batch):
      idx = order[i : i + batch]
      flip = rng.random(batch) < 0.5
      x = np.where(flip[:, None, None, None], images[idx][:, :, ::-1], images[idx])
      key, sub = jax.random.split(key)
      params, opt = step(params, opt, x, labels[idx], sub)
  return model, params


def predict(model, params, images: np.ndarray, batch: int = 1000) -> np.ndarray:
  fn = jax.jit(lambda x: jnp.argmax(model.apply(params, x), -1))
  return np.concatenate(
    [np.asarray(fn(images[i : i + batch])) for i in range(0, len(images), batch)]
  )


def near_black(images: np.ndarray) -> float:
  """The fraction of pixels in grey levels 1..15 of uint8 images [N, 28, 28, 1] (larger ones are
  cropped to 28 x 28): real Fashion-MNIST backgrounds are exactly 0, a sample's may sit a few levels
  above it."""
  v = images[:, :28, :28]
  return float(((v >= 1) & (v <= 15)).mean())


def read_set(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, H, W, 1], neighbour ids [N, k]) of a sample set's shards."""
  shards = sorted(f for f in os.listdir(path) if f.startswith("shard-") and f.endswith(".npz"))
  images, ids = [], []
  for name in shards:
    with np.load(os.path.join(path, name), allow_pickle=False) as z:
      images.append(z["images"])
      ids.append(z["neighbor_ids"])
  return np.concatenate(images), np.concatenate(ids)


def neighbor_labels_of_test_images(train_y: np.ndarray) -> np.ndarray:
  """[N, k]: the true labels of the k neighbours the neighbour job found
  for the first N test images.
  The classifier's labels of those real images agree with them as a perfect model's samples
  would (the classifier's and the retrieval's errors)."""
  from rdm_jax import config_base
  from rdm_jax.data import store

  config = config_base.config_file(os.path.join(REPO, _CONFIG.value))
  for o in _OVERRIDES.value:
    key, value = o.split("=", 1)
    if key in ("database", "data_dir"):
      config[key] = value
  paths = config_base.paths(config)
  neighbors = store.read(paths["neighbors_test"], "neighbors", hint="")["neighbor_ids"][
    :, : config.k_train
  ]
  ids = np.asarray(store.read(paths["database"], "database", hint="")["ids"])
  return train_y[ids[neighbors]]


def job(module: str, *args: str) -> str:
  cmd = [
    sys.executable,
    "-m",
    module,
    f"--config={_CONFIG.value}",
    *args,
    *(f"--config.{o}" for o in _OVERRIDES.value),
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  if out.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return out.stdout


def main(argv):
  del argv
  t0 = time.perf_counter()
  train_x, train_y = sources.load_idx_split(IDX, "train")
  test_x, test_y = sources.load_idx_split(IDX, "test")
  cache = os.path.join(
    REPO, "data", "fashion_mnist", "eval_cache", "demo_classifier_v2_seed0.msgpack"
  )
  model = Classifier()
  if os.path.exists(cache):  # msgpack of arrays only: reading it runs no code
    from flax import serialization

    template = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1), jnp.uint8))
    with open(cache, "rb") as f:
      params = serialization.from_bytes(template, f.read())
  else:
    from flax import serialization

    model, params = train_classifier(train_x[:TRAIN_STOP], train_y[:TRAIN_STOP])
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".tmp", "wb") as f:
      f.write(serialization.to_bytes(params))
    os.replace(cache + ".tmp", cache)
  test_got = predict(model, params, test_x)
  print(
    f"classifier: test accuracy {float((test_got == test_y).mean()):.4f} on {len(test_y)} images "
    f"(trained on train rows 0..{TRAIN_STOP}, or read from {cache}; "
    f"{time.perf_counter() - t0:.0f} s)"
  )
  real_nb = neighbor_labels_of_test_images(train_y)
  real_got = test_got[: len(real_nb)]
  n, k = _NUM.value, real_nb.shape[1]
  rows, splits = {}, {}
  root = os.path.join(
    _WORKDIR.value,
    "samples",
    "quality"
    + (f"_step{_STEP.value}" if _STEP.value else "")
    + (f"_{_TAG.value}" if _TAG.value else ""),
  )
  for seed in map(int, _SEEDS.value):
    dirs = {name: os.path.join(root, f"{name}_seed{seed}") for name in _SETS.value}
    if not _NO_SAMPLE.value:
      for name, out in dirs.items():
        job(
          "rdm_jax.sample",
          f"--workdir={_WORKDIR.value}",
          f"--out={out}",
          f"--config.sample.condition={name}",
          f"--config.sample.seed={seed}",
          f"--config.sample.num_images={_NUM.value}",
          *([f"--step={_STEP.value}"] if _STEP.value else []),
        )
    eval_out = os.path.join(root, f"eval_seed{seed}")
    job(
      "rdm_jax.evaluate",
      f"--workdir={_WORKDIR.value}",
      f"--samples={','.join(dirs.values())}",
      f"--out={eval_out}",
    )
    with open(os.path.join(eval_out, "metrics.json")) as f:
      scores = json.load(f)
    for name, path in dirs.items():
      images, ids = read_set(path)
      got = predict(model, params, images[:, :28, :28])
      m = (
        scores["sets"].get(name)
        or scores["sets"].get(os.path.basename(path))
        or scores["sets"][f"{name} ({os.path.basename(path)})"]
      )
      labels = train_y[ids]
      agree, agree_one, share_one = agreement(got, labels)
      rows.setdefault(name, []).append(
        (
          seed,
          len(images),
          agree,
          m["precision"],
          m["recall"],
          m["fd"],
          near_black(images),
          agree_one,
          share_one,
        )
      )
      splits.setdefault(name, []).append(by_split(got, labels))
  (real, real_one, real_share), (first, first_one, first_share) = (
    agreement(real_got, real_nb),
    agreement(real_got[:n], real_nb[:n]),
  )
  print(
    f"real test images against their own k={k} neighbours' majority label: agreement {real:.3f} "
    f"(the ceiling for samples conditioned on those neighbours); {real_one:.3f} where the {k} are "
    f"unanimous ({real_share:.0%} of the test images); on the first {n} (the exemplar samples' "
    f"queries): {first:.3f}, {first_one:.3f} where unanimous ({first_share:.0%})"
  )
  print(
    f"pixels in grey levels 1..15 (near black, not black): {near_black(test_x):.3f} of the "
    "real test images'"
  )
  print(
    "| set | seed | samples | label agreement | unanimous neighbours: agreement (share) | "
    "precision | recall | FD | pixels in grey 1..15 |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for name, rs in rows.items():
    for seed, n, agree, p, r, fd, grey, agree_one, share_one in rs:
      print(
        f"| {name} | {seed} | {n} | {agree:.3f} | {agree_one:.3f} ({share_one:.0%}) | {p:.3f} | "
        f"{r:.3f} | {fd:.1f} | {grey:.3f} |"
      )
  for name, rs in rows.items():
    cols = np.array([r[2:5] + r[7:8] for r in rs], np.float64)
    summary = ", ".join(
      f"{what} {c.mean():.3f} ({c.min():.3f}..{c.max():.3f})"
      for what, c in zip(("agreement", "precision", "recall", "unanimous agreement"), cols.T)
    )
    print(f"{name}: mean (min..max) over {len(rs)} seeds: {summary}")
  real_split = by_split(real_got[:n], real_nb[:n])
  print(
    f"label agreement by how the k={k} neighbours' labels split (mean over seeds; 'any top': the "
    f"sample shows one of the most frequent labels, so either label of a tie), against the real "
    f"test images that are the first {n} exemplar queries:"
  )
  print(
    "| set | split | share | agreement | agreement, any top label | real: share | real: agreement "
    "| real: any top label |"
  )
  print("|---|---|---|---|---|---|---|---|")
  absent = (0.0, float("nan"), float("nan"))
  for name, per_seed in splits.items():
    for kind in sorted({kind for d in per_seed for kind in d}, key=split_order):
      got_kind = np.array([d.get(kind, absent) for d in per_seed])  # [seeds, 3]
      share, agree, any_top = got_kind[:, 0].mean(), *np.nanmean(got_kind[:, 1:], axis=0)
      r = real_split.get(kind, absent)
      print(
        f"| {name} | {kind} | {share:.0%} | {agree:.3f} | {any_top:.3f} | {r[0]:.0%} | "
        f"{r[1]:.3f} | {r[2]:.3f} |"
      )


if __name__ == "__main__":
  app.run(main)
