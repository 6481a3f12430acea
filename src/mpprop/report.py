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

from mpprop.config import Params

MARKDOWN_FILE = "table2.md"
CSV_FILE = "table2.csv"
PROMOTED_FILE = "promoted.json"  # written by `mpprop promote`
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


def report_dir(params: Params) -> Path:
    return params.path(params.raw["report"]["dir"])


def _fmt(value: float | None, decimals: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{decimals}f}"


def collect_rows(params: Params) -> list[Row]:
    """One row per property of params `properties`, from metrics/<prop>.json."""
    from mpprop.evaluate import default_presets, metrics_path

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
        rows.append(Row(prop, params.property_spec(prop).unit, n_tests.pop(),
                        {p: results[p] for p in presets}, promoted.get(prop) or {}))
    if missing:
        raise ReportError(
            "no evaluation results for: " + ", ".join(missing) + "; run `mpprop evaluate`"
        )
    return rows


def _champion_text(champion: dict[str, Any]) -> str:
    if not champion:
        return "-"
    text = f"v{champion.get('version', '?')}"
    source = champion.get("preset") or champion.get("kind")
    return f"{text} ({source})" if source else text


def table_records(rows: list[Row], presets: list[str]) -> list[dict[str, Any]]:
    """The CSV rows: raw numbers, one column per metric and preset."""
    records = []
    for r in rows:
        rec: dict[str, Any] = {"property": r.prop, "unit": r.unit, "n_test": r.n_test}
        for metric in ("test_mae", "test_screening_precision", "best_val_mae"):
            for p in presets:
                rec[f"{metric}_{p}"] = r.by_preset[p].get(metric)
        rec["champion_version"] = r.champion.get("version")
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


def to_markdown(
    rows: list[Row], presets: list[str], top_percent: float, test_fraction: float,
    snapshot: dict[str, Any],
) -> str:
    where = (
        f"MP snapshot {snapshot.get('snapshot_date', '?')} "
        f"(sha256 {str(snapshot.get('sha256', '?'))[:12]}, {snapshot.get('n_records', '?')} "
        f"records, source {snapshot.get('source', '?')})"
        if snapshot else "MP snapshot: unknown"
    )
    lines = [
        "# Table 2: test MAE and screening precision, by preset",
        "",
        f"{where}. Test set: the fixed {100 * test_fraction:g}% of each property's labelled "
        "records. "
        f"Screening: of the materials a model puts in the top {top_percent:g}% (by the "
        "property's better direction), the percentage truly in the top "
        f"{top_percent:g}%. MAE in the unit column.",
        "",
    ]
    header = ["property", "unit", "n_test"]
    header += [f"MAE {p}" for p in presets] + [f"screening {p} (%)" for p in presets]
    header += ["champion"]
    body = []
    for r in rows:
        cells = [r.prop, r.unit, str(r.n_test)]
        cells += [_fmt(r.by_preset[p]["test_mae"], MAE_DECIMALS) for p in presets]
        cells += [_fmt(r.by_preset[p]["test_screening_precision"], SCREENING_DECIMALS)
                  for p in presets]
        cells.append(_champion_text(r.champion))
        body.append(cells)
    lines += _md_table(header, body)
    lines += [
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
            + [_fmt(ref[f"screening_{p}"], SCREENING_DECIMALS) for p in PAPER_PRESETS]
        )
    lines += _md_table(header, body)
    return "\n".join(lines) + "\n"


def _snapshot_meta(params: Params) -> dict[str, Any]:
    from mpprop.snapshot import SnapshotError, load_metadata

    try:
        return load_metadata(params.snapshot_dir())
    except SnapshotError:
        return {}


def log_report(params: Params, rows: list[Row], presets: list[str], files: list[Path],
               snapshot: dict[str, Any]) -> str:
    """An MLflow run (mpprop.kind=report) with the table's numbers and files; its run id."""
    import mlflow

    from mpprop.tracking import setup_mlflow

    setup_mlflow(params)
    metrics: dict[str, float] = {}
    for r in rows:
        metrics[f"{r.prop}.n_test"] = float(r.n_test)
        for p in presets:
            for metric in ("test_mae", "test_screening_precision", "best_val_mae"):
                value = r.by_preset[p].get(metric)
                if value is not None:
                    metrics[f"{r.prop}.{p}.{metric}"] = float(value)
    with mlflow.start_run(run_name="report") as run:
        mlflow.set_tags({
            "mpprop.kind": "report",
            "snapshot_sha256": snapshot.get("sha256", ""),
            "snapshot_date": snapshot.get("snapshot_date", ""),
        })
        mlflow.log_params({
            "properties": ",".join(r.prop for r in rows),
            "presets": ",".join(presets),
            "screening_top_percent": params.train["screening_top_percent"],
        })
        mlflow.log_metrics(metrics)
        for f in files:
            mlflow.log_artifact(str(f))
        return run.info.run_id


def make_report(params: Params, log_mlflow: bool = True) -> tuple[str, list[Path], str | None]:
    """Write reports/table2.{md,csv}; returns the markdown, the files and the MLflow run id."""
    from mpprop.evaluate import default_presets

    presets = default_presets(params)
    rows = collect_rows(params)
    snapshot = _snapshot_meta(params)
    markdown = to_markdown(rows, presets, params.train["screening_top_percent"],
                           params.split["test_fraction"], snapshot)
    out = report_dir(params)
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / MARKDOWN_FILE, out / CSV_FILE
    md_path.write_text(markdown)
    csv_path.write_text(to_csv(table_records(rows, presets)))
    run_id = log_report(params, rows, presets, [md_path, csv_path], snapshot) if log_mlflow else None
    return markdown, [md_path, csv_path], run_id
