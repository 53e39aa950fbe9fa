"""What the train loop checks of each step's metrics without waiting on the device every step:
non-finite steps, loss and gradient-norm spikes (judged in the step, `train_step.make_train_step`),
and, at the end, a loss that never came back down."""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

from rdm_jax.data import pipeline
from rdm_jax.errors import fail


class StepWatch:
  """Collects each step's `finite` and `spike` flags and checks them in one transfer when asked
  (before logging, checkpoints and samples), so the loop does not wait on the device every step.

  Non-finite loss or gradients (`nonfinite`): "stop": an error naming the step and its examples
  (the step itself changed nothing; the newest checkpoint is from before it); "skip": a warning,
  training goes on. A spike of the loss or the gradient norm (`on_spike`, judged in the step:
  train_step.make_train_step): a warning with the step, both against the window's medians and the
  batch's example ids; "skip" says the step changed nothing; "stop" ends the run as a non-finite
  step does. `summary()` is the run's last word on them, and on a loss that never came back down.
  """

  def __init__(
    self, nonfinite: str, on_spike: str, example_ids, seed: int, batch_size: int, variants: int = 1
  ):
    if nonfinite not in ("stop", "skip"):
      fail(f"config.train.nonfinite={nonfinite!r}; use 'stop' or 'skip'")
    self.nonfinite, self.on_spike = nonfinite, on_spike
    self.example_ids, self.seed, self.batch_size, self.variants = (
      example_ids,
      seed,
      batch_size,
      variants,
    )
    self.pending: list[tuple[int, dict]] = []
    self.skipped = 0
    self.spikes: list[int] = []
    self.means: list[tuple[int, float]] = []  # (step, mean loss of the log interval ending there)

  def batch_ids(self, step: int) -> np.ndarray:
    """Example ids of the global batch of train step `step` (loop steps count from 1)."""
    rows = pipeline.example_indices(
      self.seed, step - 1, self.batch_size, len(self.example_ids), variants=self.variants
    )
    return np.asarray(self.example_ids[rows])

  def _shown(self, step: int) -> str:
    ids = self.batch_ids(step)
    return ", ".join(map(str, ids[:32])) + (f", ... ({len(ids)} in all)" if len(ids) > 32 else "")

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append(
      (
        step,
        {
          k: metrics[k]
          for k in ("finite", "spike", "loss", "loss_median", "grad_norm", "grad_norm_median")
        },
      )
    )

  def check(self) -> None:
    got = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending = []
    for step, m in zip(steps, got):
      if not m["finite"]:
        if self.nonfinite == "stop":
          fail(
            f"step {step}: the loss or the gradients are not finite (NaN/inf); stopped before any "
            f"checkpoint of it. Batch example ids: {self._shown(step)}. Lower config.optim.lr, "
            "check those examples, or set --config.train.nonfinite=skip to skip such steps; "
            "rerunning resumes from the newest checkpoint"
          )
        self.skipped += 1
        logging.warning(
          "step %d: non-finite loss or gradients; update skipped (%d so far). Batch example "
          "ids: %s",
          step,
          self.skipped,
          self._shown(step),
        )
      elif m["spike"]:
        self.spikes.append(step)
        what = (
          f"step {step}: spike: loss {float(m['loss']):.4g} against the window's median "
          f"{float(m['loss_median']):.4g} ({float(m['loss']) / float(m['loss_median']):.1f}x), "
          f"gradient norm {float(m['grad_norm']):.4g} against {float(m['grad_norm_median']):.4g} "
          f"({float(m['grad_norm']) / float(m['grad_norm_median']):.1f}x)"
        )
        if self.on_spike == "stop":
          fail(
            f"{what}; stopped before any checkpoint of it (config.train.on_spike=stop). Batch "
            f"example ids: {self._shown(step)}. Lower config.optim.lr, check those examples, or "
            "set --config.train.on_spike=skip; rerunning resumes from the newest checkpoint"
          )
        logging.warning(
          "%s; %s (%d so far). Batch example ids: %s",
          what,
          "update skipped" if self.on_spike == "skip" else "trained on it",
          len(self.spikes),
          self._shown(step),
        )

  def record_mean(self, step: int, mean: float) -> None:
    self.means.append((step, mean))

  def summary(self, regression: float = 2.0) -> list[str]:
    """Warnings about the run as a whole: its spikes, and a last logged mean loss above
    `regression` times the lowest one logged (a loss that jumped and never came back)."""
    lines = []
    if self.spikes:
      shown = ", ".join(map(str, self.spikes[:10])) + (", ..." if len(self.spikes) > 10 else "")
      lines.append(
        f"{len(self.spikes)} spike(s) of the loss or gradient norm at step(s) {shown} "
        f"({'skipped' if self.on_spike == 'skip' else 'trained on'}; the warnings above "
        "name their batches)"
      )
    if len(self.means) >= 3:
      best_step, best = min(self.means[:-1], key=lambda sm: sm[1])
      last_step, last = self.means[-1]
      if last > regression * best:
        lines.append(
          f"the loss did not come back down: {last:.4g} over the steps to {last_step} against "
          f"{best:.4g} to step {best_step} ({last / best:.1f}x); this model is likely broken: "
          "check the loss curve (TensorBoard) and the samples before using it"
        )
    return lines
