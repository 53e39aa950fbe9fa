"""Conditioning for sampling: query embeddings -> neighbours in a database D -> context [B, k, d].

Query sources: exemplars (embedded held-out images), pseudo-queries drawn from the proposal
p_D with top-m truncation (unconditional sampling, paper Eq. 5-6), embeddings from a .npy,
and class pools (class-conditional sampling, Sec. 3.3, from the database's labels). A query
retrieves its k nearest neighbours from D (through D's index when one is built), whose
raw embeddings condition the model. D is read from
`config.database` at sampling time, so a model can sample with another database than
the one it was trained with, provided the same encoder embedded it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from rdm_jax import config_base, untrusted
from rdm_jax.data import sources, store, visualize
from rdm_jax.errors import UserError, fail
from rdm_jax.retrieval import crops, encoders, exact, index, proposal


@dataclass(frozen=True)
class Conditioning:
  context: np.ndarray  # [B, k, d] raw embeddings
  neighbor_rows: np.ndarray  # [B, k] rows of the database store; -1: the query's own embedding
  query_rows: np.ndarray  # [B] rows of the query store
  database: store.Store
  queries: store.Store | None  # the query store (the database for proposal and class; None: a .npy)
  captions: np.ndarray | None = None  # [B] str: the text of each row (condition=text)


def open_search(config: Any, database: store.Store, build: bool = False):
  """search(queries_normalised, k) -> (scores, rows) over `database`: its index when one is
  built (rdm_jax.jobs.index); else, with `build`, the index built now (as the index job would);
  else exact search."""
  path = config_base.paths(config)["index"]
  if store.exists(path):
    return index.load(path, database, config.retrieval.index).search
  if build:
    print(f"{database.path} has no index at {path}: building it (rdm_jax.jobs.index)")
    return index.ensure(
      database, config.retrieval.index, config.retrieval.num_neighbors, path
    ).search
  emb = database["embeddings"]
  return lambda q, k: exact.exact_search(q, emb, k, normalize_database=True)


def open_database(config: Any, encoder: dict | None = None) -> store.Store:
  """config.database, checked to come from the model's encoder (when given)."""
  database = store.read(
    config_base.paths(config)["database"],
    "database",
    hint="python -m rdm_jax.jobs.embed --config=... --parts=database",
  )
  if encoder is not None and database.manifest["encoder"] != encoder:
    fail(
      f"database {database.path} was embedded by {database.manifest['encoder']} but the model was "
      f"trained with {encoder}; embed this database with the model's encoder"
    )
  width = database["embeddings"].shape[1]
  if width != config.retrieval.embed_dim:
    fail(
      f"database {database.path} holds {width}-d embeddings but the model takes "
      f"config.retrieval.embed_dim={config.retrieval.embed_dim}-d context; use a database "
      "of the model's encoder"
    )
  return database


def _gather(database: store.Store, rows: np.ndarray) -> np.ndarray:
  d = database["embeddings"].shape[1]
  return np.asarray(database["embeddings"][rows.reshape(-1)], np.float32).reshape(rows.shape + (d,))


def _retrieve(
  config: Any,
  database: store.Store,
  query_store: store.Store | None,
  query_rows: np.ndarray,
  k: int,
  include_query: bool = False,
  queries: np.ndarray | None = None,
  search=None,
) -> Conditioning:
  """The k nearest database rows of each query as context; with include_query, the query's own
  embedding first and its k-1 nearest after it (the original's `omit_query=False`). The queries
  are the query store's rows, or given."""
  if queries is None:
    queries = np.asarray(query_store["embeddings"][query_rows], np.float32)
  n_search = k - 1 if include_query else k
  ids = np.zeros((len(query_rows), 0), np.int64)
  if n_search:
    what = "queries" + (f" {query_store.path}" if query_store is not None else "")
    _, ids = (search or open_search(config, database))(exact.l2_normalize(queries, what), n_search)
    ids = np.asarray(ids)
  context = _gather(database, ids)
  if include_query:
    context = np.concatenate([queries[:, None], context], axis=1)
    ids = np.concatenate([np.full((len(ids), 1), -1, ids.dtype), ids], axis=1)
  return Conditioning(
    context=context,
    neighbor_rows=ids,
    query_rows=query_rows,
    database=database,
    queries=query_store,
  )


