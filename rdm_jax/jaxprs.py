"""Walking jaxprs: the bodies an equation calls (jit, remat, custom_vjp, scan, cond ...).

Shared by what reads a model's jaxpr: the FLOP count (parallel/flops.py), the convolution
geometries conv=auto times (ops/conv_choice.py) and which parameters FSDP gathers in the
compute dtype (parallel/fsdp.py).
"""

from __future__ import annotations

from jax.extend import core as jex_core


def sub_jaxprs(eqn) -> list:
  """The jaxprs among `eqn`'s parameters (a ClosedJaxpr's inner jaxpr), in parameter order."""
  out = []
  for v in eqn.params.values():
    for x in v if isinstance(v, (list, tuple)) else (v,):
      if isinstance(x, jex_core.ClosedJaxpr):
        out.append(x.jaxpr)
      elif isinstance(x, jex_core.Jaxpr):
        out.append(x)
  return out
