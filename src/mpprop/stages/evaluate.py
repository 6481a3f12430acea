"""`mpprop evaluate`: the saved model of each preset on its property's fixed test set.

Writes, per property (paths from params `evaluate`):
- metrics/<prop>.json: per preset test_mae, test_screening_precision (null where the property
  has no screening direction), best_val_mae, n_test, intervals, budgets, the paired
  differences (read by report);
- metrics/<prop>.summary.json: the few of those numbers `dvc metrics show` lists, one row
  per property (DVC metrics);
- plots/<prop>/parity.csv (model, material_id, true, predicted) and
  plots/<prop>/screening.csv (model, top_percent, precision, n_top): every preset's rows,
  named by `model`, which dvc.yaml's plot templates colour by (DVC plots);
- plots/<prop>/<preset>.png, a parity + screening figure, logged with that preset's rows of
  the CSVs as evaluation.png, parity.csv and screening.csv at the root of its MLflow
  training run (the same names in every run, so the UI's Compare lines them up: it compares
  root-level files only).

The predictions are made again from the saved bundle (models/<prop>/<preset>/model.pt), not
read from the training run, so the numbers belong to the file DVC versions.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mpprop import stats
from mpprop.bundle import load_model
from mpprop.config import Params
from mpprop.data import open_workspace, property_data
from mpprop.device import training_device
from mpprop.inference import predict_rows
from mpprop.outputs import output_dir
from mpprop.paths import (
    MODEL_FILE,
    PARITY_CSV,
    SCREENING_CSV,
    TRAIN_METRICS_FILE,
    metrics_path,
    metrics_summary_path,
    model_dir,
    plots_dir,
)
from mpprop.presets import PAIRED_PREFIX, default_presets, preset_label
from mpprop.settings import PropertySpec
from mpprop.snapshot import atomic_output
from mpprop.stats import n_top, screening_precision
from mpprop.tracking import TAG_DESCRIPTION, TEST_MAE_HIGH, TEST_MAE_LOW, setup_mlflow

FIGURE_ARTIFACT = "evaluation.png"  # the figure's name there (parity.csv, screening.csv beside)
SUMMARY_DIGITS = 4  # significant digits of metrics/<P>.summary.json
# figure layout (presentation only)
PANEL_SIZE_INCHES = (5.0, 4.5)
SCATTER_STYLE = {"s": 6, "alpha": 0.5}


class EvaluationError(ValueError):
    """A model that cannot be evaluated against the current snapshot and split."""


@dataclass
class PresetEvaluation:
    """One preset's model on the property's test set (targets in model units, e.g. log10 GPa)."""

    preset: str
    material_ids: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    test_mae: float
    test_screening_precision: float | None
    best_val_mae: float | None
    run_id: str | None
    curve: list[tuple[float, int, float | None]]  # (top %, n_top, precision %)
    parent: str | None = None  # the model it was fine-tuned from, if any

    @property
    def label(self) -> str:
        return preset_label(self.preset, self.parent)

    @property
    def n_test(self) -> int:
        return len(self.y_true)

    def metrics(self) -> dict[str, Any]:
        return {
            "test_mae": self.test_mae,
            "test_screening_precision": self.test_screening_precision,
            "best_val_mae": self.best_val_mae,
            "n_test": self.n_test,
        }

    def quality(self, resamples: np.ndarray, top_percent: float, better: str | None) -> dict[str, Any]:
        """Intervals and flags: what Table 2 needs to say how far a number can be trusted."""
        out: dict[str, Any] = {}
        ci = stats.quality_intervals(self.y_true, self.y_pred, resamples, top_percent, better)
        out.update(test_mae_low=ci["test_mae"].low, test_mae_high=ci["test_mae"].high)
        if "screening" in ci:
            out.update(test_screening_low=ci["screening"].low,
                       test_screening_high=ci["screening"].high)
        out.update(
            n_top=stats.n_top(self.n_test, top_percent),
            prediction_spread_ratio=stats.prediction_spread_ratio(self.y_true, self.y_pred),
            near_constant=stats.is_near_constant(self.y_true, self.y_pred),
        )
        return out






def available_presets(params: Params, prop: str) -> list[str]:
    """The configured presets that have a saved model for `prop`."""
    return [p for p in default_presets(params) if (model_dir(params, prop, p) / MODEL_FILE).exists()]


def curve_percents(params: Params) -> np.ndarray:
    ev = params.evaluate  # 0 < min <= max <= 100 and step > 0: checked at load
    lo, hi = float(ev.curve_min_percent), float(ev.curve_max_percent)
    step = float(ev.curve_step_percent)
    # half a step of slack so the maximum is included despite float rounding
    return np.arange(lo, hi + step / 2, step)


def screening_curve(
    y_true: np.ndarray, y_pred: np.ndarray, percents: Sequence[float], better: str | None
) -> list[tuple[float, int, float | None]]:

    return [
        (float(p), n_top(len(y_true), p), screening_precision(y_true, y_pred, p, better))
        for p in percents
    ]


def _check_bundle(bundle: dict[str, Any], spec: PropertySpec, ws: Any, path: Path) -> None:
    """The model must belong to this snapshot, graph cache and target definition."""
    extra = bundle.get("extra") or {}
    if extra.get("snapshot_sha256") != ws.snapshot_sha256:
        raise EvaluationError(
            f"{path} was trained on snapshot {str(extra.get('snapshot_sha256'))[:12]}, not the "
            f"current {ws.snapshot_sha256[:12]}; retrain it (`dvc repro`)"
        )
    if extra.get("graph_cache_key") != ws.cache.key:
        raise EvaluationError(
            f"{path} was trained on graph cache {extra.get('graph_cache_key')}, not the "
            f"current {ws.cache.key}; retrain it (`dvc repro`)"
        )
    trained = bundle["property"]
    if trained["transform"] != spec.transform:
        raise EvaluationError(
            f"{path} predicts {spec.key} with target transform {trained['transform']!r}, but "
            f"params say {spec.transform!r}; retrain it (`dvc repro`)"
        )


def evaluate_preset(params: Params, ws: Any, data: Any, prop: str, preset: str) -> PresetEvaluation:
    """Predict the test set with the saved model of one preset."""

    folder = model_dir(params, prop, preset)
    path = folder / MODEL_FILE
    if not path.exists():
        raise EvaluationError(
            f"no {preset} model for {prop}: {path} is missing; "
            f"run `mpprop train --property {prop} --preset {preset}`"
        )
    device, _ = training_device(params.train.device, params.train.precision)
    loaded = load_model(path, label=f"{prop} {preset}").to(device)
    bundle = loaded.bundle
    _check_bundle(bundle, data.spec, ws, path)
    train_metrics_file = folder / TRAIN_METRICS_FILE
    train_metrics = (
        json.loads(train_metrics_file.read_text()) if train_metrics_file.exists() else {}
    )
    # the ensemble mean for an ensemble bundle, as `mpprop predict` gives it
    y_pred, _ = predict_rows(loaded, data.cache, data.test_rows, params.predict.batch_size)
    y_true = data.test_targets
    if not np.all(np.isfinite(y_pred)):
        raise EvaluationError(f"the {preset} model of {prop} predicts non-finite values")
    better = data.spec.better
    return PresetEvaluation(
        preset=preset,
        material_ids=data.cache.material_id[data.test_rows],
        y_true=y_true,
        y_pred=y_pred,
        test_mae=float(np.mean(np.abs(y_pred - y_true))),
        test_screening_precision=screening_precision(
            y_true, y_pred, params.train.screening_top_percent, better
        ),
        best_val_mae=train_metrics.get("best_val_mae"),
        run_id=train_metrics.get("run_id"),
        curve=screening_curve(y_true, y_pred, curve_percents(params), better),
        parent=train_metrics.get("init_from"),
    )


def write_parity_csv(path: Path, evaluations: Sequence[PresetEvaluation]) -> None:
    """Each model's test predictions, one row per material, the model named in `model`."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "material_id", "true", "predicted"])
        for ev in evaluations:
            for mid, t, p in zip(ev.material_ids.tolist(), ev.y_true, ev.y_pred, strict=True):
                w.writerow([ev.label, mid, repr(float(t)), repr(float(p))])


