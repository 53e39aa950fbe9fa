"""benchmarks/label_agreement.py, demo_quality.py's judge of whether samples follow their
neighbours, on hand-worked rows of k = 4 neighbour labels."""

import os
import sys

import numpy as np
import pytest

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import label_agreement as la  # noqa: E402

# neighbour labels, nearest first; what each row's majority label is, and how it splits
ROWS = np.array(
  [
    [3, 3, 3, 3],  # unanimous: 3
    [7, 5, 5, 5],  # 3+1, the odd one nearest: 5
    [2, 8, 2, 8],  # a tie 2+2: the nearest neighbour's label 2
    [8, 2, 2, 8],  # the same labels in another order: 8
    [0, 6, 4, 4],  # 2+1+1: 4
    [9, 1, 0, 6],  # four labels: the nearest, 9
  ]
)
MAJORITY = [3, 5, 2, 8, 4, 9]
SPLITS = ["4", "3+1", "2+2", "2+2", "2+1+1", "1+1+1+1"]


def test_majority_and_split_of_hand_worked_rows():
  np.testing.assert_array_equal(la.majority(ROWS), MAJORITY)
  assert la.split(ROWS).tolist() == SPLITS
  np.testing.assert_array_equal(la.unanimous(ROWS), [True, False, False, False, False, False])
  assert sorted(set(SPLITS), key=la.split_order) == ["4", "3+1", "2+2", "2+1+1", "1+1+1+1"]


def test_a_tie_counts_for_either_label_only_in_plurality():
  got = np.array(
    [3, 7, 8, 2, 0, 1]
  )  # right, the odd one, the other tied label twice, a single, a single
  np.testing.assert_array_equal(la.plurality(got, ROWS), [True, False, True, True, False, True])
  np.testing.assert_array_equal(got == la.majority(ROWS), [True, False, False, False, False, False])


def test_agreement_and_its_breakdown_by_split():
  got = np.array([3, 5, 8, 8, 0, 9])
  # majority labels [3, 5, 2, 8, 4, 9]: rows 0, 1, 3, 5 agree; one unanimous row, which agrees
  assert la.agreement(got, ROWS) == pytest.approx((4 / 6, 1.0, 1 / 6))
  table = la.by_split(got, ROWS)
  assert list(table) == ["4", "3+1", "2+2", "2+1+1", "1+1+1+1"]
  assert table["4"] == pytest.approx((1 / 6, 1.0, 1.0))
  assert table["3+1"] == pytest.approx((1 / 6, 1.0, 1.0))
  assert table["2+2"] == pytest.approx((2 / 6, 0.5, 1.0))  # 8 is the first label of row 3 only
  assert table["2+1+1"] == pytest.approx((1 / 6, 0.0, 0.0))
  assert table["1+1+1+1"] == pytest.approx((1 / 6, 1.0, 1.0))
