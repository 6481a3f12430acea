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
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import pandas as pd
import torch
import yaml
from optuna.samplers import BaseSampler, GPSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState
from optuna_integration.mlflow import MLflowCallback
from optuna_integration.mlflow.mlflow import RUN_ID_ATTRIBUTE_KEY
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from mpprop.bundle import BUNDLE_FILE
from mpprop.config import (
    FINETUNE_SEARCHABLE,
    GRAPH_SEARCHABLE,
    ConfigError,
    GraphSettings,
    Hyperparams,
    Params,
)
from mpprop.data import PropertyData, Workspace, open_workspace, property_data, train_val_split
from mpprop.device import training_device
from mpprop.losses import LossSettings
from mpprop.model import trunk_shape
from mpprop.presets import tuning_parent
from mpprop.registry import resolve_parent
from mpprop.snapshot import atomic_output
from mpprop.stats import screening_signal
from mpprop.tracking import (
    KIND_STUDY,
    KIND_TRIAL,
    TAG_KIND,
    TAG_PROPERTY,
    TAG_STUDY,
    TAG_TRIAL_NUMBER,
    log_model,
    save_bundle,
    setup_mlflow,
)
from mpprop.training import EpochStats, FineTuning, fit_on_pool, set_torch_threads

# study user attrs: what the study was made from, and where its trials are tracked
ATTR_PROPERTY = TAG_PROPERTY  # the study carries the same key as its runs
ATTR_SNAPSHOT = "mpprop.snapshot_sha256"
ATTR_GRAPH_KEY = "mpprop.graph_cache_key"
ATTR_EPOCHS = "mpprop.epochs"
ATTR_PARENT_RUN = "mpprop.mlflow_parent_run_id"
ATTR_EXPERIMENT = "mpprop.mlflow_experiment_id"
# trial user attrs (tagged on the trial's MLflow run by MLflowCallback)
TRIAL_SPLIT_SEED = "split_seed"
TRIAL_EPOCHS = "epochs"
# a fine-tuned trial: its parent and fine-tuning settings (write_best_params reads it)
TRIAL_FINE_TUNING = "mpprop.fine_tuning"
# the searched keys a parent's trunk decides
TRUNK_KEYS = ("n_conv", "atom_fea_len")
TRIAL_MODEL_URI = "model_uri"
TRIAL_ERROR = "error"
TRIAL_ENQUEUED = "enqueued_baseline"
# what the study optimises (shown by optuna-dashboard and in `study.metric_names`)
OBJECTIVE_NAME = "best_val_mae"
SCREENING_NAME = "val_screening"
# tune.objective -> (metric names, directions)
OBJECTIVES = {
    "mae": ([OBJECTIVE_NAME], ["minimize"]),
    "screening": ([SCREENING_NAME], ["maximize"]),
    "pareto": ([OBJECTIVE_NAME, SCREENING_NAME], ["minimize", "maximize"]),
}
ATTR_OBJECTIVE = "mpprop.objective"
TRIAL_VAL_MAE = "val_mae"
TRIAL_VAL_SCREENING = "val_screening"
TRIAL_EPOCHS_RUN = "epochs_run"
# MLflow tag with the trial state; the key MLflowCallback uses, so both writers agree
STATE_TAG = "state"

# independent random streams derived from (sampler seed, trial number)
_SAMPLER_STREAM = 0
_SPLIT_STREAM = 1
_MLFLOW_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_ERROR_CHARS = 500  # an error message kept as a tag / attr is for the eye, not a traceback

# the hyperparameters a search space must cover (everything but epochs and the train.* ones)
SEARCHED = ("n_conv", "n_h", "atom_fea_len", "h_fea_len", "lr", "lr_decay_epoch", "optimizer")
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

Echo = Callable[[str], None]


class TuneError(RuntimeError):
    """A study that cannot be run as asked."""


# --------------------------------------------------------------------------- search space


