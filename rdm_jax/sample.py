r"""Sample from a trained RDM: queries -> neighbours in config.database ->
DDIM/DDPM/DPM-Solver++ + guidance.

Queries are embedded held-out images (`--config.sample.condition=exemplar`, default),
pseudo-queries drawn from the proposal p_D with top-m truncation (`=proposal`,
unconditional sampling as in the paper's Eq. 6; needs the neighbour job's train part),
class pools from the database's labels or a class prompt's CLIP text embedding (`=class`,
Sec. 3.3: k adjacent entries of the class's pool; Fig. 10: the prompt, then k-1), embeddings
from a .npy (`=embeddings`), or captions (`=text`, with the CLIP retriever: each caption's text
embedding is the first context entry, its k-1 nearest database entries follow; the captions go
into the shards, where the evaluate job's CLIP score reads them),
or an all-zeros context (`=zeros`: the unconditional branch alone, the original RARM script's
--unconditional).

  python -m rdm_jax.sample --config=configs/fashion_mnist_rdm.py --workdir=runs/fmnist \
      [--out=DIR] [--config.sample.num_images=50000] [--config.sample.guidance_scale=2.0]
      [--config.sample.condition=proposal --config.sample.top_m=0.01]
      [--config.sample.condition=class --config.sample.classes=Dress,Sneaker]
      [--config.sample.condition=embeddings --config.sample.embeddings_path=q.npy]
      [--config.sample.condition=text --config.sample.prompts="('a red dress','a sneaker')"
       --config.sample.text_mode=caption_and_neighbors]  # | caption | neighbors
      [--config.sample.condition=class --config.sample.classes=cat,dog
       --config.sample.class_prompt="An image of a {}."]  # pools from CLIP text
       [--config.sample.class_context=prompt_and_pool]  # Fig. 10: prompt + k-1 pool entries
      [--config.sample.sampler=dpm_solver++ --config.sample.num_steps=20]  # or ddim (eta) | ddpm
      [--distributed ...]  # one program over every process: each batch is sharded over all devices

Writes the sample set to DIR (default <workdir>/samples/<condition>):
  shard-NNNNN-of-MMMMM.npz  config.sample.shard_size samples each: uint8 `images`, `latents`, the
                            database rows (`neighbor_rows`) and ids (`neighbor_ids`) that
                            conditioned each, `query_rows`, `sample_index` and `seed` (sample i's
                            noise is fold_in(PRNGKey(seed), i), so an image does not depend on the
                            batch size or the number of processes), and the sampler settings;
  settings.json             every setting, the checkpoint step and a digest of the conditioning;
  samples.png, neighbors_and_samples.png  the first 16 samples, and each beside its k neighbours.
A killed run, rerun with the same command, keeps the shards it finished and makes the rest (the
same images an uninterrupted run makes); a directory made with other settings is refused.
`rdm_jax.evaluate` reads the directory.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from rdm_jax import config_base, errors, files, inference, preemption
from rdm_jax.data import store, visualize
from rdm_jax.errors import UserError, fail
from rdm_jax.jobs import cli, distributed

_WORKDIR = cli.define_once(flags.DEFINE_string, "workdir", None, "The training run's directory.")
_STEP = cli.define_once(flags.DEFINE_integer, "step", None, "Checkpoint step (default: latest).")
_OUT = cli.define_once(
  flags.DEFINE_string,
  "out",
  None,
  "The sample set's directory (default <workdir>/samples/<condition>).",
)


NUM_SHOWN = 16
MADE_BY = "rdm_jax.sample"
SETTINGS = "settings.json"
GRID_PNG, PANEL_PNG = "samples.png", "neighbors_and_samples.png"  # the first NUM_SHOWN samples
UNCOMPARED = (
  "batch_size",
  "processes",
  "devices",
  "config",
  "trained_on",
)  # may change between a run and its resumption


def shard_name(i: int, num_shards: int) -> str:
  return f"shard-{i:05d}-of-{num_shards:05d}.npz"


def settings_of(rdm: inference.RDM, cond, num_shards: int) -> dict[str, Any]:
  """Everything the samples depend on (compared on resumption), and how they were made (not)."""
  s = rdm.config.sample
  digest = hashlib.sha256()
  for a in (cond.context, cond.neighbor_rows, cond.query_rows):
    digest.update(np.ascontiguousarray(a).tobytes())
  sample = {k: v for k, v in s.to_dict().items() if k not in ("batch_size", "seed")}
  sample = json.loads(
    json.dumps(sample)
  )  # as settings.json holds it (tuples are lists), so a rerun compares equal
  return {
    "made_by": MADE_BY,
    "checkpoint_step": rdm.step,
    "seed": rdm.seed,
    "num_images": len(cond.context),
    "num_shards": num_shards,
    "k": rdm.k,
    "database": cond.database.path,
    "sample": sample,
    "image_shape": [*rdm.info["image_hw"]],
    "conditioning_sha256": digest.hexdigest(),
    "trained_on": rdm.info.get("trained_on"),  # the model's training data (model_info.json)
    "batch_size": s.batch_size,
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "config": json.loads(rdm.config.to_json_best_effort()),
  }


def check_out_dir(out: str, settings: dict[str, Any] | None) -> bool:
  """Whether `out` already holds this run's settings (a resumption); refuses a directory that holds
  anything else, or samples made with other settings (`settings` None: only what is not ours)."""
  path = files.join(out, SETTINGS)
  if files.exists(out) and not files.isdir(out):
    fail(f"{out} exists and is not a directory; choose another --out")
  if not files.isfile(path):
    own = files.tmp_pattern(
      SETTINGS
    )  # a run killed before its settings were in place leaves only these
    if files.isdir(out) and any(not own.fullmatch(name) for name in files.listdir(out)):
      fail(
        f"{out} holds files that rdm_jax.sample did not write (no {SETTINGS}); choose another --out"
      )
    return False
  try:
    old = files.read_json(path)
  except (OSError, UserError) as e:
    fail(f"{path} is not readable JSON ({e}); choose another --out")
  if not isinstance(old, dict) or old.get("made_by") != MADE_BY:
    fail(f"{path} was not written by rdm_jax.sample; choose another --out")
  if settings is None:
    return True
  diff = _differences(
    {k: v for k, v in old.items() if k not in UNCOMPARED},
    {k: v for k, v in settings.items() if k not in UNCOMPARED},
  )
  if diff:
    shown = "; ".join(f"{k}: {_short(a)} there, {_short(b)} now" for k, a, b in diff)
    fail(
      f"{out} holds samples made with other settings ({shown}): choose another --out for these "
      "settings, or rerun with the old ones to finish that set"
    )
  return True


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(dotted field, old value, new value) of every leaf where two settings records differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [
      d
      for k in sorted(set(old) | set(new), key=str)
      for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")
    ]
  return [] if old == new else [(prefix[:-1], old, new)]


def _short(v: Any) -> str:
  text = json.dumps(v, sort_keys=True)
  return text if len(text) <= 200 else text[:197] + "..."


def finished_shards(out: str, num_shards: int, settings: dict[str, Any]) -> np.ndarray:
  """[num_shards] bool: the shards on disk, each checked to be the one this run would write."""
  done = np.zeros(num_shards, bool)
  n, shard = settings["num_images"], settings["sample"]["shard_size"]
  for i in range(num_shards):
    path = files.join(out, shard_name(i, num_shards))
    if not files.exists(path):
      continue
    want = np.arange(i * shard, min(n, (i + 1) * shard))
    try:
      with files.load_npz(path) as z:
        index, images = z["sample_index"], z["images"]
    except (OSError, ValueError, KeyError) as e:
      fail(f"{path} is not a readable shard ({e}); move it away and rerun to make it again")
    if not np.array_equal(index, want) or images.dtype != np.uint8 or len(images) != len(want):
      fail(
        f"{path} does not hold samples {want[0]}-{want[-1]} as uint8 images; move it away and rerun"
      )
    done[i] = True
  return done


def write_shard(path: str, rdm: inference.RDM, cond, rows: np.ndarray, z: np.ndarray) -> np.ndarray:
  """Decodes and writes one shard (temporary name, then rename); returns its images."""
  s = rdm.config.sample
  images = rdm.decode(z)
  ids = np.asarray(cond.database["ids"])[np.maximum(cond.neighbor_rows[rows], 0)]
  extra = (
    {} if cond.captions is None else {"captions": cond.captions[rows]}
  )  # the CLIP score reads them
  files.atomic_savez(
    path,
    images=images,
    latents=z,
    neighbor_rows=cond.neighbor_rows[rows],
    neighbor_ids=np.where(cond.neighbor_rows[rows] < 0, -1, ids),
    query_rows=cond.query_rows[rows],
    sample_index=rows.astype(np.int64),
    seed=np.full(len(rows), rdm.seed, np.int64),
    condition=np.asarray(s.condition),
    database=np.asarray(cond.database.path),
    checkpoint_step=np.asarray(rdm.step),
    sampler=np.asarray(s.sampler),
    num_steps=np.asarray(s.num_steps),
    guidance_scale=np.asarray(s.guidance_scale),
    eta=np.asarray(s.eta),
    **extra,
  )
  return images


def sample_set(config: Any, workdir: str, out: str = "", step: int | None = None) -> str:
  """Writes config.sample's sample set of the run in `workdir` (checkpoint `step`, default the
  latest) to `out` (default <workdir>/samples/<condition>), resuming a killed run's shards; every
  process of a distributed run calls it alike. Returns the directory."""
  cli.check_platform(config)
  sample_cfg = config.sample
  if sample_cfg.shard_size < 1:
    fail(
      f"config.sample.shard_size={sample_cfg.shard_size}; give a positive number of samples "
      "per shard"
    )
  out = files.normpath(out or files.join(workdir, "samples", sample_cfg.condition))
  errors.checked_by_process_0(
    lambda: check_out_dir(out, None)
  )  # files of others: refused before any work
  cli.hold_output(out, "--out", create=False)  # checked writable before any work; one writer
  rdm = inference.RDM(config, workdir, step)  # checks the sampler settings before any retrieval
  cond = rdm.from_config()  # every process: the same conditioning of all N samples
  n = len(cond.context)
  num_shards = -(-n // sample_cfg.shard_size)
  settings = settings_of(rdm, cond, num_shards)
  lead = jax.process_index() == 0
  # process 0 alone reads the directory it writes next; another process could see it half made
  resumed = errors.checked_by_process_0(lambda: check_out_dir(out, settings))
  if lead:
    files.makedirs(out)
    for name in [
      *(shard_name(i, num_shards) for i in range(num_shards)),
      SETTINGS,
      GRID_PNG,
      PANEL_PNG,
    ]:
      files.remove_own_temporaries(files.join(out, name))  # of a killed run
    if not resumed:
      files.atomic_write_text(files.join(out, SETTINGS), json.dumps(settings, indent=1))
    done = finished_shards(out, num_shards, settings)
  else:
    done = np.zeros(num_shards, bool)
  done = np.asarray(multihost_utils.broadcast_one_to_all(done))  # process 0's view of the disk
  if done.any():
    print(f"resuming: {int(done.sum())} of {num_shards} shards are done")
  # room for the shards still to write (images, latents, ids) and the two PNGs, before sampling
  row = (
    math.prod(rdm.info["image_hw"]) * 4 + math.prod(rdm.info["latent_shape"]) * 4 + 64 * (rdm.k + 4)
  )
  errors.checked_by_process_0(
    lambda: files.need_room(
      files.join(out, shard_name(0, num_shards)),
      int((~done).sum()) * sample_cfg.shard_size * row + (4 << 20),
    )
  )
  shown, written = [], 0
  for i in range(num_shards):
    path = files.join(out, shard_name(i, num_shards))
    rows = np.arange(i * sample_cfg.shard_size, min(n, (i + 1) * sample_cfg.shard_size))
    if done[i]:
      if lead and sum(map(len, shown)) < NUM_SHOWN:
        with files.load_npz(path) as z:
          shown.append(z["images"])
      continue
    z = rdm.latents(cond.context[rows], first_index=int(rows[0]))  # all processes take part
    written += 1
    if lead:
      images = write_shard(path, rdm, cond, rows, z)
      print(f"{shard_name(i, num_shards)}: samples {rows[0]}-{rows[-1]}")
      if sum(map(len, shown)) < NUM_SHOWN:
        shown.append(images)
    if i + 1 < num_shards and preemption.reached(i):
      multihost_utils.sync_global_devices("rdm_jax.sample preempted")  # the shard is on disk
      preemption.stop(f"{int(done.sum()) + written} of {num_shards} shards are in {out}")
  if lead:
    images = np.concatenate(shown)[:NUM_SHOWN]
    grid_png, panel_png = files.join(out, GRID_PNG), files.join(out, PANEL_PNG)
    visualize.save_png(grid_png, visualize.grid(images, 4), scale=2)
    visualize.save_png(
      panel_png, rdm.panel(inference.Samples(images, None, cond), len(images)), scale=2
    )
    how = (
      f"tokens with temperature {sample_cfg.temperature}, top-k "
      f"{sample_cfg.top_k or 'off'}, top-p {sample_cfg.top_p}"
      if config_base.model_family(config) == "rarm"
      else f"{sample_cfg.sampler}, {sample_cfg.num_steps} steps"
    )
    print(
      f"step {rdm.step}: {n} {sample_cfg.condition}-conditioned samples with guidance "
      f"{sample_cfg.guidance_scale}, {how}, in {num_shards} shards\n  {out}\n  {grid_png}\n  "
      f"{panel_png}  (rows: the {rdm.k} conditioning entries | sample)"
    )
    if trained_on := store.describe_stores(rdm.info.get("trained_on")):
      print(f"the model was trained on {trained_on}")
  multihost_utils.sync_global_devices("rdm_jax.sample done")
  return out


def main(argv):
  del argv
  distributed.initialize()
  preemption.install()  # SIGTERM: finish the shard, exit 75 (all processes after the same shard)
  workdir = _WORKDIR.value or fail("--workdir is required")
  sample_set(cli.CONFIG.value, workdir, _OUT.value or "", _STEP.value)


if __name__ == "__main__":
  cli.run(main)
