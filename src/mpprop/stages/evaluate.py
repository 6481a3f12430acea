"""`mpprop evaluate`: the saved model of each preset on its property's fixed test set.

Writes, per property (paths from params `evaluate`):
- metrics/<prop>.json: per preset test_mae, test_screening_precision (null where the property
  has no screening direction), best_val_mae, n_test (DVC metrics);
- plots/<prop>/parity_<preset>.csv (material_id, true, predicted) and
  plots/<prop>/screening_<preset>.csv (top_percent, precision, n_top) (DVC plots);
- plots/<prop>/<preset>.png, a parity + screening figure, also logged (with the CSVs) as
  artifacts of the preset's training run in MLflow.

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
from mpprop.config import Params, PropertySpec
from mpprop.data import open_workspace, property_data
from mpprop.device import training_device
from mpprop.inference import predict_rows
from mpprop.outputs import output_dir
from mpprop.paths import MODEL_FILE, TRAIN_METRICS_FILE, metrics_path, model_dir, plots_dir
from mpprop.presets import PAIRED_PREFIX, default_presets
from mpprop.snapshot import atomic_output
from mpprop.stats import n_top, screening_precision
from mpprop.tracking import setup_mlflow

ARTIFACT_DIR = "evaluation"  # folder of the evaluation files inside a training run
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
    )


def write_parity_csv(path: Path, ev: PresetEvaluation) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["material_id", "true", "predicted"])
        for mid, t, p in zip(ev.material_ids.tolist(), ev.y_true, ev.y_pred, strict=True):
            w.writerow([mid, repr(float(t)), repr(float(p))])


def write_screening_csv(path: Path, ev: PresetEvaluation) -> None:
    """The curve; header only for a property without a screening direction (no curve)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["top_percent", "precision", "n_top"])
        for pct, k, precision in ev.curve:
            if precision is not None:
                w.writerow([pct, precision, k])


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
    ax.plot([lo, hi], [lo, hi], color="black")  # y = x
    ax.set_xlabel(f"DFT {spec.key} ({spec.unit})")
    ax.set_ylabel(f"predicted ({spec.unit})")
    ax.set_title(f"{spec.key} [{ev.preset}]: test MAE {ev.test_mae:.4g}, n={ev.n_test}")
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


def run_artifact_name(file_name: str, preset: str) -> str:
    """The name an evaluation file has in its training run: without the preset (parity.csv,
    screening.csv, evaluation.png), the run says which preset it is."""
    stem, dot, suffix = file_name.rpartition(".")
    stem = stem.replace(f"_{preset}", "")
    return f"{'evaluation' if stem == preset else stem}{dot}{suffix}"


def log_to_training_run(params: Params, ev: PresetEvaluation, files: list[Path]) -> bool:
    """Attach the evaluation files and the screening curve to the preset's training run."""


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
    # the same names in every training run (parity.csv, not parity_xie.csv), so that the
    # UI's Compare shows the runs' files side by side
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            same_name = Path(tmp) / run_artifact_name(f.name, ev.preset)
            shutil.copyfile(f, same_name)
            client.log_artifact(ev.run_id, str(same_name), artifact_path=ARTIFACT_DIR)
    for pct, _, precision in ev.curve:
        if precision is not None:
            # one metric with step = N: MLflow draws the curve and compares it across runs
            client.log_metric(ev.run_id, "test_screening_curve", precision, step=int(round(pct)))
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
            parity, curve, figure = (
                out_plots / f"parity_{preset}.csv",
                out_plots / f"screening_{preset}.csv",
                out_plots / f"{preset}.png",
            )
            write_parity_csv(parity, ev)
            write_screening_csv(curve, ev)
            plot_figure(figure, ev, spec, top_percent)
            if log_mlflow:
                log_to_training_run(params, ev, [figure, parity, curve])
            results[preset] = {**ev.metrics(), **ev.quality(resamples, top_percent, spec.better),
                               "budget": training_budget(params, prop, preset)}
        results.update(paired_differences(evaluations, resamples, top_percent, spec.better))
    with atomic_output(metrics_path(params, prop)) as tmp:
        Path(tmp).write_text(json.dumps(results, indent=2) + "\n")
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
