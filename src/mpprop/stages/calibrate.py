"""`mpprop calibrate`: calibrated prediction intervals for a registered model, from a labelled
file the user gives (JSON Lines of MP records: material_id, structure and the property's
field, as `mpprop fetch` reads them).

The model predicts every labelled structure as `mpprop predict` would (the published band-gap
model behind its metal classifier); split conformal prediction on the absolute errors
(mpprop.intervals) gives its interval quantiles; a copy of its bundle with them is logged and
registered as a new version of the same registered model (tag `calibrated_on`: the file's
name, SHA-256 and the number of materials used; `calibrated_from`: the version it copies),
and the alias it was chosen by moves to it. The weights are not changed.

The intervals hold for materials drawn like the labelled ones, which the model must not have
been trained on: the published checkpoints saw most of MP's 2017 materials, so a file of MP
records gives them optimistic intervals.
"""

from __future__ import annotations

import gzip
import json
import math
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pymatgen.core import Structure

from mpprop.bundle import BUNDLE_FILE, TASK_REGRESSION, BundleError, LoadedModel, with_calibration
from mpprop.config import Params
from mpprop.data import transform_target
from mpprop.device import training_device
from mpprop.inference import predict_structures
from mpprop.intervals import (
    METHOD_NORMALIZED,
    Calibration,
    calibrate,
    coverage_grid,
    min_calibration_size,
)
from mpprop.model import DOMAIN_NON_METALS
from mpprop.registry import (
    RegistryError,
    get_version_by_alias,
    load_version,
    registered_name,
    with_metal_gate,
)
from mpprop.settings import PropertySpec
from mpprop.snapshot import atomic_output, sha256_file
from mpprop.tracking import (
    KIND_CALIBRATE,
    TAG_KIND,
    TAG_PRESET,
    TAG_PROPERTY,
    download_bundle,
    download_gate_bundle,
    log_model,
    registry_lock,
    setup_mlflow,
)

# structures predicted per call (bounds the memory of one batch of graphs)
CHUNK = 1024
# version tags of the copied version that describe the old logged model or its intervals
_STALE_TAGS = ("source_run_id", "model_id", "interval_note", "calibrated_on",
               "calibrated_from", "interval_method", "interval_n", "interval_eps")


class CalibrateError(RuntimeError):
    """A calibration that cannot be done (no such model, too few labelled materials, ...)."""


@dataclass
class Labelled:
    """The usable records of a labelled file: ids, structures, targets in model units."""

    ids: list[str] = field(default_factory=list)
    structures: list[Structure] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


@dataclass
class CalibrationResult:
    name: str
    from_version: str
    version: str | None  # the new (or identical earlier) version; None: not registered
    status: str  # registered | already registered | not registered
    alias: str | None  # moved to `version`
    calibration: Calibration
    skipped: Counter
    output: Path | None

    def format(self) -> str:
        c = self.calibration
        found = {cov: c.quantile(cov) for cov in c.coverages}
        qs = ", ".join(f"{cov:g}: " + (f"±{q[1]:.4g}" if q else "too few materials")
                       for cov, q in found.items())
        unit = "x (std + eps)" if c.method == METHOD_NORMALIZED else "model units"
        skipped = (f"; skipped {sum(self.skipped.values())} ("
                   + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
                   if self.skipped else "")
        where = (f"{self.name} v{self.version} ({self.status}; from v{self.from_version}"
                 + (f", alias {self.alias}" if self.alias else "") + ")"
                 if self.version else f"{self.name} v{self.from_version} (not registered)")
        out = f"; bundle -> {self.output}" if self.output else ""
        return (f"{where}: {c.method} intervals on {c.n} materials ({c.source}){skipped}; "
                f"half-widths [{unit}] {qs}{out}")


def _dotted(record: dict[str, Any], path: str) -> Any:
    node: Any = record
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _label(value: Any, spec: PropertySpec) -> str | None:
    """Why a raw value is no usable label of `spec` (None: it is one)."""
    if value is None:
        return "missing label"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "non-numeric or non-finite label"
    if spec.transform == "log10" and value <= 0:
        return "label <= 0 for a log10 target"
    return None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with (gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)) as fh:
            yield from enumerate(fh, start=1)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise CalibrateError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def read_labelled(path: Path, spec: PropertySpec) -> Labelled:
    """The records of a JSON Lines file (.jsonl or .jsonl.gz) with a structure and a usable
    label of `spec`; every other record is counted by reason in `skipped`."""
    out = Labelled()
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            reason = _label(_dotted(record, spec.field), spec)
            if reason:
                out.skipped[reason] += 1
                continue
            structure = Structure.from_dict(record["structure"])
        except Exception:  # noqa: BLE001 - counted: one bad record does not stop the file
            out.skipped["unreadable record or structure"] += 1
            continue
        out.ids.append(str(record.get("material_id") or f"{path.name}:{lineno}"))
        out.structures.append(structure)
        out.targets.append(float(_dotted(record, spec.field)))
    return out


