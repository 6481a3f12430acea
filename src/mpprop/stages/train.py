"""`mpprop train`: one property's model (or ensemble) on its fixed split, evaluated on its
test set, logged to MLflow; writes models/<prop>/<preset>/{model.pt, metrics.json} as one unit.

K members (train.ensemble / presets.<p>.ensemble / --ensemble): seeds seed, seed+1, ...
(and bootstrap resamples of the train split with train.ensemble_bootstrap). Kept as one
ensemble bundle (prediction = mean, std = spread), or with train.ensemble_keep: best, the
member with the best validation MAE alone (K seeds, one model). The bundle also stores the
out-of-distribution reference (mpprop.ood) fitted on the train and validation embeddings, and
the calibration of its prediction intervals (mpprop.intervals: split conformal on the
validation residuals; the run logs it as params, its test coverage as metrics).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from tqdm import tqdm

from mpprop.bundle import ensemble_mean_std, fit_zero_below, floor_to_zero
from mpprop.config import Params
from mpprop.data import PropertyData, Workspace, open_workspace, property_data, train_val_split
from mpprop.device import training_device
from mpprop.experiment import calibration
from mpprop.faults import (
    pause_point,
    process_tags,
    sigterm_as_exception,
)
from mpprop.inference import embed
from mpprop.intervals import COVERAGES, Calibration, calibrate, interval_metrics
from mpprop.ood import OODReference
from mpprop.outputs import output_dir
from mpprop.paths import MODEL_FILE, TRAIN_METRICS_FILE, checkpoint_dir, model_dir
from mpprop.presets import final_hyperparams, preset_label, tuned_fine_tuning
from mpprop.registry import ParentModel, resolve_parent
from mpprop.settings import GraphSettings, Hyperparams
from mpprop.stats import screening_precision, screening_signal
from mpprop.tracking import (
    KIND_TRAIN,
    TAG_DESCRIPTION,
    TAG_GRAPH_KEY,
    TAG_KIND,
    TAG_PRESET,
    TAG_PROPERTY,
    TAG_SNAPSHOT,
    VAL_SCREENING_METRIC,
    end_orphaned_runs,
    killed_on_interrupt,
    log_model,
    save_bundle,
    setup_mlflow,
)
from mpprop.training import (
    CheckpointMismatchError,
    EpochStats,
    FineTuning,
    FitResult,
    fit_on_pool,
    predict,
    set_torch_threads,
)
from mpprop.write_errors import writing

# the nominal coverages whose measured test coverage train reports
REPORTED_COVERAGES = (0.68, 0.9)


def n_members(params: Params, preset: str, ensemble: int | None) -> int:
    if ensemble is not None:
        return int(ensemble)
    entry = params.presets.get(preset)  # none for the tuned preset
    return (entry.ensemble if entry else None) or params.train.ensemble


def _member_split(train_idx: np.ndarray, bootstrap: bool, seed: int) -> np.ndarray:
    if not bootstrap:
        return train_idx
    return np.sort(np.random.default_rng(seed).choice(train_idx, len(train_idx), replace=True))


def train_property(
    params: Params,
    prop: str,
    preset: str = "xie",
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    ensemble: int | None = None,
    init_from: str | None = None,
) -> dict[str, Any]:
    """Train one property's model(s), evaluate on the test set, log to MLflow; returns the
    metrics (also written to models/<prop>/<preset>/metrics.json).

    `init_from` (default train.init_from): a model reference (registry.resolve_parent) whose
    trunk starts every member, fine-tuned with train.freeze_trunk_epochs and
    train.trunk_lr_scale. Every member checkpoints each train.checkpoint_every epochs beside
    the model folder; a rerun after a kill resumes it (the MLflow run is a new one)."""
    set_torch_threads(params.train.torch_threads)
    # an absent device fails here, at once
    device, precision = training_device(params.train.device, params.train.precision)
    hp = final_hyperparams(params, prop, preset, overrides)
    k = n_members(params, preset, ensemble)
    keep = params.train.ensemble_keep if k > 1 else "all"
    parent, freeze, lr_scale = _parent(params, prop, preset, init_from)
    ws = open_workspace(params)
    data = property_data(params, ws, prop)
    seed = int(params.train.seed)
    tr, va = train_val_split(len(data.pool_rows), params.split.val_fraction, seed)
    experiment_id = setup_mlflow(params)
    # the runs of trainers killed with -9 on this host would stay RUNNING for ever
    end_orphaned_runs(experiment_id, KIND_TRAIN)
    out_dir = model_dir(params, prop, preset)
    bar = tqdm(total=hp.epochs * k, desc=f"train {prop} [{preset}]", unit="epoch",
               disable=not progress)
    name = f"{prop}-{preset}" + (f" (ensemble of {k})" if k > 1 and keep == "all" else "")

    # the model folder is one unit (outputs.output_dir): model.pt and metrics.json are swapped
    # in together, a second trainer of the same folder fails at once; SIGTERM unwinds like
    # Ctrl-C and ends the run KILLED (an exception ends it FAILED)
    with (
        sigterm_as_exception(),
        output_dir(out_dir, "train") as unit,
        mlflow.start_run(run_name=name,
                         log_system_metrics=bool(params.mlflow.system_metrics)) as run,
        killed_on_interrupt(),
    ):
        mlflow.set_tags({
            TAG_PROPERTY: prop, TAG_PRESET: preset, TAG_KIND: KIND_TRAIN,
            TAG_SNAPSHOT: ws.snapshot_sha256, TAG_GRAPH_KEY: ws.cache.key,
            **process_tags(), **(parent.tags() if parent else {}),
        })
        mlflow.log_params({
            **hp.as_dict(), "property": prop, "preset": preset,
            "target_transform": data.spec.transform, "seed": seed, "ensemble": k,
            "ensemble_keep": keep, "ensemble_bootstrap": params.train.ensemble_bootstrap,
            "device": str(device), "precision": precision,
            "n_train": len(tr), "n_val": len(va), "n_test": len(data.test_rows),
            **_provenance_params(ws, params.graph_settings(), parent, freeze, lr_scale),
        })
        fine_tuning = (FineTuning(parent.trunk, int(freeze), float(lr_scale), parent.label)
                       if parent else None)
        checkpoints = checkpoint_dir(params, prop, preset)
        results = [_fit_member(params, hp, data, tr, va, seed, i, k, bar, fine_tuning,
                               checkpoints) for i in range(k)]
        bar.close()
        if keep == "best":
            results = [min(results, key=lambda r: r.best_val_mae)]
        metrics, cal, zero_below = _evaluate(params, hp, data, tr, va, results)
        mlflow.set_tag(TAG_DESCRIPTION, _description(prop, preset, data, metrics, parent))
        mlflow.log_metrics({key: v for key, v in metrics.items()
                            if isinstance(v, float | int) and v is not None and np.isfinite(v)})
        ood = _ood_reference(params, results[0], data, tr, va)
        model_uri = _save_model(out_dir, unit, prop, preset, results, data, ws, parent, ood, cal,
                                zero_below)
        metrics.update(run_id=run.info.run_id, model_uri=model_uri, property=prop, preset=preset)
        pause_point("train.between_model_and_metrics")
        with writing(out_dir / TRAIN_METRICS_FILE):
            (unit / TRAIN_METRICS_FILE).write_text(
                json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    shutil.rmtree(checkpoints, ignore_errors=True)  # the model is saved: nothing to resume
    return metrics


def _provenance_params(ws: Workspace, graph: GraphSettings, parent: ParentModel | None,
                       freeze: Any, lr_scale: Any) -> dict[str, Any]:
    """The run's data, graph and parent-model parameters (fine-tuning ones None without)."""
    return {
        "snapshot_sha256": ws.snapshot_sha256,
        "snapshot_date": ws.snapshot_meta.get("snapshot_date"),
        "graph_cache_key": ws.cache.key,
        **{f"graph_{key}": v for key, v in asdict(graph).items()},
        "init_from": parent.label if parent else None,
        "freeze_trunk_epochs": freeze if parent else None,
        "trunk_lr_scale": lr_scale if parent else None,
    }


