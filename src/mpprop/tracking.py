"""MLflow: the run contract (tags, kinds), experiment set-up and the store's checks, logging
and downloading models (the served model itself is mpprop.served_model)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import mlflow
import pandas as pd
from filelock import FileLock, Timeout
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import SQLAlchemyError

from mpprop.bundle import BundleError, load_bundle, save_bundle
from mpprop.config import Params
from mpprop.faults import HOST_TAG, PID_START_TAG, PID_TAG, process_alive
from mpprop.served_model import (
    GATE_ARTIFACT,
    MODEL_ARTIFACT,
    example_structure_json,
    model_signature,
    served_requirements,
)
from mpprop.write_errors import ProjectFileError, writing

PACKAGE_DIR = Path(__file__).resolve().parent
# the reviewed file MLflow logs as the model's code (models-from-code)
PYFUNC_CODE = PACKAGE_DIR / "mlflow_model.py"
# re-exported: the stages save and load bundles through the run contract's module
__all__ = ["BundleError", "load_bundle", "save_bundle"]
# ---- the run contract: what every mpprop run carries in MLflow. Writers (train, tune,
# import-pretrained, report, extrapolation) and readers (promote, the UI's filters) use these.
TAG_PROPERTY = "mpprop.property"
TAG_KIND = "mpprop.kind"
TAG_PRESET = "mpprop.preset"
TAG_STUDY = "mpprop.study"
TAG_TRIAL_NUMBER = "optuna.trial_number"  # set by the tuner on each trial run
TAG_SNAPSHOT = "snapshot_sha256"
TAG_GRAPH_KEY = "graph_cache_key"
TAG_DESCRIPTION = "mlflow.note.content"  # the Description box of a run's page (markdown)
# a training run's test MAE interval (95% bootstrap), logged by evaluate, read by promote
TEST_MAE_LOW = "test_mae_low"
TEST_MAE_HIGH = "test_mae_high"
KIND_TRAIN = "train"
KIND_TRIAL = "tune-trial"
KIND_STUDY = "tune-study"
KIND_PRETRAINED = "pretrained"
KIND_PRETRAIN = "pretrain"  # the trunk of `mpprop pretrain`
KIND_REPORT = "report"
KIND_EXTRAPOLATION = "extrapolation"
KIND_CALIBRATE = "calibrate"  # `mpprop calibrate`: a model's bundle with its intervals
# what a model predicts (bundle.TASK_*) and the materials it was trained on (model.DOMAIN_*)
TAG_TASK = "mpprop.task"
TAG_DOMAIN = "mpprop.domain"
# the validation screening signal train runs and tuning trials log (tune.screening_percents)
VAL_SCREENING_METRIC = "best_val_screening"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The MLflow UI keeps the runs table's columns in the browser, and its URL carries only the
# search and sort; a "shared view" (the UI's Share button) is an experiment tag with the whole
# table state that a link names (viewStateShareKey). mpprop writes one: the training runs,
# best test MAE first, with the columns that compare them.
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
TRAINING_RUNS_VIEW = "mpprop-training-runs"
TRAINING_RUNS_COLUMNS = (
    "tags.`mpprop.property`", "tags.`mpprop.preset`", "metrics.`test_mae`",
    "metrics.`test_mae_low`", "metrics.`test_mae_high`", "metrics.`best_val_mae`",
    "metrics.`test_screening_precision`", "metrics.`best_val_screening`", "attributes.`Models`",
)


class TrackingStoreError(ProjectFileError):
    """A tracking store that cannot be used as it is: an empty or corrupt database, or the
    store of another project folder (a copy). The CLI reports it in one line (exit code 1)."""


SQLITE_PREFIX = "sqlite:///"
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database
_RESTORE = "restore it from a backup"
# how long a promotion waits for another one to finish registering
REGISTRY_LOCK_TIMEOUT_S = 600.0
# tracking URIs whose orphaned runs this process has ended (once per process and store)
_SWEPT: set[str] = set()


def training_runs_view() -> dict[str, Any]:
    """The runs-table state of the shared view TRAINING_RUNS_VIEW (the UI's own format)."""
    return {
        "searchFilter": f"tags.`{TAG_KIND}` = '{KIND_TRAIN}'",
        "orderByKey": "metrics.`test_mae`", "orderByAsc": True, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": list(TRAINING_RUNS_COLUMNS),
    }


def runs_table_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of the experiment's training runs: the model-training view (the UI's
    `workflowType` URL parameter; without it MLflow 3 opens the GenAI view) in the shared view
    TRAINING_RUNS_VIEW (the runs of kind train, best test MAE first, their metric columns)."""
    query = urlencode({"viewStateShareKey": TRAINING_RUNS_VIEW,
                       "workflowType": "machine_learning"})
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def setup_mlflow(params: Params, experiment: str | None = None) -> str:
    """Point MLflow at the configured tracking URI and activate the experiment (made if new);
    the store is checked and this host's orphaned runs ended first (open_store).

    For a SQLite store, a lock beside the database file (<db>.lock) is held while MLflow
    creates or upgrades the schema and the experiment: two commands starting at once on a fresh
    workspace would otherwise race on the schema (`table ... already exists`)."""
    uri = params.tracking_uri()
    name = experiment or params.mlflow.experiment
    with _store_lock(uri):
        _open_checked(params, uri, name)
        experiment_id = _activate_experiment(params, uri, name)
    _end_orphans_once(uri)
    return experiment_id


def open_store(params: Params) -> MlflowClient:
    """Point MLflow at the configured tracking store, for commands that read it (predict, a
    fine-tuning parent): checked as by setup_mlflow, orphaned runs of this host ended."""
    uri = params.tracking_uri()
    with _store_lock(uri):
        _open_checked(params, uri, params.mlflow.experiment)
    _end_orphans_once(uri)
    return MlflowClient()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI; None for other stores."""
    db = uri[len(SQLITE_PREFIX):].split("?", 1)[0] if uri.startswith(SQLITE_PREFIX) else ""
    return Path(db) if db and db != ":memory:" else None


