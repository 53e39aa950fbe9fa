"""What every job entry point shares: the --config flag and one-line user errors."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rdm_jax.errors import fail, run_main  # noqa: E402,F401

CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                         lock_config=True)
VERIFY = flags.DEFINE_bool("verify", False, "Check the sha256 of every store read against its manifest "
                           "(always done for stores up to 1 GiB).")


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax and XLA's backend probing; warnings still pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = "/orbax/" in record.pathname or record.pathname.endswith("xla_bridge.py")
    return record.levelno >= logging.WARNING or not noisy


def run(main) -> None:
  """app.run with UserError -> one-line message, exit status 2; --verify checks every store read."""
  from rdm_jax.data import store

  def with_flags(argv):
    store.verify_all_stores(VERIFY.value)
    return main(argv)

  flags.mark_flags_as_required(["config"])
  logging.getLogger("absl").addFilter(_QuietLibraries())
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # backend probing chatter
  app.run(run_main(with_flags))