def search_space(params: Params) -> dict[str, Any]:
    """`tune.search_space`, checked: {low, high[, step, log]} ranges or lists of choices."""
    space = dict(params.tune["search_space"])
    if params.tune.get("extend_search_space"):
        space.update(params.tune.get("extended_search_space") or {})
    if tuning_parent(params):
        # fine-tuned trials take n_conv and atom_fea_len from the parent's trunk
        for key in TRUNK_KEYS:
            space.pop(key, None)
    missing = [k for k in SEARCHED if k not in space
               and not (tuning_parent(params) and k in TRUNK_KEYS)]
    known = {f.name for f in fields(Hyperparams)} | set(GRAPH_SEARCHABLE) | set(FINETUNE_SEARCHABLE)
    unknown = [k for k in space if k not in known or k == "epochs"]
    if missing or unknown:
        raise ConfigError(
            f"tune.search_space must cover {', '.join(SEARCHED)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; not searchable: {', '.join(unknown)}" if unknown else "")
        )
    for name, spec in space.items():
        if isinstance(spec, dict):
            if not {"low", "high"} <= set(spec) or set(spec) - {"low", "high", "step", "log"}:
                raise ConfigError(f"tune.search_space.{name}: a range needs low and high only "
                                  f"(optional step, log), got {sorted(spec)}")
        elif not isinstance(spec, list) or not spec:
            raise ConfigError(f"tune.search_space.{name}: give {{low, high}} or a list of choices")
    return space


def suggest(trial: optuna.Trial, space: dict[str, Any]) -> dict[str, Any]:
    """Sample one point of the search space (ints and floats by the type of low/high)."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            values[name] = trial.suggest_categorical(name, spec)
        elif all(isinstance(spec[k], int) for k in ("low", "high")) and isinstance(
            spec.get("step", 1), int
        ):
            values[name] = trial.suggest_int(
                name, spec["low"], spec["high"], step=spec.get("step", 1),
                log=bool(spec.get("log", False)),
            )
        else:
            values[name] = trial.suggest_float(
                name, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                log=bool(spec.get("log", False)),
            )
    return values


def trial_hyperparams(params: Params, values: dict[str, Any], epochs: int) -> Hyperparams:
    """A trial's full configuration: searched values, tuning epochs, and train.* settings."""
    searched = {k: v for k, v in values.items()
                if k not in GRAPH_SEARCHABLE and k not in FINETUNE_SEARCHABLE}
    return Hyperparams(**{**params.train_defaults(), **searched, "epochs": int(epochs)})


def trial_graph(params: Params, values: dict[str, Any]) -> GraphSettings:
    """The graph settings of a trial: graph.* with the searched graph keys replaced."""
    return replace(params.graph_settings(),
                   **{k: values[k] for k in GRAPH_SEARCHABLE if k in values})


def derive_seed(base_seed: int, trial_number: int, stream: int) -> int:
    """A 32-bit seed that is a pure function of (base seed, trial number, stream)."""
    seq = np.random.SeedSequence([int(base_seed), int(trial_number), int(stream)])
    return int(seq.generate_state(1)[0])


SAMPLER_LABELS = {"tpe": "TPE(constant_liar, reseeded per trial)",
                  "gp": "GPSampler(reseeded per trial)"}


class TrialSeededSampler(BaseSampler):
    """TPE (or the Gaussian-process sampler, `tune.sampler: gp`) whose random state is
    reseeded from (seed, trial number) before every trial.

    Why: workers that all seed TPE with the same `tune.sampler_seed` would otherwise draw
    the same "random" start-up configurations, in lockstep. Reseeding by trial number keeps
    a single-worker study reproducible and gives every trial of a parallel study its own
    draw. `constant_liar` makes TPE treat other workers' running trials as bad, so they do
    not all crowd around the same point. Optuna's guide places TPE at 100+ trials and the GP
    sampler below that; the GP sampler has no constant liar.
    """

    def __init__(self, seed: int, constant_liar: bool = True, kind: str = "tpe") -> None:
        self._seed = int(seed)
        self._constant_liar = constant_liar
        self._kind = kind
        self._tpe = self._make(self._seed)

    def _make(self, seed: int) -> BaseSampler:
        if self._kind == "gp":
            return GPSampler(seed=seed)
        return TPESampler(seed=seed, constant_liar=self._constant_liar)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._tpe = self._make(derive_seed(self._seed, trial.number, _SAMPLER_STREAM))
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any
    ) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()


def pruner_label(params: Params) -> str:
    tune = params.tune
    if tune.get("pruner") == "hyperband":
        return (f"Hyperband(min {tune['pruner_warmup_steps']}, "
                f"factor {tune['hyperband_reduction_factor']})")
    return f"Percentile({tune['pruner_percentile']}, warmup={tune['pruner_warmup_steps']})"


