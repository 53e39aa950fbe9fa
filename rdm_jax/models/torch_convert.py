"""PyTorch state dicts <-> Flax parameter trees, for modules whose parameters are a renaming.

A converter is a table `names: {flax path: torch key}` built by the model's module (for
example `unet.ldm_names`, `autoencoder.torch_name`); this module does the rest the same way
for every model:

  * layouts: a leaf named `kernel` is a conv ([out, in, kh, kw] in torch, [kh, kw, in, out]
    here) or a linear layer ([out, in] in torch, [in, out] here); every other leaf (norm
    scales and biases, embeddings, codebooks) has the same layout on both sides;
  * checks: every expected key present, none unexpected, every shape right; otherwise one
    ValueError that lists what is missing, unexpected and misshapen, shallow keys first.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import numpy as np

Path = tuple[str, ...]


def flat_shapes(tree: Any) -> dict[Path, tuple[int, ...]]:
  """{path: shape} of a (possibly abstract) parameter tree, paths as tuples of names."""
  return {
    tuple(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _to_flax_layout(path: Path, a: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and a.ndim == 4:
    return a.transpose(2, 3, 1, 0)
  if path[-1] == "kernel" and a.ndim == 2:
    return a.T
  return a


def _to_torch_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == "kernel" and len(shape) == 2:
    return shape[::-1]
  return shape


def _listing(name: str, items: list[str]) -> str:
  return (
    f"{len(items)} {name} ({', '.join(items[:6])}{', ...' if len(items) > 6 else ''})"
    if items
    else ""
  )


def to_flax(
  state_dict: Mapping[str, np.ndarray],
  expected: Mapping[Path, tuple[int, ...]],
  names: Mapping[Path, str],
  ignored_prefixes: Iterable[str] = (),
  dtype: Any = np.float32,
) -> dict[str, Any]:
  """The nested Flax params of `expected` (path -> shape) from `state_dict`, renamed by `names`
  (path -> torch key). Keys starting with an ignored prefix are left out; any other difference
  raises ValueError listing the missing, unexpected and misshapen keys."""
  by_torch = {names[p]: p for p in expected}
  given = {k: v for k, v in state_dict.items() if not k.startswith(tuple(ignored_prefixes))}
  shallow_first = lambda keys: sorted(keys, key=lambda k: (k.count("."), k))
  missing = shallow_first(set(by_torch) - set(given))
  extra = shallow_first(set(given) - set(by_torch))
  params: dict[str, Any] = {}
  misshapen = []
  for key, path in by_torch.items():
    if key not in given:
      continue
    a = _to_flax_layout(path, np.asarray(given[key], dtype))
    if a.shape != tuple(expected[path]):
      misshapen.append(
        f"{key} {list(np.shape(given[key]))} (expected "
        f"{list(_to_torch_shape(path, tuple(expected[path])))})"
      )
      continue
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = a
  if missing or extra or misshapen:
    raise ValueError(
      "; ".join(
        x
        for x in (
          _listing("missing", missing),
          _listing("unexpected", extra),
          _listing("of another shape", misshapen),
        )
        if x
      )
    )
  return params


def to_torch(params: Any, names: Mapping[Path, str]) -> dict[str, np.ndarray]:
  """The state dict (numpy arrays in torch layout) of a Flax parameter tree: `to_flax`'s inverse."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    p = tuple(str(getattr(k, "key", k)) for k in path)
    a = np.asarray(leaf)
    if p[-1] == "kernel" and a.ndim == 4:
      a = a.transpose(3, 2, 0, 1)
    elif p[-1] == "kernel" and a.ndim == 2:
      a = a.T
    out[names[p]] = np.ascontiguousarray(a)
  return out
