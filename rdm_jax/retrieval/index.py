"""Nearest-neighbour index over a database store: exact JAX search or ScaNN, in shards.

The recipe follows CompVis RDM's `train_searcher` by the size n of each shard, on
L2-normalised vectors with dot-product scores (cosine similarity):

  n < exact_below (2e4)   exact search (JAX matmul + top-k; no index files)
  n < ah_below (1e5)      ScaNN asymmetric hashing (2 dims per block, anisotropic threshold
                          0.2) + exact float reordering of 10K candidates (the original: 2K,
                          which loses recall; see REORDER_PER_NEIGHBOR)
  otherwise               ScaNN tree (num_leaves = sqrt(n), search num_leaves / 20, k-means
                          trained on n / 10 vectors, spherical) + the same AH + reordering

`spherical=True` matters: on unit-norm data a generic k-means tree caps recall@20 at ~0.84
whatever the reordering (STACK_NOTES). Every knob is in `config.retrieval.index`.

A database too large for one index in RAM is split into row shards, each small enough
that building its index stays within `max_memory_gb`; a search queries every shard and
merges the per-shard top-k (so the result over shards equals that of one index whenever
each shard's search is exact). Shards are loaded lazily and the least recently used ones
evicted so that the loaded ones stay within `search_memory_gb` (default: max_memory_gb).

On disk (`<database>_index/`): `manifest.json` (kind "index", the database fingerprint,
width, K, the shards with their row ranges and recipes, the files of each shard) and one
ScaNN directory `shard_NNNNN` per ScaNN shard. The build resumes shard by shard; the index
appears under its name when complete. An index is untrusted input: it loads only if its
shards are exactly that layout (`_check_shards`), and never through ScaNN's
`load_searcher`, which unpickles a `scann_docids.pkl` if one is there.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, Callable

import numpy as np

from rdm_jax.data import store
from rdm_jax.errors import fail
from rdm_jax.retrieval import exact

KIND = "index"
INDEX_HINT = "python -m rdm_jax.jobs.index --config=<this config>"
# Peak bytes per database float (element) while one shard's ScaNN index is built (our
# normalised copy, then ScaNN's copies while it trains: 13.0 measured) and while it is
# loaded for search (float data for reordering + hashes: 4.8 measured); 1M x 512 tree
# index, benchmarks/RESULTS.md. With a margin.
BUILD_BYTES_PER_FLOAT = 14.0
LOADED_BYTES_PER_FLOAT = 5.5
# Candidates re-scored exactly per neighbour asked for. The original used 2 (reorder 2K):
# on 1M clustered 512-d vectors that caps recall@20 at 0.70; 10 gives 0.988 for 15% more
# search time (benchmarks/RESULTS.md).
REORDER_PER_NEIGHBOR = 10


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one shard is searched. kind: exact | brute | ah | tree_ah."""

  kind: str
  num_leaves: int = 0
  leaves_to_search: int = 0
  training_sample: int = 0
  dims_per_block: int = 2
  anisotropic_threshold: float = 0.2
  reorder: int = 0
  spherical: bool = True


KINDS = ("auto", "exact", "brute", "ah", "tree_ah")


