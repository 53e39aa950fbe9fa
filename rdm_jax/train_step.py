"""Model construction, train state, the sharded train step and the EMA, shared by all jobs.

The train state is one pytree (`TrainState`) whose parameter-shaped parts (params, EMA
params, Adam moments) take their shardings from the parameters' logical axis names
through `config.sharding_rules` (see `rdm_jax.parallel.sharding`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rdm_jax import config_base
from rdm_jax.diffusion import schedule as schedule_lib
from rdm_jax.errors import fail
from rdm_jax.models import factory, rarm
from rdm_jax.models.unet import UNet
from rdm_jax.parallel import fsdp, sharding


@flax.struct.dataclass
class LossWindow:
  """The losses and gradient norms of the last W finite steps (ring buffers; `count` steps ever
  recorded), against whose medians the train step judges a spike (`config.train.on_spike`)."""

  loss: jax.Array  # float32 [W]
  grad_norm: jax.Array  # float32 [W]
  count: jax.Array  # int32 []

  @classmethod
  def empty(cls, size: int) -> "LossWindow":
    return cls(
      loss=jnp.zeros((size,), jnp.float32),
      grad_norm=jnp.zeros((size,), jnp.float32),
      count=jnp.zeros((), jnp.int32),
    )

  def full(self) -> jax.Array:
    return self.count >= self.loss.shape[0]

  def medians(self) -> tuple[jax.Array, jax.Array]:
    """The window's median loss and gradient norm (meaningful once it is full)."""
    return jnp.median(self.loss), jnp.median(self.grad_norm)

  def push(self, loss: jax.Array, grad_norm: jax.Array) -> "LossWindow":
    i = self.count % self.loss.shape[0]
    return LossWindow(
      loss=self.loss.at[i].set(loss),
      grad_norm=self.grad_norm.at[i].set(grad_norm),
      count=self.count + 1,
    )


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  losses: LossWindow


# LDM's LambdaLinearScheduler as the RDM configs set it (f_start 1e-6, f_max = f_min = 1;
# CompVis RDM configs/rdm/imagenet.yaml, latent-diffusion ldm/lr_scheduler.py): the factor of
# update n (from 0) is f_start + (1 - f_start) n / warm_up_steps, then 1.
WARMUP_START = 1e-6


DECAYS = ("none", "cosine")


def _after_warmup(config: Any) -> optax.Schedule:
  """The rate after the warm-up: constant (`optim.decay="none"`, LDM's) or a cosine from `optim.lr`
  down to `optim.min_lr_ratio` of it at `train.num_steps` (Loshchilov
  & Hutter 2017, no restarts)."""
  optim = config.optim
  decay = optim.decay
  if decay not in DECAYS:
    fail(f"config.optim.decay={decay!r}; use one of {', '.join(DECAYS)}")
  if decay == "none":
    return optax.constant_schedule(optim.lr)
  steps = max(int(config.train.num_steps) - max(optim.warmup_steps, 1), 1)
  return optax.cosine_decay_schedule(optim.lr, steps, alpha=float(optim.min_lr_ratio))


def optimisation_line(config: Any) -> str:
  """What one update is: the global batch and the learning rate's course (train.batch_size is
  the batch of one update over every device; nothing rescales the rate with it)."""
  t, o = config.train, config.optim
  decay = (
    f", {o.decay} decay to {o.lr * o.min_lr_ratio:g}" if o.decay != "none" else ", then constant"
  )
  return (
    f"global batch {t.batch_size} per update, learning rate {o.lr:g} (AdamW b1 {o.b1:g} b2 "
    f"{o.b2:g}, weight decay {o.weight_decay:g}) after {o.warmup_steps} warm-up steps{decay}, "
    f"{t.num_steps} steps"
  )


