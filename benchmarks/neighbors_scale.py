r"""Neighbour search at scale: the job's queries/s and recall@K against raw ScaNN on the same
index and exact JAX search on the same data, plus peak memory of the index build and of
the job per million database vectors.

  python benchmarks/neighbors_scale.py [--n=1000000] [--d=512] [--num_queries=50000] \
      [--workdir=/tmp/nbench]

Data: `rdm_jax.retrieval.synthetic.clustered_unit_vectors` (N / 500 clusters, noise 0.6),
queries near random database points (not in the database: no exclusion). Each phase runs
in a child process so its peak RSS is its own; a child that only imports the same modules
gives the baseline subtracted from the peaks.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_N = flags.DEFINE_integer("n", 1_000_000, "Database vectors.")
_D = flags.DEFINE_integer("d", 512, "Width.")
_CLUSTERS = flags.DEFINE_integer("clusters", 0, "Clusters of the synthetic database; 0 = n / 500.")
_NOISE = flags.DEFINE_float("noise", 0.6, "Noise around the cluster centres (larger: harder).")
_THREADS_CMP = flags.DEFINE_bool(
  "compare_threads",
  False,
  "Also build with deterministic=False (all cores) "
  "to measure what single-threaded, reproducible training costs.",
)
_Q = flags.DEFINE_integer("num_queries", 50_000, "Queries searched by the job and by raw ScaNN.")
_K = flags.DEFINE_integer("k", 20, "Neighbours.")
_EXACT_Q = flags.DEFINE_integer("exact_queries", 1000, "Queries for recall against exact search.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/nbench", "Where stores and the index go.")
_MEMORY = flags.DEFINE_float(
  "max_memory_gb", 64.0, "config.retrieval.index.max_memory_gb (smaller: shards)."
)
_REUSE = flags.DEFINE_bool("reuse_data", False, "Keep the stores of an earlier run in --workdir.")
_PHASE = flags.DEFINE_string("phase", "", "Internal: run one phase in this process.")


def config(workdir: str):
  from rdm_jax import config_base

  c = config_base.base_config()
  c.data_dir = workdir
  c.retrieval.num_neighbors = _K.value
  c.retrieval.chunk_size = 4096
  c.retrieval.recall_sample = 0  # measured separately below
  c.retrieval.index.max_memory_gb = _MEMORY.value
  return c


def phase_data(c) -> dict:
  from rdm_jax import config_base
  from rdm_jax.data import store
  from rdm_jax.retrieval import synthetic

  paths = config_base.paths(c)
  x = synthetic.clustered_unit_vectors(
    _N.value, _D.value, num_clusters=_CLUSTERS.value or None, noise=_NOISE.value
  )
  q = synthetic.perturbed_queries(x, _Q.value)
  enc = {"name": "synthetic", "embed_dim": _D.value}
  store.write(
    paths["database"],
    "database",
    {"embeddings": x, "ids": np.arange(len(x))},
    encoder=enc,
    source={"dataset": "synthetic", "split": "database"},
  )
  store.write(
    paths["embeddings_train"],
    "embeddings",
    {"embeddings": q, "ids": np.arange(len(q))},
    encoder=enc,
    source={"dataset": "synthetic", "split": "queries"},
  )
  return {}


def phase_build(c) -> dict:
  from rdm_jax import config_base
  from rdm_jax.data import store
  from rdm_jax.retrieval import index

  paths = config_base.paths(c)
  db = store.read(paths["database"], "database", hint="")
  t = time.perf_counter()
  idx = index.build(db, c.retrieval.index, c.retrieval.num_neighbors, paths["index"])
  return {
    "build_s": time.perf_counter() - t,
    "shards": [s["recipe"] for s in idx.shards],
    "search": idx.manifest["search"],
  }


def phase_build_threaded(c) -> dict:
  """The same build with every core training (not reproducible), into a scratch path."""
  import shutil

  from rdm_jax import config_base
  from rdm_jax.data import store
  from rdm_jax.retrieval import index

  paths = config_base.paths(c)
  db = store.read(paths["database"], "database", hint="")
  c.retrieval.index.deterministic = False
  out = os.path.join(c.data_dir, "threaded_index")
  t = time.perf_counter()
  index.build(db, c.retrieval.index, c.retrieval.num_neighbors, out)
  seconds = time.perf_counter() - t
  shutil.rmtree(out)
  return {"build_s": seconds}


def phase_job(c) -> dict:
  from rdm_jax import config_base
  from rdm_jax.data import store
  from rdm_jax.jobs import neighbors
  from rdm_jax.retrieval import index

  paths = config_base.paths(c)
  db = store.read(paths["database"], "database", hint="")
  idx = index.load(paths["index"], db, c.retrieval.index)
  idx.search(
    np.asarray(store.read(paths["embeddings_train"], "embeddings", hint="")["embeddings"][:64]), 20
  )
  queries = store.read(paths["embeddings_train"], "embeddings", hint="")
  t = time.perf_counter()
  neighbors.find_neighbors(c, queries, db, idx, paths["neighbors_train"])
  return {"job_s": time.perf_counter() - t}


def phase_compare(c) -> dict:
  """The job and raw ScaNN on one loaded index, alternately, best of 3 each (machine noise)."""
  import shutil

  from rdm_jax import config_base
  from rdm_jax.data import store
  from rdm_jax.jobs import neighbors
  from rdm_jax.retrieval import exact, index

  paths = config_base.paths(c)
  db = store.read(paths["database"], "database", hint="")
  idx = index.load(paths["index"], db, c.retrieval.index)
  queries = store.read(paths["embeddings_train"], "embeddings", hint="")
  q = exact.l2_normalize(queries["embeddings"], "queries")
  searcher = idx._searcher(0)
  searcher.search_batched_parallel(q[:64])
  tuned = tuned_settings(idx.manifest)
  job, raw = [], []
  for i in range(3):
    t = time.perf_counter()
    searcher.search_batched_parallel(q, **tuned)
    raw.append(time.perf_counter() - t)
    out = os.path.join(c.data_dir, f"compare_{i}")
    t = time.perf_counter()
    neighbors.find_neighbors(c, queries, db, idx, out)
    job.append(time.perf_counter() - t)
    shutil.rmtree(out)
  return {"job_best_s": min(job), "raw_best_s": min(raw), "job_all_s": job, "raw_all_s": raw}


def tuned_settings(manifest: dict) -> dict:
  """ScaNN search arguments (K neighbours) at the settings the index job chose for shard 0."""
  from rdm_jax.retrieval import index

  tuned = manifest["search"].get(manifest["shards"][0]["dir"], {})
  return index.scann_search_args(
    tuned.get("leaves_to_search", 0), tuned.get("reorder", 0), _K.value
  )


def phase_raw(c) -> dict:
  from scann.scann_ops.py import scann_ops_pybind

  from rdm_jax import config_base
  from rdm_jax.data import store

  paths = config_base.paths(c)
  manifest = store.read(paths["index"], "index", hint="").manifest
  shard = manifest["shards"][0]
  # our own index; scann's load_searcher reads it as the ScaNN docs show (no docids pickle here)
  searcher = scann_ops_pybind.load_searcher(
    os.path.join(os.path.abspath(paths["index"]), shard["dir"])
  )
  q = np.asarray(store.read(paths["embeddings_train"], "embeddings", hint="")["embeddings"])
  searcher.search_batched_parallel(q[:64])
  t = time.perf_counter()
  ids, _ = searcher.search_batched_parallel(q, **tuned_settings(manifest))
  raw_s = time.perf_counter() - t
  np.save(os.path.join(c.data_dir, "raw_ids.npy"), ids.astype(np.int64))
  return {"raw_s": raw_s}


def phase_exact(c) -> dict:
  from rdm_jax import config_base
  from rdm_jax.data import store
  from rdm_jax.retrieval import exact

  paths = config_base.paths(c)
  db = np.asarray(store.read(paths["database"], "database", hint="")["embeddings"])
  q = np.asarray(
    store.read(paths["embeddings_train"], "embeddings", hint="")["embeddings"][: _EXACT_Q.value]
  )
  exact.exact_search(q[:8], db, _K.value)
  t = time.perf_counter()
  _, ids = exact.exact_search(q, db, _K.value)
  exact_s = time.perf_counter() - t
  np.save(os.path.join(c.data_dir, "exact_ids.npy"), ids.astype(np.int64))
  return {"exact_s": exact_s}


def phase_baseline(c) -> dict:
  import scann  # noqa: F401

  from rdm_jax.jobs import neighbors  # noqa: F401

  return {}


PHASES = {
  "data": phase_data,
  "baseline": phase_baseline,
  "build": phase_build,
  "job": phase_job,
  "build_threaded": phase_build_threaded,
  "raw": phase_raw,
  "exact": phase_exact,
  "compare": phase_compare,
}


def run_phase(name: str) -> dict:
  """Runs a phase in a child process; returns its figures and peak RSS in GiB."""
  out = subprocess.run(
    [sys.executable, __file__, f"--phase={name}"]
    + [a for a in sys.argv[1:] if not a.startswith("--phase")],
    capture_output=True,
    text=True,
  )
  if out.returncode:
    sys.exit(f"phase {name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  return result


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
  return float(np.mean([len(np.intersect1d(a, t)) / truth.shape[1] for a, t in zip(ids, truth)]))


def main(argv):
  del argv
  c = config(_WORKDIR.value)
  if _PHASE.value:
    result = PHASES[_PHASE.value](c)
    result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))
    return
  from rdm_jax.data import store

  r = {
    name: run_phase(name)
    for name in ("data", "baseline", "build", "job", "exact")
    if name != "data" or not _REUSE.value
  }
  sharded = len(r["build"]["shards"]) > 1
  if not sharded:  # raw ScaNN means one searcher: compare on a one-shard index
    r.update({name: run_phase(name) for name in ("raw", "compare")})
  n, q, k, nq = _N.value, _Q.value, _K.value, _EXACT_Q.value
  job_ids = np.asarray(
    store.read(os.path.join(c.data_dir, "neighbors_train"), "neighbors", hint="")["neighbor_ids"]
  )
  exact_ids = np.load(os.path.join(c.data_dir, "exact_ids.npy"))
  base = r["baseline"]["peak_gib"]
  per_m = 1e6 / n
  job_qps, exact_qps = q / r["job"]["job_s"], nq / r["exact"]["exact_s"]
  print(
    f"database {n} x {_D.value}, {q} queries, K={k}, {len(r['build']['shards'])} shard(s), index "
    f"{r['build']['shards'][0]}"
  )
  print(
    f"build: {r['build']['build_s']:.1f} s, peak {r['build']['peak_gib']:.2f} GiB "
    f"({(r['build']['peak_gib'] - base) * per_m:.2f} GiB per 1M vectors above the "
    f"{base:.2f} GiB baseline)"
  )
  for name, tuned in r["build"]["search"].items():
    print(
      f"  {name} search chosen for target_recall {c.retrieval.index.target_recall}: "
      + "; ".join(
        f"leaves {t['leaves_to_search']} reorder {t['reorder']}: recall {t['recall_at_k']:.4f} "
        f"{t['ms_per_query']:.3f} ms/q"
        for t in tuned["tried"]
      )
    )
  if _THREADS_CMP.value:
    threaded = run_phase("build_threaded")["build_s"]
    print(
      f"build with all {os.cpu_count()} cores training (deterministic=False): {threaded:.1f} s; "
      f"single-threaded / threaded: {r['build']['build_s'] / threaded:.2f}x"
    )
  print(
    f"job:   {job_qps:.0f} queries/s, recall@{k} {recall(job_ids[:nq], exact_ids):.4f}, peak "
    f"{r['job']['peak_gib']:.2f} GiB ({(r['job']['peak_gib'] - base) * per_m:.2f} GiB per "
    "1M above baseline)"
  )
  print(
    f"exact JAX: {exact_qps:.0f} queries/s (recall 1 by definition); job / exact: "
    f"{job_qps / exact_qps:.1f}x"
  )
  size = sum(
    os.path.getsize(os.path.join(dp, f))
    for dp, _, fs in os.walk(os.path.join(c.data_dir, "database_index"))
    for f in fs
  )
  print(f"index on disk: {size / 2**30:.2f} GiB ({size / 2**30 * per_m:.2f} GiB per 1M vectors)")
  if sharded:
    return
  raw_ids = np.load(os.path.join(c.data_dir, "raw_ids.npy"))
  raw_qps = q / r["raw"]["raw_s"]
  print(
    f"raw ScaNN (same index): {raw_qps:.0f} queries/s, recall@{k} "
    f"{recall(raw_ids[:nq], exact_ids):.4f}"
  )
  cmp = r["compare"]
  print(
    f"same process, same loaded index, best of 3 alternating runs: job {q / cmp['job_best_s']:.0f} "
    f"queries/s, raw ScaNN {q / cmp['raw_best_s']:.0f} queries/s: job / raw "
    f"{cmp['raw_best_s'] / cmp['job_best_s']:.3f}"
  )
  same = int((job_ids == raw_ids).all(axis=1).sum())
  print(
    f"separate processes: job / raw ScaNN throughput {job_qps / raw_qps:.3f}; "
    f"rows where job and raw ScaNN ids are identical: {same} of {q}"
  )


if __name__ == "__main__":
  app.run(main)
