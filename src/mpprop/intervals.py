"""Calibrated prediction intervals by split conformal prediction.

A model's absolute errors on materials it was not fitted to (the validation split in `mpprop
train`, a labelled file in `mpprop calibrate`) give, for a coverage 1 - alpha, a quantile q
such that a new material's |error| <= q with probability >= 1 - alpha, provided the new
material is drawn like the calibration ones (exchangeable): the interval is prediction ± q
(`absolute`). With an ensemble's member spread `std`, the score |error| / (std + eps) gives
prediction ± q (std + eps) (`normalized`): wider where the members disagree. The guarantee is
marginal (on average over materials like the calibration set), not per material, and says
nothing about materials unlike them (the OOD flag is for those).

A Calibration is stored in the model bundle (`calibration`: numbers and strings only, so the
bundle still loads with weights_only=True) for a grid of coverages; prediction picks the
smallest stored coverage at or above the one asked for and reports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

METHOD_ABSOLUTE = "absolute"
METHOD_NORMALIZED = "normalized"
METHODS = (METHOD_ABSOLUTE, METHOD_NORMALIZED)
# the coverages every calibration stores (plus the one params ask for)
COVERAGES = (0.5, 0.68, 0.8, 0.9, 0.95)
DEFAULT_COVERAGE = 0.9
# a model without a calibration (published checkpoints, bundles of older mpprop versions)
NO_CALIBRATION_NOTE = "no calibration: run mpprop calibrate"
# coverages closer than this are the same (0.9 from params vs 0.9 in the grid)
_TOLERANCE = 1e-9


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The split-conformal quantile of n scores: the ceil((n+1) * coverage)-th smallest (the
    ceil((n+1)(1-alpha))/n empirical quantile), inf where that rank exceeds n (too few
    scores for this coverage)."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage!r}")
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("scores must be a non-empty array of finite numbers")
    k = math.ceil((s.size + 1) * coverage - _TOLERANCE)  # 0.9 * 10 is 9.000000000000002
    return float(s[k - 1]) if k <= s.size else math.inf


def min_calibration_size(coverage: float) -> int:
    """The fewest scores that give a finite quantile at `coverage`."""
    return max(1, math.ceil(coverage / (1 - coverage) - _TOLERANCE))


def coverage_grid(extra: float | None = None) -> tuple[float, ...]:
    """COVERAGES with `extra` (e.g. predict.interval_coverage) added, sorted."""
    grid = {round(c, 6) for c in COVERAGES}
    if extra is not None:
        grid.add(round(float(extra), 6))
    return tuple(sorted(grid))


def coverage_key(coverage: float) -> str:
    """A tag name per coverage: 0.9 -> interval_q90, 0.675 -> interval_q67.5."""
    return f"interval_q{100 * coverage:.4g}"


@dataclass(frozen=True)
class Calibration:
    """Conformal quantiles of one model at a grid of coverages (model units for `absolute`,
    multiples of std + eps for `normalized`), the method its intervals use, and what it was
    calibrated on."""

    method: str
    coverages: tuple[float, ...]
    q_absolute: tuple[float, ...]
    q_normalized: tuple[float, ...] | None  # ensembles only
    eps: float | None  # added to std in the normalized score (the median validation std)
    n: int  # calibration materials
    source: str  # e.g. "validation split (980 materials)", "file.jsonl sha256 ... n=80"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown interval method {self.method!r}")
        if len(self.q_absolute) != len(self.coverages):
            raise ValueError("one absolute quantile per coverage")
        if self.method == METHOD_NORMALIZED and (
                self.q_normalized is None or len(self.q_normalized) != len(self.coverages)
                or self.eps is None or not self.eps > 0):
            raise ValueError("the normalized method needs one quantile per coverage and eps > 0")

    def quantile(self, coverage: float) -> tuple[float, float] | None:
        """(coverage used, q of the method): the smallest stored coverage >= `coverage`;
        None where none is stored or its q is infinite (too few calibration materials)."""
        qs = self.q_normalized if self.method == METHOD_NORMALIZED else self.q_absolute
        for c, q in zip(self.coverages, qs, strict=True):
            if c >= coverage - _TOLERANCE:
                return (c, q) if math.isfinite(q) else None
        return None

    def half_width(self, coverage: float, std: np.ndarray) -> tuple[float, np.ndarray] | None:
        """(coverage used, half-widths of the intervals) for predictions with these member
        spreads (ignored by the absolute method); None as for `quantile`."""
        found = self.quantile(coverage)
        if found is None:
            return None
        used, q = found
        std = np.asarray(std, dtype=np.float64)
        if self.method == METHOD_NORMALIZED:
            return used, q * (std + self.eps)
        return used, np.full(std.shape, q)

    def note(self, coverage: float) -> str:
        """Why there is no interval at `coverage` ('' where there is one)."""
        if self.quantile(coverage) is not None:
            return ""
        return (f"no interval at coverage {coverage:g}: calibrated on {self.n} materials for "
                f"coverages {', '.join(f'{c:g}' for c in self.coverages)}; coverage c needs "
                "n >= c/(1-c)")

    def state_dict(self) -> dict:
        return {"method": self.method, "coverages": list(self.coverages),
                "q_absolute": list(self.q_absolute),
                "q_normalized": None if self.q_normalized is None else list(self.q_normalized),
                "eps": self.eps, "n": self.n, "source": self.source}

    @classmethod
    def from_state(cls, state: dict) -> Calibration:
        qn = state.get("q_normalized")
        return cls(method=str(state["method"]),
                   coverages=tuple(float(c) for c in state["coverages"]),
                   q_absolute=tuple(float(q) for q in state["q_absolute"]),
                   q_normalized=None if qn is None else tuple(float(q) for q in qn),
                   eps=None if state.get("eps") is None else float(state["eps"]),
                   n=int(state["n"]), source=str(state.get("source", "")))

    def tags(self) -> dict[str, str]:
        """Registry version tags / run params: the method, n, source and the quantile of
        the method at each coverage."""
        out = {"interval_method": self.method, "interval_n": str(self.n),
               "calibrated_on": self.source}
        for c in self.coverages:
            found = self.quantile(c)
            out[coverage_key(c)] = f"{found[1]:.6g}" if found else "inf"
        if self.eps is not None:
            out["interval_eps"] = f"{self.eps:.6g}"
        return out


def interval_tags(state: dict | None) -> dict[str, str]:
    """Registry version tags of a regression bundle's `calibration` (Calibration.tags), or a
    note saying how to get intervals where it has none."""
    return Calibration.from_state(state).tags() if state else {"interval_note": NO_CALIBRATION_NOTE}


def _quantiles(scores: np.ndarray, coverages: Iterable[float]) -> tuple[float, ...]:
    return tuple(conformal_quantile(scores, c) for c in coverages)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties broken by order: scores are continuous)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if np.std(ra) and np.std(rb) else 0.0


def spread_ranks_errors(residuals: np.ndarray, std: np.ndarray) -> bool:
    """Whether the member spread ranks the absolute errors: Spearman > 2/sqrt(n), about two
    standard errors above what a spread unrelated to the errors gives."""
    return _spearman(residuals, std) > 2 / math.sqrt(len(residuals))


def calibrate(y: np.ndarray, pred: np.ndarray, std: np.ndarray | None = None,
              coverages: Iterable[float] = COVERAGES, source: str = "") -> Calibration:
    """Split-conformal calibration on held-out materials (targets `y`, predictions `pred`,
    model units). With member spreads `std` (an ensemble), the normalized quantiles too, and
    the normalized method where the spread ranks the errors on these materials (both methods
    cover by construction; normalizing by a spread unrelated to the error only adds noise)."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    grid = tuple(sorted({round(float(c), 6) for c in coverages}))
    residuals = np.abs(y - pred)
    q_abs = _quantiles(residuals, grid)
    q_norm, eps, method = None, None, METHOD_ABSOLUTE
    if std is not None and np.all(np.isfinite(std)) and float(np.median(std)) > 0:
        std = np.asarray(std, np.float64)
        eps = float(np.median(std))  # keeps a near-zero spread from giving a zero width
        q_norm = _quantiles(residuals / (std + eps), grid)
        if spread_ranks_errors(residuals, std):
            method = METHOD_NORMALIZED
    return Calibration(method, grid, q_abs, q_norm, eps, len(y), source)


def interval_metrics(y: np.ndarray, pred: np.ndarray, std: np.ndarray,
                     calibration: Calibration, coverage: float,
                     prefix: str = "test") -> dict[str, float]:
    """Measured coverage and mean width (model units) of the intervals on labelled materials
    (e.g. the test set); empty where there is no interval at `coverage`."""
    half = calibration.half_width(coverage, std)
    if half is None:
        return {}
    err = np.abs(np.asarray(y, np.float64) - np.asarray(pred, np.float64))
    return {f"{prefix}_interval_nominal": float(half[0]),
            f"{prefix}_interval_coverage": float(np.mean(err <= half[1])),
            f"{prefix}_interval_width": float(np.mean(2 * half[1]))}
