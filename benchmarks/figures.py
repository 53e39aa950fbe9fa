r"""Every picture and demo table the docs show, made from the demo's runs (`make figures`).

  python benchmarks/figures.py [--workdir=runs/fashion_mnist] [--rarm_workdir=runs/fmnist_rarm]
      [--openclipart=/usr/share/openclipart/png] [--sampler_images=128]

`make figures` first runs `make demo` and the RARM demo's chain (configs/fashion_mnist_rarm.py's
commands), then this. It samples what the demo does not (class pools, top-m at m = 0.01 and 1,
Debian's clip art as the database, every sampler at 10 to 100 steps), copies each PNG into
docs/ under the name the docs show, writes the tables between the
`<!-- figure: NAME -->` ... `<!-- /figure -->` markers of README.md and docs/*.md, and records
in docs/figures.json the digest of each config that made them and of every file and table.
`tests/test_docs_figures.py` fails when a picture or table in the docs is not the one recorded,
or when a config changed after its figures were made: rerun `make figures` then.

Every job resumes: a sample set that is complete is reused, so a rerun only copies and writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rdm_jax import files  # noqa: E402
from rdm_jax.config_base import config_file  # noqa: E402
from rdm_jax.data import store  # noqa: E402

DOCS = os.path.join(REPO, "docs")
MANIFEST = os.path.join(DOCS, "figures.json")
RDM_CONFIG, RARM_CONFIG = "configs/fashion_mnist_rdm.py", "configs/fashion_mnist_rarm.py"
MARKER = re.compile(r"(<!-- figure: ([\w-]+) -->\n)(.*?)(<!-- /figure -->)", re.S)
CLASSES = "Trouser,Dress,Sneaker,Bag"
TOP_M = ("0.01", "0.1", "1")  # 0.1: the demo's proposal set
# the paths docs/sampling.md's swap commands name, replaced by this script's flags when they differ
DOCS_WORKDIR = "runs/fashion_mnist"
DOCS_OPENCLIPART = "/usr/share/openclipart/png"

_WORKDIR = flags.DEFINE_string("workdir", "runs/fashion_mnist", "The RDM demo's run (make demo).")
_RARM_WORKDIR = flags.DEFINE_string(
  "rarm_workdir", "runs/fmnist_rarm", "The RARM demo's run (configs/fashion_mnist_rarm.py)."
)
_OPENCLIPART = flags.DEFINE_string(
  "openclipart",
  "/usr/share/openclipart/png",
  "Debian's openclipart-png folder, the swapped database.",
)
_SAMPLER_IMAGES = flags.DEFINE_integer(
  "sampler_images", 128, "Samples per set of the sampler table."
)
_SAMPLERS = (("ddim", 10), ("ddim", 50), ("ddim", 100), ("dpm_solver++", 10), ("dpm_solver++", 20))


def config_digest(path: str) -> str:
  """16 hex digits of sha256 over every field of `path`'s config (its values, not its text)."""
  return store.inputs_digest(config_file(os.path.join(REPO, path)).to_dict())