def write_screening_csv(path: Path, evaluations: Sequence[PresetEvaluation]) -> None:
    """Each model's curve; header only for a property without a screening direction."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "top_percent", "precision", "n_top"])
        for ev in evaluations:
            for pct, k, precision in ev.curve:
                if precision is not None:
                    w.writerow([ev.label, pct, precision, k])


def _significant(value: float | None, digits: int = SUMMARY_DIGITS) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


def metrics_summary(results: dict[str, dict[str, Any]], unit: str, top_percent: float
                    ) -> dict[str, Any]:
    """What `dvc metrics show` lists per property: test MAE per preset (in `unit`, the
    model's), the paired difference, screening precision of the top N% per preset (%),
    n_test. The same keys for every property, so each property is one row."""
    screening_key = f"top{top_percent:g}%_precision"
    summary: dict[str, Any] = {"unit": unit, "n_test": None, "test_mae": {}, screening_key: {}}
    for name, m in results.items():
        if name.startswith(PAIRED_PREFIX):
            summary["test_mae"][name[len(PAIRED_PREFIX):]] = _significant(m["mae_diff"])
            continue
        summary["n_test"] = m["n_test"]
        summary["test_mae"][name] = _significant(m["test_mae"])
        precision = m["test_screening_precision"]
        summary[screening_key][name] = None if precision is None else round(precision, 1)
    return summary


def plot_figure(path: Path, ev: PresetEvaluation, spec: PropertySpec, top_percent: float) -> None:
    """Parity plot, plus the screening curve where the property has a screening direction."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    screening = spec.better is not None
    n_panels = 2 if screening else 1
    width, height = PANEL_SIZE_INCHES
    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), squeeze=False)
    ax = axes[0][0]
    ax.scatter(ev.y_true, ev.y_pred, **SCATTER_STYLE)
    lo = float(min(ev.y_true.min(), ev.y_pred.min()))
    hi = float(max(ev.y_true.max(), ev.y_pred.max()))
    ax.plot([lo, hi], [lo, hi], color="black", linestyle="--", label="y = x")
    ax.set_xlabel(f"DFT {spec.key} ({spec.unit})")
    ax.set_ylabel(f"predicted {spec.key} ({spec.unit})")
    ax.set_title(f"{spec.key}, {ev.label}: test MAE {ev.test_mae:.4g} {spec.unit}, "
                 f"n={ev.n_test}")
    ax.legend(loc="upper left")
    if screening:
        ax = axes[0][1]
        pcts = [c[0] for c in ev.curve]
        ax.plot(pcts, [c[2] for c in ev.curve], marker="o")
        ax.axvline(top_percent, color="grey", linestyle="--",
                   label=f"N = {top_percent:g}%: {ev.test_screening_precision:.1f}%")
        ax.set_xlabel(f"top N% ({spec.better} is better)")
        ax.set_ylabel("screening precision (%)")
        ax.set_ylim(0, 100)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_description(ev: PresetEvaluation, quality: dict[str, Any], spec: PropertySpec,
                    top_percent: float) -> str:
    """The training run's description once its model is evaluated: test MAE with its
    interval and unit, screening precision, validation MAE."""
    unit = spec.unit
    text = (f"{spec.key} ({unit}), {ev.label}: test MAE {ev.test_mae:.4g} {unit} (95% interval "
            f"{quality['test_mae_low']:.4g} to {quality['test_mae_high']:.4g}, "
            f"{ev.n_test} test materials)")
    if ev.test_screening_precision is not None:
        text += (f"; top-{top_percent:g}% screening precision {ev.test_screening_precision:.1f}%"
                 f" ({quality['test_screening_low']:.1f} to "
                 f"{quality['test_screening_high']:.1f}, {quality['n_top']} top materials)")
    if ev.best_val_mae is not None:
        text += f"; best validation MAE {ev.best_val_mae:.4g} {unit}"
    return text + "."


