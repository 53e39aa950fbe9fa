r"""Runs a job module, as its command line would, with TFDS datasets mocked (tests only).

  python tests/with_mock_tfds.py NUM_EXAMPLES rdm_jax.jobs.encode \
      --config=configs/imagenet_rdm.py ...

`tfds.testing.mock_data` makes every split of every dataset (imagenet2012 too) a
deterministic stream of NUM_EXAMPLES random examples with the dataset's real features, so the
ImageNet chain runs offline without the 150 GB download.
"""

import runpy
import sys

import tensorflow_datasets as tfds

if __name__ == "__main__":
  num_examples, module = int(sys.argv[1]), sys.argv[2]
  sys.argv = [module] + sys.argv[3:]
  with tfds.testing.mock_data(num_examples=num_examples):
    runpy.run_module(module, run_name="__main__", alter_sys=True)
