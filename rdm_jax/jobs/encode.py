"""Encode job: images of the train and test parts -> first-stage latents stores.

For an RDM the latents are the first stage's continuous codes [N, h, w, c]; for RARM
(config.model.family = "rarm") they are the VQ first stage's token ids [N, h*w] (int32, raster
order; the manifest says tokens: true).

  python -m rdm_jax.jobs.encode --config=configs/fashion_mnist_rdm.py [--parts=train,test]
      [--process_id=P --num_processes=N]  # split the rows over processes or hosts
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import flags

from rdm_jax import config_base, preemption
from rdm_jax.data import chunked, sources, store
from rdm_jax.jobs import cli
from rdm_jax.models import first_stage, palette

_PARTS = cli.define_once(flags.DEFINE_list, "parts", ["train", "test"], "Dataset parts to encode.")
_PROCESS_ID = cli.define_once(
  flags.DEFINE_integer, "process_id", 0, "This process's index in [0, --num_processes)."
)
_NUM_PROCESSES = cli.define_once(
  flags.DEFINE_integer,
  "num_processes",
  1,
  "Processes (or hosts sharing the filesystem) splitting the rows by range; the last to finish "
  "merges.",
)


def encode_part(
  config, part: str, process_index: int = 0, process_count: int = 1
) -> store.Store | None:
  """Writes one part's latents store (None: another process merges it)."""
  out = config_base.paths(config)[f"latents_{part}"]
  fit_palette(config)
  tokens = config_base.model_family(config) == "rarm"  # RARM trains on the VQ's code indices
  kind = {"tokens": True} if tokens else {}
  done = store.read_if_current(
    out,
    "latents",
    "rdm_jax.jobs.encode",
    source=sources.part_source(config.dataset, part),
    first_stage=first_stage.identity(config.first_stage),
    **kind,
  )
  if done is not None:
    return done
  p = sources.open_part(config.dataset, part)  # rows are read chunk by chunk

  def compute(a, b):
    images, ok, unreadable = p.readable(a, b)
    for why in unreadable:
      print(f"{out}: skipping unreadable image {why}")
    encode = first_stage.encode_tokens if tokens else first_stage.encode
    return {
      "latents": encode(config.first_stage, images)[ok],
      **{k: v[ok] for k, v in p.rows(a, b).items()},
    }

  result = chunked.write_chunked(
    out,
    "latents",
    len(p),
    chunk_size=config.first_stage.chunk_size,
    compute=compute,
    finalize=lambda arrays: sources.skipped_report(out, p.ids, arrays["ids"]),
    variable_rows=True,
    source=p.source,
    first_stage=first_stage.identity(config.first_stage),
    image_shape=list(p.image_shape),
    process_index=process_index,
    process_count=process_count,
    made_by="rdm_jax.jobs.encode",
    **kind,
  )
  if result is not None:
    print(f"wrote {out}: latents {result['latents'].shape}")
  return result


def fit_palette(config) -> None:
  """The demo's palette tokenizer (first_stage.name = "palette"): fitted once from the train part's
  first images when its file is not there yet (k-means, deterministic), then reused."""
  cfg = config.first_stage
  if cfg.name != "palette" or os.path.isfile(cfg.weights):
    return
  if not cfg.weights:
    cli.fail(
      "config.first_stage.weights must name the palette file (the encode job writes it there)"
    )
  train = sources.open_part(config.dataset, "train")
  images, ok, _ = train.readable(0, min(len(train), 4000))
  colours = palette.fit(images[ok], cfg)
  palette.save(cfg.weights, colours)
  print(f"fitted a {len(colours)}-colour palette on {int(ok.sum())} train images: {cfg.weights}")


def encode_parts(
  config: Any, parts: Sequence[str], process_id: int = 0, num_processes: int = 1
) -> None:
  """The latents store of each part, resumably; process `process_id` of `num_processes` encodes
  its block of each store's chunks."""
  sources.check_disjoint(config.dataset)
  for part in parts:  # every output is safe to write before any work starts
    store.check_output(config_base.paths(config)[f"latents_{part}"], "latents")
  for part in parts:
    encode_part(config, part, process_id, num_processes)


def main(argv):
  del argv
  preemption.install()  # SIGTERM: the chunk under way is finished and kept, exit 75
  encode_parts(cli.CONFIG.value, _PARTS.value, _PROCESS_ID.value, _NUM_PROCESSES.value)


if __name__ == "__main__":
  cli.run(main)
