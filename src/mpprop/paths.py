"""Where a project keeps what its stages write: one owner for every path and file name below
the params' folders (models, metrics, plots, reports, the trunk). Stages read and write
through these functions; none spells a file name of another stage.
"""

from __future__ import annotations

from pathlib import Path

from mpprop.bundle import BUNDLE_FILE
from mpprop.config import Params

MODEL_FILE = BUNDLE_FILE  # models/<P>/<preset>/model.pt, the trunk's model.pt
TRAIN_METRICS_FILE = "metrics.json"  # beside every saved model
EXTRAPOLATION_SUFFIX = ".extrapolation.json"
SUMMARY_SUFFIX = ".summary.json"  # metrics/<P>.summary.json: the few numbers DVC shows
PARITY_CSV = "parity.csv"  # plots/<P>/: every preset's test predictions, a `model` column
SCREENING_CSV = "screening.csv"  # plots/<P>/: every preset's screening curve
PROMOTED_FILE = "promoted.json"  # written by `mpprop promote --record`, read by report
TABLE2_MARKDOWN = "table2.md"
TABLE2_CSV = "table2.csv"


def model_dir(params: Params, prop: str, preset: str) -> Path:
    """models/<P>/<preset>: model.pt and metrics.json, written as one unit by train."""
    return params.models_dir() / prop / preset


def checkpoint_dir(params: Params, prop: str, preset: str) -> Path:
    """Per-epoch training checkpoints of a model being trained (removed once it is saved)."""
    return params.models_dir() / prop / f".{preset}-checkpoints"


def metrics_path(params: Params, prop: str) -> Path:
    """metrics/<P>.json: evaluate's test metrics of every preset (DVC metrics)."""
    return params.path(params.evaluate.metrics_dir) / f"{prop}.json"


def plots_dir(params: Params, prop: str) -> Path:
    return params.path(params.evaluate.plots_dir) / prop


def extrapolation_path(params: Params, prop: str) -> Path:
    return metrics_path(params, prop).with_name(f"{prop}{EXTRAPOLATION_SUFFIX}")


def metrics_summary_path(params: Params, prop: str) -> Path:
    """metrics/<P>.summary.json: one row of `dvc metrics show` per property (test MAE and
    screening precision per preset, the paired difference, n_test, the unit)."""
    return metrics_path(params, prop).with_name(f"{prop}{SUMMARY_SUFFIX}")


def report_dir(params: Params) -> Path:
    return params.path(params.report.dir)


def promoted_path(params: Params) -> Path:
    return report_dir(params) / PROMOTED_FILE


def trunk_model_path(params: Params) -> Path:
    return params.trunk_dir() / MODEL_FILE
