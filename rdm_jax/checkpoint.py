"""Orbax checkpointing of the train state: async saves, resume from the latest by default.

Restore takes the abstract state with shardings attached, so a checkpoint restores
straight into the current mesh layout (which may differ from the one that saved it).
"""

from __future__ import annotations

import contextlib
import json
import logging as logging_lib
import math
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from rdm_jax import config_base, files, train_step
from rdm_jax.data import store
from rdm_jax.errors import (
  UserError,
  checked_by_process_0,
  fail,
  free_bytes,
  io_error_line,
  size_text,
)
from rdm_jax.parallel import mesh as mesh_lib


def manager(workdir: str, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  directory = files.abspath(files.join(workdir, "checkpoints"))
  if not create and not files.isdir(directory):
    fail(
      f"no checkpoints in {workdir}: train first with `python -m rdm_jax.train --workdir={workdir}`"
    )
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=create, enable_async_checkpointing=True
  )
  return ocp.CheckpointManager(directory, options=options)


DIGESTS = "checkpoint_digests"  # beside checkpoints/: <step>.json, every file's size and sha256


def _digest_dir(mngr: ocp.CheckpointManager) -> str:
  return files.join(files.dirname(str(mngr.directory)), DIGESTS)


def _step_sizes(step_dir: str) -> dict[str, int]:
  """{relative path: size} of every file of a checkpoint."""
  return files.walk_sizes(step_dir)


def _step_files(step_dir: str) -> dict[str, list]:
  """{relative path: [size, sha256]} of every file of a finished checkpoint."""
  return {
    rel: [size, files.sha256(files.join(step_dir, rel))]
    for rel, size in _step_sizes(step_dir).items()
  }


def record_digests(mngr: ocp.CheckpointManager) -> None:
  """Process 0 records the file digests of every checkpoint that has none yet; call it only when
  no save is in flight (`finish`: orbax lists a step before its last metadata files are
  written). Digests of checkpoints orbax has since deleted are removed (they are ours)."""
  if jax.process_index() != 0:
    return
  out = _digest_dir(mngr)
  files.makedirs(out)
  steps = set(mngr.all_steps())
  for step in sorted(steps):
    path = files.join(out, f"{step}.json")
    if not files.exists(path):
      try:
        digests = _step_files(files.join(str(mngr.directory), str(step)))
      except FileNotFoundError:  # deleted by orbax (max_to_keep) meanwhile
        continue
      files.atomic_write_text(path, json.dumps({"step": step, "files": digests}, sort_keys=True))
  for name in files.listdir(out):
    if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) not in steps:
      files.remove(files.join(out, name))


def _damage(mngr: ocp.CheckpointManager, step: int) -> str | None:
  """Why checkpoint `step` no longer matches the digests recorded when it was written (None: it
  does, or it has none)."""
  path = files.join(_digest_dir(mngr), f"{step}.json")
  if not files.isfile(path):
    return None
  try:
    want = files.read_json(path)["files"]
  except (OSError, UserError, KeyError, TypeError):
    return f"its digest record {path} is unreadable"
  step_dir = files.join(str(mngr.directory), str(step))
  have = _step_sizes(step_dir)  # sizes first: a truncated file is found without hashing the rest
  if set(have) != set(want):
    return f"files missing or added: {sorted(set(want) ^ set(have))[:3]}"
  for rel, (size, _) in want.items():
    if have[rel] != size:
      return f"{rel} is {have[rel]} bytes, {size} when written (truncated?)"
  for rel, (_, digest) in want.items():
    if files.sha256(files.join(step_dir, rel)) != digest:
      return f"{rel} changed since it was written (sha256)"
  return None