def learning_rate(config: Any) -> optax.Schedule:
  """The rate of update n (n = 0 for the first): LDM's linear warm-up from `WARMUP_START` of
  `optim.lr` over `optim.warmup_steps` updates, then `_after_warmup`."""
  optim = config.optim
  return optax.join_schedules(
    [
      optax.linear_schedule(optim.lr * WARMUP_START, optim.lr, max(optim.warmup_steps, 1)),
      _after_warmup(config),
    ],
    [max(optim.warmup_steps, 1)],
  )


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """AdamW with LDM's linear warm-up to a constant rate, optional global-norm clipping of the
  gradients, and optional RMS clipping of each tensor's Adam update (`optim.update_clip`).

  Update clipping is StableAdamW's remedy for loss spikes (Wortsman et al. 2023, Sec. 3.4): a
  tensor whose gradients were tiny for a while has a tiny second moment, and a sudden larger
  gradient then moves it by up to (1 - b1) / sqrt(1 - b2) = 3.2 learning rates per element; the
  update divided by max(1, RMS(update) / update_clip) is bounded by the rate, whatever the
  gradient did. (optax.clip_by_block_rms; Adafactor, Shazeer & Stern 2018, Sec. 6, does the same.)
  """
  optim = config.optim
  lr = learning_rate(config)
  parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
  mu_dtype = optim.mu_dtype or None  # Adam's first moment; None = the parameters' dtype
  mu_dtype = jnp.dtype(mu_dtype) if mu_dtype else None
  eps, update_clip = float(optim.eps), float(optim.update_clip)
  if (
    update_clip > 0
  ):  # adamw's own chain with the clip after Adam's scaling (opt_state[1][0] stays Adam's)
    parts.append(
      optax.chain(
        optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=eps, mu_dtype=mu_dtype),
        optax.clip_by_block_rms(update_clip),
        optax.add_decayed_weights(optim.weight_decay),
        optax.scale_by_learning_rate(lr),
      )
    )
  else:
    parts.append(
      optax.adamw(
        lr, b1=optim.b1, b2=optim.b2, eps=eps, weight_decay=optim.weight_decay, mu_dtype=mu_dtype
      )
    )
  return optax.chain(*parts)


SPIKE_MODES = ("warn", "skip", "stop")


def spike_settings(config: Any) -> tuple[str, float, int]:
  """(on_spike, spike_factor, spike_window) of config.train, checked."""
  train_cfg = config.train
  mode, factor, window = (
    train_cfg.on_spike,
    float(train_cfg.spike_factor),
    int(train_cfg.spike_window),
  )
  if mode not in SPIKE_MODES or not factor > 1 or window < 8:
    fail(
      f"config.train: on_spike={mode!r} (one of {', '.join(SPIKE_MODES)}), spike_factor={factor} "
      f"(> 1), spike_window={window} (>= 8 steps)"
    )
  return mode, factor, window


def new_state(params: Any, tx: optax.GradientTransformation, window: int) -> TrainState:
  """Step 0 of training from `params`: EMA = params, a fresh optimiser state, no losses seen."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=params,
    opt_state=tx.init(params),
    losses=LossWindow.empty(window),
  )


def _init_boxed(
  model: UNet, tx: optax.GradientTransformation, inputs, rng, window: int
) -> TrainState:
  return new_state(model.init(rng, *inputs)["params"], tx, window)


def state_shardings(
  model: UNet, tx, inputs, mesh: Mesh, rules, window: int
) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state, its NamedShardings) from the logical axis names of the params;
  `window`: the loss window's length (config.train.spike_window)."""
  abstract = jax.eval_shape(
    functools.partial(_init_boxed, model, tx, inputs, window=window), jax.random.PRNGKey(0)
  )
  shardings = sharding.logical_shardings(abstract, mesh, rules)
  return nn.meta.unbox(abstract), shardings


def init_state(model: UNet, tx, inputs, rng, shardings: TrainState, window: int) -> TrainState:
  """Initialises the state directly into its shardings (no full copy on one device); `window`:
  the loss window's length, as given to `state_shardings`."""
  init = jax.jit(
    lambda r: nn.meta.unbox(_init_boxed(model, tx, inputs, r, window)), out_shardings=shardings
  )
  return init(rng)


