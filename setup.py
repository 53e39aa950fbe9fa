"""rdm_jax: retrieval-augmented diffusion models in JAX/Flax. Pinned versions: requirements.txt."""

from setuptools import find_packages, setup

setup(
  name="rdm_jax",
  version="0.1.0",
  description="Retrieval-augmented diffusion models (Blattmann, Rombach et al. 2022) in JAX/Flax",
  packages=find_packages(include=["rdm_jax", "rdm_jax.*"]),
  package_data={"rdm_jax.data": ["imagenet2012_classes.txt"]},
  python_requires=">=3.11",
  install_requires=[
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml_collections>=1.1.0",
    "tensorflow-cpu>=2.20.0,<2.21",
    "tensorflow-datasets>=4.9.10",
    "scann>=1.4.2",
    "transformers>=4.57.6,<5",
    "clu>=0.0.12",
    "numpy",
    "scipy",
    "pillow",
    "absl-py",
    "matplotlib>=3.11",
  ],
  # Accelerators, pinned to our jax: `pip install -e .[tpu]` (libtpu; also what rdm_jax.compile
  # needs on any host) or `pip install -e .[cuda12]` (CUDA 12 plugin, cuDNN, NCCL from pip).
  extras_require={"tpu": ["jax[tpu]==0.10.2"], "cuda12": ["jax[cuda12]==0.10.2"]},
)