def _store_lock(uri: str, timeout: float = 300.0, suffix: str = ".lock") -> Any:
    """A file lock beside a SQLite tracking database (<db><suffix>); a no-op for other
    stores."""
    db = sqlite_path(uri)
    if db is None:
        return contextlib.nullcontext()
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}{suffix}", timeout=timeout)


@contextlib.contextmanager
def registry_lock(params: Params) -> Iterator[None]:
    """Held while a command reads the registry and registers from what it read (promote), so
    that a second one waits and then sees the first's version: <db>.registry.lock beside a
    SQLite store; nothing for a tracking server (run one promotion at a time there)."""
    uri = params.tracking_uri()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_store_lock(uri, REGISTRY_LOCK_TIMEOUT_S, ".registry.lock"))
        except Timeout as exc:
            raise TrackingStoreError(
                f"{exc.lock_file} was held by another promotion for "
                f"{REGISTRY_LOCK_TIMEOUT_S:.0f} s; is a `mpprop promote` stuck?") from exc
        yield


def check_database(db: Path) -> None:
    """TrackingStoreError for a database file that is empty or not SQLite: MLflow would
    recreate an empty file as a new, empty store (the runs and registry gone unnoticed) and
    fail on garbage with a traceback. A missing file is a new store."""
    try:
        with open(db, "rb") as fh:
            head = fh.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TrackingStoreError(f"the MLflow tracking database {db} cannot be read: "
                                 f"{exc.strerror}") from exc
    if not head:
        raise TrackingStoreError(
            f"the MLflow tracking database {db} is empty (0 bytes): the runs, models and "
            f"registry it held may be gone, so it is not recreated empty; {_RESTORE} (or, to "
            "start a new store on purpose, delete it)")
    if head != SQLITE_HEADER:
        raise TrackingStoreError(
            f"the MLflow tracking database {db} is corrupt (not an SQLite database): the "
            f"runs, models and registry it held may be gone; {_RESTORE} (or, to start a new "
            "store on purpose, move it aside)")


