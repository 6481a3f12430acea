"""`mpprop tune`: the paper's Optuna search for one property, every trial tracked in MLflow.

One process is one worker. Any number of workers, on any number of hosts, share a study
through its Optuna storage (SQLite on one machine, PostgreSQL beyond) and put their trials
under one MLflow parent run, whose id the study keeps in its user attrs.

Per trial: hyperparameters from `tune.search_space` (TPE), a fresh random 8:2 train/val split
of the property's non-test pool (seed from the sampler seed and the trial number), the val MAE
reported every epoch to the `PercentilePruner`, and for completed trials the model logged to
the trial's MLflow run. The test set is never read.

Workers stop at a target total of finished (complete + pruned) trials across all workers.
Deciding to start a trial and creating it happen under a lock held in the storage's database
(a PostgreSQL advisory lock, or a file lock next to a SQLite file), so racing workers never
overshoot the target. A worker that dies is detected by heartbeat; its trial is marked FAIL
(in Optuna and MLflow) and re-queued with the same hyperparameters.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import save_note
from optuna_integration.mlflow import MLflowCallback

from mpprop.bundle import BUNDLE_FILE
from mpprop.config import Params
from mpprop.data import PropertyData, Workspace, open_workspace, property_data, train_val_split
from mpprop.device import training_device
from mpprop.faults import process_tags
from mpprop.model import trunk_shape
from mpprop.presets import tuning_parent
from mpprop.registry import resolve_parent
from mpprop.search import (
    SPLIT_STREAM,
    SearchSpace,
    TrialSeededSampler,
    derive_seed,
    enqueue_baselines,
    make_pruner,
    search_space,
    suggest,
    trial_graph,
    trial_hyperparams,
)
from mpprop.settings import ConfigError, GraphSettings, Hyperparams
from mpprop.stats import screening_signal
from mpprop.study import (
    ATTR_EPOCHS,
    ATTR_GRAPH_KEY,
    ATTR_OBJECTIVE,
    ATTR_PROPERTY,
    ATTR_SNAPSHOT,
    OBJECTIVES,
    SCREENING_NAME,
    STATE_TAG,
    TRIAL_EPOCHS,
    TRIAL_EPOCHS_RUN,
    TRIAL_ERROR,
    TRIAL_FINE_TUNING,
    TRIAL_MLFLOW_RUN,
    TRIAL_MODEL_URI,
    TRIAL_SPLIT_SEED,
    TRIAL_VAL_MAE,
    TRIAL_VAL_SCREENING,
    Echo,
    MarkStaleAndRetry,
    format_trial_line,
    log_study_summary,
    name_trial_run,
    parent_run,
    state_counts,
    study_metric_names,
    study_note,
    study_summary,
    write_best_params,
)
from mpprop.study_storage import (
    StorageLock,
    TuneError,  # cli.py catches it from here; StudyStorageError subclasses it
    open_storage,
    redact,
    storage_url,
    study_storage,
)
from mpprop.tracking import (
    KIND_TRIAL,
    TAG_KIND,
    TAG_PROPERTY,
    TAG_STUDY,
    TAG_TRIAL_NUMBER,
    log_model,
    save_bundle,
    setup_mlflow,
)
from mpprop.training import EpochStats, FineTuning, FitResult, fit_on_pool, set_torch_threads

_MLFLOW_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_ERROR_CHARS = 500  # an error message kept as a tag / attr is for the eye, not a traceback


# --------------------------------------------------------------------------- the worker


def _check_study_attrs(study: optuna.Study, expect: dict[str, Any]) -> None:
    attrs = study.user_attrs
    for key, value in expect.items():
        if key in attrs and attrs[key] != value:
            raise TuneError(
                f"study {study.study_name!r} has {key}={attrs[key]!r}, this run has {value!r}; "
                "continue it with the same data and settings, or pick another --study-name"
            )


def screening_value(signal: float | None, val_mae: float, val_scale: float,
                    tie_weight: float) -> float:
    """The `screening` objective (maximised): the smoothed top-N% precision (%), minus
    tie_weight x val MAE in standard deviations of the validation targets, so that equal
    precisions (common: it moves in steps) are decided by the MAE."""
    assert signal is not None
    return signal - tie_weight * val_mae / val_scale

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Our one line per trial replaces Optuna's log; notices that MLflow would repeat for
    every trial's model (pickling note, artifact progress bars) would drown it."""
    old_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    old_pyfunc = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)
    old_bar = os.environ.get(_MLFLOW_BAR_ENV)
    os.environ[_MLFLOW_BAR_ENV] = "false"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # MLflowCallback is deprecated in optuna-integration 4.9 (removal in 6.0)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"optuna.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*MLflowCallback.*")
        try:
            yield
        finally:
            optuna.logging.set_verbosity(old_level)
            pyfunc_log.setLevel(old_pyfunc)
            if old_bar is None:
                os.environ.pop(_MLFLOW_BAR_ENV, None)
            else:
                os.environ[_MLFLOW_BAR_ENV] = old_bar


