"""The rows of a prediction CSV: columns, units, intervals, the OOD score.

Every input row gives one output row per model: rows in = rows out. A row that cannot be
read or predicted carries its error and an empty prediction. Numbers are kept to
SIGNIFICANT_DIGITS significant digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpprop.bundle import LoadedModel
from mpprop.data import inverse_transform, natural_unit
from mpprop.inference import DEFAULT_LIMITS, Predictions, StructureLimits, predict_structures
from mpprop.intervals import DEFAULT_COVERAGE
from mpprop.predict_inputs import InputRow
from mpprop.settings import PropertySpec

# prediction, std (the spread of an ensemble's members, not an interval) and the calibrated
# interval lo..hi in model units (e.g. log10 GPa); value, value_lo..value_hi in natural units
# (GPa); interval_coverage: the coverage of lo..hi; interval_note: why a row has none
OUTPUT_COLUMNS = ("id", "property", "prediction", "model_unit", "std", "n_members", "lo", "hi",
                  "value", "value_lo", "value_hi", "value_unit", "interval_coverage",
                  "interval_note", "ood_score", "ood_threshold", "ood_flag", "ood_note",
                  "model", "error", "warning")
# columns of CSVs written by earlier versions (still recognised as prediction CSVs)
LEGACY_COLUMNS = ("unit",)
SIGNIFICANT_DIGITS = 4  # numbers in the CSV: model errors are far above the 4th digit
NO_OOD_REFERENCE = ("no OOD reference: the model's training materials are not known "
                    "(published checkpoints); ood_score cannot be computed")


@dataclass
class RegisteredModel:
    prop: str
    uri: str
    loaded: LoadedModel  # label, weights, normalizer, spec: read with load_bundle only

    @property
    def label(self) -> str:
        return self.loaded.label

    @property
    def spec(self) -> PropertySpec:
        return self.loaded.spec


def _finite_or_none(x: float) -> float | None:
    """A finite number to SIGNIFICANT_DIGITS significant digits, else None (empty cell)."""
    return float(f"{float(x):.{SIGNIFICANT_DIGITS}g}") if np.isfinite(x) else None


def _ood_columns(model: RegisteredModel, score: float, flag: bool, ok: bool) -> dict[str, Any]:
    """The OOD score with the threshold it is compared with, and why there is none."""
    ood = model.loaded.ood
    if ood is None:
        return {"ood_score": None, "ood_threshold": None, "ood_flag": None,
                "ood_note": NO_OOD_REFERENCE if ok else ""}
    return {"ood_score": _finite_or_none(score) if ok else None,
            "ood_threshold": _finite_or_none(ood.threshold),
            "ood_flag": bool(flag) if ok and np.isfinite(score) else None, "ood_note": ""}


def _row_warning(structure_warning: str, ood: dict[str, Any]) -> str:
    """The structure's warning, and a word whenever the OOD flag is up."""
    parts = [structure_warning] if structure_warning else []
    if ood["ood_flag"]:
        parts.append(f"out of distribution: OOD score {ood['ood_score']} above "
                     f"{ood['ood_threshold']} (the 99th percentile of validation materials)")
    return "; ".join(parts)


def _interval_columns(out: Predictions, k: int, i: int, spec: PropertySpec, ok: bool
                      ) -> dict[str, Any]:
    """The interval columns of model k's row for structure i (empty on a failed row)."""
    lo, hi = out.lo[k][i], out.hi[k][i]
    has = ok and bool(np.isfinite(lo) and np.isfinite(hi))
    value_lo, value_hi = inverse_transform(np.array([lo, hi]), spec) if has else (None, None)
    return {"lo": _finite_or_none(lo) if has else None,
            "hi": _finite_or_none(hi) if has else None,
            "value_lo": _finite_or_none(value_lo) if has else None,
            "value_hi": _finite_or_none(value_hi) if has else None,
            "interval_coverage": out.interval_coverage[k] if has else None,
            "interval_note": out.interval_notes[k] if ok else ""}


def predict_rows(
    models: list[RegisteredModel], rows: list[InputRow],
    limits: StructureLimits = DEFAULT_LIMITS, coverage: float = DEFAULT_COVERAGE,
) -> list[dict[str, Any]]:
    """Output rows (one per input row and model, input order) for one batch: structures are
    checked (within `limits`) and featurized once per graph setting, whatever the number of
    models; calibrated intervals at `coverage` where a model has a calibration."""
    out = predict_structures([m.loaded for m in models], [r.structure for r in rows],
                             [r.error for r in rows], limits=limits, coverage=coverage)
    per_input: list[list[dict[str, Any]]] = [[] for _ in rows]
    for k, (model, preds) in enumerate(zip(models, out.values, strict=True)):
        values = inverse_transform(preds, model.spec)
        stds, scores, flags = out.stds[k], out.ood_scores[k], out.ood_flags[k]
        for i, r in enumerate(rows):
            error = out.errors[i]
            ok = not error and np.isfinite(preds[i])
            if not error and not ok:
                error = "model returned a non-finite prediction"
            ood = _ood_columns(model, scores[i], flags[i], ok)
            per_input[i].append(
                {
                    "id": r.id,
                    "property": model.prop,
                    "prediction": _finite_or_none(preds[i]) if ok else None,
                    "model_unit": model.spec.unit,
                    # the spread of an ensemble's members (not an interval: see lo/hi)
                    "std": _finite_or_none(stds[i]) if ok else None,
                    "n_members": model.loaded.n_members,
                    "value": _finite_or_none(values[i]) if ok else None,
                    "value_unit": natural_unit(model.spec),
                    **_interval_columns(out, k, i, model.spec, ok),
                    **ood,
                    "model": model.label,
                    "error": error,
                    "warning": _row_warning(out.warnings[i], ood) if ok else "",
                }
            )
    return [row for rows_of_input in per_input for row in rows_of_input]


def is_prediction_csv(path: Path) -> bool:
    """Whether `path` starts with the header row of an mpprop prediction CSV: `id, property,
    prediction` first, then only prediction columns (this version's or an earlier one's,
    which had fewer)."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline(4096)
    except OSError:
        return False
    fields = first.decode("utf-8", "replace").strip().split(",")
    return (fields[:3] == ["id", "property", "prediction"]
            and set(fields) <= set(OUTPUT_COLUMNS) | set(LEGACY_COLUMNS))

