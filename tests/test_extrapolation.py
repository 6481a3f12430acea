"""The extrapolation test's split and recall (mpprop.stages.extrapolation), hand-made."""

from __future__ import annotations

import numpy as np

from mpprop.config import PropertySpec
from mpprop.data import PropertyData
from mpprop.stages.extrapolation import extrapolation_split, held_out_top, recall_at_top


def test_held_out_top_follows_the_better_direction() -> None:
    y = np.arange(100.0)
    assert np.flatnonzero(held_out_top(y, 3, "higher")).tolist() == [97, 98, 99]
    assert np.flatnonzero(held_out_top(y, 3, "lower")).tolist() == [0, 1, 2]


def test_recall_counts_the_top_found_in_the_models_own_top() -> None:
    is_top = np.array([True, True, False, False, False])
    assert recall_at_top(is_top, np.array([9.0, 8, 1, 2, 3]), "higher") == 1.0
    assert recall_at_top(is_top, np.array([9.0, 1, 8, 2, 3]), "higher") == 0.5
    assert recall_at_top(is_top, np.array([9.0, 8, 1, 2, 3]), "lower") == 0.0


def test_split_keeps_the_top_out_of_training_and_in_the_candidates() -> None:
    spec = PropertySpec("bulk_modulus", "bulk_modulus.vrh", "log10(GPa)", "log10", "higher")
    pool_y = np.array([1.0, 2.0, 10.0, 3.0])  # 10.0 is the best of all: held out
    test_y = np.array([4.0, 9.0])
    data = PropertyData(spec, None, np.arange(4), pool_y, np.arange(4, 6), test_y)
    sp = extrapolation_split(data, 20, "higher")  # top 20% of 6 = 2 materials: 10 and 9
    assert sorted(sp["train_y"].tolist()) == [1.0, 2.0, 3.0]
    assert sorted(sp["cand_y"].tolist()) == [4.0, 9.0, 10.0]
    assert sorted(sp["cand_y"][sp["cand_top"]].tolist()) == [9.0, 10.0]
