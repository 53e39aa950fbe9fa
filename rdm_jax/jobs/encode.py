"""Encode job: images of the train and test parts -> first-stage latents stores.

  python -m rdm_jax.jobs.encode --config=configs/fashion_mnist_rdm.py [--parts=train,test]
"""

from __future__ import annotations

import numpy as np
from absl import flags

from rdm_jax import config_base
from rdm_jax.data import sources, store
from rdm_jax.jobs import cli
from rdm_jax.models import first_stage

_PARTS = flags.DEFINE_list("parts", ["train", "test"], "Dataset parts to encode.")


def encode_part(config, part: str) -> store.Store:
  out = config_base.paths(config)[f"latents_{part}"]
  done = store.reusable(out, "latents", "rdm_jax.jobs.encode", source=sources.part_source(config.dataset, part),
                        first_stage=first_stage.identity(config.first_stage))
  if done is not None:
    return done
  images, labels, source = sources.load_part(config.dataset, part)
  ids = np.arange(source["start"], source["stop"], dtype=np.int64)
  result = store.write_chunked(
      out, "latents", len(images), chunk_size=8192,
      compute=lambda a, b: {"latents": first_stage.encode(config.first_stage, images[a:b]),
                            "ids": ids[a:b], "labels": labels[a:b]},
      source=source, first_stage=first_stage.identity(config.first_stage), image_shape=list(images.shape[1:]),
      made_by="rdm_jax.jobs.encode")
  print(f"wrote {out}: latents {result['latents'].shape}")
  return result


def main(argv):
  del argv
  config = cli.CONFIG.value
  sources.check_disjoint(config.dataset)
  for part in _PARTS.value:  # every output is safe to write before any work starts
    store.check_output(config_base.paths(config)[f"latents_{part}"], "latents")
  for part in _PARTS.value:
    encode_part(config, part)


if __name__ == "__main__":
  cli.run(main)
