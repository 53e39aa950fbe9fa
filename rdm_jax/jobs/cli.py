"""What every job entry point shares: the --config flag and one-line user errors."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rdm_jax.errors import UserError, fail, run_main  # noqa: E402,F401

CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py).", lock_config=True
)
VERIFY = flags.DEFINE_bool(
  "verify",
  False,
  "Check the sha256 of every store read against its manifest (always done for stores up to 1 GiB).",
)
VERBOSE = flags.DEFINE_bool(
  "verbose", False, "Show the Python traceback of an error instead of one line."
)


_OWN: dict[str, dict[str, tuple[Any, str]]] = {}  # module -> flag -> (its default, its help)


def define_once(define, name: str, default, help_text: str):
  """`define(name, default, help_text)` (a flags.DEFINE_*), or the flag of that name when another
  job module imported into the same program defined it first: the data jobs share --parts,
  --process_id and --num_processes, and a program (a test) may import several jobs. Each module's
  default and help are kept; `parse_flags` gives the shared flags those of the job being run."""
  module = sys._getframe(1).f_globals.get("__name__", "")
  _OWN.setdefault(module, {})[name] = (default, help_text)
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return define(name, default, help_text)


def _own_defaults(module: str) -> None:
  """The shared flags take the default and help of `module`'s definitions (the job being run)."""
  for name, (default, help_text) in _OWN.get(module, {}).items():
    flags.FLAGS.set_default(name, default)
    flags.FLAGS[name].help = help_text


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax and XLA's backend probing; warnings still pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    noisy = "/orbax/" in record.pathname or record.pathname.endswith("xla_bridge.py")
    return record.levelno >= logging.WARNING or not noisy


class _RetrievedElsewhere(logging.Filter):
  """Drops asyncio's "exception was never retrieved" dumps: orbax's failed background writes leave
  one per array, and the job reports the failure itself in one line (`checkpoint.check_saves`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


def _config_arg(argv: list[str]) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _innermost(e: BaseException) -> BaseException:
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  return e


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a missing or broken config file, an override of an unknown field
  (with ml_collections' "did you mean"), or a bad flag value is one line and exit status 2."""
  verbose = "--verbose" in argv
  _own_defaults("__main__")

  def stop(message: str):
    if verbose:
      raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    stop(f"{e} (--helpshort lists the flags)")
  except KeyError as e:  # an override of a field the config does not have
    hint = str(e.args[0]) if e.args else str(e)
    stop("unknown config field in an override: " + " ".join(hint.strip("'\"").split()))
  except Exception as e:  # noqa: BLE001  config_flags loads the file and applies overrides here
    stop(f"--config={_config_arg(argv)}: {type(_innermost(e)).__name__}: {_innermost(e)}")
  try:
    CONFIG.value.keys()  # a config file that failed to load raises only when first read
  except Exception as e:  # noqa: BLE001
    cause = _innermost(e)
    path = _config_arg(argv)
    if isinstance(cause, FileNotFoundError) or (path and not os.path.isfile(path.split(":")[0])):
      stop(f"--config={path}: no such config file (the configs are in configs/*.py)")
    stop(f"--config={path} does not load: {type(cause).__name__}: {cause}")
  return rest


def run(main) -> None:
  """app.run with UserError -> one-line message, exit status 2; --verify checks every store read."""
  from rdm_jax.data import store

  def with_flags(argv):
    store.verify_all_stores(VERIFY.value)
    return main(argv)

  flags.mark_flags_as_required(["config"])
  logging.getLogger("absl").addFilter(_QuietLibraries())
  logging.getLogger("asyncio").addFilter(_RetrievedElsewhere())
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # backend probing chatter
  app.run(run_main(with_flags, lambda: VERBOSE.value), flags_parser=parse_flags)


def check_platform(config) -> None:
  """The platform check of a job that runs the model without training it (sample, context
  ablation): a lever this platform lacks stops the job with a UserError; warnings (bfloat16 on
  CPU) are printed by process 0. The train job logs the check's fuller form itself."""
  import jax

  from rdm_jax.parallel import mesh

  warnings = mesh.check_platform(config, training=False)[1]
  if jax.process_index() == 0:
    for warning in warnings:
      print(f"warning: {warning}")


_HELD: dict = {}  # output path -> the Lock this process holds on it until it exits


OUTPUT_ROOM = 1 << 20  # the least free space a run directory starts with (records, logs, PNGs)


def hold_output(path: str, what: str, create: bool = True) -> None:
  """One writer per output directory: `path` is checked writable (and with `create` made), then
  process 0 takes `<path>.lock` for the rest of the job (the stores' lock: holder, host, start
  time, heartbeat). A disk with less than `OUTPUT_ROOM` free is one line.
  A live holder, a second launch of the job, is refused in one line naming it, on every process
  of this launch. Run directories in a bucket (gs://) have no lock: object stores offer no
  atomic create, so two launches there are the user's to avoid."""
  import atexit

  from rdm_jax import errors, files
  from rdm_jax.data.lock import Lock

  files.prepare_output_dir(path, what, create)
  files.need_room(path, OUTPUT_ROOM, what)
  errors.OUTPUTS.append(path)

  def lock() -> None:
    if files.is_uri(path) or path in _HELD:  # held: a job run in-process again
      return
    _HELD[path] = Lock(path).acquire(
      wait=False,
      busy=f": another launch of this job is writing {what} "
      f"{path}; wait for it to finish, or choose another path",
    )
    atexit.register(_HELD[path].release)

  errors.checked_by_process_0(lock)