def file_digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def text_digest(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def blocks(text: str) -> dict[str, str]:
  """The figure tables of a markdown text: name -> what stands between its markers."""
  return {m.group(2): m.group(3) for m in MARKER.finditer(text)}


def docs_commands(page: str, name: str) -> list[list[str]]:
  """The commands of the code block of docs/<page> marked `<!-- run by: make figures (name) -->`,
  each as its argument list (continued lines joined, comments dropped)."""
  text = open(os.path.join(DOCS, page)).read()
  marker = f"<!-- run by: make figures ({name}) -->\n```bash\n"
  if marker not in text:
    sys.exit(f"docs/{page} has no code block marked {marker.splitlines()[0]}")
  block = text.split(marker, 1)[1].split("```", 1)[0].replace("\\\n", " ")
  return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def run(cmd: list[str]) -> float:
  """Runs one command to completion; its seconds. A failure stops this script with its end."""
  t = time.perf_counter()
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if out.returncode:
    sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return time.perf_counter() - t


def job(config: str, workdir: str | None, module: str, *args: str) -> float:
  """Runs one job (`python -m module --config=config [--workdir=workdir] args`) to completion."""
  workdir_flag = [f"--workdir={workdir}"] if workdir else []
  return run([sys.executable, "-m", module, f"--config={config}", *workdir_flag, *args])


def side_by_side(paths: list[str], out: str, gap: int = 8) -> None:
  """The PNGs at `paths` in one row, `gap` white pixels apart, written to `out`."""
  from PIL import Image

  images = [Image.open(p).convert("RGB") for p in paths]
  width = sum(i.width for i in images) + gap * (len(images) - 1)
  row = Image.new("RGB", (width, max(i.height for i in images)), "white")
  x = 0
  for i in images:
    row.paste(i, (x, 0))
    x += i.width + gap
  files.atomic_write(out, lambda f: row.save(f, format="PNG"))


def metrics(eval_dir: str) -> dict:
  with open(os.path.join(eval_dir, "metrics.json")) as f:
    return json.load(f)["sets"]


def evaluation_table(rows: dict) -> str:
  names = {
    "exemplar": "exemplar: held-out test images as queries",
    "proposal": "proposal: pseudo-queries from p_D (unconditional)",
    "real": "real training images, scored the same way",
  }
  lines = ["| set (against the 10k test images) | samples | FD | precision | recall |"]
  lines.append("|---|---|---|---|---|")
  for name, r in rows.items():
    if name.startswith("real"):  # the evaluate job's baseline row, "real (<part> images)"
      name = "real"
    lines.append(
      f"| {names.get(name, name)} | {r['num_samples']} | {r['fd']:.2f} | {r['precision']:.3f} | "
      f"{r['recall']:.3f} |"
    )
  return "\n".join(lines) + "\n"


CONTEXTS = {
  "true_neighbors": "true k=4 neighbours from D",
  "zeros_context": "all-zeros context (the unconditional branch)",
  "shuffled_neighbors": "neighbours of other test images (shuffled)",
}


def ablation(workdir: str) -> dict:
  with open(os.path.join(workdir, "context_ablation.json")) as f:
    return json.load(f)


def context_table(result: dict) -> str:
  """The context ablation's losses: eps-MSE and x0-MSE (RDM) or next-token NLL (RARM), the lowest
  of each column in bold."""
  columns = [("held-out eps-MSE", result, "{:.4f}"), ("x0-MSE", result.get("x0_mse"), "{:.3f}")]
  if "x0_mse" not in result:
    columns = [("next-token NLL (nats per token)", result, "{:.3f}")]
  lines = [
    "| context | " + " | ".join(c[0] for c in columns) + " |",
    "|---|" + "---|" * len(columns),
  ]
  for k, name in CONTEXTS.items():
    cells = []
    for _, values, fmt in columns:
      text = fmt.format(values[k])
      cells.append(f"**{text}**" if values[k] == min(values[c] for c in CONTEXTS) else text)
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def rdm_figures(workdir: str) -> tuple[dict[str, str], dict[str, str]]:
  """(docs PNG name -> the run's PNG, table name -> markdown) of the RDM demo. The sets made here
  go to <workdir>/figures, outside <workdir>/samples, whose sets the demo's evaluation scores."""
  demo = os.path.join(workdir, "samples")
  samples = os.path.join(workdir, "figures")
  sample = lambda *a: job(RDM_CONFIG, workdir, "rdm_jax.sample", *a)  # noqa: E731
  sample(
    "--config.sample.condition=class",
    f"--config.sample.classes={CLASSES}",
    "--config.sample.num_images=16",
    f"--out={samples}/class",
  )
  for m in TOP_M:
    if m != "0.1":
      sample(
        "--config.sample.condition=proposal",
        f"--config.sample.top_m={m}",
        "--config.sample.num_images=16",
        f"--out={samples}/proposal_top_m_{m}",
      )
  top_m = os.path.join(samples, "proposal_top_m.png")
  side_by_side(
    [
      os.path.join(
        demo if m == "0.1" else samples,
        "proposal" if m == "0.1" else f"proposal_top_m_{m}",
        "samples.png",
      )
      for m in TOP_M
    ],
    top_m,
  )
  swap_out = ""
  for cmd in docs_commands("sampling.md", "openclipart"):  # the database swap, as the docs say
    assert cmd[0] == "python", cmd
    cmd = [
      a.replace(DOCS_OPENCLIPART, _OPENCLIPART.value).replace(DOCS_WORKDIR, workdir)
      for a in [sys.executable, *cmd[1:]]
    ]
    run(cmd)
    swap_out = next((a.split("=", 1)[1] for a in cmd if a.startswith("--out=")), swap_out)

  # each set's sampling time as first measured: a rerun reuses the complete set in seconds
  timings = os.path.join(samples, "quality", "sample_job_seconds.json")
  seconds = json.load(open(timings)) if os.path.isfile(timings) else {}
  sets = []
  for sampler, steps in _SAMPLERS:
    out = os.path.join(samples, "quality", f"{sampler}_{steps}")
    existed = os.path.isdir(out)  # made before: its time is not this run's
    took = sample(
      f"--out={out}",
      f"--config.sample.sampler={sampler}",
      f"--config.sample.num_steps={steps}",
      f"--config.sample.num_images={_SAMPLER_IMAGES.value}",
    )
    seconds.setdefault(out, None if existed else took)
    files.atomic_write_text(timings, json.dumps(seconds, indent=1))
    sets.append(out)
  eval_dir = os.path.join(samples, "quality", "eval")
  job(RDM_CONFIG, workdir, "rdm_jax.evaluate", f"--samples={','.join(sets)}", f"--out={eval_dir}")
  scores = metrics(eval_dir)
  sampler_rows = [
    "| sampler, steps | FD | precision | recall | sample job s (start-up and compile included) |",
    "|---|---|---|---|---|",
  ]
  for (sampler, steps), out in zip(_SAMPLERS, sets):
    r = scores[os.path.basename(out)]
    name = {"ddim": "DDIM", "dpm_solver++": "DPM-Solver++"}[sampler]
    default = " (demo default)" if (sampler, steps) == ("ddim", 50) else ""
    sampler_rows.append(
      f"| {name} {steps}{default} | {r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
      f"{'n/a' if seconds[out] is None else f'{seconds[out]:.0f}'} |"
    )
  pngs = {
    "neighbors_and_samples.png": os.path.join(demo, "exemplar", "neighbors_and_samples.png"),
    "proposal_samples.png": os.path.join(demo, "proposal", "samples.png"),
    "class_samples.png": os.path.join(samples, "class", "samples.png"),
    "proposal_top_m.png": top_m,
    "openclipart_neighbors_and_samples.png": os.path.join(swap_out, "neighbors_and_samples.png"),
  }
  tables = {
    "demo-evaluation": evaluation_table(metrics(os.path.join(workdir, "eval"))),
    "demo-metrics": open(os.path.join(workdir, "eval", "metrics.md")).read(),  # the job's own
    "sampler-quality": "\n".join(sampler_rows) + "\n",
    "demo-context": context_table(ablation(workdir)),
  }
  return pngs, tables


def rarm_figures(workdir: str) -> tuple[dict[str, str], dict[str, str]]:
  """(docs PNG name -> the RARM run's PNG, table name -> markdown): its exemplar panel and its
  context ablation, which `make rarm-demo` writes."""
  panel = os.path.join(workdir, "samples", "exemplar", "neighbors_and_samples.png")
  if not os.path.isfile(panel):
    job(RARM_CONFIG, workdir, "rdm_jax.sample")
  return {"rarm_neighbors_and_samples.png": panel}, {
    "rarm-context": context_table(ablation(workdir))
  }


def write_docs(tables: dict[str, str]) -> list[str]:
  """Puts each table between its markers in README.md and docs/*.md; the files that have one."""
  pages = [os.path.join(REPO, "README.md")] + sorted(
    os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md")
  )
  used = []
  for page in pages:
    with open(page) as f:
      text = f.read()
    unknown = set(blocks(text)) - set(tables)
    if unknown:
      sys.exit(f"{page} marks tables this script does not make: {sorted(unknown)}")
    new = MARKER.sub(lambda m: m.group(1) + tables[m.group(2)] + m.group(4), text)
    if blocks(text):
      used.append(os.path.relpath(page, REPO))
    if new != text:
      files.atomic_write_text(page, new)
  return used


def main(argv):
  del argv
  os.chdir(REPO)  # the jobs' relative paths (data_dir, workdirs) are the repo's
  if not os.path.isdir(_OPENCLIPART.value):
    sys.exit(
      f"{_OPENCLIPART.value} is missing: apt-get install openclipart-png (`make figures` does)"
    )
  for workdir, config in ((_WORKDIR.value, RDM_CONFIG), (_RARM_WORKDIR.value, RARM_CONFIG)):
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
      sys.exit(f"{workdir} holds no trained run of {config}: `make figures` trains both first")
  pngs, tables = rdm_figures(_WORKDIR.value)
  rarm_pngs, rarm_tables = rarm_figures(_RARM_WORKDIR.value)
  pngs.update(rarm_pngs)
  tables.update(rarm_tables)
  for name, source in pngs.items():
    with open(source, "rb") as f:
      data = f.read()
    files.atomic_write(os.path.join(DOCS, name), lambda f, d=data: f.write(d))
  pages = write_docs(tables)
  rarm = set(rarm_pngs) | set(rarm_tables)
  manifest = {
    "configs": {c: config_digest(c) for c in (RDM_CONFIG, RARM_CONFIG)},
    "pictures": {
      name: {
        "config": RARM_CONFIG if name in rarm else RDM_CONFIG,
        "sha256_16": file_digest(os.path.join(DOCS, name)),
      }
      for name in sorted(pngs)
    },
    "tables": {
      name: {"config": RARM_CONFIG if name in rarm else RDM_CONFIG, "sha256_16": text_digest(text)}
      for name, text in sorted(tables.items())
    },
  }
  files.atomic_write_text(MANIFEST, json.dumps(manifest, indent=1) + "\n")
  print(f"wrote {len(pngs)} pictures to docs/, tables in {', '.join(pages)}, and {MANIFEST}")


if __name__ == "__main__":
  app.run(main)
