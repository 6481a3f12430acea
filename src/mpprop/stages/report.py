"""`mpprop report`: the paper's Table 2 (test MAE and screening precision, Xie settings vs
tuned) for this project's snapshot, as markdown and CSV, also logged to MLflow.

It reads what `mpprop evaluate` wrote (metrics/<prop>.json) and, if present, the champion
record of `mpprop promote` (reports/promoted.json).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from mpprop.config import Params
from mpprop.faults import process_tags
from mpprop.paths import PROMOTED_FILE, extrapolation_path, metrics_path, report_dir
from mpprop.presets import PAIRED_PREFIX, default_presets
from mpprop.snapshot import SnapshotError, atomic_output, load_metadata
from mpprop.stats import MIN_TOP_MATERIALS, NEAR_CONSTANT_SPREAD
from mpprop.tracking import KIND_REPORT, TAG_KIND, setup_mlflow

MARKDOWN_FILE = "table2.md"
CSV_FILE = "table2.csv"
# per preset, the numbers of metrics/<prop>.json that the CSV carries
CSV_METRICS = ("test_mae", "test_mae_low", "test_mae_high", "test_screening_precision",
               "test_screening_low", "test_screening_high", "best_val_mae", "n_top",
               "prediction_spread_ratio", "near_constant")
# display precision: the paper's Table 2 gives MAEs to 3 decimals, screening to 2
MAE_DECIMALS = 3
SCREENING_DECIMALS = 2

# The paper's Table 2, as published (data, not configuration): test MAE (property units; the
# moduli in log10(GPa)) and screening precision in % for the top 3%, Xie settings vs tuned.
# Source: the Japanese short paper in reference/000_7c8fd696cb851e5f.txt, English summary in
# DESIGN.md §1; MP snapshot of 2020-12-24. None: the paper does not screen Poisson's ratio.
PAPER_TABLE2: dict[str, dict[str, float | None]] = {
    "formation_energy_per_atom": {"mae_xie": 0.052, "mae_tuned": 0.049,
                                  "screening_xie": 99.28, "screening_tuned": 99.28},
    "energy_per_atom": {"mae_xie": 0.087, "mae_tuned": 0.085,
                        "screening_xie": 95.69, "screening_tuned": 96.06},
    "efermi": {"mae_xie": 0.363, "mae_tuned": 0.340,
               "screening_xie": 98.92, "screening_tuned": 98.56},
    "band_gap": {"mae_xie": 0.415, "mae_tuned": 0.366,
                 "screening_xie": 98.78, "screening_tuned": 97.56},
    "bulk_modulus": {"mae_xie": 0.050, "mae_tuned": 0.050,
                     "screening_xie": 100.0, "screening_tuned": 100.0},
    "shear_modulus": {"mae_xie": 0.077, "mae_tuned": 0.079,
                      "screening_xie": 100.0, "screening_tuned": 100.0},
    "poisson_ratio": {"mae_xie": 0.031, "mae_tuned": 0.030,
                      "screening_xie": None, "screening_tuned": None},
}
PAPER_PRESETS = ("xie", "tuned")  # the two columns of each metric in the paper's table


class ReportError(ValueError):
    """Evaluation results missing or unusable for the report."""


@dataclass
class Row:
    prop: str
    unit: str
    n_test: int
    by_preset: dict[str, dict[str, Any]]  # preset -> metrics/<prop>.json entry
    champion: dict[str, Any] = field(default_factory=dict)
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)  # "tuned-xie" -> diffs
    extrapolation: dict[str, Any] = field(default_factory=dict)  # `evaluate --extrapolation`



# one symbol for a value that is missing; a dimensionless unit is spelled out
MISSING = "n/a"
NOT_SCREENED = "not screened"  # a property without a screening direction (Poisson's ratio)
DIMENSIONLESS = "dimensionless"


def _fmt(value: float | None, decimals: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return f"{value:.{decimals}f}"


def _unit_text(unit: str) -> str:
    return DIMENSIONLESS if unit in ("-", "") else unit


def _paired_screening_text(d: dict[str, Any] | None) -> str:
    """A paired screening difference in percentage points with its interval, * when the
    interval excludes zero."""
    if not d or d.get("screening_diff") is None:
        return MISSING
    low, high = d["screening_diff_low"], d["screening_diff_high"]
    star = " *" if low > 0 or high < 0 else ""
    return f"{d['screening_diff']:+.1f} [{low:+.1f}, {high:+.1f}]{star}"


def collect_rows(params: Params) -> list[Row]:
    """One row per property of params `properties`, from metrics/<prop>.json."""

    presets = default_presets(params)
    promoted_file = report_dir(params) / PROMOTED_FILE
    promoted = json.loads(promoted_file.read_text()) if promoted_file.exists() else {}
    rows, missing = [], []
    for prop in params.properties:
        path = metrics_path(params, prop)
        if not path.exists():
            missing.append(f"{prop} ({path})")
            continue
        results = json.loads(path.read_text())
        absent = [p for p in presets if p not in results]
        if absent:
            raise ReportError(
                f"{path} has no results for preset(s) {', '.join(absent)}; "
                f"run `mpprop evaluate --property {prop}` after training them"
            )
        n_tests = {results[p]["n_test"] for p in presets}
        if len(n_tests) != 1:
            # every preset of a property is judged on the same fixed test set
            raise ReportError(f"{path}: presets were tested on different sets ({n_tests})")
        paired = {k[len(PAIRED_PREFIX):]: v for k, v in results.items()
                  if k.startswith(PAIRED_PREFIX)}
        extra_file = extrapolation_path(params, prop)
        extra = json.loads(extra_file.read_text()) if extra_file.exists() else {}
        rows.append(Row(prop, params.property_spec(prop).unit, n_tests.pop(),
                        {p: results[p] for p in presets}, promoted.get(prop) or {}, paired,
                        extra))
    if missing:
        raise ReportError(
            "no evaluation results for: " + ", ".join(missing) + "; run `mpprop evaluate`"
        )
    return rows


def _champion_text(champion: dict[str, Any]) -> str:
    if not champion:
        return MISSING
    text = f"v{champion.get('version', '?')}"
    source = champion.get("preset") or champion.get("kind")
    text = f"{text} ({source})" if source else text
    if champion.get("test_mae") is not None:
        text += f", test MAE {champion['test_mae']:.{MAE_DECIMALS}f}"
    return text


def table_records(rows: list[Row], presets: list[str]) -> list[dict[str, Any]]:
    """The CSV rows: raw numbers, one column per metric and preset."""
    records = []
    for r in rows:
        rec: dict[str, Any] = {"property": r.prop, "unit": r.unit, "n_test": r.n_test}
        for metric in CSV_METRICS:
            for p in presets:
                rec[f"{metric}_{p}"] = r.by_preset[p].get(metric)
        for pair, diffs in r.paired.items():
            for key in ("mae_diff", "mae_diff_low", "mae_diff_high", "screening_diff"):
                rec[f"{key}_{pair}"] = diffs.get(key)
        rec["champion_version"] = r.champion.get("version")
        rec["champion_test_mae"] = r.champion.get("test_mae")
        rec["champion_run_id"] = r.champion.get("run_id")
        records.append(rec)
    return records


def to_csv(records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if records:
        w = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
        w.writeheader()
        # empty cell where there is no value (e.g. no screening for Poisson's ratio)
        w.writerows({k: ("" if v is None else v) for k, v in rec.items()} for rec in records)
    return buf.getvalue()


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _interval(m: dict[str, Any], key: str, low: str, high: str, decimals: int) -> str:
    text = _fmt(m.get(key), decimals)
    if m.get(low) is not None and m.get(high) is not None:
        text += f" [{_fmt(m[low], decimals)}, {_fmt(m[high], decimals)}]"
    return text


def _budget_text(m: dict[str, Any]) -> str:
    b = m.get("budget") or {}
    parts = []
    if b.get("tune_trials"):
        parts.append(f"{b['tune_trials']} trials x {b.get('tune_epochs_per_trial', '?')} ep")
    if b.get("epochs"):
        parts.append(f"{b['epochs']} ep final")
    return ", ".join(parts) or MISSING


def data_vintage(snapshot: dict[str, Any]) -> str:
    """The data's own date where known (not the day it was read)."""
    if snapshot.get("database_version"):
        return f"MP database {snapshot['database_version']}"
    if snapshot.get("data_vintage"):
        return str(snapshot["data_vintage"])
    return f"unknown (read {snapshot.get('snapshot_date', '?')})"


