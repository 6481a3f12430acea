"""Statistics of model quality on a test set: bootstrap intervals, paired differences.

Why paired: the MAE of one model over random ~900-material subsets varies by ~5%, far more
than most differences between models; resampling the *same* materials for both models
cancels that shared noise. Several seeds of one configuration are averaged inside each
resample, so an interval covers the test-set draw; the spread over seeds is reported beside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

# a model whose predictions spread less than this fraction of the targets' spread is
# (nearly) predicting a constant: its MAE says little about what it learned
NEAR_CONSTANT_SPREAD = 0.1
# fewer true top-N% materials than this make a screening precision mostly noise
MIN_TOP_MATERIALS = 10

Metric = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile-bootstrap interval."""

    value: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float | bool]:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(y_pred) - np.asarray(y_true))))


def _as_seed_matrix(preds: np.ndarray) -> np.ndarray:
    """(S, n) predictions of S seeds; a single (n,) vector is one seed."""
    preds = np.asarray(preds, dtype=np.float64)
    return preds[None, :] if preds.ndim == 1 else preds


def seed_mean(metric: Metric, y: np.ndarray, preds: np.ndarray) -> float:
    """`metric` averaged over the seeds (rows) of (S, n) predictions; (n,) is one seed."""
    return float(np.mean([metric(y, p) for p in _as_seed_matrix(preds)]))


