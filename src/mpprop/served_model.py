"""The model mpprop logs to MLflow: a pyfunc that predicts a property from crystal structures
(what the registry serves and `mlflow models serve` answers with), its input and output
schema and the packages a served environment needs. Logged as code (mlflow_model.py);
tracking.log_model logs it.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, Schema
from pymatgen.core import Lattice, Structure

from mpprop.bundle import attach_metal_gate, load_model
from mpprop.data import inverse_transform, natural_unit
from mpprop.inference import parse_cif, predict_structures

MODEL_ARTIFACT = "checkpoint"
# a second bundle logged with a model whose domain is non-metals: the metal classifier that
# sets its prediction to 0 for metals when served (see CGCNNPyfunc)
GATE_ARTIFACT = "metal_classifier"
STRUCTURE_COLUMNS = ("structure", "cif", "poscar")


def parse_structure_cell(value: Any, kind: str):
    """A pymatgen Structure from a cell of the input frame (dict/JSON, CIF or POSCAR text)."""
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
    model: the members' spread, not an interval), `lo` / `hi` (the calibrated interval at
    coverage `interval_coverage`, 0.9, model units; NaN with an `interval_note` where the
    model has no calibration), `value`, `value_lo`, `value_hi` and `unit` in natural units
    (GPa), `ood_score` / `ood_flag` (distance to
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
        kind = next((c for c in STRUCTURE_COLUMNS if c in model_input.columns), None)
        if kind is None:
            # a client's mistake: MLflow's scoring server answers 400 with this message
            raise MlflowException(missing_columns_message(model_input.columns),
                                  error_code=INVALID_PARAMETER_VALUE)
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
        preds, lo, hi = out.values[0], out.lo[0], out.hi[0]
        has = np.isfinite(lo)  # calibrated intervals at the default coverage (0.9)
        return json_safe(pd.DataFrame({
            "prediction": preds,
            "std": out.stds[0],
            "lo": lo,
            "hi": hi,
            "value": inverse_transform(preds, self.spec),
            "value_lo": inverse_transform(lo, self.spec),
            "value_hi": inverse_transform(hi, self.spec),
            "interval_coverage": np.where(has, out.interval_coverage[0] or np.nan, np.nan),
            "interval_note": [out.interval_notes[0] if not e else "" for e in out.errors],
            "model_unit": self.spec.unit,
            "value_unit": natural_unit(self.spec),
            "ood_score": out.ood_scores[0],
            "ood_flag": out.ood_flags[0],
            "error": out.errors,
        }))


def missing_columns_message(columns: Any) -> str:
    """Why a request without a structure column is refused: the accepted columns and the
    ones given (the client's own names; nothing of the server)."""
    # a served model's signature drops other columns before predict sees them
    given = ", ".join(str(c) for c in list(columns)[:20])
    return (f"the input needs one of the columns {', '.join(STRUCTURE_COLUMNS)} (a pymatgen "
            "Structure as JSON, CIF text or POSCAR text)" + (f"; got: {given}" if given else ""))


def json_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with every NaN (and NA) as None: served answers are JSON, where a bare NaN is
    not valid (JSON.parse and strict parsers refuse it); None becomes null."""
    return frame.astype(object).where(pd.notna(frame), None)


def model_signature() -> ModelSignature:
    """One of the structure columns is given per request; each is optional in the schema."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", c, required=False) for c in STRUCTURE_COLUMNS]),
        outputs=Schema([ColSpec("double", "prediction"), ColSpec("double", "std"),
                        ColSpec("double", "lo"), ColSpec("double", "hi"),
                        ColSpec("double", "value"), ColSpec("double", "value_lo"),
                        ColSpec("double", "value_hi"), ColSpec("double", "interval_coverage"),
                        ColSpec("string", "interval_note"), ColSpec("string", "model_unit"),
                        ColSpec("string", "value_unit"),
                        ColSpec("double", "ood_score"), ColSpec("boolean", "ood_flag"),
                        ColSpec("string", "error")]),
    )


def served_requirements() -> list[str]:
    """What a served environment installs; mpprop itself travels as code (code_paths)."""
    return [f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas", "pymatgen",
            "pyyaml", "pydantic>=2", "tqdm", f"mlflow=={mlflow.__version__}", "ninja"]


def example_structure_json() -> str:
    """Rock salt as the model's input example (MLflow checks the signature against it)."""
    nacl = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    )
    return json.dumps(nacl.as_dict())
