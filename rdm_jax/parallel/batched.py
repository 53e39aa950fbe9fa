"""Inference over a host array in fixed-size batches, split over this process's devices.

Used by the offline jobs that map many images through one network (feature extractors,
first stages, retrieval encoders): parameters replicated, each batch sharded over a 1-D
mesh of the local devices, the last batch padded so that one compiled shape serves all.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class BatchedApply:
  """`fn(params, batch) -> pytree of [B, ...] arrays`, applied to [N, ...] host arrays.

  The batch is rounded up to a multiple of the local device count; `host_preprocess`
  (optional) maps each padded host batch before it goes to the devices.
  """

  def __init__(
    self,
    fn: Callable[[Any, jax.Array], Any],
    params: Any,
    batch_size: int,
    host_preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
  ):
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("data",))
    self.sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    self.batch = -(-batch_size // len(devices)) * len(devices)
    self.fn = jax.jit(fn, in_shardings=(replicated, self.sharded), out_shardings=self.sharded)
    self.params = jax.device_put(params, replicated)
    self.host_preprocess = host_preprocess

  def __call__(
    self, inputs: np.ndarray, log: Callable[[str], None] | None = None, what: str = "items"
  ) -> Any:
    """The outputs for all N inputs, as a pytree of host arrays [N, ...]."""
    if len(inputs) == 0:
      raise ValueError(f"no {what} to process")
    outs = []
    t0 = last = time.time()
    for a in range(0, len(inputs), self.batch):
      chunk = np.asarray(inputs[a : a + self.batch])
      n = len(chunk)
      if n < self.batch:  # pad the last batch: one compiled shape
        chunk = np.concatenate([chunk, np.zeros((self.batch - n,) + chunk.shape[1:], chunk.dtype)])
      if self.host_preprocess is not None:
        chunk = self.host_preprocess(chunk)
      out = self.fn(self.params, jax.device_put(chunk, self.sharded))
      outs.append(jax.tree.map(lambda x, n=n: np.asarray(x)[:n], out))
      if log and time.time() - last > 10:
        last = time.time()
        log(f"{a + n}/{len(inputs)} {what} ({(a + n) / (last - t0):.0f}/s)")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
