"""Training input: latents + precomputed neighbour ids -> (z0 [B, H, W, C], context [B, k, d]).

The batch of step s is a pure function of (seed, s): global positions s*B .. s*B+B-1 of an
endless stream of per-epoch permutations of the examples. A resumed run therefore sees
exactly the batches an uninterrupted run would, and each process reads only its own slice
of the global batch (`process_index`-th block of B / process_count rows). With an augmented
train part (config.dataset.augment: V crops / flips of every image, stored example-major with
their own neighbours) the permutation runs over the examples and each epoch draws one variant
per example, uniformly, from (seed, epoch): every example once per epoch, a fresh crop each time.

tf.data runs the per-step loads in parallel (numpy on memory-mapped stores: latents rows,
neighbour-id rows, then a gather of the database embeddings of the first k_train, or a
random k_train, of the K stored neighbours) and prefetches ahead of the train step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from rdm_jax import config_base
from rdm_jax.data import store
from rdm_jax.errors import fail

ENCODE_HINT = "python -m rdm_jax.jobs.encode --config=<this config>"
EMBED_HINT = "python -m rdm_jax.jobs.embed --config=<this config>"
NEIGHBORS_HINT = "python -m rdm_jax.jobs.neighbors --config=<this config>"


@dataclass(frozen=True)
class RetrievalData:
  """Validated, aligned stores for one part: latents [N, H, W, C], neighbor_ids [N, K], database [M,
  d]."""

  latents: np.ndarray
  neighbor_ids: np.ndarray
  database: np.ndarray
  latents_store: store.Store
  neighbors_store: store.Store
  database_store: store.Store
  variants: int = 1  # rows per example (config.dataset.augment), example-major

  @property
  def num_examples(self) -> int:
    """Rows of the stores (examples x variants)."""
    return self.latents.shape[0]

  @property
  def num_stored_neighbors(self) -> int:
    return self.neighbor_ids.shape[1]

  def check_unchanged(self, doing: str = "training") -> None:
    """Stops the job in one line when a store changed on disk since it was opened and validated:
    a batch read from it would not be the data its manifest (and a checkpoint's record) names, and
    a truncated memory-mapped file would end the process with SIGBUS."""
    for s in (self.latents_store, self.neighbors_store, self.database_store):
      why = s.changed()
      if why:
        fail(
          f"{why} while {doing} read it; this run stops before it uses or saves anything made from "
          f"it. Rebuild {s.path} (or put the original back) and rerun: training resumes from its "
          "last checkpoint"
        )


def load_retrieval_data(
  config: Any, part: str = "train", encoder: dict | None = None
) -> RetrievalData:
  """Opens the latents, neighbours and database stores of `part` and checks they belong together.

  Args:
    encoder: the encoder identity the model was / will be trained with; the database must
      have been embedded by the same encoder (None skips this check).
  """
  paths = config_base.paths(config)
  latents = store.read(paths[f"latents_{part}"], "latents", hint=f"{ENCODE_HINT} --parts={part}")
  neighbors = store.read(
    paths[f"neighbors_{part}"], "neighbors", hint=f"{NEIGHBORS_HINT} --parts={part}"
  )
  database = store.read(paths["database"], "database", hint=f"{EMBED_HINT} --parts=database")

  if not np.array_equal(latents["ids"], neighbors["query_ids"]):
    fail(
      f"{neighbors.path} is not aligned with {latents.path} (different example ids); "
      f"rerun `{NEIGHBORS_HINT} --parts={part}`"
    )
  variants = check_variants(latents, neighbors, part)
  if neighbors.manifest["database_fingerprint"] != database.fingerprint:
    fail(
      f"{neighbors.path} was computed against another database than {database.path}; "
      f"rerun `{NEIGHBORS_HINT} --parts={part}` for this database"
    )
  if encoder is not None and database.manifest["encoder"] != encoder:
    fail(
      f"database {database.path} was embedded by {database.manifest['encoder']}, but the model "
      f"uses {encoder}; embed the database with the model's encoder"
    )
  if config_base.model_family(config) == "rarm":
    check_tokens(config, latents)
  elif latents.manifest.get("tokens"):
    fail(
      f"{latents.path} holds VQ tokens (made for RARM) but config.model is an RDM's; encode "
      f"latents with this config (`{ENCODE_HINT} --parts={part}`) into another config.data_dir"
    )
  d = database["embeddings"].shape[1]
  if d != config.retrieval.embed_dim:
    fail(
      f"database embeddings are {d}-d but config.retrieval.embed_dim={config.retrieval.embed_dim} "
      "(the model's context width); fix the config or re-embed"
    )
  k_stored = neighbors["neighbor_ids"].shape[1]
  if config.k_train > k_stored:
    fail(
      f"config.k_train={config.k_train} is larger than the K={k_stored} neighbours stored in "
      f"{neighbors.path}; lower k_train or rerun the neighbour job with "
      f"--config.retrieval.num_neighbors={config.k_train}"
    )
  if config.k_train < 1:
    fail(f"config.k_train={config.k_train}: need at least one neighbour")
  ids = neighbors["neighbor_ids"]
  lo, hi = int(ids.min()), int(ids.max())
  if lo < 0 or hi >= len(database["embeddings"]):
    fail(
      f"{neighbors.path} holds neighbour ids in [{lo}, {hi}] but the database has "
      f"{len(database['embeddings'])} entries; rerun `{NEIGHBORS_HINT}`"
    )
  return RetrievalData(
    latents=latents["latents"],
    neighbor_ids=ids,
    database=database["embeddings"],
    latents_store=latents,
    neighbors_store=neighbors,
    database_store=database,
    variants=variants,
  )


def check_variants(latents: store.Store, neighbors: store.Store, part: str) -> int:
  """Rows per example of an augmented part (1 without): the latents' crops must be the ones the
  neighbours were searched for (same augment record, same (id, variant) in every row), stored
  example-major with every variant of every example present."""
  augment = latents.manifest["source"].get("augment")
  theirs = (neighbors.manifest.get("query_source") or {}).get("augment")
  if augment != theirs:
    fail(
      f"{latents.path} holds "
      f"{'crops ' + str(augment) if augment else 'one centre crop per image'} but "
      f"{neighbors.path} was searched for "
      f"{'crops ' + str(theirs) if theirs else 'one centre crop per image'}; encode and embed "
      f"with the same config.dataset.augment, then rerun `{NEIGHBORS_HINT} --parts={part}`"
    )
  if not augment:
    return 1
  v = int(augment["variants"])
  got = np.asarray(latents["variants"]) if "variants" in latents.arrays else None
  if (
    got is None
    or len(got) % v
    or not np.array_equal(got, np.tile(np.arange(v), len(got) // v))
    or not np.array_equal(np.asarray(neighbors["query_variants"]), got)
  ):
    fail(
      f"{latents.path} and {neighbors.path} do not hold the {v} variants of every example in "
      f"order; rerun `{ENCODE_HINT} --parts={part}` and the embed and neighbour jobs"
    )
  ids = np.asarray(latents["ids"])
  if not np.array_equal(ids, np.repeat(ids[::v], v)):
    fail(
      f"{latents.path}: the variants of an example are not consecutive rows; rerun "
      f"`{ENCODE_HINT} --parts={part}`"
    )
  return v


def check_tokens(config: Any, latents: store.Store) -> None:
  """A RARM's token store must come from the config's VQ first stage, hold int tokens [N, S] with
  S the model's sequence length, and every id inside the codebook."""
  from rdm_jax.models import first_stage, rarm

  model = rarm.from_config(config)  # the model fixes S and the codebook size
  if not latents.manifest.get("tokens"):
    fail(
      f"{latents.path} holds continuous latents, not VQ tokens; config.model.family='rarm' trains "
      f"on tokens: encode them with this config (`{ENCODE_HINT}`) into another config.data_dir"
    )
  if latents.manifest.get("first_stage") != first_stage.identity(config.first_stage):
    fail(
      f"{latents.path} was encoded by another first stage "
      f"({latents.manifest.get('first_stage', {}).get('name')}, weights "
      f"{latents.manifest.get('first_stage', {}).get('weights_sha256')}) than "
      f"config.first_stage's; its token ids mean other codes: rerun `{ENCODE_HINT}`"
    )
  z = latents["latents"]
  if z.ndim != 2 or z.dtype.kind not in "iu" or z.shape[1] != model.seq_len:
    side = int(model.seq_len**0.5)
    fail(
      f"{latents.path} holds {z.dtype}{list(z.shape[1:])} per image, but the model reads "
      f"{model.seq_len} tokens ({side} x {side}: "
      f"config.dataset.image_size={config.dataset.image_size} over the first stage's factor); "
      "encode at the config's image size"
    )
  lo, hi = (int(z.min()), int(z.max())) if z.size else (0, 0)
  if lo < 0 or hi >= model.num_codes:
    fail(
      f"{latents.path} holds token ids in [{lo}, {hi}] but the codebook has {model.num_codes} "
      f"codes (ids 0..{model.num_codes - 1}); the store is damaged or from another first stage: "
      f"rerun `{ENCODE_HINT}`"
    )


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


@functools.lru_cache(maxsize=4)
def _epoch_variants(seed: int, epoch: int, n: int, variants: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, 1]).integers(0, variants, n)


