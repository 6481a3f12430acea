"""The one place where `params.yaml` is read.

Every other module receives typed settings from here; no module opens params.yaml itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A params file or an override that cannot be used."""


@dataclass(frozen=True)
class PropertySpec:
    """How one MP property becomes a learning target."""

    key: str
    field: str  # MP summary field, dotted for nested values (bulk_modulus.vrh)
    unit: str
    transform: str  # "none" | "log10"
    better: str | None  # "lower" | "higher" | None (no screening)


@dataclass(frozen=True)
class GraphSettings:
    """CGCNN crystal-graph settings (DESIGN.md §2); part of the graph-cache key."""

    radius: float = 8.0
    max_neighbors: int = 12
    first_search_radius: float = 5.0
    gaussian_dmin: float = 0.0
    gaussian_step: float = 0.2
    gaussian_width: float = 0.2

    def key(self) -> str:
        # first_search_radius changes speed, not the graph, so it is not part of the key
        payload = {k: v for k, v in asdict(self).items() if k != "first_search_radius"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Hyperparams:
    """One CGCNN training configuration (a preset, a tuned set, or a trial)."""

    n_conv: int
    n_h: int
    atom_fea_len: int
    h_fea_len: int
    lr: float
    lr_decay_epoch: int
    optimizer: str
    epochs: int
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("SGD", "RAdam", "Adam"):
            raise ConfigError(f"optimizer must be SGD, RAdam or Adam, not {self.optimizer!r}")
        for name in ("n_conv", "n_h", "atom_fea_len", "h_fea_len", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Params:
    """The parsed params file, with typed accessors for each concern."""

    raw: dict[str, Any]
    root: Path = field(default_factory=Path.cwd)

    # ---- paths are relative to the params file's folder
    def path(self, value: str | Path) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (self.root / p)

    @property
    def data(self) -> dict[str, Any]:
        return self.raw["data"]

    @property
    def properties(self) -> list[str]:
        return list(self.raw["properties"])

    def property_specs(self) -> dict[str, PropertySpec]:
        return {k: PropertySpec(key=k, **v) for k, v in self.raw["property_specs"].items()}

    def property_spec(self, key: str) -> PropertySpec:
        specs = self.property_specs()
        if key not in specs:
            raise ConfigError(f"unknown property {key!r}; known: {', '.join(specs)}")
        return specs[key]

    def graph_settings(self) -> GraphSettings:
        g = self.raw["graph"]
        return GraphSettings(**{k: v for k, v in g.items() if k != "cache_dir"})

    @property
    def split(self) -> dict[str, Any]:
        return self.raw["split"]

    @property
    def train(self) -> dict[str, Any]:
        return self.raw["train"]

    @property
    def tune(self) -> dict[str, Any]:
        return self.raw["tune"]

    @property
    def mlflow(self) -> dict[str, Any]:
        return self.raw["mlflow"]

    @property
    def predict(self) -> dict[str, Any]:
        return self.raw["predict"]

    def snapshot_dir(self) -> Path:
        return self.path(self.data["snapshot_dir"])

    def graph_cache_dir(self) -> Path:
        return self.path(self.raw["graph"]["cache_dir"])

    def split_dir(self) -> Path:
        return self.path(self.split["dir"])

    def models_dir(self) -> Path:
        return self.path(self.train["models_dir"])

    def best_params_path(self, prop: str) -> Path:
        return self.path(self.tune["best_params_dir"]) / f"{prop}.yaml"

    def tracking_uri(self) -> str:
        """MLflow tracking URI; relative sqlite paths are anchored at the params folder."""
        uri = self.mlflow["tracking_uri"]
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            db = self.path(uri[len(prefix):])
            db.parent.mkdir(parents=True, exist_ok=True)
            return prefix + str(db)
        return uri

    def optuna_storage(self, override: str | None = None) -> str:
        uri = override or self.tune["storage"]
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            return prefix + str(self.path(uri[len(prefix):]))
        return uri

    def hyperparams(self, preset: str, prop: str, **overrides: Any) -> Hyperparams:
        """Hyperparameters of a preset ("xie" or "tuned"), with command-line overrides."""
        train = self.train
        base: dict[str, Any] = {
            "batch_size": train["batch_size"],
            "momentum": train["momentum"],
            "weight_decay": train["weight_decay"],
        }
        if preset == "tuned":
            path = self.best_params_path(prop)
            if not path.exists():
                raise ConfigError(
                    f"no tuned hyperparameters for {prop}: {path} is missing; "
                    f"run `mpprop tune --property {prop}` first"
                )
            tuned = yaml.safe_load(path.read_text())
            base.update(tuned["hyperparams"])
        elif preset in self.raw["presets"]:
            base.update(self.raw["presets"][preset])
        else:
            raise ConfigError(
                f"unknown preset {preset!r}; known: tuned, {', '.join(self.raw['presets'])}"
            )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return Hyperparams(**base)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section of params")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"override {dotted!r}: unknown key {parts[-1]!r}")
    node[parts[-1]] = value


def load_params(path: str | Path = DEFAULT_PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """Read params.yaml; `overrides` are `section.key=value` strings (value parsed as YAML)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path.resolve()}")
    raw = yaml.safe_load(path.read_text())
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return Params(raw=raw, root=path.resolve().parent)