def _open_checked(params: Params, uri: str, experiment: str) -> None:
    """Set the tracking URI and open the store (MLflow makes or upgrades its tables), with a
    one-line TrackingStoreError naming the database where it cannot be used."""
    db = sqlite_path(uri)
    if db is not None:
        check_database(db)
        db.parent.mkdir(parents=True, exist_ok=True)  # a new store's folder (mlruns/)
    mlflow.set_tracking_uri(uri)
    try:
        # opening the store creates its tables (once per process and URI: MLflow caches it)
        mlflow.MlflowClient().search_experiments(max_results=1)
    except SQLAlchemyError as exc:  # damaged pages behind a good header, a locked file
        if db is None:
            raise
        raise TrackingStoreError(f"the MLflow tracking database {db} cannot be opened "
                                 f"({_first_line(exc)}); if it is corrupt, {_RESTORE}") from exc
    except MlflowException as exc:  # e.g. a schema MLflow asks to upgrade: its own words
        if db is None:
            raise
        raise TrackingStoreError(f"the MLflow tracking database {db}: "
                                 f"{exc.message.strip().splitlines()[0]}") from exc
    if db is not None:
        _check_artifact_location(params, db, experiment)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _local_path(location: str) -> Path | None:
    """The folder of a local artifact location (file:// URI or a path); None if remote."""
    scheme = urlsplit(location).scheme
    if scheme == "file":
        return Path(unquote(urlsplit(location).path))
    return Path(location) if not scheme and location else None


def _check_artifact_location(params: Params, db: Path, experiment: str) -> None:
    """TrackingStoreError where the project's own store (its database inside the project
    folder) keeps the experiment's artifacts outside the folder and outside the configured
    mlflow.artifact_location: MLflow stores absolute locations, so a copied (or moved) project
    would read and write the original's artifacts."""
    root = params.root.resolve()
    if params.builtin or not db.resolve().is_relative_to(root):
        return  # no project folder, or a store shared on purpose
    found = mlflow.get_experiment_by_name(experiment)
    where = _local_path(found.artifact_location or "") if found is not None else None
    if where is None:
        return
    where = where.resolve()
    configured = _local_path(params.mlflow.artifact_location)
    if where.is_relative_to(root) or (
            configured is not None and where.is_relative_to(params.path(configured).resolve())):
        return
    raise TrackingStoreError(
        f"the MLflow store {db} keeps the artifacts of experiment {experiment!r} in {where}, "
        f"outside this project folder {root}: the project was copied or moved from another "
        "folder, and its runs and models would be read from and written to that folder's "
        f"artifacts. To use them on purpose, set mlflow.artifact_location to {where} "
        f"(-S mlflow.artifact_location={where}); to give this folder its own store, move "
        f"{db} aside (a new, empty store) or copy the project without it")


def _end_orphans_once(uri: str) -> None:
    """End this host's orphaned runs (end_orphaned_runs) the first time this process opens
    the store at `uri`."""
    if uri in _SWEPT:
        return
    _SWEPT.add(uri)
    # a store this user may only read (a shared server): reading commands still work
    with contextlib.suppress(MlflowException, SQLAlchemyError):
        end_orphaned_runs()


def _activate_experiment(params: Params, uri: str, name: str) -> str:
    if mlflow.get_experiment_by_name(name) is None:
        # a tracking server decides where artifacts go; a local store gets a folder of ours
        artifacts = None
        if not uri.startswith(("http://", "https://", "databricks")):
            folder = params.path(params.mlflow.artifact_location).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            artifacts = folder.as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=artifacts)
        except mlflow.exceptions.MlflowException:
            pass  # another worker created it first
    experiment = mlflow.set_experiment(name)
    # the MLflow UI opens the experiment in its model-training view (runs, metrics), and
    # `mpprop ui-url`'s link on the training runs table
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
            SHARED_VIEW_TAG_PREFIX + TRAINING_RUNS_VIEW: json.dumps(training_runs_view())}
    for key, value in tags.items():
        if experiment.tags.get(key) != value:
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def log_model(bundle_path: Path, name: str = "model", gate_path: Path | None = None) -> str:
    """Log the bundle as an MLflow pyfunc model (models-from-code) in the active run; with
    `gate_path`, the bundle of its metal classifier (GATE_ARTIFACT) beside it."""
    artifacts = {MODEL_ARTIFACT: str(bundle_path)}
    if gate_path is not None:
        artifacts[GATE_ARTIFACT] = str(gate_path)
    # a full disk under the artifact store: one line naming the run's artifact folder
    with writing(_local_path(mlflow.get_artifact_uri()) or mlflow.get_artifact_uri()):
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_CODE),
            artifacts=artifacts,
            code_paths=[str(PACKAGE_DIR)],
            signature=model_signature(),
            input_example=pd.DataFrame({"structure": [example_structure_json()]}),
            pip_requirements=served_requirements(),
        )
    return info.model_uri


