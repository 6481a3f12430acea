"""MLflow: experiment set-up, the CGCNN model bundle, and the pyfunc model that predicts from
structures (what the registry serves and `mlflow models serve` answers with)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema

from mpprop.bundle import BundleError, attach_metal_gate, load_bundle, load_model, save_bundle
from mpprop.config import Params
from mpprop.faults import HOST_TAG, PID_START_TAG, PID_TAG, process_alive

MODEL_ARTIFACT = "checkpoint"
# a second bundle logged with a model whose domain is non-metals: the metal classifier that
# sets its prediction to 0 for metals when served (see CGCNNPyfunc)
GATE_ARTIFACT = "metal_classifier"
PACKAGE_DIR = Path(__file__).resolve().parent
# the reviewed file MLflow logs as the model's code (models-from-code)
PYFUNC_CODE = PACKAGE_DIR / "mlflow_model.py"
# re-exported: the stages save and load bundles through the run contract's module
__all__ = ["BundleError", "load_bundle", "save_bundle"]
STRUCTURE_COLUMNS = ("structure", "cif", "poscar")
# ---- the run contract: what every mpprop run carries in MLflow. Writers (train, tune,
# import-pretrained, report, extrapolation) and readers (promote, the UI's filters) use these.
TAG_PROPERTY = "mpprop.property"
TAG_KIND = "mpprop.kind"
TAG_PRESET = "mpprop.preset"
TAG_STUDY = "mpprop.study"
TAG_TRIAL_NUMBER = "optuna.trial_number"  # set by the tuner on each trial run
TAG_SNAPSHOT = "snapshot_sha256"
TAG_GRAPH_KEY = "graph_cache_key"
KIND_TRAIN = "train"
KIND_TRIAL = "tune-trial"
KIND_STUDY = "tune-study"
KIND_PRETRAINED = "pretrained"
KIND_PRETRAIN = "pretrain"  # the trunk of `mpprop pretrain`
KIND_REPORT = "report"
KIND_EXTRAPOLATION = "extrapolation"
# what a model predicts (bundle.TASK_*) and the materials it was trained on (model.DOMAIN_*)
TAG_TASK = "mpprop.task"
TAG_DOMAIN = "mpprop.domain"
# the validation screening signal train runs and tuning trials log (tune.screening_percents)
VAL_SCREENING_METRIC = "best_val_screening"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def setup_mlflow(params: Params, experiment: str | None = None) -> str:
    """Point MLflow at the configured tracking URI and activate the experiment (made if new).

    For a SQLite store, a lock beside the database file (<db>.lock) is held while MLflow
    creates or upgrades the schema and the experiment: two commands starting at once on a fresh
    workspace would otherwise race on the schema (`table ... already exists`)."""
    uri = params.tracking_uri()
    with _store_lock(uri):
        mlflow.set_tracking_uri(uri)
        # opening the store creates its tables (once per process and URI: MLflow caches it)
        mlflow.MlflowClient().search_experiments(max_results=1)
        return _activate_experiment(params, uri, experiment or params.mlflow["experiment"])


def _store_lock(uri: str, timeout: float = 300.0) -> Any:
    """A file lock beside a SQLite tracking database; a no-op for other stores."""
    import contextlib

    from filelock import FileLock

    prefix = "sqlite:///"
    db = uri[len(prefix):].split("?", 1)[0] if uri.startswith(prefix) else ""
    if not db or db == ":memory:":
        return contextlib.nullcontext()
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}.lock", timeout=timeout)


def _activate_experiment(params: Params, uri: str, name: str) -> str:
    if mlflow.get_experiment_by_name(name) is None:
        # a tracking server decides where artifacts go; a local store gets a folder of ours
        artifacts = None
        if not uri.startswith(("http://", "https://", "databricks")):
            folder = params.path(params.mlflow["artifact_location"]).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            artifacts = folder.as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=artifacts)
        except mlflow.exceptions.MlflowException:
            pass  # another worker created it first
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        # the MLflow UI opens the experiment in its model-training view (runs, metrics)
        mlflow.MlflowClient().set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def parse_structure_cell(value: Any, kind: str):
    """A pymatgen Structure from a cell of the input frame (dict/JSON, CIF or POSCAR text)."""
    from pymatgen.core import Structure

    from mpprop.inference import parse_cif

    if kind == "structure":
        if isinstance(value, str):
            value = json.loads(value)
        return Structure.from_dict(value)
    if kind == "cif":
        # the first data block, as Structure.from_str; with pymatgen's reason where it fails
        return parse_cif(value)[0]
    return Structure.from_str(value, fmt="poscar")


class CGCNNPyfunc(mlflow.pyfunc.PythonModel):
    """Predicts a property from crystal structures (what `mlflow models serve` answers with).

    Input: a DataFrame with one of the columns `structure` (pymatgen Structure dict or its
    JSON text), `cif` or `poscar` (file text). Output: a DataFrame with `prediction` in the
    model's target units (e.g. log10 GPa for moduli) and its ensemble `std` (NaN for one
    model), `value` and `unit` in natural units (GPa), `ood_score` / `ood_flag` (distance to
    the training materials in the model's embedding; NaN / False where the model has no OOD
    reference), and `error` (empty where it worked); a structure that cannot be parsed or
    featurized gets NaN and its error, the rest go on. Structures outside the default
    inference.StructureLimits (too many atoms, too dense, atoms too close: work without
    bound) are refused before any neighbour search, as by `mpprop predict`.

    A classifier's `prediction` and `value` are the probability of its positive class (the
    metal classifier: of metal). A model logged with a GATE_ARTIFACT (the published band-gap
    model, trained on non-metals only) predicts 0 where that classifier says metal, as
    `mpprop predict` does by default (predict.xie_band_gap_metal_gate).

    Logged as code (models-from-code: src/mpprop/mlflow_model.py), never as a pickle; the
    weights come from the bundle artifact through `load_bundle` (weights_only=True).
    """

    def load_context(self, context: Any) -> None:
        self.loaded = load_model(context.artifacts[MODEL_ARTIFACT], label="pyfunc")
        if GATE_ARTIFACT in context.artifacts:
            attach_metal_gate(self.loaded, load_model(context.artifacts[GATE_ARTIFACT],
                                                      label="pyfunc metal classifier"))
        self.spec = self.loaded.spec
        self.bundle = self.loaded.bundle

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None):
        from mpprop.data import inverse_transform, natural_unit
        from mpprop.inference import predict_structures

        kind = next((c for c in STRUCTURE_COLUMNS if c in model_input.columns), None)
        if kind is None:
            raise ValueError(f"input needs one of the columns {', '.join(STRUCTURE_COLUMNS)}")
        structures: list[Any] = []
        errors: list[str] = []
        for value in model_input[kind].tolist():
            try:
                structures.append(parse_structure_cell(value, kind))
                errors.append("")
            except Exception as exc:  # noqa: BLE001 - reported per row, the batch goes on
                structures.append(None)
                errors.append(f"{type(exc).__name__}: {exc}")
        out = predict_structures([self.loaded], structures, errors)
        preds = out.values[0]
        return pd.DataFrame({
            "prediction": preds,
            "std": out.stds[0],
            "value": inverse_transform(preds, self.spec),
            "unit": natural_unit(self.spec),
            "ood_score": out.ood_scores[0],
            "ood_flag": out.ood_flags[0],
            "error": out.errors,
        })


def model_signature() -> ModelSignature:
    """One of the structure columns is given per request; each is optional in the schema."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", c, required=False) for c in STRUCTURE_COLUMNS]),
        outputs=Schema([ColSpec("double", "prediction"), ColSpec("double", "std"),
                        ColSpec("double", "value"), ColSpec("string", "unit"),
                        ColSpec("double", "ood_score"), ColSpec("boolean", "ood_flag"),
                        ColSpec("string", "error")]),
    )


