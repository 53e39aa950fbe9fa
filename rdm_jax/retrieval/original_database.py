"""The original's retrieval databases (`.npz` parts of DatasetBuilder.save_datapool) as our stores.

See `rdm_jax/jobs/import_database.py` for what the parts hold and what the store keeps.
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from rdm_jax import config_base, files
from rdm_jax.data import chunked, store
from rdm_jax.errors import fail
from rdm_jax.retrieval import encoders

ARRAYS = ("embedding", "img_id", "patch_coords")


def _part_order(path: str) -> tuple[int, str]:
  m = re.search(r"part_(\d+)\.npz$", os.path.basename(path))
  return (int(m.group(1)) if m else 1 << 62, os.path.basename(path))


def npz_files(spec: list[str]) -> list[str]:
  """The .npz parts, in order: a directory's *.npz by part number (`<N>x<d>-part_<i>.npz`, as the
  original names them; other names after, by name), files as given."""
  found_files = []
  for s in spec:
    if os.path.isdir(s):
      found = sorted(glob.glob(os.path.join(glob.escape(s), "*.npz")), key=_part_order)
      if not found:
        fail(
          f"{s} is a directory without .npz files; give the directory the database was unpacked to"
        )
      found_files += found
    elif os.path.isfile(s) and s.endswith(".npz"):
      found_files.append(s)
    else:
      fail(f"{s}: no such .npz file or directory")
  return found_files


def part_rows(path: str, embed_dim: int) -> int:
  """Rows of one part, its arrays' declared shapes checked (nothing inflated)."""
  with files.load_npz(path) as z:
    for name in ARRAYS:
      if name not in z:
        fail(f"{path} has no array {name!r} (it has {', '.join(z.files)[:200] or 'none'})")
    (emb_shape, emb_dtype) = z.headers["embedding"]
    if len(emb_shape) != 2 or emb_dtype.kind != "f" or emb_shape[1] != embed_dim:
      fail(
        f"{path}: embedding is {emb_dtype}{list(emb_shape)}; expected float [N, {embed_dim}] "
        f"(config.retrieval.embed_dim)"
      )
    for name in ARRAYS[1:]:
      shape, dtype = z.headers[name]
      if not shape or shape[0] != emb_shape[0] or dtype.kind not in "iu":
        fail(f"{path}: {name} is {dtype}{list(shape)}; expected integers with {emb_shape[0]} rows")
  return emb_shape[0]


class _Parts:
  """Rows [a, b) over the parts in order, one part inflated at a time."""

  def __init__(self, files: list[str], rows: list[int]):
    self.files, self.offsets = files, np.concatenate([[0], np.cumsum(rows)])
    self._loaded: tuple[int, dict] | None = None

  def _part(self, i: int) -> dict[str, np.ndarray]:
    if self._loaded is None or self._loaded[0] != i:
      self._loaded = None  # free the previous part first
      with files.load_npz(self.files[i]) as z:
        self._loaded = (i, {n: z[n] for n in ARRAYS})
    return self._loaded[1]

  def rows(self, a: int, b: int) -> dict[str, np.ndarray]:
    out: dict[str, list] = {n: [] for n in ARRAYS}
    first = int(np.searchsorted(self.offsets, a, side="right")) - 1
    for i in range(first, len(self.files)):
      lo, hi = max(a, self.offsets[i]), min(b, self.offsets[i + 1])
      if lo >= hi:
        break
      part = self._part(i)
      for n in ARRAYS:
        out[n].append(part[n][lo - self.offsets[i] : hi - self.offsets[i]])
    return {n: np.concatenate(v) for n, v in out.items()}


def import_database(config, spec: list[str]) -> store.Store:
  """Writes the database store of `config.database` from the .npz parts `spec` names (files or
  directories), resumably by chunk; returns it."""
  parts_files = npz_files(spec)
  rows = [part_rows(f, config.retrieval.embed_dim) for f in parts_files]
  dtype = np.dtype(config.database_build.embeddings_dtype)
  parts = _Parts(parts_files, rows)

  def compute(a, b):
    r = parts.rows(a, b)
    emb = r["embedding"]
    if not np.isfinite(emb).all():
      fail(f"rows [{a}, {b}) of the database hold non-finite embeddings; the files are damaged")
    return {
      "embeddings": emb.astype(dtype),
      "ids": r["img_id"].astype(np.int64),
      "patch_coords": r["patch_coords"].astype(np.int64),
    }

  source = {
    "file": os.path.realpath(parts_files[0]),
    "imported_npz": [
      {"file": os.path.realpath(f), "size": os.path.getsize(f), "rows": n}
      for f, n in zip(parts_files, rows)
    ],
  }
  out = config_base.paths(config)["database"]
  result = chunked.write_chunked(
    out,
    "database",
    sum(rows),
    chunk_size=config.retrieval.chunk_size,
    compute=compute,
    encoder=encoders.encoder_identity(config.retrieval),
    source=source,
    made_by="rdm_jax.jobs.import_database",
  )
  print(
    f"wrote {out}: embeddings {result['embeddings'].shape} {result['embeddings'].dtype} "
    f"from {len(parts_files)} files"
  )
  return result
