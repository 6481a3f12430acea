"""The model bundle: everything needed to predict with one trained CGCNN (or an ensemble of
K), in one file that holds only tensors, numbers and strings, so it loads with
`torch.load(weights_only=True)` and our own code (never an unpickled object).

Keys: state_dict + normalizer {mean, std} (the first member), members (the others, each
{state_dict, normalizer}; absent for a single model), hyperparams, graph_settings, property
(the PropertySpec it was trained for), ood (the out-of-distribution reference, optional:
see mpprop.ood), extra (provenance: snapshot, graph cache key, ...).
Since format 2 (`format`): task (regression | classification: a CrystalGraphClassifier,
whose prediction is the probability of `classes[POSITIVE_CLASS]`), classes (class names in
index order, classification only) and domain (the materials it was trained on, '' where
that is the property's records). A bundle without `format` is format 1: a regression with
no stated domain; it loads as before.
Optional in any format: calibration (mpprop.intervals.Calibration.state_dict: conformal
quantiles for prediction intervals); a bundle without it loads and predicts without
intervals, and a reader that does not know the key ignores it (the format stays 2).
Optional too: zero_below (a threshold in target units, fitted on the validation split by
fit_zero_below): predictions below it are reported as exactly 0, the model's own metal /
non-metal decision for band gap, where half the materials have a gap of exactly 0.
Weights may be stored as float16 (with_half_weights: an ensemble of two fits the shipped
models' size limit); they load into float32 networks as any bundle does.
Format 3 adds int8 weights (with_int8_weights: a quarter of the size, for larger ensembles):
each matrix as int8 with one float32 scale per output row, under `int8_scales` beside its
state_dict (at the top level and in each member); the other tensors as float16. They load
into float32 networks (weight = int8 * scale); readers before format 3 refuse them instead of
loading the integers as weights. Bundles without int8 weights are still written as format 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpprop.intervals import Calibration
from mpprop.model import (
    METAL,
    POSITIVE_CLASS,
    CrystalGraphClassifier,
    CrystalGraphConvNet,
    Normalizer,
)
from mpprop.ood import OODReference
from mpprop.settings import GraphSettings, Hyperparams, PropertySpec

BUNDLE_FILE = "model.pt"
# the newest bundle format this code writes and reads (module docstring): format 3 only for
# bundles with int8 weights, so that every other bundle still loads in mpprop of format 2
BUNDLE_FORMAT = 3
PLAIN_FORMAT = 2
INT8_SCALES = "int8_scales"
TASK_REGRESSION = "regression"
TASK_CLASSIFICATION = "classification"


class BundleError(ValueError):
    """A file that is not a loadable model bundle."""


@dataclass
class LoadedModel:
    """A bundle in memory, ready for inference: one model or an ensemble of members."""

    label: str  # what the CSV's `model` column shows, e.g. mpprop-band_gap@champion v3
    model: CrystalGraphConvNet  # the first member (its embedding is the OOD space)
    normalizer: Normalizer
    spec: PropertySpec
    bundle: dict[str, Any]
    members: list[tuple[CrystalGraphConvNet, Normalizer]] = field(default_factory=list)
    ood: OODReference | None = None
    # a metal classifier run on the same graphs: the prediction is 0 where it says metal
    # (for a model whose domain is non-metals; see attach_metal_gate)
    gate: LoadedModel | None = None
    # conformal quantiles for prediction intervals (None: not calibrated)
    calibration: Calibration | None = None

    @property
    def zero_below(self) -> float | None:
        """Predictions below this are reported as 0 (floor_to_zero); None: no floor."""
        value = self.bundle.get("zero_below")
        return None if value is None else float(value)

    def __post_init__(self) -> None:
        if not self.members:
            self.members = [(self.model, self.normalizer)]

    @property
    def task(self) -> str:
        return str(self.bundle.get("task", TASK_REGRESSION))

    @property
    def classes(self) -> list[str]:
        return list(self.bundle.get("classes") or [])

    @property
    def domain(self) -> str:
        return str(self.bundle.get("domain") or "")

    @property
    def graph_settings(self) -> GraphSettings:
        return self.model.graph_settings

    @property
    def n_members(self) -> int:
        return len(self.members)

    def to(self, device: torch.device) -> LoadedModel:
        """Every member moved to `device` (in place); prediction runs where the model is."""
        for net, _ in self.members:  # the first member is self.model
            net.to(device)
        if self.gate is not None:
            self.gate.to(device)
        return self


def _cpu_state(model: CrystalGraphConvNet) -> dict[str, torch.Tensor]:
    # a model trained on a GPU is saved as CPU tensors: the bundle loads anywhere
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_bundle(
    path: str | Path,
    model: CrystalGraphConvNet,
    normalizer: Normalizer,
    spec: PropertySpec,
    extra: dict[str, Any] | None = None,
    members: list[tuple[CrystalGraphConvNet, Normalizer]] | None = None,
    ood: OODReference | None = None,
    domain: str = "",
    classes: list[str] | tuple[str, ...] | None = None,
    calibration: Calibration | None = None,
    zero_below: float | None = None,
) -> Path:
    """Write weights, normalizer, hyperparameters, graph settings and target spec; with
    `members`, the other members of an ensemble; with `ood`, the OOD reference; `domain`:
    the materials it was trained on where that is not the property's records; `classes`:
    the class names of a CrystalGraphClassifier (required for one); `calibration`: the
    conformal quantiles of its prediction intervals (regressions only); `zero_below`: the
    threshold under which predictions are reported as 0 (fit_zero_below; regressions only)."""
    classifier = isinstance(model, CrystalGraphClassifier)
    if classifier and not classes:
        raise ValueError("a classifier's bundle needs its class names")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "state_dict": _cpu_state(model),
        "normalizer": normalizer.state_dict(),
        "hyperparams": model.hyperparams.as_dict(),
        "graph_settings": asdict(model.graph_settings),
        "property": asdict(spec),
        "extra": extra or {},
        "format": PLAIN_FORMAT,
        "task": TASK_CLASSIFICATION if classifier else TASK_REGRESSION,
        "domain": domain,
    }
    if classifier:
        data["classes"] = list(classes)
    if members:
        data["members"] = [{"state_dict": _cpu_state(m), "normalizer": n.state_dict()}
                           for m, n in members]
    if ood is not None:
        data["ood"] = ood.state_dict()
    if calibration is not None:
        if classifier:
            raise ValueError("a classifier's bundle has no prediction intervals")
        data["calibration"] = calibration.state_dict()
    if zero_below is not None:
        if classifier:
            raise ValueError("a classifier's bundle has no zero floor")
        data["zero_below"] = float(zero_below)
    torch.save(data, path)
    return path


def with_calibration(src: str | Path, dst: str | Path, calibration: Calibration) -> Path:
    """A copy of the bundle `src` at `dst` with `calibration` (replacing any it had); every
    other key is kept as it is. `src` must load (load_bundle) and be a regression."""
    _, _, _, data = load_bundle(src)
    if data.get("task", TASK_REGRESSION) != TASK_REGRESSION:
        raise BundleError(f"{src} is a classifier: it has no prediction intervals")
    return _save_copy({**data, "calibration": calibration.state_dict()}, dst)


def _save_copy(data: dict[str, Any], dst: str | Path) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, dst)
    return dst


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # BatchNorm's batch counter stays an integer
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def with_half_weights(src: str | Path, dst: str | Path) -> Path:
    """A copy of the bundle `src` at `dst` with every member's floating-point weights stored
    as float16 (half the size); every other key is kept as it is. Its predictions differ
    from the original's by the rounding: measure them on the copy."""
    _, _, _, data = load_bundle(src)
    return _save_copy(_each_state(data, lambda state: {"state_dict": _half(state)}), dst)


