"""notebooks/quickstart.ipynb runs on the tiny trained run: every cell, a panel per condition, and
the neighbours it shows are the exact nearest database entries of its queries."""

from __future__ import annotations

import json
import os
import re

import numpy as np

from tests.conftest import (
  REPO,
  TINY_OVERRIDES,
  TRAIN_CONFIG,
  TRAINED_ARGS,
  brute_force_neighbors,
  make_tiny_stores,
)

NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
SAMPLING_PAGE = os.path.join(REPO, "docs", "sampling.md")  # its Python example runs here too


def _docs() -> str:
  with open(SAMPLING_PAGE) as f:
    return f.read()


N = 4


def test_the_notebook_is_kept_without_outputs():
  """What git holds is the notebook as written: no outputs, no execution counts."""
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, "".join(cell["source"])


def test_the_quickstart_notebook_runs_on_a_trained_run(trained, tmp_path):
  import nbclient
  import nbformat

  from rdm_jax.data import store

  import shutil

  from rdm_jax.retrieval import proposal

  data_dir, workdir = str(tmp_path / "data"), trained[1]
  shutil.copytree(trained[0], data_dir)  # with p_D, which the tiny stores lack, written here
  database = store.read(os.path.join(data_dir, "database"), "database", "")
  neighbors = store.read(os.path.join(data_dir, "neighbors_train"), "neighbors", "")
  proposal.write_proposal(os.path.join(data_dir, "proposal"), neighbors, database, k=4)
  swap = str(tmp_path / "swap")
  make_tiny_stores(swap, fmnist_database=True, seed=1)  # the same encoder, other embeddings
  nb = nbformat.read(NOTEBOOK, as_version=4)
  [params] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  overrides = [*TINY_OVERRIDES, f"--config.data_dir={data_dir}", *TRAINED_ARGS]
  params.source = "\n".join(
    [
      f"CONFIG = {TRAIN_CONFIG!r}",
      f"OVERRIDES = {overrides!r}",
      f"WORKDIR = {workdir!r}",
      f"SWAP_DATABASE = {os.path.join(swap, 'database')!r}",
      'CLASSES = "0"',  # the tiny database's one label
      f"N = {N}",
    ]
  )
  # docs/sampling.md's Python example, in the notebook's kernel (`config` is the notebook's)
  [example] = re.findall(
    r"<!-- run by: tests/test_notebook.py -->\n```python\n(.*?)```", _docs(), re.S
  )
  example = example.replace('"runs/fashion_mnist"', "WORKDIR").replace('"Dress,Sneaker"', "CLASSES")
  nb.cells.append(nbformat.v4.new_code_cell(example))
  report = (
    "import json\n"
    "print(json.dumps({'exemplar': exemplar.neighbor_rows.tolist(),"
    " 'swapped': swapped_exemplar.neighbor_rows.tolist(),"
    " 'images': [s.images.shape for s in"
    " (exemplar_samples, proposal_samples, class_samples, swapped_samples)],"
    " 'docs': [out.images.shape, out.conditioning.neighbor_rows.shape, panel.shape]}))"
  )
  nb.cells.append(nbformat.v4.new_code_cell(report))
  nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}
  ).execute()

  shown = [
    o for c in nb.cells[:-2] for o in c.get("outputs", []) if "image/png" in o.get("data", {})
  ]
  assert len(shown) == 4  # exemplar, proposal, class, swapped database
  got = json.loads(nb.cells[-1].outputs[0]["text"])
  queries = store.read(os.path.join(data_dir, "embeddings_test"), "embeddings", "")["embeddings"][
    :N
  ]
  for key, database in (("exemplar", data_dir), ("swapped", swap)):
    rows = store.read(os.path.join(database, "database"), "database", "")["embeddings"]
    np.testing.assert_array_equal(
      got[key], brute_force_neighbors(queries, rows, len(got[key][0])), err_msg=key
    )
  for shape in got["images"]:
    assert shape[0] == N and shape[-1] == 1
  images, neighbor_rows, panel = got["docs"]  # the docs' example: 8 samples of k = 4 neighbours
  assert images[0] == 8 and images[-1] == 1 and neighbor_rows == [8, 4] and len(panel) == 3