def served_requirements() -> list[str]:
    """What a served environment installs; mpprop itself travels as code (code_paths)."""
    return [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas", "pymatgen",
            "pyyaml", "pydantic>=2", "tqdm", f"mlflow=={mlflow.__version__}", "ninja"]


def log_model(bundle_path: Path, name: str = "model", gate_path: Path | None = None) -> str:
    """Log the bundle as an MLflow pyfunc model (models-from-code) in the active run; with
    `gate_path`, the bundle of its metal classifier (GATE_ARTIFACT) beside it."""
    artifacts = {MODEL_ARTIFACT: str(bundle_path)}
    if gate_path is not None:
        artifacts[GATE_ARTIFACT] = str(gate_path)
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(PYFUNC_CODE),
        artifacts=artifacts,
        code_paths=[str(PACKAGE_DIR)],
        signature=model_signature(),
        input_example=pd.DataFrame({"structure": [_example_structure_json()]}),
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

    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    try:
        rel = mlmodel["flavors"]["python_function"]["artifacts"][MODEL_ARTIFACT]["path"]
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{model_uri} is not an mpprop model (no {MODEL_ARTIFACT} artifact)") from exc
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"{model_uri}: artifact path {rel!r} leaves the model folder")
    return path


def _example_structure_json() -> str:
    from pymatgen.core import Lattice, Structure

    nacl = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    return json.dumps(nacl.as_dict())


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


def end_orphaned_runs(experiment_id: str, kind: str) -> list[str]:
    """End as KILLED the RUNNING runs of this kind (tag mpprop.kind) started on this host by
    processes that no longer run (killed with -9, or the machine went down); their ids."""
    client = MlflowClient()
    host = socket.gethostname().replace("'", "")
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{TAG_KIND}` = '{kind}' and tags.`{HOST_TAG}` = '{host}' "
        "and attributes.status = 'RUNNING'",
        max_results=1000,
    )
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