def log_to_training_run(params: Params, ev: PresetEvaluation, figure: Path,
                        description: str, quality: dict[str, Any]) -> bool:
    """Attach the figure, this preset's rows of the CSVs, the screening curve, the test
    MAE interval and a description to the preset's training run."""


    if not ev.run_id:
        print(f"warning: no run_id for the {ev.preset} model; nothing logged to MLflow",
              file=sys.stderr)
        return False
    setup_mlflow(params)
    client = MlflowClient()
    try:
        client.get_run(ev.run_id)
    except MlflowException:
        # the tracking store is not versioned by DVC and may have been reset
        print(f"warning: training run {ev.run_id} of the {ev.preset} model is not in "
              f"{mlflow.get_tracking_uri()}; evaluation not logged to MLflow", file=sys.stderr)
        return False
    # the same names in every training run (not xie.png, tuned.png), at the run's root: the
    # UI's Compare shows files common to the runs side by side, and skips folders
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copyfile(figure, folder / FIGURE_ARTIFACT)
        write_parity_csv(folder / PARITY_CSV, [ev])
        write_screening_csv(folder / SCREENING_CSV, [ev])
        for name in (FIGURE_ARTIFACT, PARITY_CSV, SCREENING_CSV):
            client.log_artifact(ev.run_id, str(folder / name))
    for pct, _, precision in ev.curve:
        if precision is not None:
            # one metric with step = N: MLflow draws the curve and compares it across runs
            client.log_metric(ev.run_id, "test_screening_curve", precision, step=int(round(pct)))
    client.log_metric(ev.run_id, TEST_MAE_LOW, quality["test_mae_low"])
    client.log_metric(ev.run_id, TEST_MAE_HIGH, quality["test_mae_high"])
    client.set_tag(ev.run_id, TAG_DESCRIPTION, description)
    return True