def recipe_for(n: int, k: int, cfg: Any) -> Recipe:
  """The recipe for a shard of n vectors searched for k neighbours (config.retrieval.index)."""
  kind = cfg.kind
  if kind not in KINDS:
    fail(f"config.retrieval.index.kind={kind!r}; use one of {', '.join(KINDS)}")
  if kind == "auto":
    kind = "exact" if n < cfg.exact_below else "ah" if n < cfg.ah_below else "tree_ah"
  if kind in ("exact", "brute"):
    return Recipe(kind=kind)
  reorder = cfg.reorder or REORDER_PER_NEIGHBOR * k
  ah = dict(dims_per_block=cfg.dims_per_block, anisotropic_threshold=cfg.anisotropic_threshold,
            reorder=max(reorder, k))
  if kind == "ah":
    return Recipe(kind="ah", **ah)
  num_leaves = cfg.num_leaves or max(1, int(math.sqrt(n)))
  if num_leaves > n:
    fail(f"config.retrieval.index.num_leaves={num_leaves} exceeds the shard size {n}")
  return Recipe(kind="tree_ah", num_leaves=num_leaves,
                leaves_to_search=cfg.leaves_to_search or max(1, num_leaves // 20),
                training_sample=cfg.training_sample or max(num_leaves, n // 10),
                spherical=bool(cfg.spherical), **ah)


def shard_ranges(n: int, d: int, cfg: Any) -> list[tuple[int, int]]:
  """Row ranges [start, stop) of the shards: equal sizes, each buildable within max_memory_gb."""
  size = cfg.shard_size or int(cfg.max_memory_gb * 2**30 / (BUILD_BYTES_PER_FLOAT * d))
  if size < 1:
    fail(f"config.retrieval.index.max_memory_gb={cfg.max_memory_gb} is too small for one {d}-d vector")
  num = max(1, math.ceil(n / size))
  bounds = [round(i * n / num) for i in range(num + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def check_embeddings(s: store.Store, what: str, start: int = 0, stop: int | None = None,
                     chunk: int = 1 << 16) -> None:
  """Scans rows [start, stop) of a store's embeddings in chunks (file reads, not the memory
  map): NaN/inf or zero-norm rows are an error, raised before any work is saved."""
  stop = len(s["embeddings"]) if stop is None else min(stop, len(s["embeddings"]))
  for a in range(start, stop, chunk):
    b = min(a + chunk, stop)
    exact.l2_normalize(store.read_rows(s, "embeddings", a, b), f"{what} (rows {a}:{b})", copy=False)


def build_scann(data: np.ndarray, k: int, recipe: Recipe, threads: int = 0):
  """A ScaNN searcher over L2-normalised `data` [n, d] (not for recipe kind 'exact')."""
  import scann  # heavy import (TensorFlow ops); only when an index is built

  b = scann.scann_ops_pybind.builder(data, k, "dot_product")
  b.set_n_training_threads(threads or os.cpu_count() or 1)
  if recipe.kind == "brute":
    return b.score_brute_force().build()
  if recipe.kind == "tree_ah":
    b = b.tree(num_leaves=recipe.num_leaves, num_leaves_to_search=recipe.leaves_to_search,
               training_sample_size=recipe.training_sample, spherical=recipe.spherical)
  return b.score_ah(recipe.dims_per_block,
                    anisotropic_quantization_threshold=recipe.anisotropic_threshold).reorder(recipe.reorder).build()


# Every file ScaNN 1.4's serialize may write (scann_ops_pybind_backcompat lists the assets).
SCANN_FILES = frozenset({
    "scann_assets.pbtxt", "scann_config.pb", "ah_codebook.pb", "serialized_partitioner.pb",
    "datapoint_to_token.npy", "hashed_dataset.npy", "int8_dataset.npy", "int8_multipliers.npy",
    "dp_norms.npy", "dataset.npy"})


def _load_scann(shard_dir: str):
  """A ScaNN searcher from a checked shard directory, without `load_searcher`'s pickle of docids."""
  from scann.scann_ops.py import scann_ops_pybind

  with open(os.path.join(shard_dir, "scann_assets.pbtxt")) as f:
    assets = f.read()
  return scann_ops_pybind.ScannSearcher(scann_ops_pybind.scann_pybind.ScannNumpy(shard_dir, assets), None)


def plan(n: int, d: int, k: int, cfg: Any) -> list[dict[str, Any]]:
  """The shards of an index over [n, d]: row ranges, recipes and directory names."""
  if k > n:
    fail(f"asked for K={k} neighbours but the database has only {n} entries")
  shards = []
  for i, (a, b) in enumerate(shard_ranges(n, d, cfg)):
    recipe = recipe_for(b - a, min(k, b - a), cfg)
    shards.append(dict(start=a, stop=b, recipe=dataclasses.asdict(recipe),
                       dir="" if recipe.kind == "exact" else f"shard_{i:05d}"))
  return shards


def ensure(database: store.Store, cfg: Any, k: int, path: str, log: Callable[[str], None] = print) -> "Index":
  """The index at `path` if it was built for this database, K and knobs; else builds it."""
  path = store.check_output(path, KIND)
  if store.exists(path):
    m = store.read(path, KIND, hint=INDEX_HINT).manifest
    n, d = database["embeddings"].shape
    if (m.get("database_fingerprint"), m.get("num_neighbors"), m.get("shards"), "shard_files" in m) == (
        database.fingerprint, k, plan(n, d, k, cfg), True):
      log(f"{path} exists and matches the database and config; skipping (delete it to rebuild)")
      return load(path, database, cfg)
    log(f"{path} was built for another database or other settings; rebuilding")
  return build(database, cfg, k, path, log)


def build(database: store.Store, cfg: Any, k: int, path: str, log: Callable[[str], None] = print) -> "Index":
  """Builds (or resumes building) the index of `database` at `path`, shard by shard."""
  path = store.check_output(path, KIND)
  emb = database["embeddings"]
  n, d = emb.shape
  shards = plan(n, d, k, cfg)
  fields = dict(database_path=os.path.abspath(database.path), database_fingerprint=database.fingerprint,
                dim=d, num_neighbors=k, shards=shards)
  with store.Lock(path, log) as lock:
    partial = store.open_partial(path, fields, log)
    log(f"{path}: {len(shards)} shard(s) of {database.path} [{n}, {d}]: "
        + ", ".join(f"{s['stop'] - s['start']} rows {s['recipe']['kind']}" for s in shards))
    check_embeddings(database, f"database {database.path}")
    t0 = time.time()
    for shard in shards:
      if not shard["dir"] or os.path.isdir(os.path.join(partial, shard["dir"])):
        continue
      final = os.path.join(partial, shard["dir"])
      recipe = Recipe(**shard["recipe"])
      t = time.time()
      data = exact.l2_normalize(store.read_rows(database, "embeddings", shard["start"], shard["stop"]),
                                f"database {database.path}", copy=False)
      searcher = build_scann(data, min(k, len(data)), recipe, cfg.threads)
      del data
      tmp = final + ".tmp"
      if os.path.isdir(tmp):
        shutil.rmtree(tmp)  # an interrupted build's (ours: inside our partial)
      os.makedirs(tmp)
      searcher.serialize(os.path.abspath(tmp), relative_path=True)  # relative paths reload anywhere
      del searcher
      os.replace(tmp, final)
      lock.refresh()
      log(f"{path}: shard rows {shard['start']}:{shard['stop']} built in {time.time() - t:.1f} s")
    shard_files = {s["dir"]: {f: os.path.getsize(os.path.join(partial, s["dir"], f))
                              for f in sorted(os.listdir(os.path.join(partial, s["dir"])))}
                   for s in shards if s["dir"]}
    for files in shard_files.values():
      if set(files) - SCANN_FILES or "scann_assets.pbtxt" not in files:
        raise RuntimeError(f"ScaNN wrote files this code does not know ({sorted(files)}); update SCANN_FILES")
    manifest = dict(kind=KIND, format_version=store.FORMAT_VERSION, count=n, arrays={},
                    build_seconds=round(time.time() - t0, 1), made_by="rdm_jax.jobs.index",
                    shard_files=shard_files, **fields)
    store.atomic_write_text(os.path.join(partial, store.MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    store.publish(partial, path, KIND)
  return load(path, database, cfg)


def _check_shards(path: str, m: dict) -> None:
  """The manifest's shards are the plain, contiguous layout the build writes; nothing else loads.

  A shard directory must be `shard_NNNNN` (its position), a real directory inside the index,
  holding exactly the ScaNN files the build recorded (names from SCANN_FILES, sizes as
  recorded, no symbolic links): ScaNN's own loader would unpickle a `scann_docids.pkl` found
  there, and `scann_assets.pbtxt` names the files ScaNN opens.
  """
  bad = lambda why: fail(f"index {path} is damaged or was not written by the index job ({why}); "  # noqa: E731
                         f"delete it and rebuild: `{INDEX_HINT}`")
  shards, files = m.get("shards"), m.get("shard_files")
  if not isinstance(shards, list) or not shards or not isinstance(files, dict):
    bad("no shard list")
  expected_start = 0
  for i, shard in enumerate(shards):
    recipe = shard.get("recipe") if isinstance(shard, dict) else None
    if not isinstance(recipe, dict) or recipe.get("kind") not in KINDS[1:]:
      bad(f"shard {i} has no known recipe")
    if (type(shard.get("start")), type(shard.get("stop"))) != (int, int) or shard["start"] != expected_start \
        or shard["stop"] <= shard["start"]:
      bad(f"shard {i} rows are not contiguous")
    expected_start = shard["stop"]
    want_dir = "" if recipe["kind"] == "exact" else f"shard_{i:05d}"
    if shard.get("dir") != want_dir:
      bad(f"shard {i} names directory {str(shard.get('dir'))[:80]!r}, the build writes {want_dir!r}")
    if want_dir:
      _check_shard_dir(path, want_dir, files.get(want_dir), bad)
  if expected_start != m.get("count"):
    bad("the shards do not cover the database")


def _check_shard_dir(path: str, name: str, recorded: Any, bad: Callable[[str], None]) -> None:
  shard_dir = os.path.join(path, name)
  if os.path.islink(shard_dir) or not os.path.isdir(shard_dir) or \
      os.path.dirname(os.path.realpath(shard_dir)) != os.path.realpath(path):
    bad(f"{name} is not a directory inside the index")
  present = set(os.listdir(shard_dir))
  if "scann_docids.pkl" in present:
    bad(f"{name} holds scann_docids.pkl, a pickle (code) the build never writes")
  if not isinstance(recorded, dict) or present != set(recorded) or present - SCANN_FILES:
    bad(f"{name} holds {sorted(present)[:12]}, the build wrote {sorted(recorded or {})[:12]}")
  for f, size in recorded.items():
    full = os.path.join(shard_dir, f)
    if os.path.islink(full) or not os.path.isfile(full) or os.path.getsize(full) != size:
      bad(f"{name}/{f} is not the {size}-byte file the build wrote")
  from google.protobuf import text_format
  from scann.scann_ops import scann_assets_pb2

  with open(os.path.join(shard_dir, "scann_assets.pbtxt")) as f:
    try:
      assets = text_format.Parse(f.read(), scann_assets_pb2.ScannAssets())
    except text_format.ParseError:
      bad(f"{name}/scann_assets.pbtxt does not parse")
  for asset in assets.assets:
    if asset.asset_path not in present or asset.asset_path == "scann_assets.pbtxt":
      bad(f"{name}/scann_assets.pbtxt points outside the shard ({asset.asset_path[:80]!r})")


def load(path: str, database: store.Store, cfg: Any) -> "Index":
  """Opens the index at `path` and checks it was built on exactly this database, by the index job."""
  s = store.read(path, KIND, hint=INDEX_HINT)
  m = s.manifest
  if m.get("database_fingerprint") != database.fingerprint:
    fail(f"index {path} was built on another database ({m.get('database_path')}, fingerprint "
         f"{m.get('database_fingerprint')}) than {database.path} ({database.fingerprint}); rebuild it: "
         f"`{INDEX_HINT}`")
  n, d = database["embeddings"].shape
  if (m["count"], m.get("dim")) != (n, d):
    fail(f"index {path} covers [{m['count']}, {m.get('dim')}] but the database is [{n}, {d}]; rebuild it")
  _check_shards(s.path, m)
  return Index(s.path, m, database, cfg.search_memory_gb or cfg.max_memory_gb, cfg.threads)


class Index:
  """Searches every shard of a built index and merges the per-shard top-k."""

  def __init__(self, path: str, manifest: dict, database: store.Store, memory_gb: float,
               threads: int = 0):
    """memory_gb: RAM for the ScaNN shards loaded at once (config search_memory_gb)."""
    self.path, self.manifest, self.database = path, manifest, database
    self.shards = manifest["shards"]
    self.budget = memory_gb * 2**30
    self.threads = threads
    self._loaded: collections.OrderedDict[int, Any] = collections.OrderedDict()

  @property
  def size(self) -> int:
    return self.manifest["count"]

  @property
  def fingerprint(self) -> str:
    return store.fingerprint(self.manifest)

  def _shard_bytes(self, i: int) -> float:
    s = self.shards[i]
    return (s["stop"] - s["start"]) * self.manifest["dim"] * LOADED_BYTES_PER_FLOAT

  @property
  def shards_in_memory(self) -> int:
    """How many ScaNN shards stay loaded at once within the memory budget."""
    sizes = [self._shard_bytes(i) for i, s in enumerate(self.shards) if s["dir"]]
    return len(sizes) if not sizes else max(1, min(len(sizes), int(self.budget // max(sizes))))

  def _searcher(self, i: int):
    if i in self._loaded:
      self._loaded.move_to_end(i)
      return self._loaded[i]
    while self._loaded and sum(map(self._shard_bytes, [*self._loaded, i])) > self.budget:
      self._loaded.popitem(last=False)  # least recently used shard leaves RAM
    searcher = _load_scann(os.path.abspath(os.path.join(self.path, self.shards[i]["dir"])))
    if self.threads:
      searcher.set_num_threads(self.threads)
    self._loaded[i] = searcher
    return searcher

  def search_shard(self, i: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, database rows) of L2-normalised queries within shard i."""
    shard = self.shards[i]
    a, b = shard["start"], shard["stop"]
    k = min(k, b - a)
    recipe = shard["recipe"]
    if recipe["kind"] == "exact":
      scores, rows = exact.exact_search(queries, self.database["embeddings"][a:b], k, normalize_database=True)
    else:
      extra = {}
      if recipe["reorder"]:  # keep the built ratio of reordered candidates when k grows
        extra["pre_reorder_num_neighbors"] = max(recipe["reorder"],
                                                 math.ceil(recipe["reorder"] * k / self.manifest["num_neighbors"]))
      rows, scores = self._searcher(i).search_batched_parallel(queries, final_num_neighbors=k, **extra)
    return np.asarray(scores, np.float32), np.asarray(rows, np.int64) + a

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over all shards: (scores [Q, k] descending, database rows [Q, k] int64)."""
    if queries.shape[1] != self.manifest["dim"]:
      fail(f"queries are {queries.shape[1]}-d but index {self.path} is {self.manifest['dim']}-d: "
           "queries and database must come from the same encoder")
    if k > self.size:
      fail(f"asked for K={k} neighbours but the database has only {self.size} entries")
    results = [self.search_shard(i, queries, k) for i in range(len(self.shards))]
    if len(results) == 1:
      return results[0]
    return merge_topk([r[0] for r in results], [r[1] for r in results], k)


def merge_topk(scores: list[np.ndarray], rows: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
  """Merges per-shard top lists into the overall top-k (ties keep shard order)."""
  s = np.concatenate(scores, axis=1)
  r = np.concatenate(rows, axis=1)
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, axis=1), np.take_along_axis(r, order, axis=1)
