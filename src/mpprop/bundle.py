"""The model bundle: everything needed to predict with one trained CGCNN (or an ensemble of
K), in one file that holds only tensors, numbers and strings, so it loads with
`torch.load(weights_only=True)` and our own code (never an unpickled object).

Keys: state_dict + normalizer {mean, std} (the first member), members (the others, each
{state_dict, normalizer}; absent for a single model), hyperparams, graph_settings, property
(the PropertySpec it was trained for), ood (the out-of-distribution reference, optional:
see mpprop.ood), extra (provenance: snapshot, graph cache key, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpprop.config import GraphSettings, Hyperparams, PropertySpec
from mpprop.model import CrystalGraphConvNet, Normalizer
from mpprop.ood import OODReference

BUNDLE_FILE = "model.pt"


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

    def __post_init__(self) -> None:
        if not self.members:
            self.members = [(self.model, self.normalizer)]

    @property
    def graph_settings(self) -> GraphSettings:
        return self.model.graph_settings

    @property
    def n_members(self) -> int:
        return len(self.members)


def save_bundle(
    path: str | Path,
    model: CrystalGraphConvNet,
    normalizer: Normalizer,
    spec: PropertySpec,
    extra: dict[str, Any] | None = None,
    members: list[tuple[CrystalGraphConvNet, Normalizer]] | None = None,
    ood: OODReference | None = None,
) -> Path:
    """Write weights, normalizer, hyperparameters, graph settings and target spec; with
    `members`, the other members of an ensemble; with `ood`, the OOD reference."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "state_dict": model.state_dict(),
        "normalizer": normalizer.state_dict(),
        "hyperparams": model.hyperparams.as_dict(),
        "graph_settings": asdict(model.graph_settings),
        "property": asdict(spec),
        "extra": extra or {},
    }
    if members:
        data["members"] = [{"state_dict": m.state_dict(), "normalizer": n.state_dict()}
                           for m, n in members]
    if ood is not None:
        data["ood"] = ood.state_dict()
    torch.save(data, path)
    return path


def _network(data: dict[str, Any], state: dict[str, Any]) -> CrystalGraphConvNet:
    model = CrystalGraphConvNet(
        Hyperparams(**data["hyperparams"]), GraphSettings(**data["graph_settings"])
    )
    model.load_state_dict(state)
    return model.eval()


def load_bundle(path: str | Path) -> tuple[CrystalGraphConvNet, Normalizer, PropertySpec, dict]:
    """Read a bundle safely: weights_only=True refuses any pickled object."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        model = _network(data, data["state_dict"])
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
            members.append((_network(data, m["state_dict"]), Normalizer(**m["normalizer"])))
        ood = OODReference.from_state(data["ood"]) if data.get("ood") else None
    except Exception as exc:  # noqa: BLE001 - one message for any malformed part
        raise BundleError(f"{path}: malformed ensemble member or OOD reference: {exc}") from exc
    return LoadedModel(label, model, normalizer, spec, data, members, ood)


def ensemble_mean_std(preds: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) std over members; std NaN for a single model."""
    stack = np.stack(preds)
    std = stack.std(axis=0) if len(preds) > 1 else np.full(stack.shape[1], np.nan)
    return stack.mean(axis=0), std
