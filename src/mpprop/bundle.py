"""The model bundle: everything needed to predict with one trained CGCNN, in one file that
holds only tensors, numbers and strings, so it loads with `torch.load(weights_only=True)`
and our own code (never an unpickled object).

Keys: state_dict, normalizer {mean, std}, hyperparams, graph_settings, property (the
PropertySpec it was trained for), extra (provenance: snapshot, graph cache key, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mpprop.config import GraphSettings, Hyperparams, PropertySpec
from mpprop.model import CrystalGraphConvNet, Normalizer

BUNDLE_FILE = "model.pt"


class BundleError(ValueError):
    """A file that is not a loadable model bundle."""


@dataclass
class LoadedModel:
    """A bundle in memory, ready for inference."""

    label: str  # what the CSV's `model` column shows, e.g. mpprop-band_gap@champion v3
    model: CrystalGraphConvNet
    normalizer: Normalizer
    spec: PropertySpec
    bundle: dict[str, Any]

    @property
    def graph_settings(self) -> GraphSettings:
        return self.model.graph_settings


def save_bundle(
    path: str | Path,
    model: CrystalGraphConvNet,
    normalizer: Normalizer,
    spec: PropertySpec,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write weights, normalizer, hyperparameters, graph settings and target spec."""
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
    """Read a bundle safely: weights_only=True refuses any pickled object."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        model = CrystalGraphConvNet(
            Hyperparams(**data["hyperparams"]), GraphSettings(**data["graph_settings"])
        )
        model.load_state_dict(data["state_dict"])
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable or unsafe file: one message
        raise BundleError(f"{path} is not a loadable mpprop model bundle: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    model.eval()
    return model, Normalizer(**data["normalizer"]), PropertySpec(**data["property"]), data


def load_model(path: str | Path, label: str) -> LoadedModel:
    model, normalizer, spec, data = load_bundle(path)
    return LoadedModel(label, model, normalizer, spec, data)