class TrialRunCallback(MLflowCallback):
    """Optuna's MLflow callback without its `<param>_distribution` tags: the same search
    space on every trial crowds each run's tag panel; the study's run logs the space once
    (param `search_space`)."""

    def _set_tags(self, trial: FrozenTrial, study: optuna.Study) -> None:
        without = copy.copy(trial)
        without._distributions = {}
        super()._set_tags(without, study)


def tune_property(
    params: Params,
    prop: str,
    n_trials: int | None = None,
    epochs: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    prune: bool = True,
    echo: Echo = print,
) -> dict[str, Any]:
    """Run one tuning worker on the study of `prop` until it has `n_trials` finished trials.

    Creates the study (and its MLflow parent run) if it is new, else joins or resumes it.
    Writes the best hyperparameters to `params.best_params_path(prop)`; returns the summary.
    """
    with _quiet():
        return _tune(params, prop, n_trials, epochs, storage, study_name, prune, echo)


@dataclass
class _Worker:
    """What every trial of one tuning worker shares."""

    params: Params
    prop: str
    study_name: str
    space: SearchSpace
    objective: str
    epochs: int
    prune: bool
    ws: Workspace
    tags: dict[str, str]
    device: torch.device
    precision: str
    echo: Echo


def _tune(params: Params, prop: str, n_trials: int | None, epochs: int | None,
          storage: str | None, study_name: str | None, prune: bool, echo: Echo) -> dict[str, Any]:
    # The two storage locks, the study and its parent run are set up here in order and torn
    # down in the one `finally` below, which must see all of them (the locks' lifetimes in
    # one frame); the checks before and the summary after are steps of their own.
    tune = params.tune
    n_trials, space, objective, prune = _checked_options(params, prop, n_trials, prune, echo)
    study_name = study_name or f"mpprop-{prop}"
    url = storage_url(study_storage(params, prop, storage))
    set_torch_threads(params.train.torch_threads)
    # an absent device fails at once
    device, precision = training_device(params.train.device, params.train.precision)
    ws = open_workspace(params)
    data = property_data(params, ws, prop)  # a property without labels fails before any study

    init_lock = StorageLock(url, "mpprop-init")
    claim = StorageLock(url, f"mpprop-claim-{study_name}")
    if claim.kind == "none":
        echo(f"note: no inter-process lock for {redact(url)}; parallel workers may overshoot "
             "the target by a trial")
    tags = {
        TAG_PROPERTY: prop,
        TAG_STUDY: study_name,
        "snapshot_sha256": ws.snapshot_sha256,
        "graph_cache_key": ws.cache.key,
    }
    # one worker at a time creates tables (Optuna's, MLflow's), the study and its parent run:
    # concurrent CREATE TABLE / CREATE TYPE on a fresh PostgreSQL database collide
    with init_lock:
        study, epochs, exp_id = _open_study(params, prop, url, study_name, objective, epochs,
                                            prune, ws, echo)
        n_queued = enqueue_baselines(study, params, space)
        parent_id = parent_run(study, params, prop, exp_id, tags, url, prune)
    worker = _Worker(params, prop, study_name, space, objective, epochs, prune, ws, tags,
                     device, precision, echo)
    mlflc = _trial_run_callback(params, objective, exp_id)
    run_trial = mlflc.track_in_mlflow()(_TrialRunner(worker, data, claim))

    def progress(study: optuna.Study, trial: FrozenTrial) -> None:
        name_trial_run(trial, prop)
        echo(format_trial_line(study, trial, epochs))

    echo(
        f"study {study_name} on {redact(url)}: target {n_trials} finished trials of {epochs} "
        f"epochs; worker {socket.gethostname()}:{os.getpid()}; MLflow parent run {parent_id}"
    )
    if n_queued:
        echo(f"queued {n_queued} baseline trial(s) from tune.enqueue")
    t0 = time.perf_counter()
    mlflow.start_run(run_id=parent_id)
    status = "KILLED"
    try:
        _run_until_done(study, claim, n_trials, run_trial, [mlflc, progress],
                        float(tune.heartbeat_interval), echo)
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):  # a summary must not hide why the worker stopped
            log_study_summary(study)
        mlflow.end_run(status=status)
        claim.dispose()
        init_lock.dispose()
        path = write_best_params(params, prop, study)
    return _worker_summary(study, prop, n_trials, epochs, path, parent_id, t0)


