"""config.model.conv="auto": which convolution path is faster here, measured, and remembered.

Whether oneDNN's convolutions beat XLA:CPU's depends on the CPU (its ISA: AVX-512, AVX2, AMX),
on what caps it (ONEDNN_MAX_CPU_ISA, XLA_FLAGS=--xla_cpu_max_isa), on the thread count and on
the model's convolution shapes. So "auto" does not guess: it reads every convolution of the
model's forward pass from its jaxpr (`geometries`), times each distinct one forward and backward
on both paths (`measure`), and runs each on the path that was faster for it ("mixed"; "onednn"
or "xla" when one path wins them all). The choice and the sums are cached in a JSON file
(`cache_path()`: $RDM_JAX_CACHE or ~/.cache/rdm_jax/conv_choice.json) under a key of the
machine (CPU model, ISA flags, caps, threads, jax version) and the geometry, so a later run on
the same machine and model reads it in milliseconds instead of measuring again (a few seconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax.jaxprs import sub_jaxprs
from rdm_jax.ops import onednn

_ENV_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "XLA_FLAGS", "OMP_NUM_THREADS")
_NHWC = ("NHWC", "HWIO", "NHWC")
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "fma")


class Geometry(NamedTuple):
  """One convolution of a model: input [N,H,W,C], kernel [KH,KW,C,O], strides and padding."""

  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]


def geometries(fn: Callable, *args: Any) -> dict[Geometry, int]:
  """{geometry: how many times it appears in fn's jaxpr} over the float32 NHWC/HWIO convolutions
  (those oneDNN would take), nested jits, remat and control-flow bodies included (a loop body's
  convolution counts once)."""
  counts: dict[Geometry, int] = {}

  def walk(jaxpr) -> None:
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval for v in eqn.invars)
        p = eqn.params
        dims = p["dimension_numbers"]
        nhwc = (tuple(dims.lhs_spec), tuple(dims.rhs_spec), tuple(dims.out_spec)) == (
          (0, 3, 1, 2),
          (3, 2, 0, 1),
          (0, 3, 1, 2),
        )
        plain = all(d == 1 for d in tuple(p["lhs_dilation"]) + tuple(p["rhs_dilation"]))
        if (
          nhwc
          and plain
          and p["feature_group_count"] == 1
          and p["batch_group_count"] == 1
          and lhs.dtype == jnp.float32
          and rhs.dtype == jnp.float32
        ):
          g = Geometry(
            tuple(lhs.shape),
            tuple(rhs.shape),
            tuple(p["window_strides"]),
            tuple((int(a), int(b)) for a, b in p["padding"]),
          )
          counts[g] = counts.get(g, 0) + 1
      for sub in sub_jaxprs(eqn):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return counts


def _conv_step(impl: str, g: Geometry) -> Callable:
  """jit((x, w, dy) -> (y, dx, dw)): one convolution forward and both gradients on `impl`."""
  conv = onednn.conv_general_dilated if impl == "onednn" else jax.lax.conv_general_dilated

  def f(x, w, dy):
    y, vjp = jax.vjp(lambda x, w: conv(x, w, g.strides, g.padding, dimension_numbers=_NHWC), x, w)
    return (y,) + vjp(dy)

  return jax.jit(f)


def measure(g: Geometry, impl: str, repeats: int = 3) -> float:
  """Seconds of one run of convolution `g` forward and backward on `impl`: the fastest of
  `repeats` runs after a warm-up."""
  step = _conv_step(impl, g)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(g.lhs, np.float32))
  w = jnp.asarray(rng.standard_normal(g.rhs, np.float32))
  out = jax.eval_shape(
    lambda x, w: jax.lax.conv_general_dilated(x, w, g.strides, g.padding, dimension_numbers=_NHWC),
    x,
    w,
  )
  dy = jnp.asarray(rng.standard_normal(out.shape, np.float32))
  jax.block_until_ready(step(x, w, dy))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(step(x, w, dy))
    best = min(best, time.perf_counter() - t0)
  return best


def cache_path() -> str:
  """Where choices are remembered: $RDM_JAX_CACHE/conv_choice.json, else ~/.cache/rdm_jax/."""
  root = os.environ.get("RDM_JAX_CACHE") or os.path.join(
    os.path.expanduser("~"), ".cache", "rdm_jax"
  )
  return os.path.join(root, "conv_choice.json")


def machine() -> dict[str, Any]:
  """What decides which path is faster besides the model: CPU, ISA flags, caps, threads, jax."""
  model, flags = "unknown", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {
    "cpu": model,
    "isa": sorted(f for f in _ISA_FLAGS if f in flags),
    "threads": threads,
    "caps": {k: os.environ[k] for k in _ENV_CAPS if os.environ.get(k)},
    "jax": jax.__version__,
  }


def key(geoms: dict[Geometry, int], host: dict[str, Any] | None = None) -> str:
  """The cache key of this machine (`host`, default `machine()`) and this set of convolutions."""
  text = json.dumps(
    [
      host or machine(),
      sorted(
        [list(map(list, g[:2])), list(g.strides), [list(p) for p in g.padding], n]
        for g, n in geoms.items()
      ),
    ],
    sort_keys=True,
  )
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def _load(path: str) -> dict[str, Any] | None:
  """The cache file as a dict ({} when there is none); None when a file is there that is not a
  JSON object (not ours: it is read as empty and left as it is)."""
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    logging.warning(
      "conv=auto: %s is not a readable cache (%s); measuring, and leaving the file as it is "
      "(remove it, or set RDM_JAX_CACHE to another folder, to cache choices again)",
      path,
      e,
    )
    return None
  return data if isinstance(data, dict) else None


def _entries(data: dict[str, Any] | None) -> dict[str, Any]:
  """The well-formed choices in a cache file's dict (others are ignored, never trusted)."""
  return {
    k: v
    for k, v in (data or {}).items()
    if isinstance(v, dict)
    and v.get("choice") in ("xla", "onednn", "mixed")
    and isinstance(v.get("onednn"), list)
  }


def _write_cache(path: str, key_: str, entry: dict[str, Any]) -> None:
  """Adds one entry to the cache file (re-read just before, every other key kept as it is),
  written whole under a temporary name, then renamed. A file that is not a cache is left alone;
  a cache that cannot be written is skipped with a warning (the choice stands for this run)."""
  data = _load(path)
  if data is None:
    return
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump({**data, key_: entry}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except OSError as e:
    logging.warning("conv=auto: could not write the cache %s (%s)", path, e)


def choose(
  geoms: dict[Geometry, int],
  timer: Callable[[Geometry, str], float] | None = None,
  path: str | None = None,
) -> dict[str, Any]:
  """Which path runs which of the model's convolutions `geoms`, read from the cache or measured
  with `timer` (default `measure`) and cached: {"choice": "xla" | "onednn" | "mixed",
  "onednn": [signatures of the geometries oneDNN runs faster], "seconds": one pass over the
  model's convolutions on "xla", on "onednn" and "mixed" (each on its faster path), "cached"}."""
  path, timer = path or cache_path(), timer or measure
  if not geoms:
    return {"choice": "xla", "onednn": [], "seconds": {}, "cached": False}
  host = machine()
  k = key(geoms, host)
  entries = _entries(_load(path))
  if k in entries:
    return {**entries[k], "cached": True}
  seconds, faster = {"xla": 0.0, "onednn": 0.0, "mixed": 0.0}, []
  for g, count in geoms.items():
    t = {impl: float(timer(g, impl)) for impl in ("xla", "onednn")}
    seconds["xla"] += count * t["xla"]
    seconds["onednn"] += count * t["onednn"]
    seconds["mixed"] += count * min(t.values())
    if t["onednn"] < t["xla"]:
      faster.append(_signature(g))
  choice = "xla" if not faster else "onednn" if len(faster) == len(geoms) else "mixed"
  entry = {
    "choice": choice,
    "onednn": sorted(faster),
    "seconds": seconds,
    "machine": host,
    "convolutions": int(sum(geoms.values())),
  }
  _write_cache(path, k, entry)
  return {**entry, "cached": False}


def _signature(g: Geometry) -> list:
  """`onednn.signature` of g as JSON would store it (lists)."""
  return json.loads(json.dumps(onednn.signature(g.lhs, g.rhs, g.strides, g.padding)))


def as_impl(choice: dict[str, Any]) -> Any:
  """The UNet's `conv` for a choice: "xla", "onednn", or the frozenset of geometries on oneDNN."""
  if choice["choice"] != "mixed":
    return choice["choice"]
  return frozenset(
    tuple(sig[:6]) + (tuple(sig[6]), tuple(tuple(p) for p in sig[7])) for sig in choice["onednn"]
  )


def resolve_auto(fn: Callable, args: Sequence[Any]) -> Any:
  """config.model.conv="auto", where oneDNN can run (`onednn.resolve("auto")` says "onednn"), for
  the model whose forward pass is fn(*args): its convolutions timed forward and backward, the
  UNet's `conv` for the faster path of each (see module doc)."""
  r = choose(geometries(fn, *args))
  if r["seconds"]:
    logging.info(
      "conv=auto: %s (convolutions of one step forward and backward: XLA %.1f ms, oneDNN %.1f ms, "
      "each on its faster path %.1f ms%s)",
      r["choice"],
      1e3 * r["seconds"]["xla"],
      1e3 * r["seconds"]["onednn"],
      1e3 * r["seconds"]["mixed"],
      ", cached" if r["cached"] else "",
    )
  return as_impl(r)
