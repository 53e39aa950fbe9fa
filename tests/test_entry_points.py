"""Thin entry points: every job module can be imported beside the others in one program (a
notebook, a test) and its `main` only turns flags into the arguments of one library function."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from tests.conftest import REPO, job_modules

ENTRY_POINTS = {
  "rdm_jax/train.py": "train_and_evaluate",
  "rdm_jax/sample.py": "sample_set",
  "rdm_jax/evaluate.py": "evaluate",
  "rdm_jax/compile.py": "compile_report",
  "rdm_jax/jobs/encode.py": "encode_parts",
  "rdm_jax/jobs/embed.py": "embed_parts",
  "rdm_jax/jobs/index.py": "build",
  "rdm_jax/jobs/neighbors.py": "run",
  "rdm_jax/jobs/context_ablation.py": "run",
  "rdm_jax/jobs/import_checkpoint.py": "import_run",
  "rdm_jax/jobs/import_database.py": "original_database.import_database",
}
# what a main may call besides its library function: reading flags, failing on a missing one,
# arming the SIGTERM handler, joining a multi-process run, printing, exiting with a status
ALLOWED = {"fail", "cli.fail", "preemption.install", "distributed.initialize", "print", "sys.exit"}


def test_every_job_module_is_listed():
  assert job_modules() == set(ENTRY_POINTS)


def test_all_job_modules_import_into_one_program():
  """Their absl flags (--workdir, --out, --num_processes, ...) are defined once, whichever module
  comes first; the modules' library functions are there to call."""
  modules = [p[:-3].replace("/", ".") for p in ENTRY_POINTS]
  for order in (modules, modules[::-1]):
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in order)
    r = subprocess.run(
      [sys.executable, "-c", code],
      cwd=REPO,
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("path", sorted(ENTRY_POINTS))
def test_main_calls_one_library_function(path):
  tree = ast.parse(open(os.path.join(REPO, path)).read())
  main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
  called = set()
  for n in ast.walk(main):
    if isinstance(n, ast.Call):
      name = ast.unparse(n.func)
      if (
        not name.endswith(".value")
        and name not in ALLOWED
        and not name.startswith(("tuple", "str"))
      ):
        called.add(name)
  assert called == {ENTRY_POINTS[path]} or called == {ENTRY_POINTS[path], "report"}, called
  target = ENTRY_POINTS[path].split(".")[-1]
  library = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == target]
  assert library or "." in ENTRY_POINTS[path], f"{path} has no {target}"
  for f in library:  # the library function takes arguments: it reads no flag (_FLAG.value)
    flags_read = [
      ast.unparse(n)
      for n in ast.walk(f)
      if isinstance(n, ast.Attribute) and n.attr == "value" and ast.unparse(n.value).isupper()
    ]
    assert not flags_read, f"{path}: {target} reads {flags_read}"


def test_a_shared_flag_has_the_default_and_help_of_the_job_being_run():
  """--parts is defined by encode (train,test) and embed (database,train,test): run as the main
  module after encode was imported into the same program, embed's --help and default are its own,
  as its command line (python -m rdm_jax.jobs.embed) documents them."""
  code = (
    "import runpy, sys\n"
    "import rdm_jax.jobs.encode\n"
    "sys.argv = ['embed', '--helpfull']\n"
    "runpy.run_module('rdm_jax.jobs.embed', run_name='__main__')\n"
  )
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
  )
  lines = (out.stdout + out.stderr).splitlines()
  i = next(i for i, line in enumerate(lines) if line.strip().startswith("--parts:"))
  assert lines[i].strip() == "--parts: Dataset parts to embed.", lines[i]
  assert lines[i + 1].strip() == "(default: 'database,train,test')", lines[i + 1]
