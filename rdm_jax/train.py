r"""Train a retrieval-augmented diffusion model on pre-encoded latents and precomputed neighbours.

  python -m rdm_jax.train --config=configs/fashion_mnist_rdm.py --workdir=runs/fmnist \
      [--config.k_train=8] [--config.mesh.fsdp=2]

Resumes from the latest checkpoint in --workdir by default, with the same data order.
"""

from __future__ import annotations

import json

from absl import flags, logging

from rdm_jax.jobs import cli, distributed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from clu import metric_writers, periodic_actions, parameter_overview  # noqa: E402

from rdm_jax import (
  checkpoint,
  config_base,
  conditioning,
  errors,
  files,
  inference,
  preemption,
  step_watch,
  train_step,
)  # noqa: E402
from rdm_jax.data import pipeline, visualize  # noqa: E402
from rdm_jax.models import first_stage  # noqa: E402
from rdm_jax.parallel import mesh as mesh_lib, sharding  # noqa: E402

_WORKDIR = cli.define_once(
  flags.DEFINE_string,
  "workdir",
  None,
  "Directory for checkpoints, logs and samples (shared by all processes of a multi-host run).",
)


def make_sample_writer(config, workdir, model, sched, latent_shape, image_hw, encoder, writer):
  """Builds, once, the conditioning (test queries -> neighbours in D) and the jitted DDIM sampler;
  returns a function that writes a guided sample grid next to the neighbours that conditioned it."""
  cond = conditioning.exemplar_conditioning(
    config,
    config.train.num_sample_images,
    config.k_train,
    config.sample.query_part,
    encoder,
    config.sample.include_query,
  )
  neighbors = conditioning.context_images(cond, config.dataset)
  sampler = inference.make_sampler(model, sched, latent_shape, config.sample)
  context = jnp.asarray(cond.context)
  out = files.join(workdir, "samples")

  def write(step, params):
    z = sampler(params, context, jax.random.PRNGKey(config.train.seed + 1))
    images = first_stage.decode(config.first_stage, np.asarray(jax.device_get(z)), image_hw)
    samples, panel = visualize.grid(images, 4), visualize.neighbor_panel(neighbors, images)
    visualize.save_png(files.join(out, f"samples_{step:07d}.png"), samples, scale=2)
    visualize.save_png(files.join(out, f"neighbors_and_samples_{step:07d}.png"), panel, scale=2)
    writer.write_images(step, {"samples": samples[None], "neighbors_and_samples": panel[None]})
    logging.info("step %d: samples in %s", step, out)

  return write


def main(argv):
  del argv
  workdir = _WORKDIR.value
  if not workdir:
    cli.fail("--workdir is required (checkpoints, logs and samples go there)")
  distributed.initialize()
  preemption.install()  # SIGTERM: finish the step, save it, exit 75 (all processes at one step)
  train_and_evaluate(cli.CONFIG.value, workdir)


TRAIN_COUNTS = {  # config.train's counts: the least each may be, and what it counts
  "num_steps": (1, "the step to train to"),
  "log_every": (1, "the steps between logged losses"),
  "checkpoint_every": (1, "the steps between checkpoints; the last step always saves one"),
  "keep_checkpoints": (1, "how many checkpoints to keep"),
  "sample_every": (0, "the steps between sample grids; 0: none"),
}


