r"""Compile the train and sampling steps for a TPU slice on this host, before booking it.

  python -m rdm_jax.compile --config=configs/imagenet_rdm.py --topology=v5e-64 \
      [--config.mesh.fsdp=8] [--config.model.remat=full] [--batch=1280] [--out=report.json]

libtpu's compile-only client (`pip install -e '.[tpu]'`) compiles for the slice here (on a
CPU host too), exactly the programs `rdm_jax.train` would run there: same model, state
shardings and jitted step (`train_step.setup_training`). It prints, and writes as JSON with
--out: memory per chip (arguments, temporaries, outputs, aliased) against the chip's HBM, or
the compiler's out-of-memory message in one line; FLOPs per step from the compiler and from
the model's matmuls and convolutions; the collectives by kind with their bytes; compile time.
Exit status 1 when a step does not fit (the report is still written). No data, stores or
weights are read.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

from absl import flags

from rdm_jax.jobs import cli

from rdm_jax import files  # noqa: E402
from rdm_jax.errors import UserError  # noqa: E402
from rdm_jax import aot  # noqa: E402

_TOPOLOGY = cli.define_once(
  flags.DEFINE_string, "topology", None, "TPU slice as booked: v5e-64, v4-8, v5p-128, v6e-256, ..."
)
_BATCH = cli.define_once(
  flags.DEFINE_integer, "batch", 0, "Global train batch; 0 = config.train.batch_size."
)
_SAMPLE_BATCH = cli.define_once(
  flags.DEFINE_integer, "sample_batch", 0, "Sampling batch; 0 = config.sample.batch_size."
)
_STEPS = cli.define_once(
  flags.DEFINE_list, "steps", ["train", "sample"], "Which steps to compile: train, sample."
)
_OUT = cli.define_once(
  flags.DEFINE_string, "out", "", "Write the report here as JSON (written whole, then renamed)."
)
_HLO = cli.define_once(
  flags.DEFINE_string,
  "hlo",
  "",
  "Also write the compiled train step's HLO text here (where each collective is).",
)
_SERIALIZE = cli.define_once(
  flags.DEFINE_string,
  "serialize",
  "",
  "Also write the compiled train step here (jax.experimental.serialize_executable; loads only "
  "with the same jax and libtpu).",
)


def _check_output(path: str, ours) -> None:
  """Refuses to replace a file at `path` unless `ours(its text)` says this tool wrote it."""
  if not path or not files.exists(path):
    return
  try:
    mine = files.isfile(path) and ours(files.read_text(path))
  except (ValueError, UnicodeDecodeError, UserError):
    mine = False
  if not mine:
    cli.fail(f"{path} exists and is not a report of this tool; choose another path or move it away")


def compile_report(
  config: Any,
  topology: str,
  batch: int,
  sample_batch: int,
  steps: Sequence[str] = ("train", "sample"),
  out: str = "",
  hlo: str = "",
  serialize: str = "",
) -> bool:
  """Compiles config's `steps` for `topology` (aot.report), prints the summary and writes the
  report to `out`, the train step's HLO to `hlo` and its serialized executable to `serialize`
  (each when given). Returns whether every step fits the chips' memory."""
  if not topology:
    cli.fail("--topology is required, e.g. --topology=v5e-64")
  unknown = set(steps) - {"train", "sample"}
  if unknown:
    cli.fail(f"--steps: unknown {sorted(unknown)}; use train and/or sample")
  _check_output(out, lambda text: "libtpu_topology" in json.loads(text))
  _check_output(serialize, lambda text: False)
  _check_output(hlo, lambda text: False)
  r = aot.report(config, topology, batch, sample_batch, tuple(steps))
  compiled = {k: r[k].pop("_compiled", None) for k in ("train", "sample") if k in r}
  print(aot.summary(r))
  if out:
    files.atomic_write_text(out, json.dumps(r, indent=1) + "\n")
    print(f"report: {out}")
  if hlo:
    if compiled.get("train") is None:
      cli.fail("--hlo: the train step did not compile (see above)")
    files.atomic_write_text(hlo, compiled["train"].as_text())
    print(f"compiled train step's HLO: {hlo}")
  if serialize:
    if compiled.get("train") is None:
      cli.fail("--serialize: the train step did not compile (see above)")
    from jax.experimental import serialize_executable

    payload, _, _ = serialize_executable.serialize(compiled["train"])
    files.atomic_write(serialize, lambda f: f.write(payload))
    print(f"compiled train step: {serialize}")
  return all(r[k]["fits"] for k in ("train", "sample") if k in r)


def main(argv):
  del argv
  fits = compile_report(
    cli.CONFIG.value,
    _TOPOLOGY.value or "",
    _BATCH.value,
    _SAMPLE_BATCH.value,
    tuple(_STEPS.value),
    _OUT.value or "",
    _HLO.value or "",
    _SERIALIZE.value or "",
  )
  if not fits:
    sys.exit(1)  # the report is written; a sweep script sees which configurations do not fit


if __name__ == "__main__":
  cli.run(main)
