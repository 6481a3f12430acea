"""The one place where `params.yaml` is read.

Every other module receives typed settings from here; no module opens params.yaml itself.

`load_params` validates the whole file (after the `-S section.key=value` overrides) against
`params_schema.ParamsSchema` (one pydantic model per section; how to add a key is said
there) and words each problem in params terms; `Params` holds the validated schema and
builds the core's typed settings from it.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mpprop.params_schema import (
    SEARCH_TAGS,
    DataSection,
    EvaluateSection,
    GraphSection,
    Invalid,
    MlflowSection,
    ParamsSchema,
    PredictSection,
    PresetEntry,
    PretrainSection,
    PromoteSection,
    ReportSection,
    SplitSection,
    TrainSection,
    TuneSection,
)
from mpprop.settings import (
    ConfigError,
    GraphSettings,
    LossSettings,
    PropertySpec,
    StructureLimits,
)

DEFAULT_PARAMS_FILE = "params.yaml"
# a copy of the repository's params.yaml shipped in the package (tests keep them equal): the
# settings of `mpprop predict` / `import-pretrained` in a folder without a params.yaml
BUILTIN_PARAMS = resources.files("mpprop").joinpath("defaults.yaml")
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# keys of Hyperparams that come from `train:` unless a preset, tuned set or trial gives them
TRAIN_DEFAULTS = ("batch_size", "momentum", "weight_decay", "loss", "lr_schedule", "rank_weight")


@dataclass
class Params:
    """The validated params file: `schema` (ParamsSchema, checked once at load) and its
    folder. Each section accessor returns that section's model (read its attributes:
    `params.train.seed`); `as_dict` is the file as plain data (show-params)."""

    schema: ParamsSchema
    root: Path = field(default_factory=Path.cwd)
    builtin: bool = False  # the packaged defaults (no params.yaml in this folder)

    # ---- paths are relative to the params file's folder
    def path(self, value: str | Path) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (self.root / p)

    def as_dict(self) -> dict[str, Any]:
        """The validated file with its defaults filled in, as plain YAML data."""
        return self.schema.model_dump()

    @property
    def data(self) -> DataSection:
        return self.schema.data

    @property
    def properties(self) -> list[str]:
        return list(self.schema.properties)

    def property_specs(self) -> dict[str, PropertySpec]:
        return {k: PropertySpec(key=k, **v.model_dump()) for k, v in self.schema.property_specs.items()}

    def property_spec(self, key: str) -> PropertySpec:
        specs = self.property_specs()
        if key not in specs:
            raise ConfigError(f"unknown property {key!r}; known: {', '.join(specs)}")
        return specs[key]

    @property
    def graph(self) -> GraphSection:
        return self.schema.graph

    def graph_settings(self) -> GraphSettings:
        return GraphSettings(**self.graph.model_dump(exclude={"cache_dir"}))

    @property
    def split(self) -> SplitSection:
        return self.schema.split

    @property
    def presets(self) -> dict[str, PresetEntry]:
        return self.schema.presets

    @property
    def train(self) -> TrainSection:
        return self.schema.train

    @property
    def tune(self) -> TuneSection:
        return self.schema.tune

    @property
    def mlflow(self) -> MlflowSection:
        return self.schema.mlflow

    @property
    def predict(self) -> PredictSection:
        return self.schema.predict

    @property
    def evaluate(self) -> EvaluateSection:
        return self.schema.evaluate

    @property
    def report(self) -> ReportSection:
        return self.schema.report

    @property
    def promote(self) -> PromoteSection:
        return self.schema.promote

    @property
    def pretrain(self) -> PretrainSection:
        return self.schema.pretrain

    def trunk_dir(self) -> Path:
        return self.path(self.pretrain.dir)

    def snapshot_dir(self) -> Path:
        return self.path(self.data.snapshot_dir)

    def graph_cache_dir(self) -> Path:
        return self.path(self.graph.cache_dir)

    def split_dir(self) -> Path:
        return self.path(self.split.dir)

    def models_dir(self) -> Path:
        return self.path(self.train.models_dir)

    def best_params_path(self, prop: str) -> Path:
        return self.path(self.tune.best_params_dir) / f"{prop}.yaml"

    def tracking_uri(self) -> str:
        """MLflow tracking URI: mlflow.tracking_uri (relative sqlite paths anchored at the params
        folder); with the built-in defaults (no params.yaml), MLFLOW_TRACKING_URI where set.
        Not otherwise: mlflow.set_tracking_uri sets that variable for the whole process.
        Creates nothing: the store's folder is made where the store is opened (tracking)."""
        uri = (self.builtin and os.environ.get(TRACKING_URI_ENV)) or self.mlflow.tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            return prefix + str(self.path(uri[len(prefix):]))
        return uri

    def optuna_storage(self, override: str | None = None) -> str:
        uri = override or self.tune.storage
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            return prefix + str(self.path(uri[len(prefix):]))
        return uri

    def train_defaults(self) -> dict[str, Any]:
        """The Hyperparams keys that `train:` gives every run (TRAIN_DEFAULTS)."""
        return {k: getattr(self.train, k) for k in TRAIN_DEFAULTS}

    def structure_limits(self) -> StructureLimits:
        """The bounds on one structure's work at prediction (`predict:`)."""
        p = self.predict
        return StructureLimits(max_atoms=int(p.max_atoms),
                               min_volume_per_atom=float(p.min_volume_per_atom),
                               min_distance=float(p.min_distance))

    def loss_settings(self) -> LossSettings:
        """The `train:` keys a loss needs beyond Hyperparams."""
        t = self.train
        return LossSettings(huber_delta=float(t.huber_delta),
                            rank_top_percent=float(t.rank_top_percent),
                            rank_margin=float(t.rank_margin))