def _each_state(data: dict[str, Any],
                convert: Callable[[dict[str, torch.Tensor]], dict[str, Any]]
                ) -> dict[str, Any]:
    """`data` with convert(state_dict)'s keys merged into the top level and into each
    ensemble member (every member's weights stored alike)."""
    data = {**data, **convert(data["state_dict"])}
    if data.get("members"):
        data["members"] = [{**m, **convert(m["state_dict"])} for m in data["members"]]
    return data


def _int8(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                    dict[str, torch.Tensor]]:
    """Matrices as int8 with a float32 scale per output row (the row's largest |weight| is
    127); vectors (biases, BatchNorm) as float16; integers (BatchNorm's counter) as they are."""
    stored, scales = {}, {}
    for key, value in state.items():
        value = value.float() if value.is_floating_point() else value
        if value.is_floating_point() and value.dim() >= 2:
            row_max = value.abs().amax(dim=tuple(range(1, value.dim())), keepdim=True)
            scale = row_max.clamp_min(torch.finfo(torch.float32).tiny) / 127
            stored[key] = torch.round(value / scale).clamp(-127, 127).to(torch.int8)
            scales[key] = scale.flatten()
        else:
            stored[key] = value.half() if value.is_floating_point() else value
    return stored, scales


def with_int8_weights(src: str | Path, dst: str | Path) -> Path:
    """A copy of the bundle `src` at `dst` with every member's weight matrices stored as int8
    (a quarter of the size; module docstring), as format 3; every other key is kept as it
    is. Quantize from float32 weights, not from a float16 copy. Its predictions differ from
    the original's by the rounding: measure them on the copy."""
    _, _, _, data = load_bundle(src)
    if data.get(INT8_SCALES):
        raise BundleError(f"{src} already holds int8 weights")
    data = _each_state(data, lambda state: dict(zip(("state_dict", INT8_SCALES), _int8(state),
                                                    strict=True)))
    return _save_copy({**data, "format": BUNDLE_FORMAT}, dst)