def _predict(params: Params, model: LoadedModel, data: Labelled
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets (model units), predictions and member spreads of the labelled structures the
    model can predict (as `mpprop predict`: same limits, the metal gate); the others are
    counted in data.skipped."""
    limits = params.structure_limits()
    bs = int(params.predict.batch_size)
    y, pred, std = [], [], []
    targets = transform_target(np.asarray(data.targets, np.float64), model.spec)
    for lo in range(0, len(data.structures), CHUNK):
        out = predict_structures([model], data.structures[lo:lo + CHUNK], batch_size=bs,
                                 limits=limits)
        for i, error in enumerate(out.errors):
            if error or not np.isfinite(out.values[0][i]):
                data.skipped["not predictable (limits, elements, graph)"] += 1
                continue
            y.append(targets[lo + i])
            pred.append(out.values[0][i])
            std.append(out.stds[0][i])
    return np.array(y), np.array(pred), np.array(std)


def _source_version(params: Params, client: MlflowClient, prop: str, alias: str | None,
                    version: int | None) -> tuple[ModelVersion, str | None]:
    """The version to calibrate and the alias it was chosen by (None: by number)."""
    name = registered_name(params, prop)
    if version is not None:
        try:
            return client.get_model_version(name, str(version)), None
        except MlflowException as exc:
            raise CalibrateError(f"{name} has no version {version}: "
                                 f"{exc.message.splitlines()[0]}") from exc
    alias = alias or params.mlflow.champion_alias
    mv = get_version_by_alias(client, name, alias)
    if mv is None:
        raise CalibrateError(f"{name} has no version with alias {alias!r}: `mpprop promote` or "
                             "`mpprop import-pretrained` first, or give --version")
    return mv, alias


def _load(params: Params, client: MlflowClient, mv: ModelVersion) -> LoadedModel:
    """The version's model on train.device, behind the metal classifier where `mpprop predict`
    puts it there (the intervals are of the predictions users get)."""
    device, _ = training_device(params.train.device, params.train.precision)
    try:
        model = load_version(mv.name, str(mv.version), f"{mv.name} v{mv.version}").to(device)
        if model.task != TASK_REGRESSION:
            raise CalibrateError(f"{model.label} is a classifier: a probability has no interval")
        if params.predict.xie_band_gap_metal_gate and model.domain == DOMAIN_NON_METALS:
            model = with_metal_gate(params, client, model)
    except RegistryError as exc:
        raise CalibrateError(str(exc)) from exc
    return model


def calibrate_model(params: Params, prop: str, labelled: Path, alias: str | None = None,
                    version: int | None = None, output: Path | None = None,
                    register: bool = True, move_alias: bool = True) -> CalibrationResult:
    """Calibrate a registered version of `prop`'s model on the labelled file; write the
    calibrated bundle to `output` (if given) and register it as a new version (if
    `register`), moving the alias it was chosen by to it (if `move_alias`)."""
    if output is not None and output.exists():
        raise CalibrateError(f"--output {output} exists; give another path")
    setup_mlflow(params)
    client = MlflowClient()
    mv, chosen_by = _source_version(params, client, prop, alias, version)
    model = _load(params, client, mv)
    data = read_labelled(labelled, model.spec)
    y, pred, std = _predict(params, model, data)
    coverage = float(params.predict.interval_coverage)
    need = min_calibration_size(coverage)
    if len(y) < need:
        raise CalibrateError(f"{labelled}: {len(y)} usable labelled materials of {prop}; "
                             f"coverage {coverage:g} needs at least {need}")
    source = f"{labelled.name} sha256 {sha256_file(labelled)} n={len(y)}"
    cal = calibrate(y, pred, std, coverage_grid(coverage), source=source)
    result = CalibrationResult(mv.name, str(mv.version), None, "not registered", None, cal,
                               data.skipped, output)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"models:/{mv.name}/{mv.version}"
        try:
            bundle = with_calibration(download_bundle(uri, Path(tmp) / "model"),
                                      Path(tmp) / "calibrated" / BUNDLE_FILE, cal)
            gate = download_gate_bundle(uri, Path(tmp) / "gate")
        except BundleError as exc:
            raise CalibrateError(f"{mv.name} v{mv.version}: {exc}") from exc
        if output is not None:
            with atomic_output(output) as part:
                Path(part).write_bytes(bundle.read_bytes())
        if register:
            # as promote: a second calibration at once waits, then finds this one's version
            with registry_lock(params):
                result.version, result.status = _register(client, mv, bundle, gate, cal, prop)
                if move_alias and chosen_by:
                    client.set_registered_model_alias(mv.name, chosen_by, result.version)
                    result.alias = chosen_by
    return result


def _register(client: MlflowClient, mv: ModelVersion, bundle: Path, gate: Path | None,
              cal: Calibration, prop: str) -> tuple[str, str]:
    """A new version of mv's model with the calibrated bundle (an earlier version with the
    same calibration of the same version is reused): (version, status)."""
    calibrated_from = f"{mv.name} v{mv.version}"
    same = {**cal.tags(), "calibrated_from": calibrated_from}
    for v in client.search_model_versions(f"name = '{mv.name}'"):
        if all(v.tags.get(k) == value for k, value in same.items()):
            return str(v.version), "already registered"
    tags = {k: v for k, v in mv.tags.items() if k not in _STALE_TAGS
            and not k.startswith("interval_q")}
    tags.update(cal.tags(), calibrated_from=calibrated_from)
    with mlflow.start_run(run_name=f"{prop}-calibrate-v{mv.version}") as run:
        mlflow.set_tags({TAG_PROPERTY: prop, TAG_KIND: KIND_CALIBRATE,
                         TAG_PRESET: mv.tags.get("preset", "")})
        mlflow.log_params({**cal.tags(), "calibrated_from": calibrated_from})
        model_uri = log_model(bundle, name=f"{prop}-calibrated", gate_path=gate)
    tags["source_run_id"] = run.info.run_id
    new = mlflow.register_model(model_uri, mv.name, tags=tags)
    if mv.description:
        client.update_model_version(mv.name, new.version, description=mv.description)
    return str(new.version), "registered"
