r"""Compile the train and sampling steps for a TPU slice on this host, before booking it.

  python -m rdm_jax.compile --config=configs/imagenet_rdm.py --topology=v5e-64 \
      [--config.mesh.fsdp=8] [--config.model.remat=full] [--batch=1280] [--out=report.json]

libtpu's compile-only client (`pip install -e '.[tpu]'`) compiles for the slice here (on a
CPU host too), exactly the programs `rdm_jax.train` would run there: same model, state
shardings and jitted step (`training.setup_training`). It prints, and writes as JSON with
--out: memory per chip (arguments, temporaries, outputs, aliased) against the chip's HBM, or
the compiler's out-of-memory message in one line; FLOPs per step from the compiler and from
the model's matmuls and convolutions; the collectives by kind with their bytes; compile time.
Exit status 1 when a step does not fit (the report is still written). No data, stores or
weights are read.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from rdm_jax.jobs import cli

from rdm_jax import files  # noqa: E402
from rdm_jax.errors import UserError  # noqa: E402
from rdm_jax import aot  # noqa: E402

_TOPOLOGY = flags.DEFINE_string(
  "topology", None, "TPU slice as booked: v5e-64, v4-8, v5p-128, v6e-256, ..."
)
_BATCH = flags.DEFINE_integer("batch", 0, "Global train batch; 0 = config.train.batch_size.")
_SAMPLE_BATCH = flags.DEFINE_integer(
  "sample_batch", 0, "Sampling batch; 0 = config.sample.batch_size."
)
_STEPS = flags.DEFINE_list("steps", ["train", "sample"], "Which steps to compile: train, sample.")
_OUT = flags.DEFINE_string(
  "out", "", "Write the report here as JSON (written whole, then renamed)."
)
_HLO = flags.DEFINE_string(
  "hlo", "", "Also write the compiled train step's HLO text here (where each collective is)."
)
_SERIALIZE = flags.DEFINE_string(
  "serialize",
  "",
  "Also write the compiled train step here "
  "(jax.experimental.serialize_executable; loads only with the same jax and libtpu).",
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


def main(argv):
  del argv
  if not _TOPOLOGY.value:
    cli.fail("--topology is required, e.g. --topology=v5e-64")
  unknown = set(_STEPS.value) - {"train", "sample"}
  if unknown:
    cli.fail(f"--steps: unknown {sorted(unknown)}; use train and/or sample")
  _check_output(_OUT.value, lambda text: "libtpu_topology" in json.loads(text))
  _check_output(_SERIALIZE.value, lambda text: False)
  _check_output(_HLO.value, lambda text: False)
  r = aot.report(
    cli.CONFIG.value, _TOPOLOGY.value, _BATCH.value, _SAMPLE_BATCH.value, tuple(_STEPS.value)
  )
  compiled = {k: r[k].pop("_compiled", None) for k in ("train", "sample") if k in r}
  print(aot.summary(r))
  if _OUT.value:
    files.atomic_write_text(_OUT.value, json.dumps(r, indent=1) + "\n")
    print(f"report: {_OUT.value}")
  if _HLO.value:
    if compiled.get("train") is None:
      cli.fail("--hlo: the train step did not compile (see above)")
    files.atomic_write_text(_HLO.value, compiled["train"].as_text())
    print(f"compiled train step's HLO: {_HLO.value}")
  if _SERIALIZE.value:
    if compiled.get("train") is None:
      cli.fail("--serialize: the train step did not compile (see above)")
    from jax.experimental import serialize_executable

    payload, _, _ = serialize_executable.serialize(compiled["train"])
    files.atomic_write(_SERIALIZE.value, lambda f: f.write(payload))
    print(f"compiled train step: {_SERIALIZE.value}")
  if not all(r[k]["fits"] for k in ("train", "sample") if k in r):
    sys.exit(1)  # the report is written; a sweep script sees which configurations do not fit


if __name__ == "__main__":
  cli.run(main)
