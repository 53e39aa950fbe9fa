"""rdm_jax: retrieval-augmented diffusion models (Blattmann, Rombach et al. 2022) in JAX/Flax."""

__version__ = "0.1.0"
