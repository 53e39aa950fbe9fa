"""oneDNN convolutions for XLA's CPU backend, as a drop-in `conv_general_dilated` for nn.Conv.

XLA:CPU runs the UNet's 3x3 convolutions and their gradients slower than oneDNN (the library
PyTorch's CPU convolutions call; benchmarks/RESULTS.md has the figures per CPU).
`conv_general_dilated` here sends float32 NHWC/HWIO convolutions without dilation or groups to three
oneDNN custom calls (forward, input gradient, kernel gradient: `onednn_conv.cc`, built by `make
onednn`) and everything else to `jax.lax.conv_general_dilated`, so a model may use it everywhere.

The custom calls are opaque to XLA's SPMD partitioner, which would run them replicated on a
multi-device mesh: `resolve("auto")` therefore allows oneDNN only on a single CPU device, and
there `rdm_jax.ops.conv_choice` times both paths on the model's convolutions and runs each on
its faster one (`conv_general_dilated_where`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdm_jax.ops.manual_axes import vary_like

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_onednn_conv.so")
CONV_IMPLS = ("xla", "onednn", "auto")
_TARGETS = {
  "fwd": "RdmOnednnConvForward",
  "bwd_data": "RdmOnednnConvBackwardData",
  "bwd_weights": "RdmOnednnConvBackwardWeights",
}
_NHWC = ("NHWC", "HWIO", "NHWC")


def _open(path: str) -> tuple[ctypes.CDLL | None, str | None]:
  """(the loaded library, None) or (None, why it cannot be used)."""
  if not os.path.exists(path):
    return None, f"{path} is not built (run `make onednn`; it needs Debian's libdnnl-dev)"
  try:
    return ctypes.cdll.LoadLibrary(path), None
  except OSError as e:
    return None, f"{path} does not load ({e}); rebuild it with `make onednn`"


def problem(path: str = LIBRARY) -> str | None:
  """Why the library at `path` cannot be used (None if it loads)."""
  return _open(path)[1]


@functools.cache
def _load() -> str | None:
  """Registers the custom calls once; returns None when registered, else why not."""
  lib, why = _open(LIBRARY)
  if why:
    return why
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(
      f"rdm_onednn_conv_{name}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
    )
  return None


def available() -> bool:
  """Whether the oneDNN custom calls are built and registered."""
  return _load() is None


def resolve(impl: str, devices: Sequence[Any] | None = None) -> str:
  """config.model.conv -> "xla" or "onednn" for a model that runs on `devices` (default: this
  process's). "auto" is "onednn" where oneDNN can run safely (a single CPU device, the library
  built: the model then times both, `conv_choice.resolve_auto`), else XLA; "onednn" insists and
  says what is missing."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"config.model.conv={impl!r}; use one of {', '.join(CONV_IMPLS)}")
  if impl == "xla":
    return impl
  why = _load()
  if impl == "onednn":
    if why:
      raise RuntimeError(f"config.model.conv='onednn' but {why}; or set config.model.conv='xla'")
    return impl
  devices = list(jax.devices() if devices is None else devices)
  if why or len(devices) != 1 or devices[0].platform != "cpu":
    logging.info(
      "conv: XLA (oneDNN is used only on a single CPU device%s)", f"; {why}" if why else ""
    )
    return "xla"
  return "onednn"


def _attrs(strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> dict[str, Any]:
  (pt, pb), (pl, pr) = padding
  return dict(
    stride_h=np.int64(strides[0]),
    stride_w=np.int64(strides[1]),
    pad_top=np.int64(pt),
    pad_bottom=np.int64(pb),
    pad_left=np.int64(pl),
    pad_right=np.int64(pr),
  )


def _call(
  name: str, shape: tuple[int, ...], a: jax.Array, b: jax.Array, strides, padding
) -> jax.Array:
  if why := _load():
    raise RuntimeError(f"oneDNN convolution: {why}")
  out = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.ffi.ffi_call(f"rdm_onednn_conv_{name}", out)(a, b, **_attrs(strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(
  x: jax.Array,
  w: jax.Array,
  strides: tuple[int, int],
  padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
  """oneDNN convolution of x [N, H, W, C] (float32) with w [KH, KW, C, O]: [N, OH, OW, O]."""
  n, h, wd, _ = x.shape
  kh, kw, _, o = w.shape
  oh = (h + sum(padding[0]) - kh) // strides[0] + 1
  ow = (wd + sum(padding[1]) - kw) // strides[1] + 1
  return vary_like(
    _call("fwd", (n, oh, ow, o), x, w, strides, padding), x, w
  )  # typed for shard_map


def _conv2d_fwd(x, w, strides, padding):
  return conv2d(x, w, strides, padding), (x, w)


def _conv2d_bwd(strides, padding, res, dy):
  x, w = res
  dx = vary_like(_call("bwd_data", x.shape, dy, w, strides, padding), x)
  dw = vary_like(_call("bwd_weights", w.shape, x, dy, strides, padding), w)
  return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _explicit_padding(padding, x_shape, w_shape, strides) -> tuple[tuple[int, int], ...] | None:
  if isinstance(padding, str):
    if padding.upper() == "VALID":
      return ((0, 0), (0, 0))
    if padding.upper() != "SAME":
      return None
    return tuple(jax.lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, "SAME"))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: Any,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
) -> jax.Array:
  """`jax.lax.conv_general_dilated` that runs on oneDNN where it can (see module doc)."""
  strides = tuple(window_strides)
  pads = _explicit_padding(padding, lhs.shape, rhs.shape, strides) if lhs.ndim == 4 else None
  plain = lambda d: d is None or all(v == 1 for v in d)
  nhwc = (
    lhs.ndim == 4
    and dimension_numbers is not None
    and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  )
  if (
    nhwc
    and pads is not None
    and all(p >= 0 for lo_hi in pads for p in lo_hi)
    and plain(lhs_dilation)
    and plain(rhs_dilation)
    and feature_group_count == 1
    and batch_group_count == 1
    and lhs.dtype == jnp.float32
    and rhs.dtype == jnp.float32
    and preferred_element_type in (None, jnp.float32)
  ):
    return conv2d(lhs, rhs, strides, pads)
  return jax.lax.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
    precision,
    preferred_element_type,
  )


def signature(
  lhs_shape: Sequence[int], rhs_shape: Sequence[int], strides: Sequence[int], padding: Any
) -> tuple:
  """A convolution's geometry without its batch: (H, W, C, KH, KW, O, strides, padding)."""
  pads = _explicit_padding(padding, tuple(lhs_shape), tuple(rhs_shape), tuple(strides))
  return tuple(lhs_shape[1:]) + tuple(rhs_shape[:2]) + (rhs_shape[3], tuple(strides), pads)


def conv_general_dilated_where(
  table: frozenset,
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: Any,
  *args,
  **kwargs,
) -> jax.Array:
  """`conv_general_dilated` (oneDNN) for the geometries in `table` (`signature`s), XLA's for the
  rest: config.model.conv="auto" where each path wins some of the model's convolutions."""
  if (
    lhs.ndim == 4
    and rhs.ndim == 4
    and signature(lhs.shape, rhs.shape, window_strides, padding) in table
  ):
    return conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)
