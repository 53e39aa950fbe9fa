"""The pictures and demo tables of README.md and docs/ are the ones `make figures` recorded in
docs/figures.json, made by the configs as they are now (benchmarks/figures.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

from tests.conftest import REPO

DOCS = os.path.join(REPO, "docs")
MARKER = re.compile(r"<!-- figure: ([\w-]+) -->\n(.*?)<!-- /figure -->", re.S)
PICTURE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
RERUN = "run `make figures` (it regenerates every picture and table the docs show)"


def _manifest() -> dict:
  with open(os.path.join(DOCS, "figures.json")) as f:
    return json.load(f)


def _pages() -> dict[str, str]:
  paths = [os.path.join(REPO, "README.md")] + sorted(
    os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md")
  )
  out = {}
  for p in paths:
    with open(p) as f:
      out[os.path.relpath(p, REPO)] = f.read()
  return out


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


def test_every_picture_the_docs_show_is_the_recorded_one():
  pictures = _manifest()["pictures"]
  shown = set()
  for page, text in _pages().items():
    for link in PICTURE.findall(text):
      path = os.path.normpath(os.path.join(REPO, os.path.dirname(page), link))
      assert os.path.dirname(path) == DOCS, f"{page} shows {link}, which is not in docs/"
      name = os.path.basename(path)
      assert name in pictures, f"{page} shows {link}, which `make figures` does not make"
      with open(path, "rb") as f:
        assert _sha(f.read()) == pictures[name]["sha256_16"], (
          f"docs/{name} is not the picture `make figures` made; {RERUN}"
        )
      shown.add(name)
  assert shown == set(pictures), f"recorded but shown nowhere: {sorted(set(pictures) - shown)}"
  on_disk = {n for n in os.listdir(DOCS) if n.endswith(".png")}
  assert on_disk == shown, f"pictures in docs/ that no page shows: {sorted(on_disk - shown)}"


def test_every_demo_table_in_the_docs_is_the_recorded_one():
  tables = _manifest()["tables"]
  seen = set()
  for page, text in _pages().items():
    for name, body in MARKER.findall(text):
      assert name in tables, f"{page} marks a table {name!r} that `make figures` does not make"
      assert _sha(body.encode()) == tables[name]["sha256_16"], (
        f"the {name} table of {page} is not the one `make figures` wrote; {RERUN}"
      )
      seen.add(name)
  assert seen == set(tables), f"recorded but shown nowhere: {sorted(set(tables) - seen)}"


@pytest.mark.parametrize(
  "config", ["configs/fashion_mnist_rdm.py", "configs/fashion_mnist_rarm.py"]
)
def test_the_figures_were_made_by_the_config_as_it_is_now(config):
  """Digest of every field's value (benchmarks/figures.py's config_digest, the stores'
  inputs_digest over the config's dict): a changed recipe makes the docs' pictures stale."""
  from rdm_jax.config_base import config_file
  from rdm_jax.data import store

  manifest = _manifest()
  now = store.inputs_digest(config_file(os.path.join(REPO, config)).to_dict())
  assert manifest["configs"][config] == now, (
    f"{config} changed after its figures were made; {RERUN}"
  )
  made_by = {e["config"] for kind in ("pictures", "tables") for e in manifest[kind].values()}
  assert config in made_by
