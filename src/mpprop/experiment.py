"""Experiments the benchmarks run: one configuration trained on a project's workspace, away
from every property's fixed test set, resumable per epoch, with its test predictions kept.

A job is named by a hash of everything that changes its result (property, hyperparameters,
seed, validation share, the excluded materials, the parent trunk), so a finished job is
never trained twice and a killed one resumes from its last checkpoint. Uses the core
(data, training, bundle) and no MLflow, Optuna or click.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout
from scipy.stats import spearmanr

from mpprop.bundle import (
    BUNDLE_FILE,
    ensemble_mean_std,
    fit_zero_below,
    floored,
    load_bundle,
    load_model,
    save_bundle,
)
from mpprop.data import PropertyData, load_split, property_data, train_val_split
from mpprop.inference import predict_rows
from mpprop.intervals import Calibration, calibrate
from mpprop.model import trunk_state
from mpprop.snapshot import atomic_output
from mpprop.stats import (
    MIN_TOP_MATERIALS,
    bootstrap_metric,
    bootstrap_paired_difference,
    bootstrap_recall,
    bootstrap_recall_diff,
    is_near_constant,
    mae,
    n_top,
    paired_intervals,
    prediction_spread_ratio,
    quality_intervals,
    screening_metric,
    screening_signal,
)
from mpprop.training import EpochStats, FineTuning, fit, predict

CHECKPOINT_FILE = "checkpoint.pt"
RESULT_FILE = "result.json"
LOCK_FILE = "train.lock"  # held by the process training the job in its folder
PRED_DECIMALS = 6  # test predictions stored in results (target units)


def all_test_ids(params: Any, ws: Any) -> set[str]:
    """Every material in any configured property's fixed test set: none of them may reach
    the training, validation or pretraining of a model we report."""
    ids: set[str] = set()
    for prop in params.properties:
        ids.update(load_split(params, ws, prop)["test"])
    return ids


class JobBusy(RuntimeError):
    """Another process is training the job (it holds the job folder's lock)."""


@dataclass(frozen=True)
class Job:
    """One model to train: a property, its hyperparameters (a Hyperparams dict), a seed,
    the validation share of the usable pool, optionally a parent job's trunk, and a zero
    floor (bundle.fit_zero_below on the validation split: band gap's exact zeros).

    A refit (`refit_of`, the name of its twin: the same job trained with a validation split)
    trains on the twin's training and validation materials together, on the same schedule up
    to the epoch its twin's validation chose, and keeps that epoch's weights; its validation
    split is in its training data, so it chooses nothing, and its zero floor and calibration
    are the twin's."""

    name: str
    prop: str
    hyperparams: dict[str, Any]
    seed: int = 0
    val_fraction: float = 0.1
    parent: str | None = None  # name of the job whose trunk this one starts from
    freeze_epochs: int = 0
    trunk_lr_scale: float = 1.0
    zero_floor: bool = False
    # the seed of the new weights and the batch order, where it differs from the split's: a
    # second model on the same split (an ensemble member)
    init_seed: int | None = None
    # properties also learnt (multi-task), each on the materials of its own training split at
    # this job's seed and validation share: a fine-tune of those properties from this job on
    # that split then validates on materials whose labels its parent never saw
    aux_props: tuple[str, ...] = ()
    aux_weight: float = 1.0  # each auxiliary loss's weight beside the main one's
    refit_of: str | None = None

    def key(self, excluded: set[str], parent_key: str | None) -> str:
        fields = [self.prop, self.hyperparams, self.seed, self.val_fraction, parent_key,
                  self.freeze_epochs, self.trunk_lr_scale]
        # appended only when set: the keys of jobs without it stay those of earlier results
        fields += ["zero_floor"] if self.zero_floor else []
        fields += [["init_seed", self.init_seed]] if self.init_seed is not None else []
        fields += [["aux_props", list(self.aux_props)]] if self.aux_props else []
        fields += [["aux_weight", self.aux_weight]] if self.aux_weight != 1.0 else []
        fields += [["refit_of", self.refit_of]] if self.refit_of is not None else []
        payload = json.dumps(fields, sort_keys=True)
        h = hashlib.sha256(payload.encode())
        h.update("\n".join(sorted(excluded)).encode())
        return h.hexdigest()[:16]


def usable_rows(data: PropertyData, cache_ids: np.ndarray, excluded: set[str]
                ) -> tuple[np.ndarray, np.ndarray]:
    """The property's pool rows (and targets) whose materials are in no test set."""
    keep = np.array([cache_ids[r] not in excluded for r in data.pool_rows], dtype=bool)
    return data.pool_rows[keep], data.pool_targets[keep]


@dataclass(frozen=True)
class JobSplit:
    """A job's data: its property, usable pool (rows of the graph cache, targets) and the
    positions in that pool of its training and validation materials."""

    data: PropertyData
    rows: np.ndarray
    targets: np.ndarray
    train: np.ndarray
    val: np.ndarray


def job_split(params: Any, ws: Any, job: Job, excluded: set[str]) -> JobSplit:
    """The split `job` trains on: its property's pool less `excluded`, divided by its seed."""
    data = property_data(params, ws, job.prop)
    rows, targets = usable_rows(data, ws.cache.material_id, excluded)
    tr, va = train_val_split(len(rows), job.val_fraction, job.seed)
    return JobSplit(data, rows, targets, tr, va)


def auxiliary_targets(params: Any, ws: Any, job: Job, excluded: set[str],
                      train_rows: np.ndarray) -> np.ndarray | None:
    """The labels of job.aux_props on `train_rows` (cache rows), shape (len, n_aux): NaN where
    the material is not in that property's own training split (job_split at this job's seed,
    so never a test or validation material of it) or has no label; None without aux_props."""
    if not job.aux_props:
        return None
    columns = []
    for prop in job.aux_props:
        aux = job_split(params, ws, replace(job, prop=prop, aux_props=()), excluded)
        label = dict(zip(aux.rows[aux.train].tolist(), aux.targets[aux.train].tolist(),
                         strict=True))
        columns.append([label.get(r, np.nan) for r in train_rows.tolist()])
    return np.array(columns, dtype=np.float64).T


def model_summary(y: np.ndarray, preds: np.ndarray, resamples: np.ndarray, top_percent: float,
                  better: str | None, per_seed: list[dict] | None = None) -> dict:
    """One model's test statistics over its seeds (rows of `preds`): the seed-averaged MAE
    and top-N% precision with 95% bootstrap intervals over the materials (`resamples`),
    the seed spread, and the predictions themselves (so later comparisons can pair them)."""
    preds = np.atleast_2d(preds)
    maes = [mae(y, p) for p in preds]
    ci = quality_intervals(y, preds, resamples, top_percent, better)  # evaluate's statistics
    out: dict[str, Any] = {
        "n_seeds": len(preds),
        "test_mae": ci["test_mae"].as_dict(),
        "test_mae_seed_mean": float(np.mean(maes)),
        "test_mae_seed_std": float(np.std(maes, ddof=1)) if len(maes) > 1 else None,
        "test_mae_per_seed": maes,
        "prediction_spread_ratio": float(np.mean([prediction_spread_ratio(y, p) for p in preds])),
        "near_constant": any(is_near_constant(y, p) for p in preds),
    }
    if better is not None:
        metric = screening_metric(top_percent, better)
        scr = [metric(y, p) for p in preds]
        out["screening"] = ci["screening"].as_dict()
        out["screening_seed_std"] = float(np.std(scr, ddof=1)) if len(scr) > 1 else None
        out["screening_per_seed"] = scr
    # kept so later benchmarks (screening.py) can pair new models with these on the same materials
    out["test_pred_per_seed"] = np.round(preds, PRED_DECIMALS).tolist()
    if per_seed is not None:
        out["best_val_mae_per_seed"] = [r["best_val_mae"] for r in per_seed]
        out["best_epoch_per_seed"] = [r["best_epoch"] for r in per_seed]
        out["train_seconds_per_seed"] = [r["seconds"] for r in per_seed]
        out["hyperparams"] = per_seed[0]["hyperparams"]
    return out


def paired(y: np.ndarray, a: np.ndarray, b: np.ndarray, resamples: np.ndarray,
           top_percent: float, better: str | None) -> dict:
    """Paired bootstrap of metric(a) - metric(b) on the same materials: MAE and, with a
    screening direction, top-N% precision."""
    return {k: d.as_dict()
            for k, d in paired_intervals(y, a, b, resamples, top_percent, better).items()}


def summaries(y: np.ndarray, preds: dict[str, np.ndarray], pairs: list[tuple[str, str]],
              resamples: np.ndarray, top_percent: float, better: str | None,
              per_seed: dict[str, list[dict]] | None = None) -> tuple[dict, dict]:
    """model_summary of each model (with its seeds' training records where `per_seed` has
    them) and the paired differences of `pairs` ((a, b): a - b, keyed "a-b"), all on the
    same resampled test materials."""
    models = {k: model_summary(y, p, resamples, top_percent, better, (per_seed or {}).get(k))
              for k, p in preds.items()}
    diffs = {f"{a}-{b}": paired(y, preds[a], preds[b], resamples, top_percent, better)
             for a, b in pairs}
    return models, diffs


def screening_warning(n_test: int, top_percent: float, better: str | None) -> str | None:
    """Why a top-N% precision on this test set says little, if it does."""
    k = n_top(n_test, top_percent)
    if better is None or k >= MIN_TOP_MATERIALS:
        return None
    return f"only {k} materials in the top {top_percent:g}% of the test set"


def compare_models(y: np.ndarray, preds: dict[str, np.ndarray], pairs: list[tuple[str, str]],
                   resamples: np.ndarray, top_percent: float, better: str,
                   percents: list[float]) -> tuple[dict, dict]:
    """Each model's MAE, top-N% precision and precision averaged over `percents` (seed-
    averaged, 95% bootstrap intervals over `resamples`; the predictions left out), and the
    paired differences of `pairs` ((a, b): a - b on the same resampled materials)."""
    models, diffs = summaries(y, preds, pairs, resamples, top_percent, better)

    # secondary: the screening studies' own objective (precision averaged over
    # tune.screening_percents), less step-like than one N on few top materials
    def signal(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        return screening_signal(y_true, y_pred, percents, better)

    for k, m in models.items():
        m.pop("test_pred_per_seed", None)
        m["screening_signal"] = bootstrap_metric(y, preds[k], signal, resamples).as_dict()
    for a, b in pairs:
        diffs[f"{a}-{b}"]["screening_signal_diff"] = bootstrap_paired_difference(
            y, preds[a], preds[b], signal, resamples).as_dict()
    return models, diffs


def compare_recall(is_top: np.ndarray, preds: dict[str, np.ndarray], pairs: list[tuple[str, str]],
                   resamples: np.ndarray, better: str) -> dict[str, dict]:
    """Extrapolation recall of each model's ranking of the candidate pool (seed-averaged,
    bootstrap over the pool) and the paired differences of `pairs`, keyed "a-b"."""
    out = {k: bootstrap_recall(is_top, p, better, resamples).as_dict() for k, p in preds.items()}
    for a, b in pairs:
        out[f"{a}-{b}"] = bootstrap_recall_diff(is_top, preds[a], preds[b], better,
                                                resamples).as_dict()
    return out


def calibration(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> dict[str, float | None]:
    """Is the ensemble std an error bar? Share of |error| within 1 and 2 std (a Gaussian
    would give 68% and 95%) and the Spearman correlation of |error| with std."""
    if not np.all(np.isfinite(std)):
        return {}
    err = np.abs(mean - y)
    rho = spearmanr(err, std).statistic if np.std(std) > 0 else float("nan")
    return {"test_within_1std": float(np.mean(err <= std)),
            "test_within_2std": float(np.mean(err <= 2 * std)),
            "test_spearman_error_std": float(rho)}


def run_job(params: Any, ws: Any, job: Job, hp_type: Callable[..., Any], work: Path,
            excluded: set[str], parent_dir: Path | None = None,
            progress: Callable[[str], None] = print,
            twin_dir: Path | None = None) -> dict[str, Any]:
    """Train `job` (or resume it, or read its finished result) in work/<name>-<key>/.

    Writes the model bundle and result.json (test predictions, validation MAE, seconds and
    CPU-hours at one thread) there; returns the result. A refit needs its finished twin's
    folder (`twin_dir`). Raises JobBusy while another process trains the same job."""
    if (job.refit_of is None) != (twin_dir is None):
        raise ValueError(f"{job.name}: a refit needs its twin's folder, and only a refit has one")
    folder = job_folder(work, job, excluded, parent_dir)
    result_path = folder / RESULT_FILE
    if result_path.exists():
        return json.loads(result_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    # two processes on one job would interleave their checkpoints: the second one stops
    lock = FileLock(folder / LOCK_FILE, blocking=False)
    try:
        lock.acquire()
    except Timeout:
        raise JobBusy(f"{job.name} is being trained by another process (it holds "
                      f"{folder / LOCK_FILE})") from None
    try:
        if result_path.exists():  # finished by the process that held the lock before
            return json.loads(result_path.read_text())
        return _train_job(params, ws, job, hp_type, folder, excluded, parent_dir, progress,
                          twin_dir)
    finally:
        lock.release()


def job_folder(work: Path, job: Job, excluded: set[str], parent_dir: Path | None) -> Path:
    """Where `job` (fine-tuned from the job in `parent_dir`, if any) trains: work/<name>-<key>."""
    parent_key = parent_dir.name.rsplit("-", 1)[-1] if parent_dir is not None else None
    return work / f"{job.name}-{job.key(excluded, parent_key)}"


def _train_job(params: Any, ws: Any, job: Job, hp_type: Callable[..., Any], folder: Path,
               excluded: set[str], parent_dir: Path | None,
               progress: Callable[[str], None], twin_dir: Path | None) -> dict[str, Any]:
    """run_job's training, resumed from folder's checkpoint if there is one."""
    hp = hp_type(**job.hyperparams)
    split = job_split(params, ws, job, excluded)
    data, rows, targets, tr, va = split.data, split.rows, split.targets, split.train, split.val
    twin = (_twin(twin_dir, job.refit_of, ws, rows[va], targets[va], params.predict.batch_size)
            if twin_dir is not None else None)
    if twin is not None:  # a refit: the validation materials are trained on too
        if twin.best_epoch is None:
            raise ValueError(f"{job.name}: its twin {twin.name} records no best epoch")
        tr = np.concatenate([tr, va])
    fine_tuning = None
    if parent_dir is not None:
        parent, _, _, _ = load_bundle(parent_dir / BUNDLE_FILE)
        fine_tuning = FineTuning(trunk_state(parent.state_dict()), job.freeze_epochs,
                                 job.trunk_lr_scale, parent=parent_dir.name)
    # CPU time of this process (one torch thread: the core-hours it used, whatever else ran
    # on the machine) and wall time, both summed over the sittings of a resumed job
    before = _previous_seconds(folder)
    t0, c0 = time.perf_counter(), time.process_time()

    def spent() -> dict[str, float]:
        return {"seconds": before["seconds"] + time.perf_counter() - t0,
                "cpu_seconds": before["cpu_seconds"] + time.process_time() - c0}

    # a refit stops at its twin's best epoch, and trains on its validation materials
    last_epoch = hp.epochs if twin is None else twin.best_epoch
    val_label = "val_mae" if twin is None else "val_mae_in_training"

    def on_epoch(s: EpochStats) -> None:
        now = spent()
        (folder / "seconds.json").write_text(json.dumps(now))
        progress(f"{job.name} epoch {s.epoch}/{last_epoch} train_mae {s.train_mae:.4f} "
                 f"{val_label} {s.val_mae:.4f} ({s.seconds:.0f} s; "
                 f"{now['cpu_seconds'] / 3600:.2f} CPU-h)")

    result = fit(hp, params.graph_settings(), ws.cache, rows[tr], targets[tr], rows[va],
                 targets[va], seed=job.seed if job.init_seed is None else job.init_seed,
                 on_epoch=on_epoch,
                 eval_batch_size=params.predict.batch_size,
                 loss_settings=params.loss_settings(), better=data.spec.better,
                 fine_tuning=fine_tuning, checkpoint=folder / CHECKPOINT_FILE,
                 aux_train_targets=auxiliary_targets(params, ws, job, excluded, rows[tr]),
                 aux_weight=job.aux_weight,
                 stop_epoch=twin.best_epoch if twin is not None else None)
    total = spent()
    bs = params.predict.batch_size
    val_pred = predict(result.model, result.normalizer, ws.cache, rows[va], bs)
    pred = predict(result.model, result.normalizer, ws.cache, data.test_rows, bs)
    served = _as_served(ws, split, val_pred, pred, job.zero_floor, twin)
    save_bundle(folder / BUNDLE_FILE, result.model, result.normalizer, data.spec,
                extra={"snapshot_sha256": ws.snapshot_sha256, "graph_cache_key": ws.cache.key,
                       "job": job.name, "parent": fine_tuning.parent if fine_tuning else ""},
                calibration=served.calibration, zero_below=served.record["zero_below"])
    record = {
        "job": job.name, "property": job.prop, "hyperparams": job.hyperparams,
        "seed": job.seed, "init_seed": job.init_seed,
        **({"aux_props": list(job.aux_props), "aux_weight": job.aux_weight}
           if job.aux_props else {}),
        "parent": fine_tuning.parent if fine_tuning else None,
        "best_epoch": result.best_epoch,
        "best_val_mae": result.best_val_mae if twin is None else None,
        "epochs_run": len(result.history), "wall_seconds": total["seconds"],
        "cpu_hours": total["cpu_seconds"] / 3600, **served.record,
    }
    return _write_result(folder / RESULT_FILE, record)


def run_ensemble(params: Any, ws: Any, name: str, members: list[tuple[Job, Path]],
                 work: Path, excluded: set[str], twin_dir: Path | None = None) -> dict[str, Any]:
    """Finished jobs (job, folder) as one ensemble in work/<name>-<key>/: their bundles in one,
    predicting the members' mean (with a zero floor fitted on that mean where the members
    have one), calibrated on the validation split they share; result.json as run_job's, its
    CPU-hours the members' sum. Refits (Job.refit_of) make an ensemble only with the finished
    ensemble of their twins, in the same order (`twin_dir`), whose floor and calibration
    they take."""
    jobs = [job for job, _ in members]
    if len({(j.prop, j.seed, j.val_fraction, j.zero_floor) for j in jobs}) != 1:
        raise ValueError(f"{name}: members need the same property, validation split and "
                         "zero floor")
    refits = [j.refit_of for j in jobs]
    if any(r is not None for r in refits) or twin_dir is not None:
        twin_members = (json.loads((twin_dir / RESULT_FILE).read_text()).get("members")
                        if twin_dir is not None else None)
        if twin_members != refits:
            raise ValueError(f"{name}: an ensemble of refits needs the ensemble of their twins "
                             f"({refits}); got {twin_members}")
    key = hashlib.sha256("\n".join(f.name for _, f in members).encode()).hexdigest()[:16]
    folder = work / f"{name}-{key}"
    result_path = folder / RESULT_FILE
    if result_path.exists():
        return json.loads(result_path.read_text())
    records = [json.loads((f / RESULT_FILE).read_text()) for _, f in members]
    loaded = [load_model(f / BUNDLE_FILE, j.name) for j, f in members]
    nets = [m for model in loaded for m in model.members]
    split = job_split(params, ws, jobs[0], excluded)
    bs = params.predict.batch_size

    def mean_prediction(rows: np.ndarray) -> np.ndarray:  # the members' own floors not applied
        return ensemble_mean_std([predict(net, norm, ws.cache, rows, bs) for net, norm in nets])[0]

    val_rows = split.rows[split.val]
    twin = (_twin(twin_dir, None, ws, val_rows, split.targets[split.val], bs)
            if twin_dir is not None else None)
    served = _as_served(ws, split, mean_prediction(val_rows),
                        mean_prediction(split.data.test_rows), jobs[0].zero_floor, twin)
    first = loaded[0]
    save_bundle(folder / BUNDLE_FILE, first.model, first.normalizer, first.spec,
                extra={**first.bundle.get("extra", {}), "job": name,
                       "members": [f.name for _, f in members]},
                members=nets[1:], calibration=served.calibration,
                zero_below=served.record["zero_below"])
    record = {
        "job": name, "property": jobs[0].prop, "hyperparams": records[0]["hyperparams"],
        "seed": jobs[0].seed, "parent": records[0]["parent"],
        "members": [r["job"] for r in records],
        # each member's as served (its floor applied; older results: the best epoch's)
        "member_val_mae": [r.get("val_mae", r["best_val_mae"]) for r in records],
        "best_epoch": None, "best_val_mae": served.record["val_mae"], "epochs_run": None,
        "wall_seconds": sum(r["wall_seconds"] for r in records),
        "cpu_hours": sum(r["cpu_hours"] for r in records), **served.record,
    }
    return _write_result(result_path, record)


@dataclass(frozen=True)
class Served:
    """A trained model's predictions as its bundle serves them: its calibration, and the
    result fields they give (split sizes, validation MAE, zero floor, test predictions)."""

    calibration: Calibration
    record: dict[str, Any]


@dataclass(frozen=True)
class Twin:
    """What a refit takes from its twin, the same model trained with a validation split: its
    folder's name, validation MAE, best epoch (None for an ensemble), zero floor and
    calibration."""

    name: str
    val_mae: float
    best_epoch: int | None
    zero_below: float | None
    calibration: Calibration


def _twin(folder: Path, job_name: str | None, ws: Any, val_rows: np.ndarray,
          val_targets: np.ndarray, batch_size: int) -> Twin:
    """The finished twin in `folder` (named `job_name`, where given); a twin bundle without a
    calibration (an older result) is calibrated on its own validation predictions."""
    record = json.loads((folder / RESULT_FILE).read_text())
    if job_name is not None and record["job"] != job_name:
        raise ValueError(f"{folder} holds {record['job']}, not the twin {job_name}")
    model = load_model(folder / BUNDLE_FILE, record["job"])
    val_mae = float(record.get("val_mae", record["best_val_mae"]))
    cal = model.calibration
    if cal is None:
        pred, _ = predict_rows(model, ws.cache, val_rows, batch_size)  # as served
        cal = calibrate(val_targets, pred, source=f"validation split ({len(val_rows)} "
                        f"materials) of {record['job']}")
    return Twin(folder.name, val_mae, record.get("best_epoch"), model.zero_below, cal)


def _as_served(ws: Any, split: JobSplit, val_pred: np.ndarray, test_pred: np.ndarray,
               zero_floor: bool, twin: Twin | None = None) -> Served:
    """Raw validation and test predictions with the zero floor (fitted on the validation
    split, where asked) applied, and split conformal on the validation residuals of the
    model as served (mpprop.intervals). A refit (`twin`) has its twin's floor and
    calibration, and no validation MAE: its validation materials are in its training data."""
    val_targets = split.targets[split.val]
    if twin is None:
        zero_below = fit_zero_below(val_targets, val_pred) if zero_floor else None
    else:
        zero_below = twin.zero_below
    val_pred, test_pred = floored(val_pred, zero_below), floored(test_pred, zero_below)
    val_mae = float(np.mean(np.abs(val_pred - val_targets)))
    if twin is None:
        cal = calibrate(val_targets, val_pred,
                        source=f"validation split ({len(split.val)} materials)")
        validation = {"n_train": int(len(split.train)), "n_val": int(len(split.val)),
                      "val_mae": val_mae}
    else:
        cal = twin.calibration
        validation = {"n_train": int(len(split.train) + len(split.val)), "n_val": 0,
                      "val_mae": None, "refit_of": twin.name, "twin_val_mae": twin.val_mae,
                      "val_mae_in_training": val_mae}
    data = split.data
    return Served(cal, {
        **validation, "n_test": int(len(data.test_rows)),
        "n_excluded_from_pool": int(len(data.pool_rows) - len(split.rows)),
        "zero_below": zero_below,
        "test_ids": ws.cache.material_id[data.test_rows].tolist(),
        "test_pred": np.round(test_pred, PRED_DECIMALS).tolist(),
        "test_mae": float(np.mean(np.abs(test_pred - data.test_targets))),
    })


def _write_result(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(record) + "\n")
    return record


def _previous_seconds(folder: Path) -> dict[str, float]:
    path = folder / "seconds.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    # a job started before CPU time was recorded: its wall time stands in for it
    return {"seconds": float(data.get("seconds", 0.0)),
            "cpu_seconds": float(data.get("cpu_seconds", data.get("seconds", 0.0)))}
