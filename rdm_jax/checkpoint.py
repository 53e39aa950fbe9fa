"""Orbax checkpointing of the train state: async saves, resume from the latest by default.

Restore takes the abstract state with shardings attached, so a checkpoint restores
straight into the current mesh layout (which may differ from the one that saved it).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from rdm_jax import training
from rdm_jax.errors import fail
from rdm_jax.parallel import mesh as mesh_lib


def manager(workdir: str, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not create and not os.path.isdir(directory):
    fail(f"no checkpoints in {workdir}: train first with `python -m rdm_jax.train --workdir={workdir}`")
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=True)
  return ocp.CheckpointManager(directory, options=options)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, shardings: Any, step: int | None = None) -> Any:
  """Restores `step` (default: latest) into `shardings`; None when there is no checkpoint."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(target))
  except (ValueError, KeyError) as e:
    fail(f"checkpoint {step} in {mngr.directory} does not fit this config's model ({str(e)[:200]}); "
         "use the config it was trained with or a new --workdir")


RUN_FILES = ("model_info.json", "checkpoints")  # a directory holding either is a training run of ours


def check_workdir(workdir: str) -> None:
  """Refuses a --workdir that holds files but is not a training run (train would overwrite them)."""
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    fail(f"--workdir={workdir} exists and is not a directory; choose another --workdir")
  if os.path.isdir(workdir) and os.listdir(workdir) and not any(
      os.path.exists(os.path.join(workdir, f)) for f in RUN_FILES):
    fail(f"--workdir={workdir} holds files but no training run (no {' or '.join(RUN_FILES)}); refusing to "
         "write into it: choose a new or empty --workdir")


def check_resume(mngr: ocp.CheckpointManager, workdir: str, info: dict[str, Any]) -> None:
  """Refuses to resume checkpoints trained against another database or encoder than `info`'s."""
  path = os.path.join(workdir, "model_info.json")
  if mngr.latest_step() is None or not os.path.isfile(path):
    return
  try:
    with open(path) as f:
      before = json.load(f)
  except (OSError, ValueError) as e:
    fail(f"{path} is unreadable ({e}); it describes the checkpoints in {workdir}: restore it or use a new --workdir")
  for field, what in (("database_fingerprint", "database"), ("encoder", "retrieval encoder")):
    if before.get(field) != info[field]:
      fail(f"the checkpoints in {workdir} were trained with another {what} ({field} {before.get(field)} in "
           f"{path}, now {info[field]}); resuming would mix the two: use a new --workdir, or the "
           f"{what} of that run ({before.get('database')})")


def save(mngr: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def load_trained(config, workdir: str, step: int | None = None):
  """(model, EMA params, model_info) of a run, restored onto the config's mesh."""
  info_path = os.path.join(workdir, "model_info.json")
  if not os.path.isfile(info_path):
    fail(f"{workdir} holds no trained model: run `python -m rdm_jax.train --workdir={workdir}` first")
  with open(info_path) as f:
    info = json.load(f)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  rules = [tuple(r) for r in config.sharding_rules]
  model = training.make_model(config)
  tx = training.make_optimizer(config)
  inputs = training.example_inputs(config, 1, tuple(info["latent_shape"]), config.k_train)
  abstract, shardings = training.state_shardings(model, tx, inputs, mesh, rules)
  mngr = manager(workdir, create=False)
  state = restore(mngr, abstract, shardings, step)
  if state is None:
    fail(f"no checkpoint in {workdir}/checkpoints: train first")
  return model, state.ema_params, info, int(state.step)
