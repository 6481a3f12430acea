"""MLflow: experiment set-up, the CGCNN model bundle, and the pyfunc model that predicts from
structures (what the registry serves and `mlflow models serve` answers with)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from mpprop.config import GraphSettings, Hyperparams, Params, PropertySpec
from mpprop.model import CrystalGraphConvNet, Normalizer

MODEL_ARTIFACT = "checkpoint"
STRUCTURE_COLUMNS = ("structure", "cif", "poscar")


def setup_mlflow(params: Params, experiment: str | None = None) -> str:
    """Point MLflow at the configured tracking URI and activate the experiment (made if new)."""
    uri = params.tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = experiment or params.mlflow["experiment"]
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
    return mlflow.set_experiment(name).experiment_id


def save_bundle(
    path: str | Path,
    model: CrystalGraphConvNet,
    normalizer: Normalizer,
    spec: PropertySpec,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Everything needed to predict: weights, normalizer, hyperparameters, graph settings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "normalizer": normalizer.state_dict(),
            "hyperparams": model.hyperparams.as_dict(),
            "graph_settings": asdict(model.graph_settings),
            "property": asdict(spec),
            "extra": extra or {},
        },
        path,
    )
    return path


def load_bundle(path: str | Path) -> tuple[CrystalGraphConvNet, Normalizer, PropertySpec, dict]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    model = CrystalGraphConvNet(
        Hyperparams(**data["hyperparams"]), GraphSettings(**data["graph_settings"])
    )
    model.load_state_dict(data["state_dict"])
    model.eval()
    return model, Normalizer(**data["normalizer"]), PropertySpec(**data["property"]), data


def parse_structure_cell(value: Any, kind: str):
    """A pymatgen Structure from a cell of the input frame (dict/JSON, CIF or POSCAR text)."""
    from pymatgen.core import Structure

    if kind == "structure":
        if isinstance(value, str):
            value = json.loads(value)
        return Structure.from_dict(value)
    fmt = "cif" if kind == "cif" else "poscar"
    return Structure.from_str(value, fmt=fmt)


class CGCNNPyfunc(mlflow.pyfunc.PythonModel):
    """Predicts a property from crystal structures.

    Input: a DataFrame with one of the columns `structure` (pymatgen Structure dict or its
    JSON text), `cif` or `poscar` (file text). Output: a DataFrame with `prediction` in the
    model's target units (e.g. log10 GPa for moduli) and `error` (empty where it worked);
    a structure that cannot be parsed or featurized gets NaN and its error, the rest go on.
    """

    def load_context(self, context: Any) -> None:
        self.model, self.normalizer, self.spec, self.bundle = load_bundle(
            context.artifacts[MODEL_ARTIFACT]
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None):
        from mpprop.graphs import graphs_from_structures, known_elements
        from mpprop.snapshot import structure_problem
        from mpprop.training import predict

        kind = next((c for c in STRUCTURE_COLUMNS if c in model_input.columns), None)
        if kind is None:
            raise ValueError(f"input needs one of the columns {', '.join(STRUCTURE_COLUMNS)}")
        known = set(known_elements().tolist())
        structures, rows, errors = [], [], [""] * len(model_input)
        for i, value in enumerate(model_input[kind].tolist()):
            try:
                s = parse_structure_cell(value, kind)
                problem = structure_problem(s)
                if problem:
                    raise ValueError(f"unusable structure: {problem.replace('_', ' ')}")
                unknown = {sp.symbol for sp in s.species if sp.Z not in known}
                if unknown:
                    raise ValueError(
                        f"element(s) {', '.join(sorted(unknown))} outside the CGCNN feature table"
                    )
                structures.append(s)
                rows.append(i)
            except Exception as exc:  # noqa: BLE001 - reported per row, the batch goes on
                errors[i] = f"{type(exc).__name__}: {exc}"
        preds = np.full(len(model_input), np.nan)
        if structures:
            cache = graphs_from_structures(structures, self.model.graph_settings)
            preds[rows] = predict(self.model, self.normalizer, cache)
        return pd.DataFrame({"prediction": preds, "error": errors})


def model_signature() -> ModelSignature:
    """One of the structure columns is given per request; each is optional in the schema."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", c, required=False) for c in STRUCTURE_COLUMNS]),
        outputs=Schema([ColSpec("double", "prediction"), ColSpec("string", "error")]),
    )


def log_model(bundle_path: Path, name: str = "model") -> str:
    """Log the bundle as an MLflow pyfunc model in the active run; returns its URI."""
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=CGCNNPyfunc(),
        artifacts={MODEL_ARTIFACT: str(bundle_path)},
        signature=model_signature(),
        input_example=pd.DataFrame({"structure": [_example_structure_json()]}),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "pymatgen", "mpprop"],
    )
    return info.model_uri


def _example_structure_json() -> str:
    from pymatgen.core import Lattice, Structure

    nacl = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    return json.dumps(nacl.as_dict())