def evaluate_property(
    params: Params,
    prop: str,
    presets: Sequence[str] | None = None,
    log_mlflow: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate the presets' models of one property; write metrics, plots and figures.

    presets=None: the configured presets that have a model (at least one must);
    given presets must all have a model.
    """

    if presets is None:
        presets = available_presets(params, prop)
        if not presets:
            raise EvaluationError(
                f"no model of {prop} for any of the presets {', '.join(default_presets(params))}"
                f" under {params.models_dir() / prop}; run `mpprop train --property {prop}`"
            )
    spec = params.property_spec(prop)
    ws = open_workspace(params, in_memory=False)  # only the test rows are read
    data = property_data(params, ws, prop)
    top_percent = params.train.screening_top_percent
    results: dict[str, dict[str, Any]] = {}
    evaluations: dict[str, PresetEvaluation] = {}
    resamples = stats.bootstrap_resamples(
        len(data.test_rows), int(params.evaluate.bootstrap_resamples),
        int(params.evaluate.bootstrap_seed),
    )
    # plots/<prop>/ is one unit (outputs.output_dir): swapped in whole once every preset is
    # done, so a kill leaves the previous plots; metrics/<prop>.json is replaced atomically
    with output_dir(plots_dir(params, prop), "evaluate") as out_plots:
        for preset in presets:
            ev = evaluate_preset(params, ws, data, prop, preset)
            evaluations[preset] = ev
            figure = out_plots / f"{preset}.png"
            plot_figure(figure, ev, spec, top_percent)
            quality = ev.quality(resamples, top_percent, spec.better)
            if log_mlflow:
                log_to_training_run(params, ev, figure,
                                    run_description(ev, quality, spec, top_percent), quality)
            results[preset] = {**ev.metrics(), **quality,
                               "budget": training_budget(params, prop, preset)}
        write_parity_csv(out_plots / PARITY_CSV, list(evaluations.values()))
        write_screening_csv(out_plots / SCREENING_CSV, list(evaluations.values()))
        results.update(paired_differences(evaluations, resamples, top_percent, spec.better))
    with atomic_output(metrics_path(params, prop)) as tmp:
        Path(tmp).write_text(json.dumps(results, indent=2) + "\n")
    with atomic_output(metrics_summary_path(params, prop)) as tmp:
        summary = metrics_summary(results, spec.unit, top_percent)
        Path(tmp).write_text(json.dumps(summary, indent=2) + "\n")
    return results




def paired_differences(
    evaluations: dict[str, PresetEvaluation], resamples: np.ndarray, top_percent: float,
    better: str | None,
) -> dict[str, dict[str, Any]]:
    """Each preset minus the first (the baseline, e.g. tuned - xie), on the same resampled
    test materials: MAE and screening differences with their intervals."""
    names = list(evaluations)
    out: dict[str, dict[str, Any]] = {}
    base = evaluations[names[0]]
    for name in names[1:]:
        ev = evaluations[name]
        diffs = stats.paired_intervals(ev.y_true, ev.y_pred, base.y_pred, resamples,
                                       top_percent, better)
        d = diffs["mae_diff"]
        entry: dict[str, Any] = {"mae_diff": d.value, "mae_diff_low": d.low,
                                 "mae_diff_high": d.high, "mae_diff_excludes_zero": d.excludes_zero}
        if "screening_diff" in diffs:
            d = diffs["screening_diff"]
            entry.update(screening_diff=d.value, screening_diff_low=d.low,
                         screening_diff_high=d.high)
        out[f"{PAIRED_PREFIX}{name}-{names[0]}"] = entry
    return out


def training_budget(params: Params, prop: str, preset: str) -> dict[str, Any]:
    """What the preset's model cost: final epochs, train/val sizes, and for a tuned model the
    study's trials and epochs per trial (from models/<prop>/<preset>/metrics.json and
    tuned/<prop>.yaml)."""
    path = model_dir(params, prop, preset) / TRAIN_METRICS_FILE
    train = json.loads(path.read_text()) if path.exists() else {}
    budget: dict[str, Any] = {k: train.get(k) for k in ("epochs", "n_train", "n_val")}
    tuned_file = params.best_params_path(prop)
    if preset == "tuned" and tuned_file.exists():
        tuned = yaml.safe_load(tuned_file.read_text())
        budget.update(
            tune_trials=(tuned.get("n_trials_complete") or 0) + (tuned.get("n_trials_pruned") or 0),
            tune_trials_pruned=tuned.get("n_trials_pruned"),
            tune_epochs_per_trial=tuned["hyperparams"].get("epochs"),
        )
    return budget


def format_results(prop: str, results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{prop}:"]
    for preset, m in results.items():
        if preset.startswith(PAIRED_PREFIX):
            lines.append(f"  {preset[len(PAIRED_PREFIX):]}: test MAE difference {m['mae_diff']:+.4g} "
                         f"(95% {m['mae_diff_low']:+.4g} to {m['mae_diff_high']:+.4g}, paired)")
            continue
        scr = m["test_screening_precision"]
        lines.append(
            f"  {preset:<8} test MAE {m['test_mae']:.4g}  screening "
            f"{'-' if scr is None else f'{scr:.1f}%'}  (n_test {m['n_test']})"
        )
    return "\n".join(lines)