# =========================================================================== loading


def _show(value: Any) -> str:
    """A value as the YAML writer wrote it, short."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value) if isinstance(value, str | int | float) else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _bound(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


_TYPE_NAMES = {
    "int_type": "an integer", "float_type": "a number", "string_type": "a string",
    "bool_type": "true or false", "list_type": "a list", "dict_type": "a mapping",
    "model_type": "a mapping", "none_required": "null",
}
_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"),
           "less_than": ("<", "lt"), "less_than_equal": ("<=", "le")}


def _problem(err: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    """(location, problem) of one pydantic error, in params terms."""
    loc = tuple(part for part in err["loc"] if part not in SEARCH_TAGS)
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "value_error" and isinstance(ctx.get("error"), Invalid):
        return loc + ctx["error"].key, ctx["error"].problem
    if kind == "extra_forbidden":
        return loc, "unknown key"
    if kind == "missing":
        return loc, "missing (required)"
    if kind in _BOUNDS:
        op, name = _BOUNDS[kind]
        return loc, f"must be {op} {_bound(ctx[name])} (got {_show(got)})"
    if kind in _TYPE_NAMES:
        return loc, f"must be {_TYPE_NAMES[kind]} (got {_show(got)})"
    if kind == "literal_error":
        return loc, f"must be {ctx['expected'].replace('None', 'null')} (got {_show(got)})"
    if kind == "too_short" and ctx.get("min_length") == 1:
        return loc, "must not be empty"
    text = str(err["msg"]).removeprefix("Value error, ").replace("Input should be", "must be")
    return loc, f"{text} (got {_show(got)})"


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(exc: ValidationError, source: str, overrides: dict[str, str]) -> str:
    """One line: `<source>: <dotted.key>: <problem>; ...` (at most 8 problems shown).

    Keys missing from one section are listed together; a problem that an override caused
    says so, once per override."""
    problems: list[tuple[str, str]] = []
    missing: dict[str, list[str]] = {}
    for err in exc.errors():
        loc, problem = _problem(err)
        if err["type"] == "missing" and len(loc) > 1:
            parent = _dotted(loc[:-1])
            if parent in missing:
                missing[parent].append(str(loc[-1]))
                continue
            missing[parent] = [str(loc[-1])]
        if (_dotted(loc), problem) not in problems:
            problems.append((_dotted(loc) or "(top level)", problem))
    blamed: set[str] = set()
    lines = []
    for key, problem in problems:
        parent = key.rpartition(".")[0]
        if problem == "missing (required)" and len(missing.get(parent, ())) > 1:
            key, problem = parent, f"missing {', '.join(missing[parent])} (required)"
        for dotted, item in overrides.items():
            related = dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + ".")
            if related and item not in blamed:
                blamed.add(item)
                problem += f" (set by -S {item})"
        lines.append(f"{key}: {problem}")
    more = f"; and {len(lines) - 8} more" if len(lines) > 8 else ""
    return f"{source}: {'; '.join(lines[:8])}{more}"


def validate_params(raw: Any, source: str = DEFAULT_PARAMS_FILE,
                    overrides: dict[str, str] | None = None) -> ParamsSchema:
    """`raw` checked against ParamsSchema (the defaults filled in), or a ConfigError naming
    each bad key (`source` and `overrides` only word the message)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping of sections (got {_show(raw)})")
    try:
        model = ParamsSchema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, overrides or {})) from None
    return model


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `section.key` (missing keys too: whether the key exists is the schema's call)."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override {dotted!r}: give section.key=value")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section of params")
    node[parts[-1]] = value


def load_params(path: str | Path = DEFAULT_PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """Read params.yaml; `overrides` are `section.key=value` strings (value parsed as YAML).

    The result is validated against ParamsSchema, once: `Params.schema` holds the typed
    sections (defaults filled in). Every problem is a ConfigError with a one-line message."""
    path = Path(path)
    text, root = None, path.resolve().parent
    if not path.exists():
        if str(path) != DEFAULT_PARAMS_FILE:
            raise ConfigError(f"params file not found: {path.resolve()}")
        # outside a project folder: the shipped params.yaml, paths relative to the cwd
        text = BUILTIN_PARAMS.read_text()
    try:
        raw = yaml.safe_load(text if text is not None else path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    raw = copy.deepcopy(raw)
    given: dict[str, str] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        if not isinstance(raw, dict):
            break  # validate_params reports it
        _set_dotted(raw, key.strip(), parsed)
        given[key.strip()] = item
    return Params(schema=validate_params(raw, str(path), given), root=root,
                  builtin=text is not None)