def _shapes(tree: Any) -> list:
  return sorted(
    tuple(int(d) for d in x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape")
  )


class _NoStepMetadataWarning(logging_lib.Filter):
  """Orbax warns that an item directory has no step metadata (that lives one level up)."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return not record.getMessage().startswith("Metadata file does not exist")


def _saved_shapes(item_dir: str) -> list:
  """The array shapes of a saved state item, from its metadata (no array is read)."""
  quiet = _NoStepMetadataWarning()
  logger = logging_lib.getLogger("absl")
  logger.addFilter(quiet)
  try:
    meta = ocp.StandardCheckpointer().metadata(item_dir)
  finally:
    logger.removeFilter(quiet)
  return _shapes(getattr(meta, "item_metadata", meta))


def steps(mngr: ocp.CheckpointManager) -> list[int]:
  return sorted(mngr.all_steps())


def committed_steps(mngr: ocp.CheckpointManager) -> list[int]:
  """The steps whose checkpoint is on disk under its final name (orbax lists a step from the moment
  its save starts, even when that save then fails)."""
  return [s for s in steps(mngr) if files.isdir(files.join(str(mngr.directory), str(s)))]


def restore(
  mngr: ocp.CheckpointManager, abstract_state: Any, shardings: Any, step: int | None = None
) -> Any:
  """Restores `step` (default: the newest intact one) into `shardings`; None when there is none.

  A checkpoint is damaged when its files differ from the digests recorded after it was
  written, or when reading it fails. Without an explicit step, a damaged one is passed over
  with a warning that names it, for the next newest; when every checkpoint is damaged (or
  the one asked for is), one line says what to delete. A checkpoint whose arrays have other
  shapes than this config's model is not damage: that is an error of its own.
  """
  available = steps(mngr)
  if step is not None and step not in available:
    fail(
      f"no checkpoint of step {step} in {mngr.directory}; steps there: "
      f"{', '.join(map(str, available)) or 'none (train first)'}"
    )
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )
  want_shapes = _shapes(target)
  damaged = []
  for s in [step] if step is not None else available[::-1]:
    why = _damage(mngr, s)
    if why is None:
      try:
        saved = _saved_shapes(files.join(str(mngr.directory), str(s), "default"))
      except Exception as e:  # noqa: BLE001  unreadable metadata: damaged
        why, saved = f"its metadata does not read ({type(e).__name__}: {str(e)[:120]})", None
      if saved is not None and saved != want_shapes:
        fail(
          f"checkpoint {s} in {mngr.directory} does not fit this config's model (its arrays have "
          "other shapes); use the config it was trained with or a new --workdir"
        )
    if why is None:
      try:
        state = mngr.restore(s, args=ocp.args.StandardRestore(target))
      except Exception as e:  # noqa: BLE001  TensorStore reports damage as plain Exception
        why = f"reading it failed ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
    if why is None:
      if damaged:
        logging.warning(
          "checkpoint(s) %s in %s are damaged (%s); restored the newest intact one, step %d",
          ", ".join(str(d) for d, _ in damaged),
          mngr.directory,
          damaged[0][1],
          s,
        )
      return state
    damaged.append((s, why))
  if damaged:
    listing = " ".join(files.join(str(mngr.directory), str(d)) for d, _ in damaged)
    fail(
      f"checkpoint {damaged[0][0]} in {mngr.directory} is damaged ({damaged[0][1]})"
      + (
        f" and no intact checkpoint is left (steps {', '.join(str(d) for d, _ in damaged)})"
        if step is None
        else ""
      )
      + f"; move or delete it to go on without it (`rm -r {listing}`), or restore it from a copy"
    )
  return None


RUN_FILES = (
  "model_info.json",
  "checkpoints",
)  # a directory holding either is a training run of ours


def check_workdir(workdir: str) -> None:
  """Refuses a --workdir that holds files but is not a training run (train would overwrite them).
  Multi-process jobs run it under `errors.checked_by_process_0`, before any process writes there."""
  if files.exists(workdir) and not files.isdir(workdir):
    fail(f"--workdir={workdir} exists and is not a directory; choose another --workdir")
  if (
    files.isdir(workdir)
    and files.listdir(workdir)
    and not any(files.exists(files.join(workdir, f)) for f in RUN_FILES)
  ):
    fail(
      f"--workdir={workdir} holds files but no training run (no {' or '.join(RUN_FILES)}); "
      "refusing to write into it: choose a new or empty --workdir"
    )


def function_record(config: Any) -> dict[str, Any]:
  """The config fields that change what a trained UNet's parameters compute without changing their
  shapes (a checkpoint restored under other values would load and sample noise): model_info.json
  records them, and `check_function` holds later jobs to them. Empty for the RARM."""
  if config_base.model_family(config) != "unet":
    return {}
  d = config.diffusion
  return {
    "diffusion.prediction": d.prediction,
    "diffusion.num_timesteps": int(d.num_timesteps),
    "diffusion.beta_start": float(d.beta_start),
    "diffusion.beta_end": float(d.beta_end),
  }


def check_function(before: dict[str, Any], now: dict[str, Any], workdir: str) -> None:
  """Refuses to sample or resume a run under a `function_record` other than the one it was trained
  with (`before`: its model_info.json; runs from before the record are not checked)."""
  diff = {k: v for k, v in (before.get("function") or {}).items() if k in now and now[k] != v}
  if diff:
    fail(
      f"the model in {workdir} was trained with "
      + ", ".join(f"{k}={v!r}" for k, v in diff.items())
      + " but this config has "
      + ", ".join(f"{k}={now[k]!r}" for k in diff)
      + ": the same weights would compute something else. Use the config it was trained with ("
      + files.join(workdir, "config.json")
      + ") or pass "
      + " ".join(f"--config.{k}={v}" for k, v in diff.items())
      + "; to train anew, a new --workdir"
    )


def check_resume(mngr: ocp.CheckpointManager, workdir: str, info: dict[str, Any]) -> None:
  """Refuses to resume checkpoints trained against another database or encoder than `info`'s."""
  path = files.join(workdir, "model_info.json")
  if mngr.latest_step() is None or not files.isfile(path):
    return
  try:
    before = files.read_json(path)
  except (OSError, UserError) as e:
    fail(
      f"{path} is unreadable ({e}); it describes the checkpoints in {workdir}: restore it "
      "or use a new --workdir"
    )
  for field, what in (("database_fingerprint", "database"), ("encoder", "retrieval encoder")):
    if field == "database_fingerprint" and before.get("imported_from"):
      continue  # imported weights (jobs/import_checkpoint.py) are not tied to a database of ours
    if before.get(field) != info[field]:
      fail(
        f"the checkpoints in {workdir} were trained with another {what} ({field} "
        f"{before.get(field)} in {path}, now {info[field]}); resuming would mix the two: use a "
        f"new --workdir, or the {what} of that run ({before.get('database')})"
      )
  check_function(before, info["function"], workdir)


def set_aside_newer(mngr: ocp.CheckpointManager, step: int, keep: int) -> ocp.CheckpointManager:
  """Moves the (damaged) checkpoints newer than `step` to <workdir>/damaged_checkpoints/, so that
  training resumed from `step` can save those steps again (orbax skips a step it already has).
  Nothing is deleted. Returns a fresh manager over the remaining checkpoints."""
  from jax.experimental import multihost_utils

  newer = [s for s in steps(mngr) if s > step]
  workdir = files.dirname(str(mngr.directory))
  aside = files.join(workdir, "damaged_checkpoints")
  if jax.process_index() == 0:
    files.makedirs(aside)
    for s in newer:
      dest = files.join(aside, f"{s}.{time.strftime('%Y%m%d-%H%M%S')}")
      files.move(files.join(str(mngr.directory), str(s)), dest)
      digest = files.join(_digest_dir(mngr), f"{s}.json")
      if files.exists(digest):
        files.move(digest, dest + ".digests.json")
      logging.warning(
        "moved damaged checkpoint %d to %s; training goes on from step %d", s, dest, step
      )
  multihost_utils.sync_global_devices("rdm_jax_set_aside_damaged_checkpoints")
  mngr.close()
  return manager(workdir, keep=keep)


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  state: Any,
  force: bool = False,
  trained_on: dict[str, Any] | None = None,
) -> None:
  """Starts an async save of `step`, recording `trained_on` (`inputs_record`) in its metadata;
  first records the digests of the previous one (orbax waits for it before starting another
  anyway; a step is listed before its last files are written)."""
  metadata = {"trained_on": trained_on} if trained_on else None
  with _save_errors(mngr, step):
    finish(mngr)
    mngr.save(step, args=ocp.args.StandardSave(state), force=force, custom_metadata=metadata)
  _IN_FLIGHT.add(id(mngr))