def bootstrap_resamples(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """(B, n) indices of the test materials drawn with replacement (seeded)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap_metric(
    y_true: np.ndarray, preds: np.ndarray, metric: Metric, resamples: np.ndarray,
    level: float = 0.95,
) -> Interval:
    """Seed-averaged `metric` of (S, n) predictions with its bootstrap interval."""
    y, p = np.asarray(y_true, np.float64), _as_seed_matrix(preds)
    values = np.array([seed_mean(metric, y[idx], p[:, idx]) for idx in resamples])
    return interval_of(seed_mean(metric, y, p), values, level)


def bootstrap_paired_difference(
    y_true: np.ndarray, preds_a: np.ndarray, preds_b: np.ndarray, metric: Metric,
    resamples: np.ndarray, level: float = 0.95,
) -> Interval:
    """metric(a) - metric(b) on the same resampled materials (a and b seed-averaged)."""
    y = np.asarray(y_true, np.float64)
    a, b = _as_seed_matrix(preds_a), _as_seed_matrix(preds_b)
    values = np.array([
        seed_mean(metric, y[idx], a[:, idx]) - seed_mean(metric, y[idx], b[:, idx])
        for idx in resamples
    ])
    point = seed_mean(metric, y, a) - seed_mean(metric, y, b)
    return interval_of(point, values, level)


def interval_of(point: float, values: np.ndarray, level: float = 0.95) -> Interval:
    """Percentile interval of bootstrap `values` around `point` (NaN resamples dropped)."""
    tail = 100.0 * (1.0 - level) / 2.0
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return Interval(point, float("nan"), float("nan"))
    return Interval(point, float(np.percentile(finite, tail)),
                    float(np.percentile(finite, 100.0 - tail)))


def _top_orders(y_true: np.ndarray, y_pred: np.ndarray, better: str) -> tuple[np.ndarray, np.ndarray]:
    """Both rankings, best first by the property's better direction (stable sorts)."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower', 'higher' or None, not {better!r}")
    sign = -1.0 if better == "higher" else 1.0
    return (np.argsort(sign * np.asarray(y_true, float), kind="stable"),
            np.argsort(sign * np.asarray(y_pred, float), kind="stable"))


def _precision_of_orders(true_order: np.ndarray, pred_order: np.ndarray,
                         top_percent: float) -> float:
    k = n_top(len(true_order), top_percent)
    is_true_top = np.zeros(len(true_order), dtype=bool)
    is_true_top[true_order[:k]] = True
    return 100.0 * int(is_true_top[pred_order[:k]].sum()) / k


def screening_precision(
    y_true: np.ndarray, y_pred: np.ndarray, top_percent: float, better: str | None
) -> float | None:
    """Percent of the model's top-N% materials that are truly in the top N%.

    "Top" follows the property's better direction; None where there is no screening.
    Ties at the cut-off are broken by order (stable sort), on both sides alike.
    """
    if better is None:
        return None
    return _precision_of_orders(*_top_orders(y_true, y_pred, better), top_percent)


def screening_signal(y_true: np.ndarray, y_pred: np.ndarray, percents: list[float],
                     better: str) -> float:
    """Top-N% precision averaged over several N (%): on ~800 validation materials the top
    3% are ~24, so one N moves in steps of ~4 points; averaging N = 2..5% smooths it."""
    orders = _top_orders(y_true, y_pred, better)  # sorted once for every N
    return float(np.mean([_precision_of_orders(*orders, p) for p in percents]))


def screening_metric(top_percent: float, better: str) -> Metric:
    """Top-N% precision (percent) as a metric of (y_true, y_pred)."""

    def metric(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        value = screening_precision(y_true, y_pred, top_percent, better)
        return float("nan") if value is None else value

    return metric


def prediction_spread_ratio(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """std(predictions) / std(targets): ~1 for a useful model, ~0 for a constant one."""
    spread = float(np.std(y_true))
    return float(np.std(y_pred)) / spread if spread > 0 else float("nan")


def is_near_constant(y_true: np.ndarray, y_pred: np.ndarray) -> bool:
    return bool(prediction_spread_ratio(y_true, y_pred) < NEAR_CONSTANT_SPREAD)


def n_top(n: int, top_percent: float) -> int:
    """Materials in the top N% of n (the rounding of metrics.screening_precision)."""
    return max(1, int(np.ceil(n * top_percent / 100.0)))


def quality_intervals(y_true: np.ndarray, preds: np.ndarray, resamples: np.ndarray,
                      top_percent: float, better: str | None) -> dict[str, Interval]:
    """Seed-averaged test MAE and, with a screening direction, top-N% precision, each with
    its bootstrap interval: what evaluate and the benchmarks report of one model."""
    out = {"test_mae": bootstrap_metric(y_true, preds, mae, resamples)}
    if better is not None:
        out["screening"] = bootstrap_metric(y_true, preds, screening_metric(top_percent, better),
                                            resamples)
    return out


def paired_intervals(y_true: np.ndarray, preds_a: np.ndarray, preds_b: np.ndarray,
                     resamples: np.ndarray, top_percent: float, better: str | None
                     ) -> dict[str, Interval]:
    """metric(a) - metric(b) on the same resampled materials: MAE ("mae_diff") and, with a
    screening direction, top-N% precision ("screening_diff")."""
    out = {"mae_diff": bootstrap_paired_difference(y_true, preds_a, preds_b, mae, resamples)}
    if better is not None:
        out["screening_diff"] = bootstrap_paired_difference(
            y_true, preds_a, preds_b, screening_metric(top_percent, better), resamples)
    return out


# The extrapolation test (evaluate --extrapolation, benchmarks/screening.py): the top of a
# property held out of training; how much of it does a model put in its own top?

def held_out_top(y: np.ndarray, top_percent: float, better: str) -> np.ndarray:
    """Boolean mask of the top `top_percent` of y (by `better`), at least one material."""
    k = n_top(len(y), top_percent)
    order = np.argsort(-y if better == "higher" else y, kind="stable")
    mask = np.zeros(len(y), bool)
    mask[order[:k]] = True
    return mask


def recall_at_top(is_top: np.ndarray, pred: np.ndarray, better: str) -> float:
    """Share of the true top found in the model's top-|top| of the pool."""
    k = int(is_top.sum())
    if k == 0:
        return float("nan")
    order = np.argsort(-pred if better == "higher" else pred, kind="stable")
    return float(is_top[order[:k]].sum() / k)


def recall_metric(better: str) -> Metric:
    """recall_at_top as a metric of (is_top, pred), for the seed-averaged bootstraps."""

    def metric(is_top: np.ndarray, pred: np.ndarray) -> float:
        return recall_at_top(is_top, pred, better)

    return metric


def seed_mean_recall(is_top: np.ndarray, preds: np.ndarray, better: str) -> float:
    """recall_at_top averaged over the rows of (S, n) predictions (one row per seed; a 1-d
    array is one seed)."""
    return seed_mean(recall_metric(better), is_top, preds)


def bootstrap_recall(is_top: np.ndarray, pred: np.ndarray, better: str,
                     resamples: np.ndarray) -> Interval:
    """Seed-averaged recall of (n,) or (S, n) predictions with its bootstrap interval."""
    return bootstrap_metric(is_top, pred, recall_metric(better), resamples)


def bootstrap_recall_diff(is_top: np.ndarray, a: np.ndarray, b: np.ndarray, better: str,
                          resamples: np.ndarray) -> Interval:
    """recall(a) - recall(b) on the same resampled pool (each seed-averaged)."""
    return bootstrap_paired_difference(is_top, a, b, recall_metric(better), resamples)