def check_train_counts(train) -> None:
  """Refuses, in one line and before any work, a config.train count the loop cannot run with."""
  for name, (least, meaning) in TRAIN_COUNTS.items():
    value = train[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      cli.fail(f"config.train.{name}={value!r} must be a whole number >= {least} ({meaning})")


def check_x0_bound(config) -> None:
  """Refuses, before any work, a censored x0 loss (config.diffusion.x0_bound) on a diffusion model
  that does not predict x0, or a negative bound."""
  d = config.diffusion
  if config_base.model_family(config) == "unet" and (
    d.x0_bound < 0 or (d.x0_bound and d.prediction != "x0")
  ):
    cli.fail(
      f"config.diffusion.x0_bound={d.x0_bound}: the censored loss is for prediction='x0' (this "
      f"config predicts {d.prediction!r}); set it to the data's bound (1.0 for pixels in [-1, 1]) "
      "and predict x0, or set it to 0"
    )


def train_and_evaluate(config, workdir: str) -> None:
  """Trains config's model in `workdir` to config.train.num_steps, resuming from its newest
  checkpoint, with logs, periodic samples and checkpoints there (the job; a test or a notebook
  calls it in-process)."""
  check_train_counts(config.train)
  check_x0_bound(config)
  platform_line, platform_warnings = mesh_lib.check_platform(config)
  logging.info(platform_line)
  logging.info(train_step.optimisation_line(config))
  for w in platform_warnings:
    logging.warning(w)
  workdir = files.normpath(workdir)
  errors.checked_by_process_0(
    lambda: checkpoint.check_workdir(workdir)
  )  # before any process writes there
  cli.hold_output(workdir, "--workdir")  # one writer: a second launch on this run is refused

  # --------------------------------------------------------------------------- Data
  data = pipeline.load_retrieval_data(config, "train")
  encoder = data.database_store.manifest["encoder"]
  if config.retrieval.encoder != encoder["name"]:
    cli.fail(
      f"config.retrieval.encoder={config.retrieval.encoder!r} but the database was embedded by "
      f"{encoder['name']!r}"
    )
  latent_shape = data.latents.shape[1:]
  image_hw = tuple(data.latents_store.manifest["image_shape"][:2])

  # --------------------------------------------------------------------------- Mesh
  mesh = mesh_lib.from_config(config)
  rules = [tuple(r) for r in config.sharding_rules]
  batch_devices = sharding.batch_devices(mesh, rules)
  if config.train.batch_size % batch_devices:
    cli.fail(
      f"config.train.batch_size={config.train.batch_size} is not divisible by the "
      f"{batch_devices} devices of the batch axes {dict(rules)['batch']}"
    )
  logging.info(
    "mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count()
  )

  # --------------------------------------------------------------------------- Model
  setup = train_step.setup_training(config, latent_shape, mesh)
  model, sched = setup.model, setup.sched
  if setup.layout is not None and setup.layout.fsdp_outer > 1:
    logging.info(
      "FSDP gathers in two stages: within each of %d groups of the fsdp axis, then across them "
      "(config.mesh.fsdp_outer)",
      setup.layout.fsdp_outer,
    )

  # --------------------------------------------------------------------------- Checkpoint
  mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints)
  trained_on = checkpoint.inputs_record(data)  # each checkpoint records the data it was trained on
  info = {
    "encoder": encoder,
    "database": data.database_store.path,
    "database_fingerprint": data.database_store.fingerprint,
    "trained_on": {
      part: {k: r[k] for k in ("path", "fingerprint")} for part, r in trained_on.items()
    },
    "latent_shape": list(latent_shape),
    "image_hw": list(image_hw),
    "function": checkpoint.function_record(config),
  }
  checkpoint.check_resume(mngr, workdir, info)
  state = checkpoint.restore(mngr, setup.abstract, setup.state_sh)
  if state is not None and checkpoint.steps(mngr)[-1] > int(state.step):  # newer ones were damaged
    mngr = checkpoint.set_aside_newer(mngr, int(state.step), config.train.keep_checkpoints)
  if state is None:
    state = setup.init_state(jax.random.PRNGKey(config.train.seed))
    logging.info("initialised a new model")
  else:
    checkpoint.check_inputs(mngr, int(state.step), data)
    logging.info("resumed from step %d", int(state.step))
  start_step = int(state.step)
  errors.checked_by_process_0(
    lambda: checkpoint.check_space(mngr, setup.abstract, start_step, config.train)
  )
  one_checkpoint = checkpoint.state_bytes(setup.abstract)
  if jax.process_index() == 0:
    files.atomic_write_text(
      files.join(workdir, "config.json"), config.to_json_best_effort(indent=1)
    )
    files.atomic_write_text(files.join(workdir, "model_info.json"), json.dumps(info, indent=1))
  parameter_overview.log_parameter_overview(state.params)

  # --------------------------------------------------------------------------- Update step
  step_fn = setup.train_step
  learning_rate = train_step.learning_rate(config)  # logged beside the loss
  rng = jax.random.PRNGKey(config.train.seed + 2)

  # --------------------------------------------------------------------------- Train loop
  writer = metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0, asynchronous=True
  )
  num_steps = config.train.num_steps
  progress = periodic_actions.ReportProgress(
    num_train_steps=num_steps, writer=writer, every_steps=config.train.log_every
  )
  batches = pipeline.train_iterator(
    data, config, start_step, jax.process_index(), jax.process_count()
  )
  write_samples = None
  if config.train.sample_every:  # checked before training: a missing store fails now, not at step N
    write_samples = make_sample_writer(
      config, workdir, model, sched, latent_shape, image_hw, encoder, writer
    )
  watch = step_watch.StepWatch(
    config.train.nonfinite,
    train_step.spike_settings(config)[0],
    data.latents_store["ids"],
    config.train.seed,
    config.train.batch_size,
    data.variants,
  )
  losses = []
  with (
    jax.set_mesh(mesh),
    checkpoint.kept_on_error(mngr),
  ):  # a stop for any reason completes a save in flight
    for step in range(start_step + 1, num_steps + 1):
      z0, context = next(batches)
      z0, context = sharding.put_batch(mesh, rules, z0, context)
      state, metrics = step_fn(state, z0, context, rng)
      losses.append(metrics["loss"])
      watch.add(step, metrics)
      progress(step)
      preempted = preemption.reached(step)
      due = [
        step % every == 0 or step == num_steps
        for every in (
          config.train.log_every,
          config.train.checkpoint_every,
          config.train.sample_every or num_steps,
        )
      ]
      checkpoint.check_saves(
        mngr, collective=any(due)
      )  # a failed background save stops the run now
      if any(due) or preempted:
        watch.check()  # before anything of this step is logged or written
        saving = due[1] or preempted
        checkpoint.check_room(
          mngr,
          int(one_checkpoint * 1.05) + checkpoint.LOG_ROOM if saving else checkpoint.LOG_ROOM,
          step,
        )
      if step % config.train.log_every == 0 or step == num_steps:
        mean = float(np.mean(jax.device_get(losses)))
        watch.record_mean(step, mean)
        writer.write_scalars(
          step,
          {
            "loss": mean,
            "grad_norm": float(jax.device_get(metrics["grad_norm"])),
            "learning_rate": float(learning_rate(step - 1)),  # of this step's update
            "loss_spikes": len(watch.spikes),
          },
        )
        logging.info("step %d loss %.6f", step, mean)
        losses = []
      if step % config.train.checkpoint_every == 0 or step == num_steps or preempted:
        errors.checked_by_process_0(
          data.check_unchanged
        )  # no checkpoint of a model that read a changed store
        checkpoint.save(mngr, step, state, force=preempted, trained_on=trained_on)
      if write_samples and (step % config.train.sample_every == 0 or step == num_steps):
        write_samples(step, state.ema_params)
      if preempted:
        checkpoint.finish(mngr)
        writer.flush()
        preemption.stop(f"saved step {step} of {num_steps} in {workdir}")
  checkpoint.finish(mngr)
  writer.flush()
  for line in watch.summary():
    logging.warning(line)
    print(f"warning: {line}")
  print(f"trained to step {num_steps}; checkpoints, TensorBoard logs and samples in {workdir}")


if __name__ == "__main__":
  cli.run(main)