def exemplar_conditioning(
  config: Any,
  n: int,
  k: int,
  part: str = "test",
  encoder: dict | None = None,
  include_query: bool = False,
  database: store.Store | None = None,
  search=None,
) -> Conditioning:
  """The first n embedded images of `part` as queries (exemplar-conditional sampling); their k
  nearest database entries condition, or (include_query) the query itself and its k-1 nearest."""
  database = open_database(config, encoder) if database is None else database
  queries = store.read(
    config_base.paths(config)[f"embeddings_{part}"],
    "embeddings",
    hint=f"python -m rdm_jax.jobs.embed --config=... --parts={part}",
  )
  if queries.manifest["encoder"] != database.manifest["encoder"]:
    fail(f"queries {queries.path} and database {database.path} come from different encoders")
  if n > len(queries["embeddings"]):
    fail(f"asked for {n} samples but {queries.path} has {len(queries['embeddings'])} queries")
  return _retrieve(config, database, queries, np.arange(n), k, include_query, search=search)


def proposal_conditioning(
  config: Any,
  n: int,
  k: int,
  rng: np.random.Generator,
  encoder: dict | None = None,
  database: store.Store | None = None,
  search=None,
) -> Conditioning:
  """Unconditional sampling (Eq. 6): pseudo-queries x~ ~ p_D (top-m), then their k neighbours in D.

  `query_rows` are the pseudo-queries' database rows.
  """
  database = open_database(config, encoder) if database is None else database
  p = store.read(
    config_base.paths(config)["proposal"],
    proposal.KIND,
    hint="python -m rdm_jax.jobs.neighbors --config=... --parts=train",
  )
  if p.manifest["database_fingerprint"] != database.fingerprint:
    fail(
      f"proposal {p.path} was computed for another database than {database.path}; rerun the "
      "neighbour job for this database, or sample with --config.sample.condition=exemplar"
    )
  sample_cfg = config.sample
  rows = proposal.draw(
    p,
    n,
    rng,
    top_m=sample_cfg.top_m,
    top_count=sample_cfg.top_count,
    weighted=sample_cfg.proposal_weighted,
    top_m_of=sample_cfg.top_m_of,
  )
  return _retrieve(config, database, database, rows, k, search=search)


def load_query_embeddings(path: str, database: store.Store) -> np.ndarray:
  """float32 [N, d] query embeddings from a .npy, checked against the database's width (no
  pickle)."""
  if not os.path.isfile(path):
    fail(f"config.sample.embeddings_path={path!r}: no such file")
  try:
    queries = untrusted.load_npy(path)  # no pickle; its declared shape checked before it is read
  except UserError as e:
    fail(f"config.sample.embeddings_path: {e}")
  d = database["embeddings"].shape[1]
  if queries.ndim != 2 or queries.shape[1] != d or queries.dtype.kind != "f":
    fail(
      f"{path}: {queries.dtype} {queries.shape}; expected float [N, {d}] embeddings from the "
      f"database's encoder {database.manifest['encoder'].get('name')}"
    )
  return np.asarray(queries, np.float32)


def embeddings_conditioning(
  config: Any,
  queries: np.ndarray,
  k: int,
  encoder: dict | None = None,
  include_query: bool = False,
  database: store.Store | None = None,
  search=None,
) -> Conditioning:
  """Query embeddings [N, d] made by the database's encoder (e.g. `load_query_embeddings`)."""
  database = open_database(config, encoder) if database is None else database
  queries = np.asarray(queries, np.float32)
  d = database["embeddings"].shape[1]
  if queries.ndim != 2 or queries.shape[1] != d:
    fail(
      f"query embeddings of shape {queries.shape}; expected [N, {d}] from the database's encoder"
    )
  return _retrieve(
    config,
    database,
    None,
    np.arange(len(queries)),
    k,
    include_query,
    queries=queries,
    search=search,
  )


TEXT_MODES = ("caption_and_neighbors", "caption", "neighbors")