def _parent(params: Params, prop: str, preset: str, init_from: str | None
            ) -> tuple[ParentModel | None, Any, Any]:
    """The model every member fine-tunes from (None: from scratch), its frozen-trunk epochs
    and trunk learning-rate scale: --init-from, train.init_from, or the tuned file's."""
    ref = init_from or params.train.init_from
    freeze, lr_scale = params.train.freeze_trunk_epochs, params.train.trunk_lr_scale
    if preset == "tuned" and not ref:
        # a study of fine-tuned trials names its parent and settings in the tuned file
        tuned_ft = tuned_fine_tuning(params, prop)
        if tuned_ft:
            ref = tuned_ft["init_from"]
            freeze, lr_scale = tuned_ft["freeze_trunk_epochs"], tuned_ft["trunk_lr_scale"]
    return (resolve_parent(params, ref) if ref else None), freeze, lr_scale


def _save_model(out_dir: Path, unit: Path, prop: str, preset: str, results: list[FitResult],
                data: PropertyData, ws: Workspace, parent: ParentModel | None,
                ood: OODReference, cal: Calibration, zero_below: float | None) -> str:
    """The bundle (the first member, the others as ensemble members) written into the unit
    and logged to the run; returns the logged model's URI."""
    with writing(out_dir / MODEL_FILE):  # a full disk names models/<P>/<preset>/model.pt
        bundle = save_bundle(
            unit / MODEL_FILE, results[0].model, results[0].normalizer, data.spec,
            extra={"snapshot_sha256": ws.snapshot_sha256, "graph_cache_key": ws.cache.key,
                   "preset": preset, "ensemble": len(results),
                   "parent": parent.label if parent else ""},
            members=[(r.model, r.normalizer) for r in results[1:]], ood=ood,
            calibration=cal, zero_below=zero_below,
        )
    return log_model(bundle, name=f"{prop}-{preset}")