def _worker_summary(study: optuna.Study, prop: str, n_trials: int, epochs: int,
                    path: Path | None, parent_id: str, t0: float) -> dict[str, Any]:
    """What `mpprop tune` prints and returns: the study's summary and this worker's part."""
    summary = study_summary(study)
    summary.update(
        property=prop,
        target_trials=n_trials,
        epochs=epochs,
        best_params_path=str(path) if path else None,
        mlflow_parent_run_id=parent_id,
        worker_seconds=time.perf_counter() - t0,
    )
    return summary


def _checked_options(params: Params, prop: str, n_trials: int | None, prune: bool, echo: Echo
                     ) -> tuple[int, SearchSpace, str, bool]:
    """The trial target, search space, objective and pruning of a worker, checked before
    anything is opened (a pareto study prunes nothing)."""
    n_trials = int(n_trials if n_trials is not None else params.tune.n_trials)
    if n_trials < 1:
        raise ConfigError(f"n_trials must be >= 1, got {n_trials}")
    space = search_space(params)
    objective = str(params.tune.objective)
    if objective == "pareto" and prune:
        # Optuna cannot prune multi-objective trials (trial.report is single-objective)
        echo("note: tune.objective pareto: no pruning (every trial runs all its epochs)")
        prune = False
    spec = params.property_spec(prop)
    if objective != "mae" and spec.better is None:
        raise ConfigError(f"tune.objective {objective} needs a screening direction; "
                          f"{prop} has none (property_specs.{prop}.better)")
    return n_trials, space, objective, prune


def _trial_run_callback(params: Params, objective: str, exp_id: str) -> TrialRunCallback:
    """The callback that runs each trial in a nested MLflow run under the study's parent."""
    metric_names = OBJECTIVES[objective][0]
    return TrialRunCallback(
        tracking_uri=params.tracking_uri(),
        metric_name=metric_names if len(metric_names) > 1 else metric_names[0],
        create_experiment=False,
        mlflow_kwargs={"nested": True, "experiment_id": exp_id},
        tag_trial_user_attrs=True,
    )