def text_queries(config: Any, database: store.Store, texts: list[str]) -> np.ndarray:
  """CLIP text embeddings [N, d] of `texts`, from the CLIP that embedded `database` (checked)."""
  identity = encoders.encoder_identity(config.retrieval)
  if identity != database.manifest["encoder"]:
    fail(
      f"config.retrieval names encoder {identity} but database {database.path} was embedded by "
      f"{database.manifest['encoder']}: text and image embeddings must come from one CLIP"
    )
  return encoders.embed_text(config.retrieval, texts)


def part_captions(config: Any, part: str) -> list[str]:
  """The captions of a part's embeddings store, in row order (config.sample.prompts_from)."""
  if part not in ("train", "test"):
    fail(
      f"config.sample.prompts_from={part!r}; use train or test (a part whose embeddings "
      "store has captions)"
    )
  path = config_base.paths(config)[f"embeddings_{part}"]
  queries = store.read(path, "embeddings", hint="run `python -m rdm_jax.jobs.embed` first")
  if "captions" not in queries.arrays:
    fail(
      f"{path} has no captions: its source has none (a TFDS caption feature, "
      "config.dataset.caption_feature, or an image folder's captions.jsonl); give "
      "--config.sample.prompts instead"
    )
  return [str(c) for c in queries["captions"]]


def text_conditioning(
  config: Any,
  prompts: list[str] | tuple[str, ...],
  k: int,
  encoder: dict | None = None,
  database: store.Store | None = None,
  search=None,
  mode: str | None = None,
) -> Conditioning:
  """Captions as queries (Sec. 4.2; the original's knn2img with a prompt), `mode` (default
  config.sample.text_mode): "caption_and_neighbors": each caption's CLIP text embedding first and
  its k-1 nearest database entries after it; "caption": the text embedding alone (k = 1);
  "neighbors": its k nearest database entries alone."""
  database = open_database(config, encoder) if database is None else database
  mode = mode or config.sample.text_mode
  if mode not in TEXT_MODES:
    fail(f"config.sample.text_mode={mode!r}; use {', '.join(TEXT_MODES)}")
  if not prompts:
    fail(
      "config.sample.condition=text needs captions: --config.sample.prompts=\"('a red "
      "dress','a sneaker')\", "
      "or --config.sample.prompts_from=test (the test part's own captions)"
    )
  queries = text_queries(config, database, list(prompts))
  rows = np.arange(len(prompts))
  if mode == "caption":
    cond = Conditioning(
      context=queries[:, None],
      neighbor_rows=np.full((len(rows), 1), -1, np.int64),
      query_rows=rows,
      database=database,
      queries=None,
    )
  else:
    cond = _retrieve(
      config,
      database,
      None,
      rows,
      k,
      include_query=mode == "caption_and_neighbors",
      queries=queries,
      search=search,
    )
  return replace(cond, captions=np.asarray(list(prompts), dtype=str))


def class_ids(names_or_ids: str, names: tuple[str, ...], labels: np.ndarray) -> list[int]:
  """Class names (any case) or label ids, comma-separated, as label ids ("Dress,7" -> [3, 7]);
  "" = every label."""
  present = sorted(set(np.unique(labels).tolist()) - {-1})  # -1: unlabelled
  if not names_or_ids.strip():
    return present
  out = []
  lower = [x.lower() for x in names]
  for item in (x.strip() for x in names_or_ids.split(",")):
    if item.lstrip("-").isdigit():
      c = int(item)
    elif item.lower() in lower:
      c = lower.index(item.lower())
    else:
      fail(
        f"unknown class {item!r} in config.sample.classes; the classes are: "
        + (", ".join(f"{i} {x}" for i, x in enumerate(names)) or ", ".join(map(str, present)))
      )
    if c not in present:
      fail(f"class {item!r} (label {c}) has no entry in the database")
    out.append(c)
  return out


def class_pool(database: store.Store, label: int, size: int) -> np.ndarray:
  """xi_l(c) from labels: the `size` database rows labelled c nearest (cosine) to their mean
  direction, nearest first: the class's own prototype stands in for the text embedding of
  'An image of a {c}.' (Sec. 3.3) when the database has labels."""
  rows = np.flatnonzero(np.asarray(database["labels"]) == label)
  if len(rows) < size:
    fail(
      f"class {label} has {len(rows)} database entries, fewer than sample.class_pool_size={size}"
    )
  unit = exact.l2_normalize(
    np.asarray(database["embeddings"][rows], np.float32), f"database {database.path}"
  )
  prototype = unit.mean(axis=0)
  return rows[np.argsort(-(unit @ prototype), kind="stable")[:size]]