def stored_precision(path: str | Path) -> str:
    """How the bundle at `path` stores its weights: "int8" (with_int8_weights), "float16"
    (with_half_weights) or "float32"."""
    _, _, _, data = load_bundle(path)
    if data.get(INT8_SCALES):
        return "int8"
    if any(v.dtype == torch.float16 for v in data["state_dict"].values()):
        return "float16"
    return "float32"


def _dequantized(state: dict[str, torch.Tensor],
                 scales: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if not scales:
        return state
    unknown = set(scales) - set(state)
    if unknown:
        raise BundleError(f"int8 scales for weights it does not hold: {sorted(unknown)}")
    return {k: v.float() * scales[k].float().view(-1, *[1] * (v.dim() - 1)) if k in scales
            else v for k, v in state.items()}


def _network(data: dict[str, Any], state: dict[str, Any],
             int8_scales: dict[str, torch.Tensor] | None = None) -> CrystalGraphConvNet:
    version = data.get("format", 1)
    if not isinstance(version, int) or version > BUNDLE_FORMAT:
        raise BundleError(f"bundle format {version!r} is newer than this mpprop reads "
                          f"(up to {BUNDLE_FORMAT})")
    if int8_scales and version < BUNDLE_FORMAT:
        raise BundleError(f"int8 weights in a bundle of format {version} (they need "
                          f"{BUNDLE_FORMAT})")
    state = _dequantized(state, int8_scales)
    if any(v.dtype == torch.int8 for v in state.values()):
        raise BundleError("int8 weights without their scales")
    task = data.get("task", TASK_REGRESSION)
    if task not in (TASK_REGRESSION, TASK_CLASSIFICATION):
        raise BundleError(f"unknown task {task!r}")
    net = CrystalGraphClassifier if task == TASK_CLASSIFICATION else CrystalGraphConvNet
    model = net(Hyperparams(**data["hyperparams"]), GraphSettings(**data["graph_settings"]))
    model.load_state_dict(state)
    return model.eval()


def load_bundle(path: str | Path) -> tuple[CrystalGraphConvNet, Normalizer, PropertySpec, dict]:
    """Read a bundle safely: weights_only=True refuses any pickled object."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        model = _network(data, data["state_dict"], data.get(INT8_SCALES))
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable or unsafe file: one message
        raise BundleError(f"{path} is not a loadable mpprop model bundle: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    return model, Normalizer(**data["normalizer"]), PropertySpec(**data["property"]), data


def load_model(path: str | Path, label: str) -> LoadedModel:
    """A bundle with all its ensemble members and its OOD reference."""
    model, normalizer, spec, data = load_bundle(path)
    members = [(model, normalizer)]
    try:
        for m in data.get("members") or []:
            members.append((_network(data, m["state_dict"], m.get(INT8_SCALES)),
                            Normalizer(**m["normalizer"])))
        ood = OODReference.from_state(data["ood"]) if data.get("ood") else None
        cal = Calibration.from_state(data["calibration"]) if data.get("calibration") else None
    except Exception as exc:  # noqa: BLE001 - one message for any malformed part
        raise BundleError(f"{path}: malformed ensemble member, OOD reference or "
                          f"calibration: {exc}") from exc
    return LoadedModel(label, model, normalizer, spec, data, members, ood, calibration=cal)


def ensemble_mean_std(preds: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) std over members; std NaN for a single model."""
    stack = np.stack(preds)
    std = stack.std(axis=0) if len(preds) > 1 else np.full(stack.shape[1], np.nan)
    return stack.mean(axis=0), std


def attach_metal_gate(model: LoadedModel, gate: LoadedModel) -> LoadedModel:
    """Let `gate`, a metal classifier, set `model`'s prediction to 0 where it says metal.

    Both must read the same graphs: the classifier runs on the graphs built for `model`.
    """
    if gate.task != TASK_CLASSIFICATION or gate.classes[POSITIVE_CLASS:POSITIVE_CLASS + 1] != [METAL]:
        raise BundleError(f"{gate.label} is not a metal classifier (task {gate.task!r}, "
                          f"classes {gate.classes})")
    if gate.graph_settings != model.graph_settings:
        raise BundleError(f"{gate.label} reads other graphs than {model.label}: "
                          f"{gate.graph_settings} vs {model.graph_settings}")
    model.gate = gate
    return model


def fit_zero_below(y: np.ndarray, pred: np.ndarray, max_candidates: int = 200) -> float:
    """The threshold t that minimises the MAE of floor_to_zero(pred, t) on held-out materials
    (targets `y` >= 0 with exact zeros, as band gaps); 0.0 (no material floored beyond the
    negative predictions) when no threshold does better. Candidates: 0 and the quantiles of
    the predictions that lie between 0 and the largest target (at most `max_candidates`)."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    inside = pred[(pred > 0) & (pred < float(np.max(y)))]
    grid = np.unique(np.concatenate([[0.0], np.quantile(inside, np.linspace(0, 1, max_candidates))
                                     if len(inside) else []]))
    errors = [float(np.mean(np.abs(y - np.where(pred < t, 0.0, pred)))) for t in grid]
    return float(grid[int(np.argmin(errors))])


def floored(values: np.ndarray, threshold: float | None) -> np.ndarray:
    """Values below `threshold` set to 0; NaN stays NaN; None: unchanged."""
    if threshold is None:
        return values
    return np.where(np.isfinite(values) & (values < threshold), 0.0, values)


def floor_to_zero(values: np.ndarray, stds: np.ndarray, threshold: float | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """floored(values), and the stds of the floored values set to 0 too."""
    if threshold is None:
        return values, stds
    below = np.isfinite(values) & (values < threshold)
    return floored(values, threshold), np.where(below & np.isfinite(stds), 0.0, stds)


def gate_metals(values: np.ndarray, stds: np.ndarray, p_metal: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Values and stds with 0 where the classifier's more probable class is metal (its own
    decision, as its authors used it); elsewhere unchanged. NaN stays NaN."""
    metal = p_metal > 1.0 - p_metal
    values = np.where(metal & np.isfinite(values), 0.0, values)
    stds = np.where(metal & np.isfinite(stds), 0.0, stds)
    return values, stds