def make_pruner(params: Params, epochs: int, prune: bool = True) -> optuna.pruners.BasePruner:
    """The paper's PercentilePruner (compares with completed trials at the same epoch), or
    Hyperband (`tune.pruner: hyperband`) for a budget-aware search."""
    if not prune:
        return optuna.pruners.NopPruner()
    if params.tune.get("pruner") == "hyperband":
        # successive halving in brackets: rungs from the warm-up epochs to the trial's epochs
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, int(params.tune["pruner_warmup_steps"])),
            max_resource=int(epochs),
            reduction_factor=int(params.tune["hyperband_reduction_factor"]),
        )
    return optuna.pruners.PercentilePruner(
        float(params.tune["pruner_percentile"]),
        n_warmup_steps=int(params.tune["pruner_warmup_steps"]),
    )


def enqueue_baselines(study: optuna.Study, params: Params, space: dict[str, Any]) -> int:
    """Queue `tune.enqueue` (baseline points, e.g. the Xie architecture) as a new study's
    first trials, so the study's best is never worse on validation than those baselines.

    Each entry fixes some searched hyperparameters; the sampler draws the rest. Called once,
    under the init lock, for a study without trials. Returns the number queued.
    """
    entries = params.tune.get("enqueue") or []
    if tuning_parent(params):  # the parent's trunk decides these
        entries = [{k: v for k, v in e.items() if k not in TRUNK_KEYS} for e in entries]
    for i, entry in enumerate(entries):
        unknown = sorted(set(entry) - set(space))
        if unknown:
            raise ConfigError(f"tune.enqueue[{i}]: {', '.join(unknown)} not in tune.search_space")
        for name, value in entry.items():
            spec = space[name]
            inside = (value in spec) if isinstance(spec, list) else spec["low"] <= value <= spec["high"]
            if not inside:
                raise ConfigError(
                    f"tune.enqueue[{i}].{name}={value!r} is outside tune.search_space.{name} ({spec})"
                )
    if study.get_trials(deepcopy=False):
        return 0
    for entry in entries:
        study.enqueue_trial(dict(entry), user_attrs={TRIAL_ENQUEUED: True})
    return len(entries)


# --------------------------------------------------------------------------- storage + locks


def redact(url: str) -> str:
    """A storage URL fit for logs: the password (if any) is masked."""

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: show it as given
        return url


