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

Builds are deterministic: the same database and knobs give the same index files and the
same neighbours, byte for byte, whatever the machine's thread count. ScaNN 1.4's
RANDOM_INITIALIZATION of the tree's k-means ignores its seed, so the tree starts from
k-means++ (seeded by ScaNN's `clustering_seed`), and with more than one training thread
the point-to-leaf lists and the AH codebooks come out in thread-timing order, so
`deterministic=True` (the default) trains on one thread (benchmarks/RESULTS.md: the cost).

Recall is a target, not a hope (`target_recall`, default 0.97): after each ScaNN shard is
built, `tune_search` measures recall@K against exact search on a sample of the shard's own
rows (each query's own row left out of both lists) and widens the search (leaves searched,
candidates reordered) until the target is met, or fails with the table of what it tried.
The chosen settings, the measured recall and the time per query go in the manifest and
are what `Index.search` uses.

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
import time
from typing import Any, Callable

import numpy as np

from rdm_jax import files, untrusted
from rdm_jax.data import store
from rdm_jax.data.lock import Lock
from rdm_jax.errors import UserError, fail
from rdm_jax.retrieval import exact

KIND = "index"
INDEX_HINT = "python -m rdm_jax.jobs.index --config=<this config>"
# Peak bytes per database float (element) while one shard's ScaNN index is built (our
# normalised copy, then ScaNN's copies while it trains) and while it is loaded for search
# (float data for reordering + hashes): benchmarks/neighbors_scale.py's figures on a 1M x 512
# tree index (benchmarks/RESULTS.md), with a margin.
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
  ah = dict(
    dims_per_block=cfg.dims_per_block,
    anisotropic_threshold=cfg.anisotropic_threshold,
    reorder=max(reorder, k),
  )
  if kind == "ah":
    return Recipe(kind="ah", **ah)
  num_leaves = cfg.num_leaves or max(1, int(math.sqrt(n)))
  if num_leaves > n:
    fail(f"config.retrieval.index.num_leaves={num_leaves} exceeds the shard size {n}")
  return Recipe(
    kind="tree_ah",
    num_leaves=num_leaves,
    leaves_to_search=cfg.leaves_to_search or max(1, num_leaves // 20),
    training_sample=cfg.training_sample or max(num_leaves, n // 10),
    spherical=bool(cfg.spherical),
    **ah,
  )


def shard_ranges(n: int, d: int, cfg: Any) -> list[tuple[int, int]]:
  """Row ranges [start, stop) of the shards: equal sizes, each buildable within max_memory_gb."""
  size = cfg.shard_size or int(cfg.max_memory_gb * 2**30 / (BUILD_BYTES_PER_FLOAT * d))
  if size < 1:
    fail(
      f"config.retrieval.index.max_memory_gb={cfg.max_memory_gb} is too small for one {d}-d vector"
    )
  num = max(1, math.ceil(n / size))
  bounds = [round(i * n / num) for i in range(num + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def check_embeddings(
  s: store.Store, what: str, start: int = 0, stop: int | None = None, chunk: int = 1 << 16
) -> None:
  """Scans rows [start, stop) of a store's embeddings in chunks (file reads, not the memory
  map): NaN/inf or zero-norm rows are an error, raised before any work is saved."""
  stop = len(s["embeddings"]) if stop is None else min(stop, len(s["embeddings"]))
  for a in range(start, stop, chunk):
    b = min(a + chunk, stop)
    exact.l2_normalize(store.read_rows(s, "embeddings", a, b), f"{what} (rows {a}:{b})", copy=False)


def build_scann(data: np.ndarray, k: int, recipe: Recipe, threads: int = 1):
  """A ScaNN searcher over L2-normalised `data` [n, d] (not for recipe kind 'exact').

  threads: training threads; 1 (the default) is what makes the build deterministic.
  """
  import scann  # heavy import (TensorFlow ops); only when an index is built

  b = scann.scann_ops_pybind.builder(data, k, "dot_product")
  b.set_n_training_threads(max(1, threads))
  if recipe.kind == "brute":
    return b.score_brute_force().build()
  if recipe.kind == "tree_ah":
    # random_init=False: k-means++ from ScaNN's seed (its random initialisation is unseeded)
    b = b.tree(
      num_leaves=recipe.num_leaves,
      num_leaves_to_search=recipe.leaves_to_search,
      training_sample_size=recipe.training_sample,
      spherical=recipe.spherical,
      random_init=False,
    )
  return (
    b.score_ah(
      recipe.dims_per_block, anisotropic_quantization_threshold=recipe.anisotropic_threshold
    )
    .reorder(recipe.reorder)
    .build()
  )


# Every file ScaNN 1.4's serialize may write (scann_ops_pybind_backcompat lists the assets).
SCANN_FILES = frozenset(
  {
    "scann_assets.pbtxt",
    "scann_config.pb",
    "ah_codebook.pb",
    "serialized_partitioner.pb",
    "datapoint_to_token.npy",
    "hashed_dataset.npy",
    "int8_dataset.npy",
    "int8_multipliers.npy",
    "dp_norms.npy",
    "dataset.npy",
  }
)


def training_threads(cfg: Any) -> int:
  """ScaNN training threads: 1 when builds must be reproducible, else `threads` (0 = all cores)."""
  return 1 if cfg.deterministic else cfg.threads or os.cpu_count() or 1


def scann_search_args(leaves: int, reorder: int, k: int) -> dict[str, int]:
  """ScaNN `search_batched_parallel` keywords for k neighbours with leaves searched / reorder (0: as
  built)."""
  args = {"final_num_neighbors": k}
  if leaves:
    args["leaves_to_search"] = leaves
  if reorder:
    args["pre_reorder_num_neighbors"] = max(reorder, k)
  return args


def _search_scann(searcher, queries: np.ndarray, k: int, leaves: int, reorder: int) -> np.ndarray:
  """Database rows [Q, k] of a ScaNN search with explicit leaves searched / reorder (0: as
  built)."""
  rows, _ = searcher.search_batched_parallel(queries, **scann_search_args(leaves, reorder, k))
  return np.asarray(rows, np.int64)


def recall_leaving_out_self(
  approx: np.ndarray, truth: np.ndarray, self_rows: np.ndarray, k: int
) -> float:
  """Mean recall@k of approx against truth (both [Q, >= k+1] row lists), each query's own row
  (self_rows) removed from both first: the query is a database point, and finding itself is free."""
  hits = 0
  for a, t, me in zip(approx, truth, self_rows):
    t = [r for r in t if r != me][:k]
    a = [r for r in a if r != me][:k]
    hits += len(set(a) & set(t))
  return hits / (k * len(truth))


def needs_tuning(recipe: Recipe, cfg: Any, n: int, k: int) -> bool:
  return recipe.kind not in ("exact", "brute") and cfg.target_recall > 0 and n > k + 1


def tuning_queries(data: np.ndarray, k: int, cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(rows, queries, exact top-(k+1) rows) for `tune_search`: `cfg.tune_queries` rows of the
  shard (a fixed seed). Computed before the ScaNN build, so its memory does not add to the
  build's peak."""
  rng = np.random.default_rng(cfg.tune_seed)
  n = len(data)
  rows = np.sort(rng.choice(n, min(cfg.tune_queries, n), replace=False))
  queries = np.ascontiguousarray(data[rows])
  _, truth = exact.exact_search(queries, data, min(k + 1, n))
  return rows, queries, truth


def tune_search(
  searcher,
  data: np.ndarray,
  k: int,
  recipe: Recipe,
  cfg: Any,
  log: Callable[[str], None] = print,
  what: str = "shard",
  queries: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
  """The cheapest search settings of a built ScaNN shard that reach `cfg.target_recall`.

  Queries are `cfg.tune_queries` rows of the shard (`tuning_queries`), searched for k+1
  neighbours so that each can drop itself; truth is exact search. Starting from the
  recipe, each step widens whichever of (leaves searched x2, reorder x2) gains more recall,
  within num_leaves and `max_reorder` (0 = 100 per neighbour). Returns the settings with
  the measured recall and ms per query, and every setting tried. Fails with that table
  when the widest search allowed misses the target.
  """
  n = len(data)
  if not needs_tuning(recipe, cfg, n, k):
    return {}
  self_rows, queries, truth = queries or tuning_queries(data, k, cfg)
  kk = min(k + 1, n)
  leaves, reorder = recipe.leaves_to_search, max(recipe.reorder, k)
  max_leaves = max(recipe.num_leaves, leaves)
  max_reorder = max(min(n, cfg.max_reorder or 100 * k), reorder)  # never narrower than the recipe
  tried: dict[tuple[int, int], dict[str, float]] = {}

  def measure(leaves: int, reorder: int) -> float:
    if (leaves, reorder) not in tried:
      _search_scann(searcher, queries[:64], kk, leaves, reorder)  # warm-up
      t = time.perf_counter()
      rows = _search_scann(searcher, queries, kk, leaves, reorder)
      ms = (time.perf_counter() - t) * 1e3 / len(queries)
      tried[(leaves, reorder)] = dict(
        recall=recall_leaving_out_self(rows, truth, self_rows, k), ms_per_query=ms
      )
    return tried[(leaves, reorder)]["recall"]

  while measure(leaves, reorder) < cfg.target_recall:
    steps = [(min(2 * leaves, max_leaves), reorder), (leaves, min(2 * reorder, max_reorder))]
    steps = [s for s in steps if s != (leaves, reorder)]
    if not steps:
      table = "\n".join(
        f"  leaves {a:>6} reorder {b:>6}: recall@{k} {v['recall']:.4f}, "
        f"{v['ms_per_query']:.3f} ms/query"
        for (a, b), v in sorted(tried.items())
      )
      fail(
        f"{what}: recall@{k} against exact search stays below "
        f"retrieval.index.target_recall={cfg.target_recall} within the search budget (leaves "
        f"searched <= num_leaves={max_leaves}, reorder <= "
        f"max_reorder={max_reorder}):\n{table}\nRaise retrieval.index.max_reorder, use a finer "
        "quantisation (dims_per_block=1) or more leaves (num_leaves), or lower target_recall."
      )
    leaves, reorder = max(steps, key=lambda s: (measure(*s), -s[0] * s[1]))
  chosen = tried[(leaves, reorder)]
  log(
    f"{what}: search {leaves} leaves, reorder {reorder}: recall@{k} {chosen['recall']:.4f} "
    f"(target {cfg.target_recall}), {chosen['ms_per_query']:.3f} ms/query"
  )
  return dict(
    leaves_to_search=leaves,
    reorder=reorder,
    recall_at_k=round(chosen["recall"], 6),
    ms_per_query=round(chosen["ms_per_query"], 4),
    queries=len(queries),
    tried=[
      dict(
        leaves_to_search=a,
        reorder=b,
        recall_at_k=round(v["recall"], 6),
        ms_per_query=round(v["ms_per_query"], 4),
      )
      for (a, b), v in sorted(tried.items())
    ],
  )


def _load_scann(shard_dir: str):
  """A ScaNN searcher from a checked shard directory, without `load_searcher`'s pickle of docids."""
  from scann.scann_ops.py import scann_ops_pybind

  with untrusted.open_regular(
    os.path.join(shard_dir, "scann_assets.pbtxt"), "r", encoding="utf-8"
  ) as f:
    assets = f.read()
  return scann_ops_pybind.ScannSearcher(
    scann_ops_pybind.scann_pybind.ScannNumpy(shard_dir, assets), None
  )


def plan(n: int, d: int, k: int, cfg: Any) -> list[dict[str, Any]]:
  """The shards of an index over [n, d]: row ranges, recipes and directory names."""
  if k > n:
    fail(f"asked for K={k} neighbours but the database has only {n} entries")
  shards = []
  for i, (a, b) in enumerate(shard_ranges(n, d, cfg)):
    recipe = recipe_for(b - a, min(k, b - a), cfg)
    shards.append(
      dict(
        start=a,
        stop=b,
        recipe=dataclasses.asdict(recipe),
        dir="" if recipe.kind == "exact" else f"shard_{i:05d}",
      )
    )
  return shards


def search_target(cfg: Any) -> dict[str, Any]:
  """The knobs the build's search tuning and determinism depend on (recorded; a change rebuilds)."""
  return dict(
    target_recall=cfg.target_recall,
    tune_queries=cfg.tune_queries,
    tune_seed=cfg.tune_seed,
    max_reorder=cfg.max_reorder,
    deterministic=bool(cfg.deterministic),
  )


def ensure(
  database: store.Store, cfg: Any, k: int, path: str, log: Callable[[str], None] = print
) -> "Index":
  """The index at `path` if it was built for this database, K and knobs; else builds it."""
  path = store.check_output(path, KIND)
  if store.exists(path):
    m = store.read(path, KIND, hint=INDEX_HINT).manifest
    n, d = database["embeddings"].shape
    if (
      m.get("database_fingerprint"),
      m.get("num_neighbors"),
      m.get("shards"),
      m.get("search_target"),
      "shard_files" in m,
    ) == (database.fingerprint, k, plan(n, d, k, cfg), search_target(cfg), True):
      log(f"{path} exists and matches the database and config; skipping (delete it to rebuild)")
      return load(path, database, cfg)
    log(f"{path} was built for another database or other settings; rebuilding")
  return build(database, cfg, k, path, log)


def _serialize(searcher: Any, folder: str, size: int) -> None:
  """Writes a ScaNN searcher into `folder`; a disk without room for it (about its float32 rows) is
  one line, before writing or after a failed write (ScaNN reports a full disk as an "I/O error")."""
  files.need_room(os.path.join(folder, "dataset.npy"), size)
  try:
    searcher.serialize(
      os.path.abspath(folder), relative_path=True
    )  # relative paths reload anywhere
  except (RuntimeError, OSError) as e:
    store.remove_shard_dir(folder)
    files.need_room(
      os.path.join(folder, "dataset.npy"), 2 * size
    )  # short of room, not a failing disk
    files.write_failed(e, folder)


def build(
  database: store.Store, cfg: Any, k: int, path: str, log: Callable[[str], None] = print
) -> "Index":
  """Builds (or resumes building) the index of `database` at `path`, shard by shard."""
  path = store.check_output(path, KIND)
  emb = database["embeddings"]
  n, d = emb.shape
  shards = plan(n, d, k, cfg)
  fields = dict(
    database_path=os.path.abspath(database.path),
    database_fingerprint=database.fingerprint,
    dim=d,
    num_neighbors=k,
    shards=shards,
    search_target=search_target(cfg),
  )
  with Lock(path, log) as lock:
    partial = store.open_partial(path, fields, log)
    log(
      f"{path}: {len(shards)} shard(s) of {database.path} [{n}, {d}]: "
      + ", ".join(f"{s['stop'] - s['start']} rows {s['recipe']['kind']}" for s in shards)
    )
    check_embeddings(database, f"database {database.path}")
    t0 = time.time()
    search = {}
    finished = _partial_manifest_search(partial)  # a run killed while finishing had written these
    for shard in shards:
      if not shard["dir"]:
        continue
      final = os.path.join(partial, shard["dir"])
      tuned = final + ".search.json"  # the shard's tuned search settings, written before the shard
      if os.path.isdir(final) and os.path.isfile(tuned):
        search[shard["dir"]] = untrusted.read_json(tuned)
        continue
      if os.path.isdir(final) and shard["dir"] in finished:
        search[shard["dir"]] = finished[shard["dir"]]
        continue
      if os.path.isdir(final):
        store.remove_shard_dir(
          final
        )  # built, but its search settings were lost: build it again (deterministic)
      recipe = Recipe(**shard["recipe"])
      t = time.time()
      data = exact.l2_normalize(
        store.read_rows(database, "embeddings", shard["start"], shard["stop"]),
        f"database {database.path}",
        copy=False,
      )
      tune_k = min(k, len(data) - 1)
      probe = (
        tuning_queries(data, tune_k, cfg) if needs_tuning(recipe, cfg, len(data), tune_k) else None
      )
      t_build = time.time()
      searcher = build_scann(data, min(k, len(data)), recipe, training_threads(cfg))
      build_s = time.time() - t_build
      search[shard["dir"]] = tune_search(
        searcher,
        data,
        tune_k,
        recipe,
        cfg,
        log,
        f"{path}: shard rows {shard['start']}:{shard['stop']}",
        probe,
      )
      del data
      tmp = final + ".tmp"
      if os.path.isdir(tmp):
        store.remove_shard_dir(tmp)  # an interrupted build's (ours: inside our partial)
      os.makedirs(tmp)
      _serialize(
        searcher, tmp, size=(shard["stop"] - shard["start"]) * database["embeddings"].shape[1] * 4
      )
      del searcher
      store.atomic_write_text(tuned, json.dumps(search[shard["dir"]], sort_keys=True))
      os.replace(tmp, final)
      lock.refresh()
      log(
        f"{path}: shard rows {shard['start']}:{shard['stop']} built in {build_s:.1f} s "
        f"(+{time.time() - t - build_s:.1f} s reading, tuning the search, writing)"
      )
    for name in os.listdir(partial):  # temporaries of a run killed while writing them (ours)
      if name.endswith(".tmp"):
        (store.remove_shard_dir if os.path.isdir(os.path.join(partial, name)) else os.remove)(
          os.path.join(partial, name)
        )
    shard_files = {
      s["dir"]: {
        f: os.path.getsize(os.path.join(partial, s["dir"], f))
        for f in sorted(os.listdir(os.path.join(partial, s["dir"])))
      }
      for s in shards
      if s["dir"]
    }
    for written in shard_files.values():
      if set(written) - SCANN_FILES or "scann_assets.pbtxt" not in written:
        raise RuntimeError(
          f"ScaNN wrote files this code does not know ({sorted(written)}); update SCANN_FILES"
        )
    manifest = dict(
      kind=KIND,
      format_version=store.FORMAT_VERSION,
      count=n,
      arrays={},
      build_seconds=round(time.time() - t0, 1),
      made_by="rdm_jax.jobs.index",
      shard_files=shard_files,
      search=search,
      **fields,
    )
    store.atomic_write_text(
      os.path.join(partial, store.MANIFEST), json.dumps(manifest, indent=1, sort_keys=True)
    )
    for name in search:  # ours; the manifest holds them now
      if os.path.isfile(os.path.join(partial, name + ".search.json")):
        os.remove(os.path.join(partial, name + ".search.json"))
    store.publish(partial, path, KIND)
  return load(path, database, cfg)


TIMINGS = ("build_seconds", "ms_per_query")  # measured, so different on every build


def without_timings(value: Any) -> Any:
  """A manifest (or part of one) without the measured times, at any depth."""
  if isinstance(value, dict):
    return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
  if isinstance(value, list):
    return [without_timings(v) for v in value]
  return value


def _partial_manifest_search(partial: str) -> dict[str, Any]:
  """The per-shard search settings in a manifest an interrupted build wrote into its partial."""
  try:
    search = untrusted.read_json(os.path.join(partial, store.MANIFEST)).get("search", {})
  except (OSError, UserError, AttributeError):
    return {}
  return search if isinstance(search, dict) else {}


def _check_shards(path: str, m: dict) -> None:
  """The manifest's shards are the plain, contiguous layout the build writes; nothing else loads.

  A shard directory must be `shard_NNNNN` (its position), a real directory inside the index,
  holding exactly the ScaNN files the build recorded (names from SCANN_FILES, sizes as
  recorded, no symbolic links): ScaNN's own loader would unpickle a `scann_docids.pkl` found
  there, and `scann_assets.pbtxt` names the files ScaNN opens.
  """
  bad = lambda why: fail(
    f"index {path} is damaged or was not written by the index job ({why}); "
    f"delete it and rebuild: `{INDEX_HINT}`"
  )
  shards, files = m.get("shards"), m.get("shard_files")
  if not isinstance(shards, list) or not shards or not isinstance(files, dict):
    bad("no shard list")
  expected_start = 0
  for i, shard in enumerate(shards):
    recipe = shard.get("recipe") if isinstance(shard, dict) else None
    if not isinstance(recipe, dict) or recipe.get("kind") not in KINDS[1:]:
      bad(f"shard {i} has no known recipe")
    if (
      (type(shard.get("start")), type(shard.get("stop"))) != (int, int)
      or shard["start"] != expected_start
      or shard["stop"] <= shard["start"]
    ):
      bad(f"shard {i} rows are not contiguous")
    expected_start = shard["stop"]
    want_dir = "" if recipe["kind"] == "exact" else f"shard_{i:05d}"
    if shard.get("dir") != want_dir:
      bad(
        f"shard {i} names directory {str(shard.get('dir'))[:80]!r}, the build writes {want_dir!r}"
      )
    if want_dir:
      _check_shard_dir(path, want_dir, files.get(want_dir), bad)
      tuned = (
        m.get("search", {}).get(want_dir, {}) if isinstance(m.get("search", {}), dict) else None
      )
      if not isinstance(tuned, dict) or any(
        type(tuned.get(key, 0)) is not int
        or not 0 <= tuned.get(key, 0) <= shard["stop"] - shard["start"]
        for key in ("leaves_to_search", "reorder")
      ):
        bad(f"the search settings of {want_dir} are not what the build writes")
  if expected_start != m.get("count"):
    bad("the shards do not cover the database")


def _check_shard_dir(path: str, name: str, recorded: Any, bad: Callable[[str], None]) -> None:
  shard_dir = os.path.join(path, name)
  if (
    os.path.islink(shard_dir)
    or not os.path.isdir(shard_dir)
    or os.path.dirname(os.path.realpath(shard_dir)) != os.path.realpath(path)
  ):
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

  with untrusted.open_regular(
    os.path.join(shard_dir, "scann_assets.pbtxt"), "r", encoding="utf-8"
  ) as f:
    try:
      assets = text_format.Parse(f.read(1 << 20), scann_assets_pb2.ScannAssets())
    except (text_format.ParseError, UnicodeDecodeError):
      bad(f"{name}/scann_assets.pbtxt does not parse")
  for asset in assets.assets:
    if asset.asset_path not in present or asset.asset_path == "scann_assets.pbtxt":
      bad(f"{name}/scann_assets.pbtxt points outside the shard ({asset.asset_path[:80]!r})")


def load(path: str, database: store.Store, cfg: Any) -> "Index":
  """Opens the index at `path` and checks it was built on exactly this database, by the index
  job."""
  s = store.read(path, KIND, hint=INDEX_HINT)
  m = s.manifest
  if m.get("database_fingerprint") != database.fingerprint:
    fail(
      f"index {path} was built on another database ({m.get('database_path')}, fingerprint "
      f"{m.get('database_fingerprint')}) than {database.path} ({database.fingerprint}); rebuild "
      f"it: `{INDEX_HINT}`"
    )
  n, d = database["embeddings"].shape
  if (m["count"], m.get("dim")) != (n, d):
    fail(
      f"index {path} covers [{m['count']}, {m.get('dim')}] but the database is [{n}, {d}]; "
      "rebuild it"
    )
  _check_shards(s.path, m)
  return Index(s.path, m, database, cfg.search_memory_gb or cfg.max_memory_gb, cfg.threads)


class Index:
  """Searches every shard of a built index and merges the per-shard top-k."""

  def __init__(
    self, path: str, manifest: dict, database: store.Store, memory_gb: float, threads: int = 0
  ):
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
    """What the index is (shards, files, search settings, recall), not how long it took: a
    deterministic rebuild has the same fingerprint, so the neighbours made with it stay valid."""
    return store.fingerprint(without_timings(self.manifest))

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
      scores, rows = exact.exact_search(
        queries, self.database["embeddings"][a:b], k, normalize_database=True
      )
    else:
      tuned = self.manifest.get("search", {}).get(shard["dir"]) or {}
      leaves = tuned.get("leaves_to_search", recipe["leaves_to_search"])
      reorder = tuned.get("reorder", recipe["reorder"])
      if reorder:  # keep the tuned ratio of reordered candidates when k grows
        reorder = max(reorder, math.ceil(reorder * k / self.manifest["num_neighbors"]))
      rows, scores = self._searcher(i).search_batched_parallel(
        queries, **scann_search_args(leaves, reorder, k)
      )
    return np.asarray(scores, np.float32), np.asarray(rows, np.int64) + a

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over all shards: (scores [Q, k] descending, database rows [Q, k] int64)."""
    if queries.shape[1] != self.manifest["dim"]:
      fail(
        f"queries are {queries.shape[1]}-d but index {self.path} is {self.manifest['dim']}-d: "
        "queries and database must come from the same encoder"
      )
    if k > self.size:
      fail(f"asked for K={k} neighbours but the database has only {self.size} entries")
    results = [self.search_shard(i, queries, k) for i in range(len(self.shards))]
    if len(results) == 1:
      return results[0]
    return merge_topk([r[0] for r in results], [r[1] for r in results], k)


def merge_topk(
  scores: list[np.ndarray], rows: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
  """Merges per-shard top lists into the overall top-k (ties keep shard order)."""
  s = np.concatenate(scores, axis=1)
  r = np.concatenate(rows, axis=1)
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, axis=1), np.take_along_axis(r, order, axis=1)