def row_warnings(r: Row, presets: list[str], top_percent: float) -> list[str]:
    """What makes a row's numbers weak: too few top materials, near-constant predictions."""
    notes = []
    n_top = next((r.by_preset[p].get("n_top") for p in presets if r.by_preset[p].get("n_top")), None)
    screened = any(r.by_preset[p].get("test_screening_precision") is not None for p in presets)
    if screened and n_top is not None and n_top < MIN_TOP_MATERIALS:
        notes.append(f"only {n_top} materials in the top {top_percent:g}%: screening is noise")
    flat = [p for p in presets if r.by_preset[p].get("near_constant")]
    if flat:
        notes.append(f"near-constant predictions: {', '.join(flat)} (spread < "
                     f"{100 * NEAR_CONSTANT_SPREAD:g}% of the targets')")
    return notes


def to_markdown(
    rows: list[Row], presets: list[str], top_percent: float, test_fraction: float,
    snapshot: dict[str, Any],
) -> str:
    """Table 2 as markdown: how to read it, one row per property, its warnings, and the
    paper's own Table 2 for reference."""
    lines = _introduction(top_percent, test_fraction, snapshot)
    pairs = sorted({k for r in rows for k in r.paired})
    extrapolated = any(r.extrapolation for r in rows)
    header = ["property", "unit", "n_test"] + [f"budget {p}" for p in presets]
    header += [f"MAE {p}" for p in presets] + [f"MAE {k}" for k in pairs]
    header += ["n_top"] + [f"screening {p} (%)" for p in presets]
    header += [f"screening {k} (points)" for k in pairs]
    if extrapolated:
        header += [f"extrapolation recall {p}" for p in presets]
    header += ["champion"]
    lines += _md_table(header, [_row_cells(r, presets, pairs, extrapolated) for r in rows])
    if extrapolated:
        lines += ["", "Extrapolation recall (`mpprop evaluate --extrapolation`): the property's "
                  "top materials are held out of training; the share of them a model puts in "
                  "its own top of a pool of them plus the test set (random picking: the "
                  "`random_recall` of metrics/<property>.extrapolation.json)."]
    notes = [f"- {r.prop}: {w}" for r in rows for w in row_warnings(r, presets, top_percent)]
    if notes:
        lines += ["", "Warnings:", "", *notes]
    return "\n".join(lines + _paper_reference(rows)) + "\n"