def _open_study(params: Params, prop: str, url: str, study_name: str, objective: str,
                epochs: int | None, prune: bool, ws: Workspace, echo: Echo
                ) -> tuple[optuna.Study, int, str]:
    """Create or load the study (under the init lock) and check it is the same study:
    property, objective, snapshot, graphs and epochs. Returns it, its epochs and the MLflow
    experiment id."""
    tune = params.tune
    directions = OBJECTIVES[objective][1]
    storage_obj = open_storage(
        params, url, MarkStaleAndRetry(int(tune.failed_trial_max_retry), echo)
    )
    exp_id = setup_mlflow(params)
    # setup_mlflow does not activate an experiment it has just created; trial runs
    # (started by MLflowCallback without an experiment id) must not land in Default
    mlflow.set_experiment(experiment_id=exp_id)
    study = optuna.create_study(
        storage=storage_obj, study_name=study_name, directions=directions,
        sampler=TrialSeededSampler(int(tune.sampler_seed), kind=tune.sampler),
        pruner=make_pruner(params, int(epochs or tune.epochs), prune), load_if_exists=True,
    )
    unit = params.property_spec(prop).unit
    if not study.metric_names:
        study.set_metric_names(study_metric_names(objective, unit))
    study.set_user_attr("mpprop.pareto_mae_tolerance", float(tune.pareto_mae_tolerance))
    if ATTR_EPOCHS in study.user_attrs and epochs is None:
        epochs = int(study.user_attrs[ATTR_EPOCHS])  # resuming: keep the study's epochs
    epochs = int(epochs if epochs is not None else tune.epochs)
    expect = {ATTR_PROPERTY: prop, ATTR_OBJECTIVE: objective, ATTR_SNAPSHOT: ws.snapshot_sha256,
              ATTR_GRAPH_KEY: ws.cache.key, ATTR_EPOCHS: epochs}
    _check_study_attrs(study, expect)
    for key, value in expect.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    space = search_space(params)
    fixed = [k for k, v in space.items() if isinstance(v, list) and len(v) == 1]
    save_note(study, study_note(prop, unit, objective, epochs, _pruning_text(params, prune),
                                [k for k in space if k not in fixed], fixed))
    return study, epochs, exp_id


def _pruning_text(params: Params, prune: bool) -> str:
    """How the study prunes, in words (its note on optuna-dashboard)."""
    tune = params.tune
    if not prune:
        return "off"
    if tune.pruner == "hyperband":
        return (f"Hyperband, rungs from epoch {max(1, tune.pruner_warmup_steps)}, reduction "
                f"factor {tune.hyperband_reduction_factor}")
    return (f"PercentilePruner ({tune.pruner_percentile:g}th percentile), after "
            f"{tune.pruner_startup_trials} finished trials and {tune.pruner_warmup_steps} "
            "warm-up epochs")