def ema_decay(decay: float, num_updates: jax.Array) -> jax.Array:
  """LDM's LitEma: min(decay, (1 + n) / (10 + n)), n counting this update (the first is 2/11)."""
  n = num_updates.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def make_train_step(
  config: Any, model: UNet, tx, sched: schedule_lib.Schedule, layout: FsdpLayout | None = None
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple[TrainState, dict]]:
  """(state, z0 [B,H,W,C], context [B,k,d], rng) -> (state, metrics); the eps-MSE of Eq. 3 (or the
  v-MSE, min-SNR weighted: config.diffusion, schedule.diffusion_loss) (for RARM:
  z0 = tokens [B, S], next-token cross-entropy of Eq. 4).

  With probability `config.train.p_uncond` an example's context is replaced by zeros,
  the unconditional branch that classifier-free guidance samples against. A step whose
  loss or gradient norm is not finite changes nothing but the step counter (so no NaN
  reaches the parameters, the optimiser or the EMA) and reports metrics["finite"] = False;
  the train loop stops on it or skips it (config.train.nonfinite).

  A spike: once the state's window holds `config.train.spike_window` finite steps, a loss or a
  gradient norm above `spike_factor` times the window's median (metrics["spike"], beside
  metrics["loss_median"] and ["grad_norm_median"]). The gradient norm rises first: the demo at
  twice its learning rate broke after one step of 12x the median gradient norm and 4x the
  median loss (benchmarks/RESULTS.md, "The demo on any x86 machine"). With `on_spike="skip"`
  such a step changes nothing but the step counter and the window, as a non-finite one;
  otherwise it trains and the loop warns (or stops). Every finite step enters the window,
  spikes too, so a level that stays high becomes the new median and is trained on.

  With a `layout` (`fsdp_layout`: the batch axes shard parameters), the loss and its gradient
  run manual over the batch axes (`parallel.fsdp`): parameters all-gathered, their gradients
  reduce-scattered. The same draws (t, noise, dropped contexts) of the whole batch either way.
  """
  p_uncond = config.train.p_uncond
  on_spike, spike_factor, _ = spike_settings(config)
  decay = config.optim.ema_decay
  autoregressive = isinstance(model, rarm.RARM)
  weighting = config.diffusion.loss_weighting
  gamma = float(config.diffusion.min_snr_gamma)
  x0_bound = float(config.diffusion.x0_bound)

  def step(state: TrainState, z0, context, rng):
    rng = jax.random.fold_in(rng, state.step)
    drop_rng, loss_rng = jax.random.split(rng)
    if p_uncond > 0:
      keep = jax.random.uniform(drop_rng, (context.shape[0], 1, 1)) >= p_uncond
      context = jnp.where(keep, context, 0.0)

    def loss_fn(params, z0, context, *draws):
      if autoregressive:  # z0: tokens [B, S]; Eq. 4's next-token cross-entropy
        return rarm.nll(model.apply({"params": params}, z0, context), z0)
      return schedule_lib.diffusion_loss(
        lambda z_t, t: model.apply({"params": params}, z_t, t, context),
        sched,
        z0,
        None,
        weighting,
        gamma,
        draws=draws,
        x0_bound=x0_bound,
      )

    batch = (
      (z0, context)
      if autoregressive
      else (z0, context, *schedule_lib.draw_t_and_noise(sched, z0.shape, loss_rng))
    )
    if layout is None:
      loss, grads = jax.value_and_grad(loss_fn)(state.params, *batch)
    else:
      loss, grads = fsdp.value_and_grad(
        loss_fn,
        layout.mesh,
        layout.param_shardings,
        layout.batch_axes,
        layout.cast,
        layout.dtype,
        ("fsdp", layout.fsdp_outer),
      )(state.params, *batch)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    loss_median, grad_median = state.losses.medians()
    spike = (
      finite
      & state.losses.full()
      & ((loss > spike_factor * loss_median) | (grad_norm > spike_factor * grad_median))
    )
    losses = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old), state.losses.push(loss, grad_norm), state.losses
    )
    apply = finite & ~spike if on_spike == "skip" else finite

    def update(state: TrainState) -> TrainState:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      d = ema_decay(decay, state.step + 1)  # LitEma increments num_updates before using it
      ema = jax.tree.map(lambda e, p: e - (1.0 - d) * (e - p), state.ema_params, params)
      return state.replace(
        step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state, losses=losses
      )

    # A branch, not a select of every leaf: jnp.where(finite, new, old) reads each donated
    # buffer after its update is written, so XLA copies every parameter, moment and EMA
    # leaf first.
    new_state = jax.lax.cond(
      apply, update, lambda s: s.replace(step=s.step + 1, losses=losses), state
    )
    return new_state, {
      "loss": loss,
      "grad_norm": grad_norm,
      "finite": finite,
      "spike": spike,
      "loss_median": loss_median,
      "grad_norm_median": grad_median,
    }

  return step


@dataclasses.dataclass(frozen=True)
class FsdpLayout:
  """What the explicit FSDP gradient (`parallel.fsdp.value_and_grad`) needs: the mesh, the
  parameters' shardings, the batch axes, which parameters to cast to `dtype` before gathering."""

  mesh: Mesh
  param_shardings: Any
  batch_axes: tuple
  cast: Any
  dtype: Any
  fsdp_outer: int = (
    1  # > 1: gathered in two stages, within and across this many groups (fsdp.split_mesh)
  )


def fsdp_layout(
  config: Any, model: Any, inputs: tuple, mesh: Mesh, rules, abstract_params: Any, params_sh: Any
) -> FsdpLayout | None:
  """The layout of an explicit FSDP gradient when a batch axis of more than one device shards
  some parameter (mesh.fsdp > 1 by the default rules) and no other axis is in use; None
  otherwise: GSPMD's all-reduce is what data parallelism needs, and beside tensor parallelism
  GSPMD's own choices moved fewer bytes (on 8 CPU devices, fsdp 4 x tensor 2: 27 MB a step
  against 31 MB for the explicit gradient, whose gathered kernels GSPMD regathers over tensor)."""
  batch_axes = sharding.axes_of(dict(rules).get("batch"))
  sharding_axes = {
    a
    for s in jax.tree.leaves(params_sh, is_leaf=lambda x: isinstance(x, NamedSharding))
    for entry in s.spec
    for a in sharding.axes_of(entry)
  }
  if not any(mesh.shape[a] > 1 for a in set(batch_axes) & sharding_axes):
    return None
  if any(mesh.shape[a] > 1 for a in mesh.axis_names if a not in batch_axes):
    return None
  dtype = jnp.dtype(config.model.dtype)
  cast = fsdp.cast_before_gather(
    lambda p, *xs: model.apply({"params": p}, *xs), abstract_params, inputs, dtype
  )
  outer = config.mesh.fsdp_outer
  if (
    not outer
    and "fsdp" in batch_axes
    and mesh.shape["fsdp"] >= 4
    and mesh.devices.flat[0].platform != "cpu"
  ):
    outer = fsdp.choose_outer(mesh, batch_axes, params_sh, abstract_params, cast, dtype)
  return FsdpLayout(mesh, params_sh, batch_axes, cast, dtype, max(1, outer))