def _introduction(top_percent: float, test_fraction: float, snapshot: dict[str, Any]
                  ) -> list[str]:
    """The title and how to read the table: data, test set, screening, intervals, marks."""
    where = (
        f"Data: {data_vintage(snapshot)}; snapshot read {snapshot.get('snapshot_date', '?')} "
        f"(sha256 {str(snapshot.get('sha256', '?'))[:12]}, {snapshot.get('n_records', '?')} "
        f"records, source {snapshot.get('source', '?')})"
        if snapshot else "MP snapshot: unknown"
    )
    return [
        "# Table 2: test MAE and screening precision, by preset",
        "",
        f"{where}. Test set: the fixed {100 * test_fraction:g}% of each property's labelled "
        "records. "
        f"Screening: of the materials a model puts in the top {top_percent:g}% (by the "
        "property's better direction), the percentage truly in the top "
        f"{top_percent:g}%. MAE in the unit column. [a, b]: 95% bootstrap interval over the "
        "test materials; differences are paired (both models on the same resampled "
        "materials), * where the interval excludes zero. n_top: the materials truly in the "
        f"top {top_percent:g}% of the test set (one of them moves precision by 100/n_top "
        f"points). {MISSING}: no value; {NOT_SCREENED}: the property has no screening "
        "direction.",
        "",
    ]


def _row_cells(r: Row, presets: list[str], pairs: list[str], extrapolated: bool) -> list[str]:
    """One property's cells, in the header's order."""
    cells = [r.prop, _unit_text(r.unit), str(r.n_test)]
    cells += [_budget_text(r.by_preset[p]) for p in presets]
    cells += [_interval(r.by_preset[p], "test_mae", "test_mae_low", "test_mae_high",
                        MAE_DECIMALS) for p in presets]
    for k in pairs:
        d = r.paired.get(k)
        cells.append(MISSING if d is None else (
            f"{d['mae_diff']:+.{MAE_DECIMALS}f} [{d['mae_diff_low']:+.{MAE_DECIMALS}f}, "
            f"{d['mae_diff_high']:+.{MAE_DECIMALS}f}]" + (" *" if d["mae_diff_excludes_zero"] else "")))
    screened = any(r.by_preset[p].get("test_screening_precision") is not None
                   for p in presets)
    n_top = next((r.by_preset[p].get("n_top") for p in presets
                  if r.by_preset[p].get("n_top")), None)
    cells.append(str(n_top) if screened and n_top else NOT_SCREENED if not screened
                 else MISSING)
    cells += [_interval(r.by_preset[p], "test_screening_precision", "test_screening_low",
                        "test_screening_high", SCREENING_DECIMALS - 1)
              if screened else NOT_SCREENED for p in presets]
    cells += [_paired_screening_text(r.paired.get(k)) if screened else NOT_SCREENED
              for k in pairs]
    if extrapolated:
        cells += [_interval(r.extrapolation.get(p) or {}, "recall", "recall_low",
                            "recall_high", 2) for p in presets]
    cells.append(_champion_text(r.champion))
    return cells