class _TrialRunner:
    """The objective of one worker's trials: train on the trial's split, report to the
    pruner, log the model; returns what the study optimises."""

    def __init__(self, worker: _Worker, data: PropertyData, claim: StorageLock) -> None:
        self.w = worker
        self.claim = claim
        tune = worker.params.tune
        self.percents = [float(p) for p in tune.screening_percents]
        self.tie_weight = float(tune.screening_tie_weight)
        self.seed_base = int(tune.sampler_seed)
        self.every = tune.progress_every
        self.datasets = {worker.params.graph_settings(): data}
        # train.init_from: every trial fine-tunes this parent's trunk (its n_conv and
        # atom_fea_len win over searched ones; the fine-tuning settings may be searched)
        init = tuning_parent(worker.params)
        self.parent = resolve_parent(worker.params, init) if init else None

    def trunk_values(self) -> dict[str, int]:
        """n_conv and atom_fea_len of the parent's trunk (not searched with a parent)."""
        if self.parent is None:
            return {}
        n_conv, width = trunk_shape(self.parent.trunk)
        return {"n_conv": n_conv, "atom_fea_len": width}

    def fine_tuning(self, values: dict[str, Any]) -> FineTuning | None:
        if self.parent is None:
            return None
        train = self.w.params.train
        return FineTuning(
            self.parent.trunk,
            int(values.get("freeze_trunk_epochs", train.freeze_trunk_epochs)),
            float(values.get("trunk_lr_scale", train.trunk_lr_scale)), self.parent.label,
        )

    def data_for(self, settings: GraphSettings) -> PropertyData:
        """The property's data on the graphs of `settings` (built once, cached by key)."""
        if settings not in self.datasets:
            self.w.echo(f"graph cache for {settings} (built if absent)")
            ws_g = open_workspace(self.w.params, graph=settings, build=True)
            self.datasets[settings] = property_data(self.w.params, ws_g, self.w.prop)
        return self.datasets[settings]

    def signal(self, val_y: np.ndarray, val_pred: np.ndarray | None, better: str | None
               ) -> float | None:
        """The smoothed validation screening precision (None without a direction)."""
        if better is None or val_pred is None:
            return None
        return screening_signal(val_y, val_pred, self.percents, better)

    def split_seed(self, trial: optuna.Trial) -> int:
        """The trial's train/validation split seed, recorded on the trial with its epochs."""
        # a re-queued trial carries its original's user attrs: same split as the original
        seed = int(trial.user_attrs.get(
            TRIAL_SPLIT_SEED, derive_seed(self.seed_base, trial.number, SPLIT_STREAM)
        ))
        trial.set_user_attr(TRIAL_SPLIT_SEED, seed)
        trial.set_user_attr(TRIAL_EPOCHS, self.w.epochs)
        return seed

    def log_trial(self, trial: optuna.Trial, hp: Hyperparams, graph: GraphSettings,
                  data: PropertyData, seed: int, n_train: int, n_val: int,
                  fine_tuning: FineTuning | None) -> None:
        """The trial run's tags and params (and the fine-tuning attrs the tuned file keeps)."""
        w = self.w
        # the process tags: a trial run of a worker killed with -9 is ended by the next command
        mlflow.set_tags({**w.tags, TAG_KIND: KIND_TRIAL, TAG_TRIAL_NUMBER: str(trial.number),
                         **process_tags()})
        mlflow.set_tag("graph_cache_key", data.cache.key)
        mlflow.log_params({
            **hp.as_dict(), **{f"graph_{k}": v for k, v in asdict(graph).items()},
            "split_seed": seed, "property": w.prop, "study_name": w.study_name,
            "target_transform": data.spec.transform, "n_train": n_train, "n_val": n_val,
            "init_from": fine_tuning.parent if fine_tuning else None,
        })
        if fine_tuning is not None:
            mlflow.set_tags(self.parent.tags())
            trial.set_user_attr(TRIAL_FINE_TUNING, {
                "init_from": tuning_parent(w.params), "n_conv": hp.n_conv,
                "atom_fea_len": hp.atom_fea_len, "freeze_trunk_epochs": fine_tuning.freeze_epochs,
                "trunk_lr_scale": fine_tuning.trunk_lr_scale})

    def keep_model(self, trial: optuna.Trial, result: FitResult, data: PropertyData) -> None:
        """Log the trial's model (its best-validation checkpoint) and name it on the trial."""
        w = self.w
        mlflow.log_metrics({"best_epoch": result.best_epoch, "epochs_run": len(result.history)})
        with tempfile.TemporaryDirectory() as tmp:
            bundle = save_bundle(
                Path(tmp) / BUNDLE_FILE, result.model, result.normalizer, data.spec,
                extra={"snapshot_sha256": w.ws.snapshot_sha256, "graph_cache_key": data.cache.key,
                       "study_name": w.study_name, "trial": trial.number},
            )
            trial.set_user_attr(TRIAL_MODEL_URI, log_model(bundle))

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        # one trial, top to bottom: sample, split, log, fit, keep the model, the objective;
        # `on_epoch` closes over the trial's split and validation targets
        # the trial exists now: other workers may decide whether to start theirs
        self.claim.release()
        w = self.w
        values = {**suggest(trial, w.space), **self.trunk_values()}
        hp = trial_hyperparams(w.params, values, w.epochs)
        fine_tuning = self.fine_tuning(values)
        graph = trial_graph(w.params, values)
        data = self.data_for(graph)
        seed = self.split_seed(trial)
        trial.set_user_attr(TRIAL_MLFLOW_RUN, mlflow.active_run().info.run_id)
        tr, va = train_val_split(len(data.pool_rows), float(w.params.split.val_fraction), seed)
        val_y = data.pool_targets[va]
        val_scale = float(np.std(val_y)) or 1.0
        better = data.spec.better
        self.log_trial(trial, hp, graph, data, seed, len(tr), len(va), fine_tuning)

        def on_epoch(s: EpochStats) -> None:
            mlflow.log_metrics(
                {"val_mae": s.val_mae, "train_mae": s.train_mae, "epoch_seconds": s.seconds},
                step=s.epoch,
            )
            if self.every and (s.epoch % self.every == 0 or s.epoch == w.epochs):
                w.echo(f"  trial {trial.number:>4} epoch {s.epoch}/{w.epochs} val_mae "
                       f"{s.val_mae:.4g} ({s.seconds:.1f} s/epoch)")
            signal = self.signal(val_y, s.val_pred, better)
            if signal is not None:
                mlflow.log_metric(SCREENING_NAME, signal, step=s.epoch)
            if w.objective == "pareto":
                return  # multi-objective trials take no intermediate values
            # the pruner sees what the study optimises, epoch by epoch
            trial.report(s.val_mae if w.objective == "mae" else
                         screening_value(signal, s.val_mae, val_scale, self.tie_weight), s.epoch)
            if w.prune and trial.should_prune():
                raise optuna.TrialPruned(f"val MAE {s.val_mae:.4g} at epoch {s.epoch}")

        try:
            result = fit_on_pool(
                hp, graph, data, tr, va, seed, on_epoch, w.params.predict.batch_size,
                w.params.loss_settings(), w.device, w.precision, fine_tuning,
            )
        except BaseException as exc:
            _record_trial_end(trial, exc)
            raise
        self.keep_model(trial, result, data)
        # the signal of the kept (best-MAE) checkpoint: the model the trial hands on
        signal = self.signal(val_y, result.history[result.best_epoch - 1].val_pred, better)
        trial.set_user_attr(TRIAL_VAL_MAE, result.best_val_mae)
        trial.set_user_attr(TRIAL_EPOCHS_RUN, len(result.history))
        if signal is not None:
            trial.set_user_attr(TRIAL_VAL_SCREENING, signal)
            mlflow.log_metric("best_val_screening", signal)
        if w.objective == "mae":
            return result.best_val_mae
        if w.objective == "screening":
            return screening_value(signal, result.best_val_mae, val_scale, self.tie_weight)
        return result.best_val_mae, signal


