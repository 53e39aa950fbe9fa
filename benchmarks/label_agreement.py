"""Label agreement of demo_quality.py: does a sample show the label its
conditioning neighbours carry?

Plain numpy on integer labels (no flags, no model), so that tests can check it by hand-worked cases.
"""

from __future__ import annotations

import numpy as np


def counts(labels: np.ndarray, size: int = 0) -> np.ndarray:
  """[N, k] -> [N, C]: how many of each row's k neighbours carry each label (C = the largest label
  + 1, or `size` if larger)."""
  size = max(size, int(labels.max()) + 1)
  out = np.zeros((len(labels), size), np.int64)
  np.add.at(out, (np.arange(len(labels))[:, None], labels), 1)
  return out


def majority(labels: np.ndarray) -> np.ndarray:
  """[N, k] -> [N]: the most frequent label per row; a tie goes to the earliest neighbour's
  label."""
  c = counts(labels)
  top = np.take_along_axis(c, labels, axis=1) == c.max(
    1, keepdims=True
  )  # [N, k]: a most frequent label
  return labels[np.arange(len(labels)), top.argmax(1)]


def unanimous(labels: np.ndarray) -> np.ndarray:
  """[N, k] -> [N] bool: all k labels of the row are the same."""
  return np.all(labels == labels[:, :1], axis=1)


def split(labels: np.ndarray) -> np.ndarray:
  """[N, k] -> [N] str: how each row's k labels split, their counts largest first joined by "+"
  ("4" = unanimous, "3+1", "2+2" = a tie, "2+1+1", "1+1+1+1" for k = 4)."""
  return np.array(["+".join(str(n) for n in row if n) for row in -np.sort(-counts(labels), axis=1)])


def plurality(got: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """[N], [N, k] -> [N] bool: the predicted label is one of the row's most frequent labels (in a tie
  either tied label counts; `majority` takes the first neighbour's)."""
  c = counts(labels, int(got.max()) + 1)
  return c[np.arange(len(got)), got] == c.max(1)


def by_split(got: np.ndarray, labels: np.ndarray) -> dict[str, tuple[float, float, float]]:
  """{split: (share of rows, agreement with the majority label, with any most frequent label)}."""
  kinds, same, any_top = split(labels), got == majority(labels), plurality(got, labels)
  return {
    kind: (
      float(np.mean(kinds == kind)),
      float(same[kinds == kind].mean()),
      float(any_top[kinds == kind].mean()),
    )
    for kind in sorted(set(kinds), key=split_order)
  }


def split_order(kind: str) -> list[int]:
  """Sort key of `split` names: unanimous first, then 3+1, 2+2, 2+1+1, ..."""
  return [-int(c) for c in kind.split("+")]


def agreement(got: np.ndarray, neighbor_labels: np.ndarray) -> tuple[float, float, float]:
  """(agreement with the majority label, agreement where the neighbours are unanimous, the share
  of unanimous rows) of predicted labels [N] against the neighbours' labels [N, k]."""
  same = got == majority(neighbor_labels)
  one = unanimous(neighbor_labels)
  return (
    float(same.mean()),
    float(same[one].mean()) if one.any() else float("nan"),
    float(one.mean()),
  )
