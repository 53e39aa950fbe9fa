"""The commands in README.md and docs/*.md name what exists: every `python -m rdm_jax.<job>` is a
module with a main, every --flag is one a job defines, every --config file loads with its
argument, and every --config.<field> override names a field of that config. The demo runs the
commands end to end (`make demo`); this keeps the ones it does not run from rotting."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest
from tests.conftest import REPO, job_modules

from rdm_jax.config_base import config_file

PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))
JOB = re.compile(r"python -m (rdm_jax(?:\.\w+)+)(.*)")


def _commands() -> list[tuple[str, str, str]]:
  """(page, module, arguments) of every job command in the pages' code blocks."""
  out = []
  for page in PAGES:
    text = open(os.path.join(REPO, page)).read()
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
      for line in block.replace("\\\n", " ").splitlines():
        m = JOB.search(line.split("  #")[0])
        if m:
          out.append((page, m.group(1), m.group(2)))
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
  assert len(COMMANDS) >= 30 and {p for p, _, _ in COMMANDS} >= {"docs/getting_started.md"}


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