def _record_trial_end(trial: optuna.Trial, exc: BaseException) -> None:
    """A pruned or failed fit's state on the trial run (and the error on the trial)."""
    if isinstance(exc, optuna.TrialPruned):
        mlflow.set_tag(STATE_TAG, TrialState.PRUNED.name)
        return
    # uncaught errors skip Optuna's callbacks: record the state here too
    error = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
    mlflow.set_tag(STATE_TAG, TrialState.FAIL.name)
    mlflow.set_tag(TRIAL_ERROR, error)
    trial.set_user_attr(TRIAL_ERROR, error)


def _run_until_done(study: optuna.Study, claim: StorageLock, n_trials: int,
                    run_trial: Callable[[optuna.Trial], Any], callbacks: list[Callable],
                    heartbeat: float, echo: Echo) -> None:
    """Start one trial at a time (under the claim lock, so parallel workers do not overshoot)
    until the study has `n_trials` finished trials; wait while the last ones run elsewhere."""
    # a diverged run (NaN loss) or an out-of-memory model is a failed trial, not a dead worker
    catch = (FloatingPointError, MemoryError, torch.OutOfMemoryError)
    waiting_note = False
    while True:
        claim.acquire()
        try:
            optuna.storages.fail_stale_trials(study)
            counts = state_counts(study)
            done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
            if done >= n_trials:
                return
            if counts[TrialState.FAIL] >= n_trials:
                raise TuneError(
                    f"{counts[TrialState.FAIL]} failed trials in study {study.study_name} "
                    f"(target {n_trials}); see the failed runs in MLflow"
                )
            if counts[TrialState.WAITING] == 0 and done + counts[TrialState.RUNNING] >= n_trials:
                # the rest is running elsewhere: wait, and take over if a worker dies
                if not waiting_note:
                    echo(f"waiting for {counts[TrialState.RUNNING]} trial(s) of other workers")
                    waiting_note = True
                claim.release()
                time.sleep(heartbeat)
                continue
            waiting_note = False
            study.optimize(run_trial, n_trials=1, catch=catch, callbacks=callbacks)
        finally:
            claim.release()