def _description(prop: str, preset: str, data: PropertyData, metrics: dict[str, Any],
                 parent: Any) -> str:
    """The training run's description until `mpprop evaluate` adds the test interval."""
    unit = data.spec.unit
    label = preset_label(preset, parent.label if parent else None)
    text = (f"{prop} ({unit}), {label}: {metrics['epochs']} epochs on {metrics['n_train']} "
            f"materials ({metrics['n_val']} validation); best validation MAE "
            f"{metrics['best_val_mae']:.4g} {unit}")
    if parent:
        text += f"; fine-tuned from {parent.label}"
    return (text + f"; test MAE {metrics['test_mae']:.4g} {unit} on {len(data.test_rows)} "
            "test materials (its interval: `mpprop evaluate`).")


def _fit_member(params: Params, hp: Hyperparams, data: PropertyData, tr: np.ndarray,
                va: np.ndarray, seed: int, i: int, k: int, bar: tqdm,
                fine_tuning: FineTuning | None, checkpoints: Path) -> FitResult:
    member_seed = seed + i

    def on_epoch(s: EpochStats) -> None:
        suffix = f"_m{i}" if k > 1 else ""
        mlflow.log_metrics({f"train_mae{suffix}": s.train_mae, f"val_mae{suffix}": s.val_mae,
                            f"epoch_seconds{suffix}": s.seconds}, step=s.epoch)
        bar.set_postfix(member=f"{i + 1}/{k}", train_mae=f"{s.train_mae:.4f}",
                        val_mae=f"{s.val_mae:.4f}")
        bar.update(1)

    train_idx = _member_split(tr, bool(params.train.ensemble_bootstrap) and k > 1, member_seed)
    device, precision = training_device(params.train.device, params.train.precision)
    every = int(params.train.checkpoint_every)
    checkpoint = checkpoints / f"member-{i}.pt" if every else None

    def fit_member() -> FitResult:
        return fit_on_pool(hp, params.graph_settings(), data, train_idx, va, member_seed,
                           on_epoch, params.predict.batch_size,
                           params.loss_settings(), device, precision,
                           fine_tuning, checkpoint, max(1, every))

    try:
        return fit_member()
    except CheckpointMismatchError:
        # left by a killed run of other settings: this run starts afresh
        tqdm.write(f"{checkpoint}: a killed run of other settings; starting from scratch")
        checkpoint.unlink()
        return fit_member()