def download_bundle(model_uri: str, dst: str | Path) -> Path:
    """The bundle file of a logged model, downloaded into `dst`, without loading the model.

    mpprop's own paths (promote, predict) read only this file, with `load_bundle`: whatever
    else a run in the store holds (a pickle, another MLmodel) is never executed. The MLmodel
    file is read with yaml.safe_load to find the bundle's path.
    """
    import yaml

    # a version whose artifacts were deleted: a BundleError naming the model, not the temp
    # folder it was to be downloaded to
    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                        dst_path=str(dst)))
    except (MlflowException, OSError) as exc:
        raise BundleError(f"{model_uri}: its artifacts cannot be read from the artifact store "
                          f"({_first_line(exc).replace(str(dst), '<download>')})") from exc
    if not (root / "MLmodel").is_file():
        raise BundleError(f"{model_uri}: its MLmodel file is missing from the artifact store")
    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    try:
        rel = mlmodel["flavors"]["python_function"]["artifacts"][MODEL_ARTIFACT]["path"]
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{model_uri} is not an mpprop model (no {MODEL_ARTIFACT} artifact)") from exc
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"{model_uri}: artifact path {rel!r} leaves the model folder")
    if not path.is_file():
        raise BundleError(f"{model_uri}: its bundle file ({rel}) is missing from the artifact "
                          "store (deleted?); register the model again")
    return path


def download_gate_bundle(model_uri: str, dst: str | Path) -> Path | None:
    """The metal classifier's bundle logged beside a model (GATE_ARTIFACT), downloaded into
    `dst`; None where the model has none. Read like download_bundle: no model is loaded."""
    import yaml

    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    try:
        rel = mlmodel["flavors"]["python_function"]["artifacts"][GATE_ARTIFACT]["path"]
    except (KeyError, TypeError):
        return None
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"{model_uri}: artifact path {rel!r} leaves the model folder")
    return path


# ---- runs of killed processes: ended by the next command that opens the store


@contextlib.contextmanager
def killed_on_interrupt() -> Iterator[None]:
    """Inside `mlflow.start_run()`: a signal (Terminated, KeyboardInterrupt) ends the active
    run KILLED; other exceptions leave it to start_run, which ends it FAILED."""
    try:
        yield
    except KeyboardInterrupt:
        if mlflow.active_run() is not None:
            mlflow.end_run(status="KILLED")
        raise


def end_orphaned_runs(experiment_id: str | None = None, kind: str | None = None) -> list[str]:
    """End as KILLED the RUNNING runs started on this host by processes that no longer run
    (killed with -9, or the machine went down): of `kind` (tag mpprop.kind; None: every kind)
    in `experiment_id` (None: every active experiment); their ids. Runs without the process
    tags (faults.process_tags) are left alone."""
    client = MlflowClient()
    host = socket.gethostname().replace("'", "")
    ids = ([experiment_id] if experiment_id is not None else
           [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)])
    if not ids:
        return []
    filt = f"tags.`{HOST_TAG}` = '{host}' and attributes.status = 'RUNNING'"
    if kind is not None:
        filt = f"tags.`{TAG_KIND}` = '{kind}' and {filt}"
    runs = client.search_runs(ids, filt, max_results=1000)
    ended = []
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags[PID_TAG])
        except (KeyError, ValueError):
            continue
        if pid == os.getpid() or process_alive(pid, tags.get(PID_START_TAG)):
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended
