"""Collectives in compiled HLO text, by kind and bytes: what `rdm_jax.compile` reports per chip,
and what FSDP's gather plan (`parallel/fsdp.py`) reads off its probe programs."""

from __future__ import annotations

import collections
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "bf16": 2,
  "f16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
# TPU emits reduce-scatter as a fusion of this name (an all-reduce whose
# result each chip keeps a slice of)
_FUSED_REDUCE_SCATTER = re.compile(r"=\s*(.*?)\sfusion\(.*calls=%all-reduce-scatter")


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} of the collectives in compiled HLO text; bytes are each op's
  result (for async ops, the -start's result without its operand copies). TPU's
  all-reduce-scatter fusions count as reduce-scatter, once: the all-reduce inside the
  computation such a fusion calls is not counted again."""
  out: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  fused_body = (
    False  # inside the computation an all-reduce-scatter fusion calls (counted at its call)
  )
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      fused_body = line.split()[0].lstrip("%").startswith("all-reduce-scatter")
      continue
    if fused_body:
      continue
    m = _OP.search(line)
    if m:
      shape, kind, start = m.groups()
    elif f := _FUSED_REDUCE_SCATTER.search(line):
      shape, kind, start = f.group(1), "reduce-scatter", None
    else:
      continue
    arrays = [
      _BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
      for t, dims in _ARRAY.findall(shape)
    ]
    if start and kind != "all-reduce" and len(arrays) > 1:  # (operands..., results...)
      arrays = arrays[len(arrays) // 2 :]
    out[kind]["count"] += 1
    out[kind]["bytes"] += int(sum(arrays))
  return {k: dict(v) for k, v in sorted(out.items())}
