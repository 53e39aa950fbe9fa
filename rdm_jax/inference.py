"""A trained RDM with its database and index, loaded once, to sample from a notebook.

  from rdm_jax import inference
  rdm = inference.RDM(config, "runs/fashion_mnist")        # EMA weights of the latest checkpoint
  out = rdm.sample(rdm.exemplars(8))                        # held-out images as queries
  out = rdm.sample(rdm.classes(8, "Dress,Sneaker"), seed=1) # class pools (Sec. 3.3)
  out = rdm.sample(rdm.proposal(8))                         # unconditional: p_D, top-m (Eq. 6)
  out = rdm.sample(rdm.embeddings(q, include_query=True))   # your own query embeddings [N, d]
  out.images                                                # uint8 [N, H, W, C]
  out.conditioning.neighbor_rows                            # the database rows behind each
  rdm.panel(out)                                            # uint8: neighbours | sample, per row

Sampling follows `config.sample` (sampler, steps, guidance, eta, batch size) as the sample job
does; `rdm_jax.sample` is this class plus files.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rdm_jax import checkpoint, conditioning
from rdm_jax.data import visualize
from rdm_jax.diffusion import samplers, schedule as schedule_lib
from rdm_jax.errors import fail
from rdm_jax.models import factory, first_stage, rarm
from rdm_jax.parallel import mesh as mesh_lib, sharding


@dataclass(frozen=True)
class Samples:
  images: np.ndarray  # uint8 [N, H, W, C]
  latents: np.ndarray | None  # [N, h, w, c]
  conditioning: conditioning.Conditioning


class RDM:
  """Model (EMA weights), database, search and the compiled sampler of one training run."""

  def __init__(self, config: Any, workdir: str, step: int | None = None):
    self.config = config
    self.model, self.params, self.info, self.step = checkpoint.load_trained(config, workdir, step)
    self._sampler = make_sampler(
      self.model, factory.make_schedule(config), self.info["latent_shape"], config.sample
    )
    self.database = conditioning.open_database(config, self.info["encoder"])
    self.mesh = mesh_lib.from_config(config)
    self.rules = [tuple(r) for r in config.sharding_rules]

  @property
  def k(self) -> int:
    """Neighbours per sample: config.sample.k (the original's --k_nn), or k_train when 0. The
    model attends over any number of neighbours; the database must hold that many."""
    k, rows = self.config.sample.k or self.config.k_train, len(self.database["embeddings"])
    if k < 1 or k > rows:
      fail(
        f"config.sample.k={self.config.sample.k}: give 1 to {rows} neighbours "
        f"(the database's size), or 0 for k_train ({self.config.k_train})"
      )
    return k

  @functools.cached_property
  def _search(self):
    """The database's index, loaded on first use (class pools need none). A database swapped in
    with config.database gets its index built when it has none; the default one is searched
    exactly then."""
    return conditioning.open_search(self.config, self.database, build=bool(self.config.database))

  def exemplars(self, n: int, part: str | None = None, include_query: bool | None = None):
    """The first n embedded images of `part` (default config.sample.query_part) as queries."""
    s = self.config.sample
    return conditioning.exemplar_conditioning(
      self.config,
      n,
      self.k,
      part or s.query_part,
      self.info["encoder"],
      s.include_query if include_query is None else include_query,
      self.database,
      self._search,
    )

  def proposal(self, n: int, seed: int = 0):
    """n pseudo-queries from p_D (config.sample.top_m, top_m_of, proposal_weighted)."""
    return conditioning.proposal_conditioning(
      self.config,
      n,
      self.k,
      np.random.default_rng(seed),
      self.info["encoder"],
      self.database,
      self._search,
    )

  def classes(self, n: int, classes: str | None = None, seed: int = 0):
    """n samples cycling over `classes` (names or labels, comma-separated; default
    config.sample.classes)."""
    return conditioning.class_conditioning(
      self.config,
      n,
      self.k,
      np.random.default_rng(seed),
      self.info["encoder"],
      classes,
      self.database,
    )

  def embeddings(self, queries: np.ndarray, include_query: bool | None = None):
    """Your own query embeddings [N, d], made by the database's encoder."""
    s = self.config.sample
    return conditioning.embeddings_conditioning(
      self.config,
      queries,
      self.k,
      self.info["encoder"],
      s.include_query if include_query is None else include_query,
      self.database,
      self._search,
    )

  def text(self, prompts: list[str]):
    """Captions: each one's CLIP text embedding and its k-1 nearest database entries."""
    return conditioning.text_conditioning(
      self.config, prompts, self.k, self.info["encoder"], self.database, self._search
    )

  def from_config(self, n: int | None = None):
    """The conditioning `config.sample.condition` names, for n (default num_images) samples."""
    s = self.config.sample
    n = s.num_images if n is None else n
    seed = self.seed  # the pseudo-queries (proposal) and class draws follow config.sample.seed too
    if s.condition == "exemplar":
      return self.exemplars(n)
    if s.condition == "proposal":
      return self.proposal(n, seed + 11)
    if s.condition == "class":
      return self.classes(n, seed=seed + 13)
    if s.condition == "embeddings":
      queries = conditioning.load_query_embeddings(s.embeddings_path, self.database)
      if n > len(queries):
        fail(f"asked for {n} samples but {s.embeddings_path} has {len(queries)} embeddings")
      return self.embeddings(queries[:n])
    if s.condition == "text":
      prompts = list(s.prompts) or (
        conditioning.part_captions(self.config, s.prompts_from)[:n] if s.prompts_from else []
      )
      return self.text([prompts[i % len(prompts)] for i in range(n)] if prompts else [])
    if s.condition == "zeros":
      return conditioning.zeros_conditioning(self.database, n)
    fail(
      f"config.sample.condition={s.condition!r}; use exemplar, proposal, class, embeddings, "
      "text or zeros"
    )

  def sample(
    self, cond: conditioning.Conditioning, seed: int | None = None, first_index: int = 0
  ) -> Samples:
    """One sample per conditioning row; row i is sample first_index + i, drawn with key
    fold_in(PRNGKey(seed), first_index + i) whatever the batch size, devices or processes
    (default seed: config.sample.seed, or config.train.seed + 7 when that is -1). With several
    processes every one passes the same conditioning; each batch is sharded over all devices."""
    z = self.latents(cond.context, seed, first_index)
    return Samples(images=self.decode(z), latents=z, conditioning=cond)

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """uint8 images [N, H, W, C] of latents [N, h, w, c] through the first stage."""
    return first_stage.decode(self.config.first_stage, latents, tuple(self.info["image_hw"]))

  def latents(
    self, context: np.ndarray, seed: int | None = None, first_index: int = 0
  ) -> np.ndarray:
    """Latents [N, h, w, c] for context [N, k, d] (see `sample`)."""
    return sample_in_batches(
      self._sampler,
      self.params,
      context,
      self.config.sample.batch_size,
      jax.random.PRNGKey(self.seed if seed is None else seed),
      first_index,
      self.mesh,
      self.rules,
    )

  @property
  def seed(self) -> int:
    """The default sampling seed: config.sample.seed, or config.train.seed + 7 when that is -1."""
    s = self.config.sample.seed
    return self.config.train.seed + 7 if s == -1 else s

  def panel(self, samples: Samples, n: int = 16) -> np.ndarray:
    """uint8 image: a row per sample, its k conditioning entries then the sample (first n)."""
    n = min(n, len(samples.images))
    return visualize.neighbor_panel(
      conditioning.context_images(samples.conditioning, self.config.dataset, n), samples.images[:n]
    )


def make_sampler(model: Any, sched: schedule_lib.Schedule, latent_shape, sample_config: Any):
  """A jitted (params, context [B,k,d], rng) -> latents [B, H, W, C] with guidance, set up by
  `config.sample` (sampler, num_steps, guidance_scale, eta, timestep_spacing, clip_x0: 0 = none).
  A sampler, spacing or step count that does not exist is a UserError here, before compiling."""
  s = sample_config
  if isinstance(model, rarm.RARM):  # tokens [B, S], one position at a time with the KV cache
    if s.temperature <= 0 or not 0 < s.top_p <= 1 or s.top_k < 0:
      fail(
        f"config.sample: temperature={s.temperature} (> 0), top_k={s.top_k} (>= 0, 0 = all), "
        f"top_p={s.top_p} (in (0, 1]) for RARM sampling"
      )
    return jax.jit(
      lambda params, context, keys: rarm.sample(
        model,
        params,
        context,
        keys,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        guidance_scale=s.guidance_scale,
      )
    )
  if s.final_step not in ("abar0", "x0"):
    fail(
      f"config.sample.final_step={s.final_step!r}; use abar0 (the original's end) or x0 (the last "
      "step's predicted z_0)"
    )
  try:
    samplers.timesteps(s.sampler, sched, s.num_steps, s.timestep_spacing)
  except ValueError as e:
    fail(f"{e} (config.sample)")

  def sample(params, context, rng):
    return samplers.sample(
      schedule_lib.eps_fn(model, params, sched),
      sched,
      context,
      (context.shape[0],) + tuple(latent_shape),
      rng,
      sampler=s.sampler,
      num_steps=s.num_steps,
      guidance_scale=s.guidance_scale,
      eta=s.eta,
      clip_x0=s.clip_x0 or None,
      timestep_spacing=s.timestep_spacing,
      final_x0=s.final_step == "x0",
    )

  return jax.jit(sample)


def sample_keys(rng: jax.Array, indices: np.ndarray) -> jax.Array:
  """Per-sample keys fold_in(rng, i) for sample indices i: a sample's noise depends on the seed
  and its index alone, not on the batch, device or process that draws it."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(indices, jnp.uint32))


def sample_in_batches(
  sampler,
  params,
  context: np.ndarray,
  batch_size: int,
  rng: jax.Array,
  first_index: int = 0,
  mesh: Mesh | None = None,
  rules=None,
) -> np.ndarray:
  """Latents for every context row, `batch_size` rows at a time; row i is sample first_index + i
  and uses key fold_in(rng, first_index + i) (`sample_keys`). The last batch is padded so one
  compiled shape serves all.

  With a mesh, each batch is sharded over the axes of the 'batch' rule across all processes
  (every process passes the same context; the batch is rounded up to a multiple of those
  devices) and the latents are gathered to every process.
  """
  if not len(context):
    raise ValueError("no context rows to sample from")
  n_dev = 1 if mesh is None else sharding.batch_devices(mesh, rules)
  size = (
    -(-min(batch_size, len(context)) // n_dev) * n_dev
  )  # one batch: no more padding than needed
  out = []
  for a in range(0, len(context), size):
    c = context[a : a + size]
    n = len(c)
    index = first_index + a + np.arange(size)
    if n < size:
      c = np.concatenate([c, np.zeros((size - n,) + c.shape[1:], c.dtype)])
    keys = np.asarray(sample_keys(rng, index))
    if mesh is None:
      z = sampler(params, jnp.asarray(c), jnp.asarray(keys))
    else:
      c, keys = (
        jax.make_array_from_callback(
          x.shape, sharding.batch_sharding(mesh, rules, x.ndim), lambda i, x=x: x[i]
        )
        for x in (c, keys)
      )
      z = multihost_utils.process_allgather(sampler(params, c, keys), tiled=True)
    out.append(np.asarray(jax.device_get(z))[:n])
  return np.concatenate(out)