def batch_shardings(
  mesh: Mesh, rules, latent_ndim: int
) -> tuple[NamedSharding, NamedSharding, NamedSharding]:
  """The train step's input shardings of (z0, context, rng): the batch dimension over the
  batch axes, the rng replicated. `latent_ndim` counts z0's dimensions, batch included."""
  return (
    sharding.batch_sharding(mesh, rules, latent_ndim),
    sharding.batch_sharding(mesh, rules, 3),
    NamedSharding(mesh, P()),
  )


def jit_train_step(step_fn, state_sh: TrainState, mesh: Mesh, rules, latent_ndim: int):
  """jax.jit with explicit in/out shardings and the state donated."""
  z_sh, c_sh, replicated = batch_shardings(mesh, rules, latent_ndim)
  return jax.jit(
    step_fn,
    in_shardings=(state_sh, z_sh, c_sh, replicated),
    out_shardings=(state_sh, replicated),
    donate_argnums=(0,),
  )


@dataclasses.dataclass
class TrainSetup:
  """Everything `rdm_jax.train` compiles, built once by `setup_training` (also what
  `rdm_jax.compile` lowers for a TPU topology): the model, optimiser and schedule, the
  abstract train state with its shardings, and the jitted, sharded, state-donating step."""

  model: Any
  tx: optax.GradientTransformation
  sched: schedule_lib.Schedule
  inputs: tuple
  abstract: TrainState
  state_sh: TrainState
  train_step: Any
  latent_shape: tuple
  mesh: Mesh
  rules: list
  layout: FsdpLayout | None = (
    None  # the explicit FSDP gradient's, when the batch axes shard parameters
  )

  def batch_specs(self, config: Any, batch: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract (z0, context, rng) of a global batch with the step's input shardings."""
    z_sh, c_sh, rng_sh = batch_shardings(self.mesh, self.rules, 1 + len(self.latent_shape))
    z_dtype = jnp.int32 if config_base.model_family(config) == "rarm" else jnp.float32
    z = jax.ShapeDtypeStruct((batch,) + tuple(self.latent_shape), z_dtype, sharding=z_sh)
    c = jax.ShapeDtypeStruct(
      (batch, config.k_train, config.retrieval.embed_dim), jnp.float32, sharding=c_sh
    )
    return z, c, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rng_sh)

  def init_state(self, rng: jax.Array) -> TrainState:
    """A freshly initialised train state, placed in its shardings."""
    return init_state(
      self.model, self.tx, self.inputs, rng, self.state_sh, self.abstract.losses.loss.shape[0]
    )

  def state_specs(self) -> TrainState:
    """The abstract train state with its shardings (ShapeDtypeStructs, for lowering)."""
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract, self.state_sh
    )


def setup_training(
  config: Any, latent_shape: tuple, mesh: Mesh, tx: optax.GradientTransformation | None = None
) -> TrainSetup:
  """The model, optimiser, schedule, state shardings and jitted train step of `config` on `mesh`
  (restoring a checkpoint needs the same abstract state and shardings). `tx` replaces
  `make_optimizer(config)` (tests pin the update rule)."""
  rules = [tuple(r) for r in config.sharding_rules]
  model = factory.make_model(config, list(mesh.devices.flat), latent_shape)
  sched = factory.make_schedule(config)
  tx = make_optimizer(config) if tx is None else tx
  inputs = factory.example_inputs(config, 1, latent_shape, config.k_train)
  abstract, state_sh = state_shardings(model, tx, inputs, mesh, rules, spike_settings(config)[2])
  layout = fsdp_layout(config, model, inputs, mesh, rules, abstract.params, state_sh.params)
  step = jit_train_step(
    make_train_step(config, model, tx, sched, layout), state_sh, mesh, rules, len(latent_shape) + 1
  )
  return TrainSetup(
    model, tx, sched, inputs, abstract, state_sh, step, tuple(latent_shape), mesh, rules, layout
  )