def finish(mngr: ocp.CheckpointManager) -> None:
  """Waits for the last async save and records its digests."""
  _IN_FLIGHT.discard(id(mngr))
  with _save_errors(mngr):
    mngr.wait_until_finished()
    record_digests(mngr)


@contextlib.contextmanager
def kept_on_error(mngr: ocp.CheckpointManager):
  """When the body fails (a changed store, a spike, a bug), the save in flight is completed and its
  digests recorded before the error ends the process, which would cut orbax's writer thread off."""
  try:
    yield
  except BaseException:
    try:
      finish(mngr)
    except UserError:
      pass  # that save failed too; the body's error is the one to report
    raise


_IN_FLIGHT: set[int] = (
  set()
)  # id() of the managers with a save not yet seen to the end (`check_saves`)


def check_saves(mngr: ocp.CheckpointManager, collective: bool = True) -> None:
  """Call every step: once the save in flight has ended, waits on it, which raises when it failed
  (a full disk, an I/O error): the run then stops in one line at once, not at the next save; and
  records its digests. With several processes, process 0's look decides, at `collective` steps
  only (a broadcast); orbax's own `check_for_errors` is not enough: it stays silent here."""
  if id(mngr) not in _IN_FLIGHT:
    return
  if jax.process_count() == 1:
    ended = not mngr.is_saving_in_progress()
  elif collective:
    from jax.experimental import multihost_utils

    ended = bool(multihost_utils.broadcast_one_to_all(np.asarray(not mngr.is_saving_in_progress())))
  else:
    return
  if ended:
    finish(mngr)


