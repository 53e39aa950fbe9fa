r"""Does the demo's recipe converge whatever the machine? Training seeds x convolution paths x ISAs.

  python benchmarks/demo_robustness.py [--seeds=0,1,2] [--variants=onednn,onednn_avx2,xla]
      [--root=runs/robustness] [--overrides=optim.lr=5e-4,...] [--sample_seed=7]

Each cell trains the demo (`configs/fashion_mnist_rdm.py`, `make demo`'s training) with
`--config.train.seed=S` in `<root>/<variant>_seed<S>` (a finished run is reused), then scores
256 exemplar and 256 proposal samples of sample seed 7 with `benchmarks/demo_quality.py`
(label agreement by its Fashion-MNIST classifier, k=3 precision and recall against the test
split). Variants:
  onednn       config.model.conv=onednn on this CPU's own ISA
  onednn_avx2  the same with oneDNN capped to AVX2 (ONEDNN_MAX_CPU_ISA, DNNL_MAX_CPU_ISA) and
               XLA's own code too (--xla_cpu_max_isa=AVX2): what an AVX2-only CPU runs
  xla          config.model.conv=xla (XLA's convolutions) on this CPU's own ISA
  xla_avx2     the same, XLA capped to AVX2
Prints a row per cell (loss at the end and its lowest logged mean, spikes warned, step time,
label agreement, precision, recall) and whether issue 13's goals hold (agreement >= 0.85,
precision >= 0.6, recall >= 0.5).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from rdm_jax.ops.conv_choice import machine  # noqa: E402
from rdm_jax.parallel.mesh import TCMALLOC  # noqa: E402

CONFIG = "configs/fashion_mnist_rdm.py"
AVX2 = {
  "ONEDNN_MAX_CPU_ISA": "AVX2",
  "DNNL_MAX_CPU_ISA": "AVX2",
  "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
}
VARIANTS = {
  "onednn": ("onednn", {}),
  "onednn_avx2": ("onednn", AVX2),
  "xla": ("xla", {}),
  "xla_avx2": ("xla", AVX2),
}
GOALS = {"agreement": 0.85, "precision": 0.6, "recall": 0.5}

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (config.train.seed).")
_VARIANTS = flags.DEFINE_list(
  "variants", ["onednn", "onednn_avx2", "xla"], f"Of {', '.join(VARIANTS)}."
)
_ROOT = flags.DEFINE_string("root", "runs/robustness", "Where the runs go.")
_OVERRIDES = flags.DEFINE_list(
  "overrides",
  [],
  "Extra config fields for training and sampling, as field=value "
  "(a recipe change, e.g. train.num_steps=1800).",
)
_SAMPLE_SEED = flags.DEFINE_integer("sample_seed", 7, "Sampling seed of every cell.")
_NUM = flags.DEFINE_integer("num_images", 256, "Samples per set.")


def env_of(variant: str) -> dict:
  env = dict(os.environ)
  for k in AVX2:
    env.pop(k, None)
  env.update(VARIANTS[variant][1])
  if os.path.exists(TCMALLOC):
    env["LD_PRELOAD"] = TCMALLOC
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def train(workdir: str, seed: int, variant: str) -> dict:
  """Trains the cell (unless its log says it finished); its losses and spikes from the log."""
  log_path = workdir + ".train.log"
  if not (os.path.exists(log_path) and "trained to step" in open(log_path).read()):
    cmd = [
      sys.executable,
      "-m",
      "rdm_jax.train",
      f"--config={CONFIG}",
      f"--workdir={workdir}",
      f"--config.train.seed={seed}",
      f"--config.model.conv={VARIANTS[variant][0]}",
      "--config.train.sample_every=0",
      *(f"--config.{o}" for o in _OVERRIDES.value),
    ]
    start = time.time()
    with open(log_path, "w") as log:
      done = subprocess.run(
        cmd, env=env_of(variant), stdout=log, stderr=subprocess.STDOUT, cwd=REPO
      )
    if done.returncode:
      raise SystemExit(f"training {workdir} failed; see {log_path}")
    with open(log_path, "a") as log:
      log.write(f"\nwall seconds: {time.time() - start:.0f}\n")
  text = open(log_path).read()
  means = [float(x) for x in re.findall(r"step \d+ loss ([0-9.]+)", text)]
  rate = re.findall(r"([0-9.]+) steps/s", text)
  return {
    "final_loss": means[-1],
    "lowest_loss": min(means),
    "spikes": len(re.findall(r"step \d+: spike: ", text)),
    "not_recovered": "did not come back down" in text,
    "step_s": 1 / float(rate[-1]) if rate else float("nan"),
  }


def quality(workdir: str, variant: str) -> dict:
  """demo_quality.py's rows for the cell's exemplar and proposal sets at the sample seed."""
  cmd = [
    sys.executable,
    os.path.join(REPO, "benchmarks", "demo_quality.py"),
    f"--workdir={workdir}",
    f"--seeds={_SAMPLE_SEED.value}",
    f"--num_images={_NUM.value}",
    "--sets=exemplar,proposal",
    f"--overrides={','.join(_OVERRIDES.value)}",
  ]
  out = subprocess.run(cmd, env=env_of(variant), capture_output=True, text=True, cwd=REPO)
  if out.returncode:
    raise SystemExit(f"demo_quality on {workdir} failed:\n{out.stderr[-3000:]}")
  rows = {}
  for line in out.stdout.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if (
      len(cells) >= 7
      and cells[0] in ("exemplar", "proposal")
      and cells[1] == str(_SAMPLE_SEED.value)
    ):
      rows[cells[0]] = {
        "agreement": float(cells[3]),
        "precision": float(cells[5]),
        "recall": float(cells[6]),
      }
  return rows


def main(argv):
  del argv
  os.makedirs(_ROOT.value, exist_ok=True)
  results = []
  for variant in _VARIANTS.value:
    if variant not in VARIANTS:
      raise SystemExit(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)}")
    for seed in map(int, _SEEDS.value):
      workdir = os.path.join(_ROOT.value, f"{variant}_seed{seed}")
      cell = {
        "variant": variant,
        "seed": seed,
        **train(workdir, seed, variant),
        **{f"{s}_{k}": v for s, r in quality(workdir, variant).items() for k, v in r.items()},
      }
      cell["goals"] = all(cell.get(f"exemplar_{k}", 0) >= v for k, v in GOALS.items())
      results.append(cell)
      print(json.dumps(cell), flush=True)
  print(f"CPU: {cpu_name()}; overrides: {' '.join(_OVERRIDES.value) or 'none'}")
  print(
    "| variant | seed | final loss (lowest) | spikes | s/step | exemplar agreement / precision / "
    "recall | proposal agreement / precision / recall | goals |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for c in results:
    print(
      f"| {c['variant']} | {c['seed']} | {c['final_loss']:.4f} ({c['lowest_loss']:.4f}) | "
      f"{c['spikes']} | {c['step_s']:.3f} | {c.get('exemplar_agreement', 0):.3f} / "
      f"{c.get('exemplar_precision', 0):.3f} / {c.get('exemplar_recall', 0):.3f} | "
      f"{c.get('proposal_agreement', 0):.3f} / {c.get('proposal_precision', 0):.3f} / "
      f"{c.get('proposal_recall', 0):.3f} | {'met' if c['goals'] else 'MISSED'} |"
    )


def cpu_name() -> str:
  m = machine()
  return f"{m['cpu']}, {'AVX-512' if 'avx512f' in m['isa'] else 'AVX2'}"


if __name__ == "__main__":
  app.run(main)