class StorageLock:
    """An inter-process lock that lives where the study lives, so it spans hosts.

    PostgreSQL: a session advisory lock (released by the server if the worker dies).
    SQLite: an flock on a file beside the database (released by the kernel likewise).
    Other back-ends: no lock; workers may then overshoot the target by a trial or two.
    acquire/release are idempotent, so a holder may release early (see the objective).
    """

    def __init__(self, url: str, name: str) -> None:

        self.name = name
        self._url = make_url(url)
        self._key = int.from_bytes(
            hashlib.sha256(name.encode()).digest()[:8], "big", signed=True
        )
        self._conn: Any = None
        self._fh: Any = None
        self._engine: Any = None
        backend = self._url.get_backend_name()
        self.kind = {"postgresql": "postgresql", "sqlite": "sqlite"}.get(backend, "none")
        if self.kind == "sqlite" and not self._url.database:
            self.kind = "none"  # in-memory SQLite: one process anyway

    @property
    def held(self) -> bool:
        return self._conn is not None or self._fh is not None

    def acquire(self) -> None:
        if self.held or self.kind == "none":
            return
        if self.kind == "sqlite":
            safe = re.sub(r"[^\w.-]", "_", self.name)  # study names may hold any character
            path = Path(f"{self._url.database}.{safe}.lock")
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a+")  # noqa: SIM115 - held open while the lock is held
            fcntl.flock(fh, fcntl.LOCK_EX)
            self._fh = fh
            return

        if self._engine is None:
            self._engine = create_engine(self._url, poolclass=NullPool)
        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        self._conn = conn

    def release(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        if self._conn is not None:
            from sqlalchemy import text

            conn, self._conn = self._conn, None
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            finally:
                conn.close()  # closing the session frees the lock in any case

    def __enter__(self) -> StorageLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def dispose(self) -> None:
        self.release()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


STORAGE_CONNECT_TIMEOUT = 10  # seconds for the check of a PostgreSQL storage URL


def _storage_error(url: str, err: BaseException) -> TuneError:
    """One line naming the storage (password masked) and why it cannot be used."""

    cause = getattr(err, "orig", None) or err  # a DBAPIError wraps the driver's error
    text = re.sub(r"\(Background on this error at: [^)]*\)", "", str(cause))
    text = " ".join(text.split())[:_ERROR_CHARS]  # one line
    try:
        password = make_url(url).password
    except Exception:  # noqa: BLE001 - an unparsable URL has no password to hide
        password = None
    if password:
        text = text.replace(str(password), "***")
    return TuneError(
        f"cannot use Optuna storage {redact(url)}: {type(cause).__name__}: {text or '?'}"
    )


def storage_url(url: str, check: bool = True) -> str:
    """The storage URL to use, checked: a TuneError naming it if it cannot be used.

    `postgresql://` gets a driver that is installed: SQLAlchemy 2.1 maps a bare
    `postgresql://` to psycopg 3; where only psycopg2 is installed, it is named, so plain
    URLs work. With `check`, the URL must parse, name a database kind SQLAlchemy has a driver
    for, and accept a connection (PostgreSQL within STORAGE_CONNECT_TIMEOUT), so that a bad
    `--storage` is one line instead of a traceback from deep inside SQLAlchemy.
    """

    try:
        parsed = make_url(url)
    except Exception as err:  # noqa: BLE001 - any URL SQLAlchemy cannot read
        raise _storage_error(url, err) from err
    if parsed.drivername == "postgresql":

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
            parsed = parsed.set(drivername="postgresql+psycopg2")
            url = parsed.render_as_string(hide_password=False)
    if check:

        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = STORAGE_CONNECT_TIMEOUT
        try:
            engine = create_engine(parsed, poolclass=NullPool, connect_args=connect_args)
            try:
                engine.connect().close()
            finally:
                engine.dispose()
        except Exception as err:  # noqa: BLE001 - unknown dialect, no driver, no server...
            raise _storage_error(url, err) from err
    return url


def study_storage(params: Params, prop: str, override: str | None = None) -> str:
    """The study's storage URL: `--storage` or `tune.storage`, `{property}` filled in; the
    folder of a SQLite file is made."""
    url = params.optuna_storage(override).replace("{property}", prop)
    prefix = "sqlite:///"
    if url.startswith(prefix):
        Path(url[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
    return url


def open_storage(
    params: Params, url: str, stale_callback: Callable[[optuna.Study, FrozenTrial], None] | None
) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats: a worker silent for grace_period has its trial failed."""

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=int(params.tune["heartbeat_interval"]),
                grace_period=int(params.tune["grace_period"]),
                heartbeat_stale_trial_callback=stale_callback,
            )
    # RuntimeError: e.g. Optuna's "incompatible with the table schema" of an older study
    except (SQLAlchemyError, ImportError, OSError, RuntimeError, ValueError) as err:
        raise _storage_error(url, err) from err


def state_counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = dict.fromkeys(TrialState, 0)
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def epochs_run(trial: FrozenTrial) -> int:
    # multi-objective trials report no intermediate values: their count is a user attr
    return len(trial.intermediate_values) or int(trial.user_attrs.get(TRIAL_EPOCHS_RUN, 0))


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Counts by state, the best trial, and the epochs spent (complete + pruned trials)."""
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(study)
    done = [t for t in trials if t.state in DONE_STATES]
    best = _best_trial(study, study.user_attrs.get("mpprop.pareto_mae_tolerance"))
    return {
        "study_name": study.study_name,
        "n_trials_complete": counts[TrialState.COMPLETE],
        "n_trials_pruned": counts[TrialState.PRUNED],
        "n_trials_failed": counts[TrialState.FAIL],
        "n_trials_running": counts[TrialState.RUNNING],
        "n_trials_waiting": counts[TrialState.WAITING],
        "best_trial": best.number if best else None,
        "best_val_mae": trial_val_mae(best) if best else None,
        "best_values": list(best.values) if best else None,
        "epochs_run": int(sum(epochs_run(t) for t in done)),
    }


def _best_trial(study: optuna.Study, mae_tolerance: float | None = None) -> FrozenTrial | None:
    """The study's pick: lowest val MAE (objective mae), highest screening signal
    (screening), or on the Pareto front the best signal among the trials whose MAE is within
    `mae_tolerance` (tune.pareto_mae_tolerance) of the front's best MAE (pareto)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    if len(study.directions) == 1:
        pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
        return pick(complete, key=lambda t: t.value)
    front = study.best_trials
    best_mae = min(t.values[0] for t in front)
    tol = 0.0 if mae_tolerance is None else mae_tolerance
    near = [t for t in front if t.values[0] <= best_mae * (1 + tol)]
    return max(near, key=lambda t: (t.values[1], -t.values[0]))


def trial_val_mae(t: FrozenTrial) -> float | None:
    if TRIAL_VAL_MAE in t.user_attrs:
        return float(t.user_attrs[TRIAL_VAL_MAE])
    return float(t.value) if t.values and len(t.values) == 1 else None


def write_best_params(params: Params, prop: str, study: optuna.Study) -> Path | None:
    """tuned/<prop>.yaml: the best trial's hyperparameters, read by `train --preset tuned`."""
    best = _best_trial(study, params.tune["pareto_mae_tolerance"])
    if best is None:
        return None
    epochs = int(best.user_attrs.get(TRIAL_EPOCHS, study.user_attrs[ATTR_EPOCHS]))
    fine_tuning = best.user_attrs.get(TRIAL_FINE_TUNING)
    # with a parent, its trunk fixed n_conv and atom_fea_len (not searched)
    trunk = {k: fine_tuning[k] for k in ("n_conv", "atom_fea_len")} if fine_tuning else {}
    hp = trial_hyperparams(params, {**best.params, **trunk}, epochs)
    summary = study_summary(study)
    payload = {
        "hyperparams": {k: v for k, v in hp.as_dict().items()
                        if k in best.params or k in (*SEARCHED, "epochs")
                        and k not in FINETUNE_SEARCHABLE},
        # searched graph settings (train --preset tuned builds that graph cache if absent)
        "graph": {k: best.params[k] for k in GRAPH_SEARCHABLE if k in best.params},
        # a study of fine-tuned trials: `train --preset tuned` starts from the same parent
        "fine_tuning": ({k: fine_tuning[k] for k in
                         ("init_from", "freeze_trunk_epochs", "trunk_lr_scale")}
                        if fine_tuning else None),
        "best_val_mae": trial_val_mae(best),
        "best_val_screening": best.user_attrs.get(TRIAL_VAL_SCREENING),
        "objective": study.user_attrs.get(ATTR_OBJECTIVE, "mae"),
        "best_trial": best.number,
        "study_name": study.study_name,
        "n_trials_complete": summary["n_trials_complete"],
        "n_trials_pruned": summary["n_trials_pruned"],
        "property": prop,
        "snapshot_sha256": study.user_attrs.get(ATTR_SNAPSHOT),
        "model_uri": best.user_attrs.get(TRIAL_MODEL_URI),
    }
    path = params.best_params_path(prop)

    # several workers may write it at the end of a study
    with atomic_output(path) as tmp, open(tmp, "w") as fh:
        yaml.safe_dump(payload, fh, sort_keys=False)
    return path


# --------------------------------------------------------------------------- callbacks


def format_trial_line(study: optuna.Study, trial: FrozenTrial, target_epochs: int) -> str:
    """One line per finished trial: number, state, objective value(s), best so far, epochs
    run, time."""
    metric = "/".join(study.metric_names or [OBJECTIVE_NAME]).replace(OBJECTIVE_NAME, "val_mae")
    if trial.state == TrialState.COMPLETE:
        mae = "/".join(f"{v:.4g}" for v in trial.values)
    elif trial.intermediate_values:
        mae = f"{trial.intermediate_values[max(trial.intermediate_values)]:.4g}"
    else:
        mae = "-"
    best = _best_trial(study, study.user_attrs.get("mpprop.pareto_mae_tolerance"))
    best_s = ("/".join(f"{v:.4g}" for v in best.values) + f" (trial {best.number})") if best else "-"
    secs = (
        (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.datetime_complete and trial.datetime_start else float("nan")
    )
    line = (
        f"trial {trial.number:>4} {trial.state.name:<8} {metric} {mae:<9} best {best_s:<22} "
        f"epochs {epochs_run(trial)}/{target_epochs}  {secs:.0f} s"
    )
    if trial.state == TrialState.FAIL and TRIAL_ERROR in trial.user_attrs:
        line += f"  ({trial.user_attrs[TRIAL_ERROR]})"
    return line


class MarkStaleAndRetry:
    """Heartbeat-stale trials (worker died): re-queue with the same hyperparameters, and
    mark the dead trial's MLflow run FAILED with state tag FAIL (MLflowCallback never saw it).
    """

    def __init__(self, max_retry: int, echo: Echo) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self._echo = echo

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry(study, trial)
        run_id = trial.system_attrs.get(RUN_ID_ATTRIBUTE_KEY)
        if run_id:
            client = mlflow.MlflowClient()
            client.set_tag(run_id, STATE_TAG, TrialState.FAIL.name)
            client.set_tag(run_id, TRIAL_ERROR, "worker lost (no heartbeat)")
            client.set_terminated(run_id, status="FAILED")
        history = trial.system_attrs.get("retry_history", [])
        self._echo(
            f"trial {trial.number:>4} FAIL     worker lost (no heartbeat); "
            f"re-queued (retry {len(history) + 1})"
        )


# --------------------------------------------------------------------------- the worker


def _check_study_attrs(study: optuna.Study, expect: dict[str, Any]) -> None:
    attrs = study.user_attrs
    for key, value in expect.items():
        if key in attrs and attrs[key] != value:
            raise TuneError(
                f"study {study.study_name!r} has {key}={attrs[key]!r}, this run has {value!r}; "
                "continue it with the same data and settings, or pick another --study-name"
            )


def _parent_run(study: optuna.Study, params: Params, prop: str, exp_id: str,
                tags: dict[str, str], storage_url: str, prune: bool) -> str:
    """The study's MLflow parent run: made by the first worker, found by the others."""

    client = mlflow.MlflowClient()
    run_id = study.user_attrs.get(ATTR_PARENT_RUN)
    if run_id:
        try:
            client.get_run(run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise TuneError(
                f"study {study.study_name!r} tracks its trials in MLflow run {run_id}, which "
                f"{redact(mlflow.get_tracking_uri())} does not have: every worker must use the "
                "same MLflow tracking server (mlflow.tracking_uri)"
            ) from exc
        return run_id
    run = client.create_run(
        exp_id, run_name=study.study_name, tags={**tags, TAG_KIND: KIND_STUDY}
    )
    tune = params.tune
    client.log_batch(run.info.run_id, params=[
        mlflow.entities.Param(k, str(v)) for k, v in {
            "property": prop,
            "study_name": study.study_name,
            "epochs": study.user_attrs[ATTR_EPOCHS],
            "sampler": SAMPLER_LABELS[tune["sampler"]],
            "sampler_seed": tune["sampler_seed"],
            "pruner": pruner_label(params) if prune else "none",
            "search_space": yaml.safe_dump(search_space(params), default_flow_style=True).strip(),
            "optuna_storage": redact(storage_url),
        }.items()
    ])
    study.set_user_attr(ATTR_PARENT_RUN, run.info.run_id)
    study.set_user_attr(ATTR_EXPERIMENT, exp_id)
    return run.info.run_id


def screening_value(signal: float | None, val_mae: float, val_scale: float,
                    tie_weight: float) -> float:
    """The `screening` objective (maximised): the smoothed top-N% precision (%), minus
    tie_weight x val MAE in standard deviations of the validation targets, so that equal
    precisions (common: it moves in steps) are decided by the MAE."""
    assert signal is not None
    return signal - tie_weight * val_mae / val_scale


def trial_run_name(prop: str, trial: FrozenTrial) -> str:
    """`<property> trial <n> (searched values)`: readable in the MLflow run list."""
    p = trial.params
    if not p:
        return f"{prop} trial {trial.number}"
    arch = "/".join(str(p.get(k, "?")) for k in ("atom_fea_len", "h_fea_len"))
    return (f"{prop} trial {trial.number} (conv {p.get('n_conv', '?')}, h {p.get('n_h', '?')}, "
            f"{arch}, {p.get('optimizer', '?')} lr {p.get('lr', '?')}, decay "
            f"{p.get('lr_decay_epoch', '?')})")


def name_trial_run(trial: FrozenTrial, prop: str) -> None:
    """Name the trial's MLflow run and describe it (MLflowCallback names it by number only)."""

    run_id = trial.system_attrs.get(RUN_ID_ATTRIBUTE_KEY)
    if not run_id:
        return
    client = mlflow.MlflowClient()
    client.update_run(run_id, name=trial_run_name(prop, trial))
    described = ", ".join(f"{k}={v}" for k, v in sorted(trial.params.items()))
    baseline = " Enqueued baseline (tune.enqueue)." if trial.user_attrs.get(TRIAL_ENQUEUED) else ""
    client.set_tag(run_id, "mlflow.note.content",
                   f"Optuna trial {trial.number}, {trial.state.name}: {described}.{baseline}")


def log_study_summary(study: optuna.Study) -> None:
    """The study's parent run (active): best value and trial counts so far."""

    summary = study_summary(study)
    metrics = {k: float(summary[k]) for k in (
        "n_trials_complete", "n_trials_pruned", "n_trials_failed", "epochs_run")}
    if summary["best_val_mae"] is not None:
        metrics["best_val_mae"] = float(summary["best_val_mae"])
        mlflow.set_tag("best_trial", str(summary["best_trial"]))
    mlflow.log_metrics(metrics)
    if len(study.directions) > 1:
        log_pareto_front(study)


def log_pareto_front(study: optuna.Study) -> None:
    """The study's Pareto front (val MAE vs val screening) as a table and a plot in the
    active (parent) run."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials}
    rows = [{"trial": t.number, OBJECTIVE_NAME: t.values[0], SCREENING_NAME: t.values[1],
             "pareto_front": t.number in front, **t.params} for t in done]
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "pareto_front.csv"
        pd.DataFrame(rows).to_csv(table, index=False)
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter([r[OBJECTIVE_NAME] for r in rows], [r[SCREENING_NAME] for r in rows],
                   c=["C3" if r["pareto_front"] else "C0" for r in rows], s=12)
        ax.set_xlabel("best validation MAE (target units)")
        ax.set_ylabel("validation top-N% precision (%)")
        ax.set_title(f"{study.study_name}: Pareto front (red)")
        fig.tight_layout()
        fig.savefig(Path(tmp) / "pareto_front.png")
        plt.close(fig)
        mlflow.log_artifact(str(table))
        mlflow.log_artifact(str(Path(tmp) / "pareto_front.png"))


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
    space: dict[str, Any]
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
    tune = params.tune
    n_trials = int(n_trials if n_trials is not None else tune["n_trials"])
    if n_trials < 1:
        raise ConfigError(f"n_trials must be >= 1, got {n_trials}")
    space = search_space(params)
    objective = str(tune["objective"])
    if objective == "pareto" and prune:
        # Optuna cannot prune multi-objective trials (trial.report is single-objective)
        echo("note: tune.objective pareto: no pruning (every trial runs all its epochs)")
        prune = False
    spec = params.property_spec(prop)
    if objective != "mae" and spec.better is None:
        raise ConfigError(f"tune.objective {objective} needs a screening direction; "
                          f"{prop} has none (property_specs.{prop}.better)")
    study_name = study_name or f"mpprop-{prop}"
    url = storage_url(study_storage(params, prop, storage))
    set_torch_threads(params.train.get("torch_threads"))
    device, precision = training_device(params.train)  # an absent device fails at once
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
        parent_id = _parent_run(study, params, prop, exp_id, tags, url, prune)
    worker = _Worker(params, prop, study_name, space, objective, epochs, prune, ws, tags,
                     device, precision, echo)
    metric_names = OBJECTIVES[objective][0]
    mlflc = MLflowCallback(
        tracking_uri=params.tracking_uri(),
        metric_name=metric_names if len(metric_names) > 1 else metric_names[0],
        create_experiment=False,
        mlflow_kwargs={"nested": True, "experiment_id": exp_id},
        tag_trial_user_attrs=True,
    )
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
                        float(tune["heartbeat_interval"]), echo)
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):  # a summary must not hide why the worker stopped
            log_study_summary(study)
        mlflow.end_run(status=status)
        claim.dispose()
        init_lock.dispose()
        path = write_best_params(params, prop, study)
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


def _open_study(params: Params, prop: str, url: str, study_name: str, objective: str,
                epochs: int | None, prune: bool, ws: Workspace, echo: Echo
                ) -> tuple[optuna.Study, int, str]:
    """Create or load the study (under the init lock) and check it is the same study:
    property, objective, snapshot, graphs and epochs. Returns it, its epochs and the MLflow
    experiment id."""
    tune = params.tune
    metric_names, directions = OBJECTIVES[objective]
    storage_obj = open_storage(
        params, url, MarkStaleAndRetry(int(tune["failed_trial_max_retry"]), echo)
    )
    exp_id = setup_mlflow(params)
    # setup_mlflow does not activate an experiment it has just created; trial runs
    # (started by MLflowCallback without an experiment id) must not land in Default
    mlflow.set_experiment(experiment_id=exp_id)
    study = optuna.create_study(
        storage=storage_obj, study_name=study_name, directions=directions,
        sampler=TrialSeededSampler(int(tune["sampler_seed"]), kind=tune["sampler"]),
        pruner=make_pruner(params, int(epochs or tune["epochs"]), prune), load_if_exists=True,
    )
    if not study.metric_names:
        study.set_metric_names(metric_names)
    study.set_user_attr("mpprop.pareto_mae_tolerance", float(tune["pareto_mae_tolerance"]))
    if ATTR_EPOCHS in study.user_attrs and epochs is None:
        epochs = int(study.user_attrs[ATTR_EPOCHS])  # resuming: keep the study's epochs
    epochs = int(epochs if epochs is not None else tune["epochs"])
    expect = {ATTR_PROPERTY: prop, ATTR_OBJECTIVE: objective, ATTR_SNAPSHOT: ws.snapshot_sha256,
              ATTR_GRAPH_KEY: ws.cache.key, ATTR_EPOCHS: epochs}
    _check_study_attrs(study, expect)
    for key, value in expect.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    return study, epochs, exp_id


class _TrialRunner:
    """The objective of one worker's trials: train on the trial's split, report to the
    pruner, log the model; returns what the study optimises."""

    def __init__(self, worker: _Worker, data: PropertyData, claim: StorageLock) -> None:
        self.w = worker
        self.claim = claim
        tune = worker.params.tune
        self.percents = [float(p) for p in tune["screening_percents"]]
        self.tie_weight = float(tune["screening_tie_weight"])
        self.seed_base = int(tune["sampler_seed"])
        self.every = int(tune.get("progress_every") or 0)
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
            int(values.get("freeze_trunk_epochs", train["freeze_trunk_epochs"])),
            float(values.get("trunk_lr_scale", train["trunk_lr_scale"])), self.parent.label,
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

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        # the trial exists now: other workers may decide whether to start theirs
        self.claim.release()
        w = self.w
        values = {**suggest(trial, w.space), **self.trunk_values()}
        hp = trial_hyperparams(w.params, values, w.epochs)
        fine_tuning = self.fine_tuning(values)
        graph = trial_graph(w.params, values)
        data = self.data_for(graph)
        # a re-queued trial carries its original's user attrs: same split as the original
        seed = int(trial.user_attrs.get(
            TRIAL_SPLIT_SEED, derive_seed(self.seed_base, trial.number, _SPLIT_STREAM)
        ))
        trial.set_user_attr(TRIAL_SPLIT_SEED, seed)
        trial.set_user_attr(TRIAL_EPOCHS, w.epochs)
        tr, va = train_val_split(len(data.pool_rows), float(w.params.split["val_fraction"]), seed)
        val_y = data.pool_targets[va]
        val_scale = float(np.std(val_y)) or 1.0
        better = data.spec.better
        mlflow.set_tags({**w.tags, TAG_KIND: KIND_TRIAL, TAG_TRIAL_NUMBER: str(trial.number)})
        mlflow.set_tag("graph_cache_key", data.cache.key)
        mlflow.log_params({
            **hp.as_dict(), **{f"graph_{k}": v for k, v in asdict(graph).items()},
            "split_seed": seed, "property": w.prop, "study_name": w.study_name,
            "target_transform": data.spec.transform, "n_train": len(tr), "n_val": len(va),
            "init_from": fine_tuning.parent if fine_tuning else None,
        })
        if fine_tuning is not None:
            mlflow.set_tags(self.parent.tags())
            trial.set_user_attr(TRIAL_FINE_TUNING, {
                "init_from": tuning_parent(w.params), "n_conv": hp.n_conv,
                "atom_fea_len": hp.atom_fea_len, "freeze_trunk_epochs": fine_tuning.freeze_epochs,
                "trunk_lr_scale": fine_tuning.trunk_lr_scale})

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
                hp, graph, data, tr, va, seed, on_epoch, w.params.predict["batch_size"],
                LossSettings.from_train(w.params.train), w.device, w.precision, fine_tuning,
            )
        except optuna.TrialPruned:
            mlflow.set_tag(STATE_TAG, TrialState.PRUNED.name)
            raise
        except BaseException as exc:
            # uncaught errors skip Optuna's callbacks: record the state here too
            error = f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
            mlflow.set_tag(STATE_TAG, TrialState.FAIL.name)
            mlflow.set_tag(TRIAL_ERROR, error)
            trial.set_user_attr(TRIAL_ERROR, error)
            raise
        mlflow.log_metrics({"best_epoch": result.best_epoch, "epochs_run": len(result.history)})
        with tempfile.TemporaryDirectory() as tmp:
            bundle = save_bundle(
                Path(tmp) / BUNDLE_FILE, result.model, result.normalizer, data.spec,
                extra={"snapshot_sha256": w.ws.snapshot_sha256, "graph_cache_key": data.cache.key,
                       "study_name": w.study_name, "trial": trial.number},
            )
            trial.set_user_attr(TRIAL_MODEL_URI, log_model(bundle))
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