def zeros_conditioning(database: store.Store, n: int) -> Conditioning:
  """The unconditional branch of classifier-free guidance on its own: one all-zeros context
  entry per sample (the original's `rarm_sample.py --unconditional`; attention over k zero
  entries reads the same as over one)."""
  d = database["embeddings"].shape[1]
  return Conditioning(
    context=np.zeros((n, 1, d), np.float32),
    neighbor_rows=np.full((n, 1), -1, np.int64),
    query_rows=np.arange(n),
    database=database,
    queries=None,
  )


CLASS_CONTEXTS = ("pool", "prompt_and_pool")


def prompt_classes(names_or_ids: str, names: tuple[str, ...]) -> tuple[list[int], list[str]]:
  """(labels, names) of "golden retriever,207": names as given (their label where the dataset's
  names hold them, else their position in the list), label ids through the dataset's names;
  "" = every named class."""
  items = [x.strip() for x in names_or_ids.split(",") if x.strip()]
  if not items and not names:
    fail(
      "config.sample.classes: name the classes for the class prompt, comma-separated (this "
      "dataset has no class names to take them from: config.dataset.class_names)"
    )
  if not items:
    return list(range(len(names))), list(names)
  lower = [x.lower() for x in names]
  labels, out = [], []
  for i, item in enumerate(items):
    if item.lstrip("-").isdigit():
      c = int(item)
      if not 0 <= c < len(names):
        fail(
          f"class {item} in config.sample.classes: the class prompt needs its name, and the "
          f"dataset names {len(names)} classes"
          + (f" (0..{len(names) - 1})" if names else "; give names instead of labels")
        )
      labels.append(c)
      out.append(names[c])
    else:
      labels.append(lower.index(item.lower()) if item.lower() in lower else i)
      out.append(item)
  return labels, out


