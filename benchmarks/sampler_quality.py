r"""Sample quality against steps, for each sampler, on a trained run (the demo's by default).

  python benchmarks/sampler_quality.py [--workdir=runs/fashion_mnist] [--steps=10,20,50,100]
      [--samplers=ddim,dpm_solver++] [--num_images=128] [--config=configs/fashion_mnist_rdm.py]

For every (sampler, steps) the sample job writes `num_images` exemplar-conditioned samples (the
same held-out queries and the same per-sample seeds for all) to <workdir>/samples/quality/
<sampler>_<steps>, timing it; then one evaluate run scores every set against the config's
reference (`config.eval`) and this prints its table with the sampling seconds of each set. A set
that is already complete is reused (the sample job resumes), so a rerun only evaluates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKDIR = flags.DEFINE_string(
  "workdir", "runs/fashion_mnist", "A trained run (make demo writes this one)."
)
_CONFIG = flags.DEFINE_string("config", "configs/fashion_mnist_rdm.py", "Its config.")
_STEPS = flags.DEFINE_list("steps", ["10", "20", "50", "100"], "Step counts.")
_SAMPLERS = flags.DEFINE_list(
  "samplers", ["ddim", "dpm_solver++"], "Samplers (ddim, ddpm, dpm_solver++)."
)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 128, "Samples per set.")


def job(module: str, *args: str) -> None:
  cmd = [
    sys.executable,
    "-m",
    module,
    f"--config={_CONFIG.value}",
    f"--workdir={_WORKDIR.value}",
    *args,
  ]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if out.returncode:
    sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")


def main(argv):
  del argv
  root = os.path.join(_WORKDIR.value, "samples", "quality")
  sets, seconds = [], {}
  for sampler in _SAMPLERS.value:
    for steps in _STEPS.value:
      name = f"{sampler}_{steps}"
      out = os.path.join(root, name)
      t = time.perf_counter()
      job(
        "rdm_jax.sample",
        f"--out={out}",
        f"--config.sample.sampler={sampler}",
        f"--config.sample.num_steps={steps}",
        f"--config.sample.num_images={_NUM_IMAGES.value}",
      )
      seconds[name] = time.perf_counter() - t
      sets.append(out)
      print(f"{name}: {seconds[name]:.0f} s (job, incl. start-up and compile)", flush=True)
  eval_dir = os.path.join(root, "eval")
  job("rdm_jax.evaluate", f"--samples={','.join(sets)}", f"--out={eval_dir}")
  with open(os.path.join(eval_dir, "metrics.json")) as f:
    rows = json.load(f)["sets"]
  print(open(os.path.join(eval_dir, "metrics.md")).read())
  print("| set | FD | precision | recall | sample job s |\n|---|---|---|---|---|")
  for name, r in rows.items():
    print(
      f"| {name} | {r.get('fd', float('nan')):.2f} | {r.get('precision', float('nan')):.3f} | "
      f"{r.get('recall', float('nan')):.3f} | {seconds.get(name, float('nan')):.0f} |"
    )


if __name__ == "__main__":
  app.run(main)
