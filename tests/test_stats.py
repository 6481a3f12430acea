"""Bootstrap intervals and paired differences (mpprop.stats) on hand-made predictions."""

from __future__ import annotations

import numpy as np
import pytest

from mpprop import stats


def _data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=n)
    # model b: model a's errors plus extra noise on every material
    err = rng.normal(scale=0.3, size=n)
    return y, y + err, y + err + rng.normal(scale=0.1, size=n)


def test_interval_contains_point_and_shrinks_with_n() -> None:
    y, a, _ = _data(400)
    ci = stats.bootstrap_metric(y, a, stats.mae, stats.bootstrap_resamples(len(y), 500, 0))
    assert ci.low < ci.value < ci.high
    assert ci.value == pytest.approx(stats.mae(y, a))
    y4, a4, _ = _data(4000)
    wide = ci.high - ci.low
    narrow = stats.bootstrap_metric(y4, a4, stats.mae, stats.bootstrap_resamples(4000, 500, 0))
    # the width falls like 1/sqrt(n): 10x the materials, ~1/3 the width
    assert (narrow.high - narrow.low) < 0.5 * wide


def test_paired_difference_sees_what_unpaired_intervals_hide() -> None:
    y, a, b = _data(400)
    res = stats.bootstrap_resamples(len(y), 1000, 1)
    ci_a = stats.bootstrap_metric(y, a, stats.mae, res)
    ci_b = stats.bootstrap_metric(y, b, stats.mae, res)
    # the two unpaired intervals overlap ...
    assert ci_a.high > ci_b.low
    # ... but the paired difference a - b excludes zero: a is better on the same materials
    d = stats.bootstrap_paired_difference(y, a, b, stats.mae, res)
    assert d.value == pytest.approx(ci_a.value - ci_b.value)
    assert d.high < 0 and d.excludes_zero


def test_paired_difference_of_a_model_with_itself_is_zero() -> None:
    y, a, _ = _data(200)
    d = stats.bootstrap_paired_difference(y, a, a, stats.mae, stats.bootstrap_resamples(200, 200, 0))
    assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0)
    assert not d.excludes_zero


def test_seeds_are_averaged_inside_each_resample() -> None:
    y = np.zeros(4)
    seeds = np.array([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])  # MAE 1 and 3
    ci = stats.bootstrap_metric(y, seeds, stats.mae, stats.bootstrap_resamples(4, 50, 0))
    assert ci.value == 2.0 and ci.low == 2.0 and ci.high == 2.0


def test_screening_metric_and_near_constant() -> None:
    y = np.arange(100.0)
    assert stats.screening_metric(3, "higher")(y, y) == 100.0
    assert stats.screening_metric(3, "higher")(y, -y) == 0.0
    assert stats.is_near_constant(y, np.full(100, 50.0) + 0.01 * y)
    assert not stats.is_near_constant(y, 0.5 * y)
    assert stats.n_top(980, 3) == 30 and stats.n_top(13, 3) == 1