def _paper_reference(rows: list[Row]) -> list[str]:
    """The paper's Table 2 for the properties of `rows` (its numbers, as published)."""
    lines = [
        "",
        "## Reference: the paper's Table 2",
        "",
        "As published (MP snapshot of 2020-12-24, 120 Optuna trials per property, top 3%); "
        "not comparable number for number with a different snapshot, subsample or budget.",
        "",
    ]
    header = ["property"] + [f"MAE {p}" for p in PAPER_PRESETS]
    header += [f"screening {p} (%)" for p in PAPER_PRESETS]
    body = []
    for r in rows:
        ref = PAPER_TABLE2.get(r.prop)
        if ref is None:
            continue
        body.append(
            [r.prop]
            + [_fmt(ref[f"mae_{p}"], MAE_DECIMALS) for p in PAPER_PRESETS]
            # the paper screens every property but Poisson's ratio (no direction)
            + [NOT_SCREENED if ref[f"screening_{p}"] is None
               else _fmt(ref[f"screening_{p}"], SCREENING_DECIMALS) for p in PAPER_PRESETS]
        )
    return lines + _md_table(header, body)


def _snapshot_meta(params: Params) -> dict[str, Any]:

    try:
        return load_metadata(params.snapshot_dir())
    except SnapshotError:
        return {}


def log_report(params: Params, rows: list[Row], presets: list[str], files: list[Path],
               snapshot: dict[str, Any]) -> str:
    """An MLflow run (mpprop.kind=report) with the table's numbers and files; its run id."""


    setup_mlflow(params)
    metrics: dict[str, float] = {}
    for r in rows:
        metrics[f"{r.prop}.n_test"] = float(r.n_test)
        for p in presets:
            for metric in CSV_METRICS:
                value = r.by_preset[p].get(metric)
                if value is not None:
                    metrics[f"{r.prop}.{p}.{metric}"] = float(value)
        for pair, diffs in r.paired.items():
            metrics[f"{r.prop}.{pair}.mae_diff"] = float(diffs["mae_diff"])
    with mlflow.start_run(run_name="report") as run:
        mlflow.set_tags({
            TAG_KIND: KIND_REPORT,
            "snapshot_sha256": snapshot.get("sha256", ""),
            "snapshot_date": snapshot.get("snapshot_date", ""),
            "data_vintage": data_vintage(snapshot) if snapshot else "",
            **process_tags(),  # a killed report's run is ended by the next command
        })
        mlflow.log_params({
            "properties": ",".join(r.prop for r in rows),
            "presets": ",".join(presets),
            "screening_top_percent": params.train.screening_top_percent,
        })
        mlflow.log_metrics(metrics)
        for f in files:
            mlflow.log_artifact(str(f))
        return run.info.run_id


def make_report(params: Params, log_mlflow: bool = True) -> tuple[str, list[Path], str | None]:
    """Write reports/table2.{md,csv}; returns the markdown, the files and the MLflow run id."""

    presets = default_presets(params)
    rows = collect_rows(params)
    snapshot = _snapshot_meta(params)
    markdown = to_markdown(rows, presets, params.train.screening_top_percent,
                           params.split.test_fraction, snapshot)
    out = report_dir(params)
    md_path, csv_path = out / MARKDOWN_FILE, out / CSV_FILE
    # each file replaced atomically (temp file + rename): a kill leaves the previous one whole
    for path, text in ((md_path, markdown), (csv_path, to_csv(table_records(rows, presets)))):
        with atomic_output(path) as tmp:
            Path(tmp).write_text(text)
    run_id = log_report(params, rows, presets, [md_path, csv_path], snapshot) if log_mlflow else None
    return markdown, [md_path, csv_path], run_id
