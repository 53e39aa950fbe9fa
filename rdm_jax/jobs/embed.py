"""Embed job: retrieval-encoder embeddings of the database and of the query parts.

Writes the database store (embeddings + ids + labels + source: provenance of every entry)
and embeddings stores of the train and test parts (the queries for the neighbour job), with
`captions` when the source has them (a TFDS caption feature, an image folder's side file).
With `config.database_build.crops_per_image` > 0 the database holds random crops of its
images instead (`rdm_jax.retrieval.crops`: the paper's OpenImages recipe), each entry with its
image id and box, its embeddings stored as `config.database_build.embeddings_dtype`
(float16 by default: 1 GB per 1M 512-d vectors; searched in float32). Unreadable images are
logged, skipped and counted in the manifest. Resumable by chunk; --num_processes processes
(or hosts sharing the filesystem) split the images by range, as the neighbour job does.

  python -m rdm_jax.jobs.embed --config=configs/fashion_mnist_rdm.py [--parts=database,train,test]
      [--process_id=P --num_processes=N]
"""

from __future__ import annotations

from typing import Any, Sequence

from absl import flags

from rdm_jax import config_base, preemption
from rdm_jax.data import chunked, sources, store
from rdm_jax.jobs import cli
from rdm_jax.retrieval import crops, encoders

_PARTS = cli.define_once(
  flags.DEFINE_list, "parts", ["database", "train", "test"], "Dataset parts to embed."
)
_PROCESS_ID = cli.define_once(
  flags.DEFINE_integer, "process_id", 0, "This process's index in [0, --num_processes)."
)
_NUM_PROCESSES = cli.define_once(
  flags.DEFINE_integer, "num_processes", 1, "Processes splitting the rows by range."
)


def output(config, part: str) -> tuple[str, str]:
  """(store path, kind) the embed job writes for a part."""
  paths = config_base.paths(config)
  return (
    (paths["database"], "database")
    if part == "database"
    else (paths[f"embeddings_{part}"], "embeddings")
  )


def embed_part(
  config, part: str, encode=None, process_index: int = 0, process_count: int = 1
) -> store.Store | None:
  """Writes one part's store (None: another process merges it)."""
  if part == "database" and crops.enabled(config.database_build):
    return crops.build_database(config, encode, process_index, process_count)
  out, kind = output(config, part)
  identity = encoders.encoder_identity(config.retrieval)
  done = store.read_if_current(
    out,
    kind,
    "rdm_jax.jobs.embed",
    source=sources.part_source(config.dataset, part),
    encoder=identity,
  )
  if done is not None:
    return done
  p = sources.open_part(config.dataset, part)  # rows are read chunk by chunk
  encode = encode or encoders.make_encoder(config.retrieval)
  # captions (when the source has them) in one fixed width, so that chunks merge into one array
  width = max([1] + [len(c) for c in p.captions]) if p.captions is not None else 0

  def compute(a, b):  # an unreadable image is logged and left out (counted in the manifest)
    images, ok, unreadable = p.readable(a, b)
    for why in unreadable:
      print(f"{out}: skipping unreadable image {why}")
    rows = {"embeddings": encode(images)[ok], **{k: v[ok] for k, v in p.rows(a, b).items()}}
    return {**rows, "captions": p.captions[a:b][ok].astype(f"<U{width}")} if width else rows

  result = chunked.write_chunked(
    out,
    kind,
    len(p),
    chunk_size=config.retrieval.chunk_size,
    compute=compute,
    variable_rows=True,
    finalize=lambda arrays: sources.skipped_report(out, p.ids, arrays["ids"]),
    encoder=identity,
    source=p.source,
    process_index=process_index,
    process_count=process_count,
    made_by="rdm_jax.jobs.embed",
  )
  if result is not None:
    print(f"wrote {out}: embeddings {result['embeddings'].shape}")
  return result


def embed_parts(
  config: Any, parts: Sequence[str], process_id: int = 0, num_processes: int = 1
) -> None:
  """The embeddings store of each part (the database store for "database"), resumably; process
  `process_id` of `num_processes` embeds its block of each store's chunks."""
  sources.check_disjoint(config.dataset)
  for part in parts:  # every output is safe to write before any work starts
    store.check_output(*output(config, part))
  encode = _Lazy(lambda: encoders.make_encoder(config.retrieval))  # skipped parts load no weights
  for part in parts:
    embed_part(config, part, encode, process_id, num_processes)


def main(argv):
  del argv
  preemption.install()  # SIGTERM: the chunk under way is finished and kept, exit 75
  embed_parts(cli.CONFIG.value, _PARTS.value, _PROCESS_ID.value, _NUM_PROCESSES.value)


class _Lazy:
  """Builds the encoder the first time it is called."""

  def __init__(self, make):
    self._make, self._fn = make, None

  def __call__(self, images):
    self._fn = self._fn or self._make()
    return self._fn(images)


if __name__ == "__main__":
  cli.run(main)