@contextlib.contextmanager
def _save_errors(mngr: ocp.CheckpointManager, step: int | None = None):
  """A failed checkpoint write -> one line: what failed, which checkpoints are intact, what to
  do."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001  orbax and TensorStore report write errors as several types
    intact = committed_steps(mngr)
    saving = f"checkpoint {step}" if step is not None else "a checkpoint"
    fail(
      f"writing {saving} to {mngr.directory} failed: {io_error_line(e, str(mngr.directory))}. "
      f"Intact checkpoints: {', '.join(map(str, intact)) or 'none'}; fix that and rerun: training "
      "resumes from the newest"
    )


def check_space(
  mngr: ocp.CheckpointManager, abstract_state: Any, start_step: int, train: Any
) -> None:
  """Refuses, before training, a run whose checkpoints will not fit on the disk of its --workdir:
  each is about the state's bytes, and up to `keep_checkpoints` of them plus the one being written
  are on disk at once. (A bucket is not checked.)"""
  directory = str(mngr.directory)
  if files.is_uri(directory):
    return
  every, keep, num_steps = train.checkpoint_every, train.keep_checkpoints, train.num_steps
  to_save = len(
    {s for s in range(start_step + 1, num_steps + 1) if s % every == 0 or s == num_steps}
  )
  have = len(steps(mngr))
  one = state_bytes(abstract_state)
  need = (min(keep + 1, have + to_save) - min(have, keep + 1)) * one * 1.05 if to_save else 0
  free = free_bytes(directory)
  if free is not None and need > free:
    fail(
      f"{directory}: the run's checkpoints need about {size_text(need)} more (up to {keep + 1} "
      f"checkpoints of {size_text(one)} at once) but {size_text(free)} is free there; free space, "
      "lower config.train.keep_checkpoints, or choose a --workdir on another disk"
    )


def state_bytes(abstract_state: Any) -> int:
  """About what one checkpoint of the state takes on disk (its arrays' bytes)."""
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


LOG_ROOM = 1 << 20  # what a log step writes, at most (TensorBoard events, the loss line)


def check_room(mngr: ocp.CheckpointManager, need: int, step: int) -> None:
  """Stops the run in one line, before it writes, when the disk of its checkpoints has less than
  `need` bytes free (a checkpoint's `state_bytes`, or `LOG_ROOM` at a log step): a full disk then
  stops training with every committed checkpoint intact, not in a failed write."""
  directory = str(mngr.directory)
  if files.is_uri(directory):
    return

  def look() -> None:  # process 0's look decides for every process (they share the disk)
    intact = committed_steps(mngr)  # a save in flight is completed as the error stops the run
    files.need_room(
      directory,
      need,
      f"step {step}",
      "training stopped before writing. Checkpoints intact: "
      f"{', '.join(map(str, intact)) or 'none'}. Free space (or move --workdir to a larger disk) "
      "and rerun: training resumes from the newest",
    )

  checked_by_process_0(look)


INPUT_PARTS = ("latents", "neighbors", "database")


def inputs_record(data: Any) -> dict[str, Any]:
  """What a checkpoint records of the stores it was trained on (`pipeline.RetrievalData`): each
  store's path, fingerprint (its manifest, which holds the arrays' checksums) and the state of
  its array files (inode, size, time written) when the run opened it."""
  stores = (data.latents_store, data.neighbors_store, data.database_store)
  return {
    part: {"path": s.path, "fingerprint": s.fingerprint, "files": s.states}
    for part, s in zip(INPUT_PARTS, stores)
  }


def recorded_inputs(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The `inputs_record` a checkpoint was saved with; None for one without (imported weights)."""
  try:
    custom = mngr.metadata(step).custom_metadata or {}
  except Exception as e:  # noqa: BLE001  unreadable step metadata
    fail(
      f"the metadata of checkpoint {step} in {mngr.directory} does not read ({type(e).__name__}); "
      "move that checkpoint away to go on without it"
    )
  record = custom.get("trained_on") if isinstance(custom, dict) else None
  if record is None:
    return None
  ok = isinstance(record, dict) and all(
    isinstance(record.get(p), dict)
    and isinstance(record[p].get("fingerprint"), str)
    and isinstance(record[p].get("files"), dict)
    for p in INPUT_PARTS
  )
  if not ok:
    fail(
      f"checkpoint {step} in {mngr.directory} has a malformed record of its training data; move "
      "that checkpoint away to go on without it"
    )
  return record


def check_inputs(mngr: ocp.CheckpointManager, step: int, data: Any) -> None:
  """Refuses to resume checkpoint `step` on data other than what it was trained on.

  A store with another fingerprint (rebuilt, or another one) is refused in one line. A store with
  the recorded fingerprint whose files were touched since (time, size or inode differ: a copy, a
  restore from backup, or an edit in place that left the manifest alone) has every array checked
  against its manifest's sha256 first: resumed when they match, refused when not.
  """
  record = recorded_inputs(mngr, step)
  if record is None:
    return
  stores = (data.latents_store, data.neighbors_store, data.database_store)
  for part, s in zip(INPUT_PARTS, stores):
    was = record[part]
    if was["fingerprint"] != s.fingerprint:
      fail(
        f"checkpoint {step} in {mngr.directory} was trained on the {part} store {was.get('path')} "
        f"(fingerprint {was['fingerprint']}); {s.path} is now {s.fingerprint}: resuming would mix "
        "two data sets. Put that store back, or train on this one with a new --workdir"
      )
    if was["files"] != s.states:  # both {array: [inode, size, mtime_ns]}
      changed = store.changed_array(s)
      if changed:
        fail(
          f"{s.path}/{changed}.npy changed after checkpoint {step} in {mngr.directory} was "
          "trained on it (its sha256 no longer matches the store's manifest); rebuild or restore "
          f"{s.path}, then rerun"
        )
      logging.info(
        "%s was touched since checkpoint %d; its arrays match their checksums", s.path, step
      )


def load_trained(config, workdir: str, step: int | None = None):
  """(model, EMA params, model_info) of a run, restored onto the config's mesh."""
  info_path = files.join(workdir, "model_info.json")
  if not files.isfile(info_path):
    fail(
      f"{workdir} holds no trained model: run `python -m rdm_jax.train --workdir={workdir}` first"
    )
  info = files.read_json(info_path)
  if not isinstance(info, dict) or not isinstance(info.get("latent_shape"), list):
    fail(
      f"{info_path} is not a model record of rdm_jax.train (no latent_shape); restore it or "
      "train again"
    )
  check_function(info, function_record(config), workdir)
  setup = train_step.setup_training(
    config, tuple(info["latent_shape"]), mesh_lib.from_config(config)
  )
  state = restore(manager(workdir, create=False), setup.abstract, setup.state_sh, step)
  if state is None:
    fail(f"no checkpoint in {workdir}/checkpoints: train first")
  return setup.model, state.ema_params, info, int(state.step)