def class_conditioning(
  config: Any,
  n: int,
  k: int,
  rng: np.random.Generator,
  encoder: dict | None = None,
  classes: str | None = None,
  database: store.Store | None = None,
) -> Conditioning:
  """Class-conditional sampling (Sec. 3.3): sample i takes class classes[i % C] and k adjacent
  entries of its pool xi_l(c) (l = sample.class_pool_size), at a random offset. The pool of class c
  is, with `sample.class_prompt` (e.g. "An image of a {}."), the l database entries nearest to the
  CLIP text embedding of the prompt with c's name, as in the paper; else, from a labelled
  database, the entries labelled c nearest to their mean direction (`class_pool`).

  `sample.class_context` reads the paper two ways: "pool" is Sec. 3.3's k adjacent pool entries;
  "prompt_and_pool" is Fig. 10's caption, the prompt's text embedding first and k-1 adjacent pool
  entries after it (with l = k-1 exactly "its k-1 nearest neighbors"). `query_rows` are the
  classes' labels (a named class the dataset does not name: its position in `classes`); with a
  prompt, each sample's prompt is its caption (the evaluate job's CLIP score reads it)."""
  sample_cfg = config.sample
  database = open_database(config, encoder) if database is None else database
  names_or_ids = sample_cfg.classes if classes is None else classes
  mode = sample_cfg.class_context
  if mode not in CLASS_CONTEXTS:
    fail(f"config.sample.class_context={mode!r}; use {' or '.join(CLASS_CONTEXTS)}")
  drawn = k - 1 if mode == "prompt_and_pool" else k
  if not drawn <= sample_cfg.class_pool_size:
    fail(
      f"sample.class_pool_size={sample_cfg.class_pool_size} must be at least "
      + (f"k={k}" if drawn == k else f"k-1={drawn} (the prompt takes one of the k={k} slots)")
    )
  prompts = None
  if sample_cfg.class_prompt:
    if "{}" not in sample_cfg.class_prompt:
      fail(
        f"config.sample.class_prompt={sample_cfg.class_prompt!r} needs a {{}} where the "
        "class name goes"
      )
    labels, names = prompt_classes(names_or_ids, sources.class_names(config.dataset))
    if sample_cfg.class_pool_size > database["embeddings"].shape[0]:
      fail(
        f"sample.class_pool_size={sample_cfg.class_pool_size} exceeds the database's "
        f"{database['embeddings'].shape[0]} entries"
      )
    texts = [sample_cfg.class_prompt.format(c) for c in names]
    queries = text_queries(config, database, texts)
    _, nearest = open_search(config, database)(
      exact.l2_normalize(queries, "class prompts"), sample_cfg.class_pool_size
    )
    classes = list(range(len(names)))  # positions here; labels below
    pools = {i: np.asarray(nearest[i]) for i in classes}
    prompts = {i: (texts[i], queries[i]) for i in classes}
  else:
    if mode == "prompt_and_pool":
      fail(
        "config.sample.class_context='prompt_and_pool' puts the class prompt's text "
        "embedding in the context: "
        'set config.sample.class_prompt (e.g. "An image of a {}.") with a CLIP retriever'
      )
    if "labels" not in database.arrays:
      fail(
        f"database {database.path} has no labels: class pools need a labelled database or "
        "config.sample.class_prompt with a CLIP retriever"
      )
    classes = class_ids(
      names_or_ids,
      sources.open_source(config.dataset, database.manifest["source"]).class_names(),
      np.asarray(database["labels"]),
    )
    labels = classes
    pools = {c: class_pool(database, c, sample_cfg.class_pool_size) for c in classes}
  which = [classes[i % len(classes)] for i in range(n)]
  starts = rng.integers(0, sample_cfg.class_pool_size - drawn + 1, size=n)
  rows = np.stack([pools[c][a : a + drawn] for c, a in zip(which, starts)]).reshape(n, drawn)
  context = _gather(database, rows)
  label_of = dict(zip(classes, labels))
  query_rows = np.array([label_of[c] for c in which], np.int64)
  if prompts is None:
    return Conditioning(
      context=context,
      neighbor_rows=rows,
      query_rows=query_rows,
      database=database,
      queries=database,
    )
  if mode == "prompt_and_pool":
    context = np.concatenate([np.stack([prompts[c][1] for c in which])[:, None], context], axis=1)
    rows = np.concatenate([np.full((n, 1), -1, rows.dtype), rows], axis=1)
  return Conditioning(
    context=context,
    neighbor_rows=rows,
    query_rows=query_rows,
    database=database,
    queries=None,
    captions=np.asarray([prompts[c][0] for c in which], dtype=str),
  )


def database_images(database: store.Store, dataset: Any, rows: np.ndarray) -> np.ndarray:
  """Pixels of a store's rows (database entries, queries) through the store's source metadata;
  grey for a store of imported embeddings (no images to show)."""
  if not sources.has_pixels(database.manifest["source"]):
    return np.full(rows.shape + (8, 8, 3), 128, np.uint8)
  ids = np.asarray(database["ids"])[rows.reshape(-1)]
  if "boxes" in database.arrays:  # a database of crops: show the crop each entry is
    raw = sources.open_source(dataset, database.manifest["source"]).raw_reader()(ids)
    images = crops.crop_pixels(
      raw, np.asarray(database["boxes"])[rows.reshape(-1)], database.manifest["crops"]
    )
  else:
    read, _ = sources.open_source(dataset, database.manifest["source"]).reader()
    images = read(ids)
  return images.reshape(rows.shape + images.shape[1:])


def context_images(cond: Conditioning, dataset: Any, n: int | None = None) -> np.ndarray:
  """Pixels of the first n rows' context entries [n, k, h, w, c]: database rows through the
  database's source, the query's own slot (row -1) through the query store's, resized to the
  database's images."""
  rows = cond.neighbor_rows[:n]
  own = rows < 0
  images = database_images(cond.database, dataset, np.where(own, 0, rows))
  if not own.any():
    return images
  if cond.queries is None:  # embeddings given as numbers: no image to show
    images[own] = 255
  else:
    query = database_images(cond.queries, dataset, cond.query_rows[:n])
    images[own] = visualize.resize_like(query, images.shape[2:4], images.shape[-1])[
      np.nonzero(own)[0]
    ]
  return images
