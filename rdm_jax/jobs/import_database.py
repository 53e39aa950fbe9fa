r"""Imports a published retrieval database (the original's `.npz` parts of CLIP image embeddings).

  python -m rdm_jax.jobs.import_database --config=configs/imagenet_rdm.py \
      --npz=database/OpenImages        # a directory of *.npz parts, or files separated by commas

The original's `DatasetBuilder.save_datapool` writes parts holding `embedding` [N, d] (the
retriever's image embeddings: OpenAI CLIP ViT-B/32 for the released RDMs), `img_id` [N] (the
entry's image in the original's dataset order) and `patch_coords` (the crop). This job writes
them, in the order of the file names, as the database store of `config.database` (default
<data_dir>/database), which the index, neighbour, train and sample jobs then use as one of
ours: embeddings as `config.database_build.embeddings_dtype`, `ids` = img_id and
`patch_coords` kept as provenance. The embeddings are labelled with `config.retrieval`'s
encoder (the user vouches that it is the one they were made with: OpenAI's ViT-B-32.pt for
the published databases); their width must be `config.retrieval.embed_dim`.

The store has no pixels (the original ships no image lists for them), so neighbour panels
leave the neighbours' slots grey; nor can it exclude a query's own image. Files are read
without pickle, every array's declared shape checked before it is inflated; the job is
resumable by chunk like the embed job, one part in memory at a time.
"""

from __future__ import annotations

from absl import flags

from rdm_jax.retrieval import original_database
from rdm_jax.errors import fail
from rdm_jax.jobs import cli

_NPZ = cli.define_once(
  flags.DEFINE_list,
  "npz",
  None,
  "The original's database: a directory of *.npz parts, or .npz files.",
)


def main(argv):
  del argv
  spec = _NPZ.value or fail("--npz is required (the original's database .npz parts)")
  original_database.import_database(cli.CONFIG.value, spec)


if __name__ == "__main__":
  cli.run(main)
