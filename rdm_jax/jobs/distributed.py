"""The multi-host flags of the jobs that run one program over all processes (train, sample)."""

from __future__ import annotations

import jax
from absl import flags

from rdm_jax.jobs import cli

DISTRIBUTED = cli.define_once(
  flags.DEFINE_bool,
  "distributed",
  False,
  "Call jax.distributed.initialize (multi-host). On TPU pods and SLURM the cluster is detected; "
  "elsewhere give the flags below.",
)
COORDINATOR = cli.define_once(
  flags.DEFINE_string, "coordinator_address", None, "host:port of process 0 (multi-host)."
)
NUM_PROCESSES = cli.define_once(
  flags.DEFINE_integer, "num_processes", None, "Number of processes (multi-host)."
)
PROCESS_ID = cli.define_once(
  flags.DEFINE_integer, "process_id", None, "This process's index (multi-host)."
)


def initialize() -> None:
  """jax.distributed.initialize when --distributed is given (before any other JAX call)."""
  if DISTRIBUTED.value:
    jax.config.update(
      "jax_cpu_collectives_implementation", "gloo"
    )  # CPU hosts (tests); others ignore it
    jax.distributed.initialize(
      coordinator_address=COORDINATOR.value,
      num_processes=NUM_PROCESSES.value,
      process_id=PROCESS_ID.value,
    )