def _evaluate(params: Params, hp: Hyperparams, data: PropertyData, tr: np.ndarray,
              va: np.ndarray, results: list[FitResult]
              ) -> tuple[dict[str, Any], Calibration, float | None]:
    """The metrics of the kept model(s), the calibration of their intervals on the
    validation split (logged as run params; its test coverage joins the metrics) and, for a
    property with a zero floor, its threshold (fitted on the validation split; the metrics
    and intervals are those of the floored predictions, as the model serves them)."""
    val_pred = _mean_std(params, data, data.pool_rows[va], results)
    test_pred = _mean_std(params, data, data.test_rows, results)
    zero_below = None
    if data.spec.zero_floor:
        zero_below = fit_zero_below(data.pool_targets[va], val_pred[0])
        val_pred, test_pred = (floor_to_zero(*p, zero_below) for p in (val_pred, test_pred))
    metrics = _metrics(params, hp, data, tr, va, results, val_pred[0], test_pred)
    if zero_below is not None:
        metrics.update(zero_below=zero_below, best_val_mae=float(
            np.mean(np.abs(val_pred[0] - data.pool_targets[va]))))
    cal = _calibration(data, va, val_pred)
    mlflow.log_params(cal.tags())
    for coverage in REPORTED_COVERAGES:  # measured on the test set, in metrics.json
        metrics.update(_coverage_metrics(data, test_pred, cal, coverage))
    return metrics, cal, zero_below


def _mean_std(params: Params, data: PropertyData, rows: np.ndarray, results: list[FitResult]
              ) -> tuple[np.ndarray, np.ndarray]:
    """The kept model(s)' prediction (ensemble mean) and member spread on `rows`."""
    bs = params.predict.batch_size
    return ensemble_mean_std([predict(r.model, r.normalizer, data.cache, rows, bs)
                              for r in results])


def _calibration(data: PropertyData, va: np.ndarray,
                 val_pred: tuple[np.ndarray, np.ndarray]) -> Calibration:
    """Split conformal on the validation residuals. The validation split also chose the best
    epoch (and member, with ensemble_keep: best): its residuals are a little optimistic, which
    the test coverage in the metrics shows."""
    mean, std = val_pred
    return calibrate(data.pool_targets[va], mean, std, COVERAGES,
                     source=f"validation split ({len(va)} materials)")


def _coverage_metrics(data: PropertyData, test_pred: tuple[np.ndarray, np.ndarray],
                      cal: Calibration, coverage: float) -> dict[str, float]:
    """test_interval_{coverage,width}_<percent>: the measured share of test materials inside
    their interval at a nominal coverage, and the mean width (model units)."""
    found = interval_metrics(data.test_targets, *test_pred, cal, coverage)
    pct = f"{100 * coverage:.0f}"
    return {f"test_interval_coverage_{pct}": found["test_interval_coverage"],
            f"test_interval_width_{pct}": found["test_interval_width"]} if found else {}


def _metrics(params: Params, hp: Hyperparams, data: PropertyData, tr: np.ndarray,
             va: np.ndarray, results: list[FitResult], val_mean: np.ndarray,
             test_pred: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Validation and test metrics of the kept model(s) (the ensemble mean for several)."""
    test_mean, test_std = test_pred
    y = data.test_targets
    best_val = (results[0].best_val_mae if len(results) == 1
                else float(np.mean(np.abs(val_mean - data.pool_targets[va]))))
    better = data.spec.better
    val_screening = (screening_signal(data.pool_targets[va], val_mean,
                                      [float(p) for p in params.tune.screening_percents], better)
                     if better is not None else None)
    return {
        "best_val_mae": best_val,
        VAL_SCREENING_METRIC: val_screening,
        "best_epoch": results[0].best_epoch,
        "epochs": hp.epochs,
        "n_train": len(tr),
        "n_val": len(va),
        "ensemble": len(results),
        "member_val_mae": [r.best_val_mae for r in results],
        "seconds_per_epoch": float(np.mean([h.seconds for r in results for h in r.history])),
        "test_mae": float(np.mean(np.abs(test_mean - y))),
        "test_screening_precision": screening_precision(
            y, test_mean, params.train.screening_top_percent, data.spec.better),
        **calibration(y, test_mean, test_std),
    }


def _ood_reference(params: Params, result: FitResult, data: PropertyData, tr: np.ndarray,
                   va: np.ndarray) -> OODReference:
    bs = params.predict.batch_size
    pred = params.predict
    return OODReference.fit(
        embed(result.model, data.cache, data.pool_rows[tr], bs),
        embed(result.model, data.cache, data.pool_rows[va], bs),
        k=int(pred.ood_k), quantile=float(pred.ood_quantile),
        max_reference=int(pred.ood_max_reference), seed=int(params.train.seed),
    )
