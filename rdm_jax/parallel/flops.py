"""Analytic FLOPs of a model: the matmuls and convolutions of its traced forward pass.

Counts 2 x multiply-adds of every `dot_general` and `conv_general_dilated` in the jaxpr (inside
jit, remat, custom_vjp and shard_map bodies too), from the shapes alone: what MFU divides by.
Element-wise work (norms, activations, softmax) is left out, as in MaxDiffusion's
calculate_model_tflops and the usual 6ND accounting; a train step counts 3 forward passes
(forward, and backward with respect to activations and weights).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax

from rdm_jax.jaxprs import sub_jaxprs

TRAIN_MULTIPLIER = 3


def _eqn_flops(eqn) -> int:
  name = eqn.primitive.name
  if name == "dot_general":
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
    return 2 * math.prod(lhs) * math.prod(rhs_free)
  if name == "conv_general_dilated":
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    # each output element: (kernel window x input features per group) multiply-adds
    return 2 * math.prod(out) * (math.prod(rhs) // out_features)
  return 0


def jaxpr_flops(jaxpr) -> int:
  """Sum of `_eqn_flops` over a jaxpr and its sub-jaxprs (a scan body counts `length` times)."""
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    inner = sum(jaxpr_flops(j) for j in sub_jaxprs(eqn))
    if eqn.primitive.name == "scan":
      inner *= eqn.params["length"]
    total += inner
  return total


def forward_flops(fn: Callable[..., Any], *args: Any) -> int:
  """FLOPs of one call fn(*args) (arrays or ShapeDtypeStructs), from its jaxpr."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