def example_indices(
  seed: int,
  step: int,
  global_batch: int,
  n: int,
  shuffle: bool = True,
  process_index: int = 0,
  process_count: int = 1,
  variants: int = 1,
) -> np.ndarray:
  """Rows of the examples in this process's slice of the global batch of `step`, of n rows; with
  `variants` rows per example (example-major), epochs run over the n / variants examples and
  each takes the variant its epoch draws for it."""
  local = global_batch // process_count
  pos = step * global_batch + process_index * local + np.arange(local, dtype=np.int64)
  examples = n // variants
  if not shuffle:
    return (pos % examples) * variants
  epochs, within = pos // examples, pos % examples
  out = np.empty(local, np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    chosen = _epoch_permutation(seed, int(e), examples)[within[sel]]
    out[sel] = chosen * variants + (
      _epoch_variants(seed, int(e), examples, variants)[chosen] if variants > 1 else 0
    )
  return out


def select_neighbors(
  ids: np.ndarray, k: int, mode: str, rng: np.random.Generator | None
) -> np.ndarray:
  """[B, K] stored neighbour ids -> [B, k]: the k nearest ('first') or k random of K ('random')."""
  if mode == "first":
    return ids[:, :k]
  if mode == "random":
    order = np.argsort(rng.random(ids.shape), axis=1)[:, :k]
    return np.take_along_axis(ids, order, axis=1)
  fail(f"config.k_select={mode!r}; use 'first' or 'random'")


def load_batch(
  data: RetrievalData, rows: np.ndarray, k: int, mode: str, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """(z0 [B, H, W, C] float32, or RARM's tokens [B, S] int32; context [B, k, d] float32) of the
  rows."""
  order = np.argsort(rows)  # sorted reads are kinder to memory-mapped files
  sorted_rows = rows[order]
  inverse = np.empty_like(order)
  inverse[order] = np.arange(len(order))
  z0 = np.asarray(data.latents[sorted_rows])[inverse]
  z0 = z0.astype(np.int32 if z0.dtype.kind in "iu" else np.float32)  # RARM's tokens stay integers
  ids = np.asarray(data.neighbor_ids[sorted_rows])[inverse]
  ids = select_neighbors(ids, k, mode, rng)
  context = np.asarray(data.database[ids.reshape(-1)], np.float32).reshape(ids.shape + (-1,))
  return z0, context


def train_iterator(
  data: RetrievalData, config: Any, start_step: int, process_index: int = 0, process_count: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Process-local batches for steps start_step, start_step+1, ... via tf.data with prefetch."""
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
  b = config.train.batch_size
  if b % process_count:
    fail(f"config.train.batch_size={b} is not divisible by {process_count} processes")
  seed, k, mode = config.train.seed, config.k_train, config.k_select

  def fetch(step):
    data.check_unchanged()  # before the reads: a truncated file is one line, not SIGBUS
    step = int(step)
    rows = example_indices(
      seed, step, b, data.num_examples, True, process_index, process_count, data.variants
    )
    rng = np.random.default_rng([seed, step, process_index, 1]) if mode == "random" else None
    return load_batch(data, rows, k, mode, rng)

  shapes = (
    (b // process_count,) + data.latents.shape[1:],
    (b // process_count, k, data.database.shape[1]),
  )
  ds = tf.data.Dataset.range(start_step, config.train.num_steps)
  z_type = tf.int32 if data.latents.dtype.kind in "iu" else tf.float32
  ds = ds.map(
    lambda s: tf.numpy_function(fetch, [s], (z_type, tf.float32), stateful=False),
    num_parallel_calls=tf.data.AUTOTUNE
    if config.input.num_parallel_calls < 0
    else config.input.num_parallel_calls,
    deterministic=True,
  )
  ds = ds.map(lambda z, c: (tf.ensure_shape(z, shapes[0]), tf.ensure_shape(c, shapes[1])))
  ds = ds.prefetch(config.input.prefetch)
  return _stores_checked(ds.as_numpy_iterator(), data)


def _stores_checked(batches: Iterator, data: RetrievalData) -> Iterator:
  """The batches; a failure in tf.data's threads after a store changed is that change's one line."""
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except Exception:
      data.check_unchanged()
      raise
    yield batch
