r"""Imports a published RDM or RARM checkpoint (the original's Lightning
`model.ckpt`) as a training run.

  python -m rdm_jax.jobs.import_checkpoint --config=configs/imagenet_rdm.py \
      --checkpoint=models/rdm/imagenet/model.ckpt --workdir=runs/rdm_imagenet_released
  python -m rdm_jax.jobs.import_checkpoint --config=configs/imagenet_rarm.py:dogs,released \
      --checkpoint=models/rarm/imagenet/dogs/model.ckpt --workdir=runs/rarm_dogs_released

An RDM's UNet (`model.diffusion_model.*`) and its EMA (`model_ema.*`, LitEma's names without
dots), or a RARM's transformer (`transformer.*`: LatentImageRETRO's RetrievalPatchTransformer,
which keeps no EMA), become a checkpoint of `--workdir` at the original's global step, so that
`rdm_jax.sample`, `rdm_jax.evaluate`, the context ablation and `rdm_jax.inference.RDM` use it
as they use a run of ours, and `rdm_jax.train --workdir=...` fine-tunes it (with a raised
--config.train.num_steps; Adam's moments start from zero, as the original's are not imported).

The file is read by the restricted reader (nothing in it can run) and checked before anything
is written: the network must be `config.model`'s (every key and shape; a difference is listed
in one line), an RDM's noise schedule (`betas`) must be `config.diffusion`'s, a RARM's start
and mask tokens (`sos_token`, `mask_token`) must be ours (codes + 1, codes), and its first
stage must have `config.first_stage`'s architecture and, when `config.first_stage.weights`
is there, its weights (the latents or tokens it was trained on; the released RARM's taming
VQGAN lives only in its model.ckpt, which `config.first_stage.weights` may name). A RARM's
split of its width into heads is not in the file: config.model.heads x dim_head must be the
original's (12 x 64 in every released config). The run is not tied to a database: any store
embedded by `config.retrieval`'s encoder serves it (model_info.json records the encoder and
where the weights came from).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import flags, logging

from rdm_jax import checkpoint, config_base, files, train_step
from rdm_jax.data import store
from rdm_jax.errors import fail
from rdm_jax.jobs import cli
from rdm_jax.models import (
  autoencoder,
  factory,
  first_stage,
  rarm,
  torch_convert,
  torch_legacy,
  unet,
)
from rdm_jax.parallel import mesh as mesh_lib
from rdm_jax.retrieval import encoders

_CHECKPOINT = cli.define_once(
  flags.DEFINE_string,
  "checkpoint",
  None,
  "The original's Lightning model.ckpt (docs/paper_configuration.md).",
)
_WORKDIR = cli.define_once(
  flags.DEFINE_string, "workdir", None, "A new or empty directory for the imported run."
)

UNET_PREFIX = "model.diffusion_model."
RARM_PREFIX = rarm.TORCH_PREFIX
FIRST_STAGE_PREFIX = first_stage.MODEL_PREFIX


def ema_key(key: str) -> str:
  """LitEma's buffer name of parameter `key` ("model.diffusion_model.out.2.weight" ->
  "model_ema.diffusion_modelout2weight"): the module path below `model.`, dots removed."""
  return "model_ema." + key.split(".", 1)[1].replace(".", "")


def unet_params(sd: dict[str, np.ndarray], model: unet.UNet, abstract: dict, ema: bool) -> dict:
  """The UNet's parameters (or their EMA) from the original's state dict; ValueError on a
  mismatch."""
  names = unet.ldm_names(model, abstract)
  shapes = torch_convert.flat_shapes(abstract)
  if ema:
    names = {p: ema_key(UNET_PREFIX + k) for p, k in names.items()}
    given = {
      k: v
      for k, v in sd.items()
      if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")
    }
  else:
    names = {p: UNET_PREFIX + k for p, k in names.items()}
    given = {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
  return torch_convert.to_flax(given, shapes, names)


def check_schedule(sd: dict[str, np.ndarray], config, path: str) -> None:
  if "betas" not in sd:
    logging.warning("%s holds no noise schedule (betas); assuming config.diffusion's", path)
    return
  ours = np.asarray(factory.make_schedule(config).betas, np.float64)
  theirs = sd["betas"]
  if (
    not isinstance(theirs, np.ndarray)
    or theirs.ndim != 1
    or not len(theirs)
    or theirs.dtype.kind not in "fiu"
  ):
    fail(
      f"{path}: its noise schedule (betas) is {getattr(theirs, 'dtype', type(theirs).__name__)}"
      f"{list(np.shape(theirs))}; a schedule is a float vector of T betas: the file is "
      "damaged or not an RDM"
    )
  theirs = theirs.astype(np.float64)
  if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-5, atol=0):
    fail(
      f"{path} was trained with another noise schedule than config.diffusion's ({theirs.shape[0]} "
      f"steps, betas {theirs[0]:.6g}..{theirs[-1]:.6g}; the config has {ours.shape[0]}, "
      f"{ours[0]:.6g}..{ours[-1]:.6g}): set --config.diffusion.num_timesteps / beta_start / "
      "beta_end to the checkpoint's"
    )


def check_first_stage(sd: dict[str, np.ndarray], config, path: str) -> None:
  """Its first stage must be config.first_stage's: same architecture, and same weights if we have
  them."""
  fs = {k[len(FIRST_STAGE_PREFIX) :]: v for k, v in sd.items() if k.startswith(FIRST_STAGE_PREFIX)}
  if not all(isinstance(v, np.ndarray) for v in fs.values()):
    fail(
      f"{path}: its {FIRST_STAGE_PREFIX}* entries are not all tensors; the file is damaged "
      "or not an RDM"
    )
  if not fs:
    logging.warning("%s holds no first stage; assuming config.first_stage's", path)
    return
  if config.first_stage.name == "identity":
    fail(
      f"{path} was trained on the latents of a neural first stage but "
      "config.first_stage.name='identity': use a config with the checkpoint's first stage "
      "(configs/imagenet_rdm.py: vq_f4)"
    )
  try:
    theirs = autoencoder.convert_state_dict(fs, first_stage.spec(config.first_stage))
  except ValueError as e:
    fail(
      f"{path}: its first stage is not config.first_stage.name={config.first_stage.name!r} ({e})"
    )
  if config.first_stage.weights and os.path.isfile(config.first_stage.weights):
    ours = first_stage.load(config.first_stage).params
    same = jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), ours, theirs))
    if not same:
      fail(
        f"{path}: its first stage's weights differ from config.first_stage.weights="
        f"{config.first_stage.weights}; its UNet models the latents of its own: point "
        "config.first_stage.weights at the first stage it was trained with"
      )


def rarm_params(sd: dict[str, np.ndarray], model: rarm.RARM, abstract: dict, path: str) -> dict:
  """The RARM's parameters from the original's state dict, after checking its special tokens."""
  for name, ours in (("sos_token", model.sos_token), ("mask_token", model.mask_token)):
    theirs = sd.get(name)
    if theirs is None:
      continue
    if not isinstance(theirs, np.ndarray) or theirs.size != 1 or theirs.dtype.kind not in "iu":
      fail(f"{path}: its {name} is not one integer; the file is damaged or not a RARM")
    if int(theirs.reshape(())) != ours:
      fail(
        f"{path}: its {name} is {int(theirs.reshape(()))} but a RARM over {model.num_codes} codes "
        f"has {ours}; config.first_stage's codebook size differs from the checkpoint's"
      )
  try:
    return rarm.from_torch(sd, abstract)
  except ValueError as e:
    fail(
      f"{path}: its transformer is not config.model's ({e}); set config.model's depth, heads and "
      "dim_head to the checkpoint's (configs/imagenet_rarm.py is the released RARMs')"
    )


def network_weights(
  sd: dict[str, np.ndarray], setup: train_step.TrainSetup, path: str
) -> tuple[Any, Any]:
  """(parameters, their EMA) of config.model's network from the original's state dict."""
  model, abstract = setup.model, setup.abstract.params
  if isinstance(model, rarm.RARM):
    params = rarm_params(sd, model, abstract, path)
    return params, params
  try:
    params = unet_params(sd, model, abstract, ema=False)
  except ValueError as e:
    fail(
      f"{path}: its UNet is not config.model's ({e}); set config.model to the checkpoint's "
      "architecture (configs/imagenet_rdm.py is the released ImageNet RDM's)"
    )
  if not any(k.startswith("model_ema.") for k in sd):
    logging.warning(
      "%s holds no EMA weights (model_ema.*); sampling will use the raw weights", path
    )
    return params, params
  try:
    return params, unet_params(sd, model, abstract, ema=True)
  except ValueError as e:
    fail(f"{path}: its EMA weights do not match its UNet ({e})")


def read_state_dict(path: str, config) -> tuple[Any, dict[str, np.ndarray]]:
  """(the file's object, its state dict), checked to hold config.model.family's network."""
  autoregressive = config_base.model_family(config) == "rarm"
  prefix, kind = (RARM_PREFIX, "RARM") if autoregressive else (UNET_PREFIX, "RDM")
  obj = torch_legacy.load_weights(
    path,
    f"{kind} checkpoint",
    "download it as docs/paper_configuration.md says and give its local path",
  )
  sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
  if not isinstance(sd, dict) or not any(str(k).startswith(prefix) for k in sd):
    other_prefix, other_kind, other_config = (
      (UNET_PREFIX, "an RDM", "imagenet_rdm")
      if autoregressive
      else (RARM_PREFIX, "a RARM", "imagenet_rarm")
    )
    other = isinstance(sd, dict) and any(str(k).startswith(other_prefix) for k in sd)
    hint = (
      f"it is {other_kind}: use its config (configs/{other_config}.py)"
      if other
      else f"give the model.ckpt of a {kind}"
    )
    fail(
      f"{path} holds no {kind} state dict (no {prefix}* keys; config.model.family="
      f"{config_base.model_family(config)!r}): {hint}"
    )
  network = [
    v
    for k, v in sd.items()
    if k.startswith((prefix, "model_ema."))
    and k not in ("model_ema.decay", "model_ema.num_updates")
  ]
  if not all(isinstance(v, np.ndarray) for v in network):
    fail(
      f"{path}: its {prefix}* and model_ema.* entries are not all tensors; the file is "
      f"damaged or not a {kind}"
    )
  return obj, sd


def main(argv):
  del argv
  path = _CHECKPOINT.value or fail("--checkpoint is required (the original's model.ckpt)")
  import_run(
    cli.CONFIG.value,
    path,
    _WORKDIR.value or fail("--workdir is required (a new or empty directory)"),
  )


def import_run(config, path: str, workdir: str) -> None:
  """The job: `path` (the original's model.ckpt) as a run of config's model in `workdir`."""
  workdir = files.normpath(workdir)
  checkpoint.check_workdir(workdir)
  cli.hold_output(workdir, "--workdir", create=False)  # a refused import writes nothing
  digest = store.file_sha256(path) if os.path.isfile(path) else ""
  info_path = files.join(workdir, "model_info.json")
  if files.exists(info_path):
    record = files.read_json(info_path)
    before = record.get("imported_from") if isinstance(record, dict) else None
    before = before if isinstance(before, dict) else {}
    if before.get("sha256") != digest:
      fail(
        f"--workdir={workdir} already holds another run; importing would mix the two: choose a "
        "new or empty --workdir"
      )
    print(
      f"{workdir} already holds {path} (imported at step {before.get('global_step')}); "
      "nothing to do"
    )
    return

  obj, sd = read_state_dict(path, config)
  if config_base.model_family(config) == "unet":
    check_schedule(sd, config, path)
  check_first_stage(sd, config, path)

  shape = factory.latent_shape(config)
  setup = train_step.setup_training(config, shape, mesh_lib.from_config(config))
  tx, shardings = setup.tx, setup.state_sh
  params, ema = network_weights(sd, setup, path)
  step = obj.get("global_step", 0) if isinstance(obj, dict) else 0
  step = int(step) if isinstance(step, (int, np.integer)) and step >= 0 else 0

  put = lambda tree, sh: jax.tree.map(lambda a, s: jax.device_put(np.asarray(a), s), tree, sh)
  state = train_step.TrainState(
    step=jax.device_put(np.asarray(step, np.int32), shardings.step),
    params=put(params, shardings.params),
    ema_params=put(ema, shardings.ema_params),
    opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(put(params, shardings.params)),
    losses=jax.device_put(
      train_step.LossWindow.empty(train_step.spike_settings(config)[2]), shardings.losses
    ),
  )
  info = {
    "encoder": encoders.encoder_identity(config.retrieval),
    "database": None,
    "database_fingerprint": None,
    "latent_shape": list(shape),
    "image_hw": [config.dataset.image_size] * 2,
    "function": checkpoint.function_record(config),
    "imported_from": {"checkpoint": os.path.abspath(path), "sha256": digest, "global_step": step},
  }
  files.makedirs(workdir)
  mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints)
  if step not in checkpoint.steps(
    mngr
  ):  # else a killed import saved it but had not written model_info
    checkpoint.save(mngr, step, state, force=True)
  checkpoint.finish(mngr)
  if jax.process_index() == 0:  # written last: its presence means the import is complete
    files.atomic_write_text(
      files.join(workdir, "config.json"), config.to_json_best_effort(indent=1)
    )
    files.atomic_write_text(files.join(workdir, "model_info.json"), json.dumps(info, indent=1))
  print(
    f"imported {path} (step {step}, {'EMA and raw' if ema is not params else 'raw'} "
    f"weights) into {workdir}"
  )


if __name__ == "__main__":
  cli.run(main)
