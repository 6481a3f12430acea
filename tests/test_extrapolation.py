"""The extrapolation test's split (mpprop.holdout) and recall (mpprop.stats), hand-made."""

from __future__ import annotations

import numpy as np
import pytest

from mpprop.data import PropertyData
from mpprop.holdout import extrapolation_split
from mpprop.settings import PropertySpec
from mpprop.stats import (
    bootstrap_recall,
    bootstrap_recall_diff,
    held_out_top,
    recall_at_top,
    seed_mean_recall,
)


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


def test_recall_averages_seeds_and_pairs_on_the_same_pool() -> None:
    is_top = np.array([True, True, False, False, False])
    good = np.array([9.0, 8, 1, 2, 3])  # finds both: recall 1
    half = np.array([9.0, 1, 8, 2, 3])  # finds one: recall 0.5
    assert seed_mean_recall(is_top, np.stack([good, half]), "higher") == 0.75
    assert seed_mean_recall(is_top, good, "higher") == 1.0  # one seed as a 1-d array
    whole = np.arange(5)[None, :]  # the identity resample: the point value alone
    ci = bootstrap_recall(is_top, np.stack([good, half]), "higher", whole)
    assert (ci.value, ci.low, ci.high) == (0.75, 0.75, 0.75)
    d = bootstrap_recall_diff(is_top, np.stack([good, good]), np.stack([good, half]), "higher",
                              np.repeat(whole, 3, axis=0))
    assert d.value == pytest.approx(0.25) and d.low == pytest.approx(0.25)
