"""The commands in README.md, docs/*.md and the configs' docstrings.

Every code block with commands says, in a comment on the line before it, what runs it: `<!-- run
by: make demo -->` (the Makefile's demo recipe is the block, command for command), `make figures
(NAME)` (benchmarks/figures.py reads the block and runs it), a test file (which runs it here), or
`<!-- not run here: why -->` (ImageNet, downloads, a pod). The tests below run the blocks marked
for this file; all commands, run or not, must name what exists: every `python -m rdm_jax.<job>`
is a module with a main, every --flag is one a job defines, every --config file loads with its
argument, every --config.<field> override names a field of that config, and every shell line
starts with a command (a lost `#` makes a comment one)."""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from tests.conftest import REPO, job_modules, subprocess_env

from rdm_jax.config_base import config_file

PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))
CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/configs/*.py"))
JOB = re.compile(r"python -m (rdm_jax(?:\.\w+)+)(.*)")
BLOCK = re.compile(r"(?:<!-- (run by|not run here): (.+?) -->\n)?```(\w*)\n(.*?)```", re.S)
DEMO_CONFIG = "configs/fashion_mnist_rdm.py"


def _read(path: str) -> str:
  with open(os.path.join(REPO, path)) as f:
    return f.read()


def _blocks() -> list[tuple[str, str | None, str, str, str]]:
  """(page, "run by" | "not run here" | None, who or why, language, text) of every fenced block."""
  return [(page, *m.groups()) for page in PAGES for m in BLOCK.finditer(_read(page))]


def _docstring(path: str) -> str:
  return ast.get_docstring(ast.parse(_read(path))) or ""


def _lines(text: str) -> list[str]:
  """A block's lines with continued lines joined."""
  return text.replace("\\\n", " ").splitlines()


def _commands() -> list[tuple[str, str, str]]:
  """(page, module, arguments) of every job command in the pages' code blocks and in the configs'
  docstrings."""
  texts = [(page, block[-1]) for page, *block in _blocks()]
  texts += [(path, _docstring(path)) for path in CONFIGS]
  out = []
  for page, text in texts:
    for line in _lines(text):
      m = JOB.search(line.split("  #")[0])
      if m:
        out.append((page, m.group(1), m.group(2)))
  return out


def _marked(page: str, who: str) -> list[str]:
  """The texts of the blocks of `page` marked `<!-- run by: who -->` or `who (...)`, in order."""
  return [
    text
    for p, kind, by, _, text in _blocks()
    if p == page and kind == "run by" and (by == who or by.startswith(who + " ("))
  ]


def _argv(line: str) -> list[str]:
  return shlex.split(line, comments=True)


def _makefile_recipe(target: str) -> list[list[str]]:
  """The `$(RUN) -m ...` lines of a Makefile target, with the Makefile's variables put in and
  `$(RUN)` as `python`: the commands as the docs write them."""
  text = _read("Makefile")
  values = dict(re.findall(r"^(\w+) *[?:]?= *(.*)$", text, re.M))
  recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.M).group(1)
  out = []
  for line in recipe.splitlines():
    line = line.strip()
    if line.startswith("$(RUN) -m"):
      line = re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), line[6:])
      out.append(["python", *_argv(line)])
  return out


COMMANDS = _commands()


def _flags_of_every_job() -> set[str]:
  """The names of the flags the job modules define, from one program that imports them all."""
  modules = sorted(p[:-3].replace("/", ".") for p in job_modules())
  code = (
    "import importlib, json\n"
    f"for m in {modules!r}: importlib.import_module(m)\n"
    "from absl import flags\n"
    "print(json.dumps(sorted(flags.FLAGS)))\n"
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_pages_have_commands():
  assert len(COMMANDS) >= 30
  assert {p for p, _, _ in COMMANDS} >= {"docs/getting_started.md", DEMO_CONFIG}


def test_every_command_runs_a_job_with_flags_it_defines():
  known, jobs = _flags_of_every_job(), job_modules()
  for page, module, args in COMMANDS:
    assert module.replace(".", "/") + ".py" in jobs, f"{page}: {module} is not a job"
    for name in re.findall(r"(?<![\w.])--(\w+)", args):
      assert name in known, f"{page}: python -m {module} --{name}: no job defines it"


@pytest.mark.parametrize("page,module,args", COMMANDS, ids=lambda x: str(x)[:40])
def test_config_files_and_overrides_exist(page, module, args):
  m = re.search(r"--config=(\S+)", args)
  if not m or not m.group(1).startswith("configs/"):
    return  # a placeholder (CONFIG, ...)
  path, _, arg = m.group(1).partition(":")
  config = config_file(os.path.join(REPO, path), *([arg] if arg else []))
  for field in re.findall(r"--config\.([\w.]+)=", args):
    node = config
    for part in field.split("."):
      assert part in node, f"{page}: --config.{field} is not a field of {m.group(1)}"
      node = node[part]


# what a line of a bash block may start with (after VAR=value assignments)
SHELL_COMMANDS = {
  "python",
  "python3.11",
  ".venv/bin/pip",
  "make",
  "bash",
  "sbatch",
  "mkdir",
  "wget",
  "for",
  "cd",
}


def test_every_command_block_says_what_runs_it():
  figures = _read("benchmarks/figures.py")
  marked = 0
  for page, kind, who, lang, text in _blocks():
    if lang not in ("bash", "python") and not JOB.search(text):
      continue  # a tree, a citation
    assert kind, (
      f"{page}: a block of commands without <!-- run by: ... --> or <!-- not run here: -->"
    )
    marked += 1
    name = os.path.basename(page)
    if kind == "not run here":
      assert len(who.split()) >= 2, f"{page}: say why it is not run here: {who!r}"
    elif who == "make demo":
      assert [_argv(line) for line in _lines(text) if _argv(line)] == _makefile_recipe("demo"), page
    elif m := re.fullmatch(r"make figures \((\w+)\)", who):
      assert f'docs_commands("{name}", "{m.group(1)}")' in figures, (page, who)
    elif who.startswith("tests/"):
      runner = who.split()[0]
      assert os.path.isfile(os.path.join(REPO, runner)), (page, who)
      assert name in _read(runner), f"{page}: {runner} never reads this page"
    else:
      raise AssertionError(f"{page}: unknown runner {who!r}")
  assert marked >= 14


def test_every_shell_line_starts_with_a_command():
  for page, _, _, lang, text in _blocks():
    if lang != "bash":
      continue
    for line in _lines(text):
      words = _argv(line)
      while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words.pop(0)  # VAR=value before the command
      assert not words or words[0] in SHELL_COMMANDS, f"{page}: not a command: {line!r}"


def test_the_demo_commands_are_what_make_demo_runs():
  """The demo configs' docstrings, command for command, are the Makefile's demo and rarm-demo
  recipes (a block marked `make demo` is checked against it above)."""
  demo = _makefile_recipe("demo")
  assert len(demo) == 9 and demo[4][:3] == ["python", "-m", "rdm_jax.train"]
  assert _marked("docs/getting_started.md", "make demo")
  for config, target in ((DEMO_CONFIG, "demo"), ("configs/fashion_mnist_rarm.py", "rarm-demo")):
    lines = [line.strip() for line in _lines(_docstring(config)) if "python -m" in line]
    assert [_argv(line) for line in lines] == _makefile_recipe(target), config


def test_the_database_swap_writes_outside_the_sets_evaluate_scores():
  """docs/sampling.md's clip-art commands (make figures runs them): the embed writes the
  database the sample job then reads, and the samples go outside <workdir>/samples, so the demo's
  evaluation keeps scoring the demo's sets alone."""
  embed, sample = [
    _argv(line)
    for line in _lines(_marked("docs/sampling.md", "make figures (openclipart)")[0])
    if _argv(line)
  ]
  flag = lambda cmd, name: next(a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}="))  # noqa: E731
  assert embed[:3] == ["python", "-m", "rdm_jax.jobs.embed"]
  assert sample[:3] == ["python", "-m", "rdm_jax.sample"]
  assert flag(embed, "config.database") == flag(sample, "config.database")
  workdir, out = flag(sample, "workdir"), flag(sample, "out")
  assert not os.path.normpath(out).startswith(os.path.join(workdir, "samples"))


def test_make_knows_the_readme_commands():
  """README.md's two commands are Makefile targets (make -n prints their recipes, runs nothing)."""
  [block] = _marked("README.md", "tests/test_docs_commands.py")
  targets = [_argv(line)[1] for line in _lines(block)]
  assert targets == ["demo", "test"]
  for target, runs in zip(targets, ("-m rdm_jax.evaluate", "-m pytest")):
    out = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and runs in out.stdout, out.stdout + out.stderr


def test_the_bring_your_own_embeddings_commands_run(tmp_path):
  """docs/jobs.md's .npy commands, run as written with CONFIG the demo's: the neighbours are the
  exact cosine top-K and p_D counts the first k_train of each (Eq. 5)."""
  import numpy as np

  from rdm_jax.data import store

  rng = np.random.default_rng(0)
  db, queries = rng.standard_normal((300, 24)), rng.standard_normal((40, 24))
  np.save(tmp_path / "db.npy", db.astype(np.float32))
  np.save(tmp_path / "train.npy", queries.astype(np.float32))
  for line in _lines(_marked("docs/jobs.md", "tests/test_docs_commands.py")[0]):
    argv = [a.replace("CONFIG", os.path.join(REPO, DEMO_CONFIG)) for a in _argv(line)]
    assert argv[0] == "python"
    out = subprocess.run(
      [sys.executable, *argv[1:]],
      cwd=tmp_path,
      env=subprocess_env(),
      capture_output=True,
      text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
  config = config_file(os.path.join(REPO, DEMO_CONFIG))
  k, num = config.k_train, config.retrieval.num_neighbors
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  want = np.argsort(-(unit(queries) @ unit(db).T), axis=1, kind="stable")[:, :num]
  got = store.read(str(tmp_path / "nbrs"), "neighbors", "")
  np.testing.assert_array_equal(got["neighbor_ids"], want)
  p_d = store.read(str(tmp_path / "nbrs_proposal"), "proposal", "")
  counts = np.bincount(want[:, :k].ravel(), minlength=len(db))
  np.testing.assert_array_equal(p_d["counts"], counts[p_d["rows"]])
  np.testing.assert_allclose(p_d["probs"], counts[p_d["rows"]] / (k * len(queries)))


def test_the_mesh_commands_make_the_meshes_they_name():
  """docs/training.md's mesh flags on this session's 8 devices; tests/parallel/test_sharding.py
  trains on each of these meshes against one device."""
  import jax

  from rdm_jax.config_base import with_overrides
  from rdm_jax.parallel import mesh as mesh_lib

  assert jax.device_count() == 8  # make test's XLA_FLAGS
  block = _marked("docs/training.md", "tests/test_docs_commands.py")[0]
  got = []
  for line in _lines(block):
    overrides = [a for a in _argv(line) if a.startswith("--config.")]
    config = with_overrides(config_file(os.path.join(REPO, DEMO_CONFIG)), overrides)
    got.append(dict(mesh_lib.from_config(config).shape))
  assert got == [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 2, "fsdp": 4, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
  ]


def test_the_launch_dry_runs_print_what_the_docs_show():
  """docs/training.md's transcript: each `$ ` line, run in the repository, prints the lines that
  follow it."""
  transcript = _marked("docs/training.md", "tests/test_docs_commands.py")[1]
  runs = [chunk.splitlines() for chunk in ("\n" + transcript).split("\n$ ")[1:]]
  assert len(runs) == 2
  for command, *printed in runs:
    out = subprocess.run(
      ["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == printed, command
