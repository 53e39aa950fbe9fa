"""Embed job: retrieval-encoder embeddings of the database and of the query parts.

Writes the database store (embeddings + ids + labels + source: provenance of every entry)
and embeddings stores of the train and test parts (the queries for the neighbour job).

  python -m rdm_jax.jobs.embed --config=configs/fashion_mnist_rdm.py [--parts=database,train,test]
"""

from __future__ import annotations

import numpy as np
from absl import flags

from rdm_jax import config_base
from rdm_jax.data import sources, store
from rdm_jax.jobs import cli
from rdm_jax.retrieval import encoders

_PARTS = flags.DEFINE_list("parts", ["database", "train", "test"], "Dataset parts to embed.")


def output(config, part: str) -> tuple[str, str]:
  """(store path, kind) the embed job writes for a part."""
  paths = config_base.paths(config)
  return (paths["database"], "database") if part == "database" else (paths[f"embeddings_{part}"], "embeddings")


def embed_part(config, part: str, encode=None) -> store.Store:
  out, kind = output(config, part)
  identity = encoders.encoder_identity(config.retrieval)
  done = store.reusable(out, kind, "rdm_jax.jobs.embed", source=sources.part_source(config.dataset, part),
                        encoder=identity)
  if done is not None:
    return done
  images, labels, source = sources.load_part(config.dataset, part)
  ids = np.arange(source["start"], source["stop"], dtype=np.int64)
  encode = encode or encoders.make_encoder(config.retrieval)
  result = store.write_chunked(
      out, kind, len(images), chunk_size=config.retrieval.chunk_size,
      compute=lambda a, b: {"embeddings": encode(images[a:b]), "ids": ids[a:b], "labels": labels[a:b]},
      encoder=identity, source=source,
      made_by="rdm_jax.jobs.embed")
  print(f"wrote {out}: embeddings {result['embeddings'].shape}")
  return result


def main(argv):
  del argv
  config = cli.CONFIG.value
  sources.check_disjoint(config.dataset)
  for part in _PARTS.value:  # every output is safe to write before any work starts
    store.check_output(*output(config, part))
  encode = _Lazy(lambda: encoders.make_encoder(config.retrieval))  # skipped parts load no weights
  for part in _PARTS.value:
    embed_part(config, part, encode)


class _Lazy:
  """Builds the encoder the first time it is called."""

  def __init__(self, make):
    self._make, self._fn = make, None

  def __call__(self, images):
    self._fn = self._fn or self._make()
    return self._fn(images)


if __name__ == "__main__":
  cli.run(main)
