r"""docs/training.md's pod table: `rdm_jax.compile` for configs/imagenet_rdm.py at the paper's batch
on several TPU slices, data parallel against FSDP, remat off and on.

  python benchmarks/compile_table.py [--rows=v5e-64:dp:none,v5e-64:fsdp:full] [--reports=DIR]

Each row compiles the train step for its slice through libtpu's compile-only client (about
10 minutes per row on a 2-core host) and writes its report to --reports/<row>.json; a row whose
report is already there is read, not compiled again. Prints the table as Markdown. The
images/s column is an upper bound: the chip's dense bf16 peak over the model's FLOPs per
example (3 x forward), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = (
  "v5e-64:dp:none",
  "v5e-64:fsdp:none",
  "v5e-64:dp:full",
  "v5e-64:fsdp:full",
  "v5e-32:fsdp:full",
  "v5e-256:dp:none",
  "v4-64:dp:none",
  "v5p-64:dp:none",
)
MESH = {"dp": [], "fsdp": ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]}


def run_row(row: str, reports: str, config: str, batch: int) -> dict:
  topology, mesh, remat = row.split(":")
  path = os.path.join(reports, row.replace(":", "_") + ".json")
  if not os.path.exists(path):
    cmd = [
      sys.executable,
      "-m",
      "rdm_jax.compile",
      f"--config={config}",
      f"--topology={topology}",
      "--steps=train",
      f"--out={path}",
      f"--config.model.remat={remat}",
      *MESH[mesh],
    ] + ([f"--batch={batch}"] if batch else [])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if not os.path.exists(path):
      raise SystemExit(f"{row}: the compile tool wrote no report:\n{proc.stderr[-2000:]}")
  with open(path) as f:
    return json.load(f)


def table_row(row: str, r: dict) -> str:
  _, mesh, remat = row.split(":")
  t = r["train"]
  per_chip = t["global_batch"] // r["chips"]
  if not t["fits"]:
    return (
      f"| {r['topology']} | {mesh} | {remat} | {per_chip} | does not fit: {t['error'][:90]} | | | "
      f"{t['compile_seconds']:.0f} |"
    )
  m = t["memory"]
  gib = 2**30
  return (
    f"| {r['topology']} | {mesh} | {remat} | {per_chip} | {m['total_bytes'] / gib:.1f} of "
    f"{r['hbm_gib_per_chip']:g} (args {m['argument_bytes'] / gib:.1f}, temps "
    f"{m['temp_bytes'] / gib:.1f}) | {t['model_flops_per_chip'] / 1e12:.1f} "
    f"({t['compiler_flops_per_chip'] / 1e12:.1f}) | "
    f"{t['best_case_examples_per_second_per_chip']:.0f} | {t['compile_seconds']:.0f} |"
  )


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--rows", default=",".join(ROWS), help="topology:dp|fsdp:none|full|dots, comma-separated"
  )
  p.add_argument("--reports", default="runs/compile_reports")
  p.add_argument("--config", default="configs/imagenet_rdm.py")
  p.add_argument(
    "--batch", type=int, default=0, help="global batch; 0 = the config's (the paper's 1280)"
  )
  a = p.parse_args()
  os.makedirs(a.reports, exist_ok=True)
  print(
    "| slice | mesh | remat | batch per chip | GiB per chip (HBM) | model TFLOP per chip per "
    "step (compiler's) | best-case images/s per chip (bf16 peak, upper bound) | compile s |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for row in a.rows.split(","):
    print(table_row(row, run_row(row, os.path.abspath(a.reports), a.config, a.batch)), flush=True)


if __name__ == "__main__":
  main()
