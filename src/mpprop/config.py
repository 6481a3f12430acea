"""The one place where `params.yaml` is read.

Every other module receives typed settings from here; no module opens params.yaml itself.

`load_params` validates the whole file (after the `-S section.key=value` overrides) against
the schema below: one pydantic model per section, `ParamsSchema` at the top. Unknown keys are
errors (a typo is never ignored) and values are not coerced ("3" is not a number). To add a
key, add a field to its section's model, with a default so that older params files still
load, its range in `Field(...)`, and rules that tie several keys together in the model's
`_check` validator (raise `Invalid(key, problem)` to name the key in the message).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WrapValidator,
    field_validator,
    model_serializer,
    model_validator,
)

from mpprop.settings import (
    ConfigError,
    GraphSettings,
    Hyperparams,
    Loss,
    LossSettings,
    LrSchedule,
    Optimizer,
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
# graph settings a study may search (each value its own graph cache, built on demand)
GRAPH_SEARCHABLE = ("radius", "max_neighbors", "gaussian_step")
# fine-tuning settings a study may search when train.init_from is set
FINETUNE_SEARCHABLE = ("freeze_trunk_epochs", "trunk_lr_scale")
# percentile: the paper's PercentilePruner; hyperband: Optuna's HyperbandPruner (budget-aware)
Pruner = Literal["percentile", "hyperband"]


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


# =========================================================================== schema
# One model per section of params.yaml, in the file's order; `ParamsSchema` is the whole file.


class Invalid(ValueError):
    """A rule broken by one key, raised in a validator: `key` (a name or a tuple of names and
    list indices, relative to the model or field being validated) is added to the error's
    location, so that the message names the dotted key."""

    def __init__(self, key: str | int | tuple[str | int, ...], problem: str) -> None:
        super().__init__(problem)
        self.key = key if isinstance(key, tuple) else (key,)
        self.problem = problem


class Section(BaseModel):
    """Base of every params model: unknown keys are errors and values keep their YAML type
    (strict: "3" is not a number, 3.0 is not an integer; an integer is a valid float).
    A value a command sets after loading (`mpprop fetch --source`) is checked the same way."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


def _keep_int(value: Any, handler: Any) -> Any:
    checked = handler(value)
    return value if type(value) is int else checked


# a number where integers stay integers (values shown in reports and file names: 3, not 3.0)
Number = Annotated[float, WrapValidator(_keep_int)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Name = Annotated[str, Field(min_length=1)]
Percent = Annotated[Number, Field(gt=0, le=100)]


# ---------------------------------------------------------------- data
class MpApiSection(Section):
    """`data.mp_api`: the Materials Project API source."""

    criteria: dict[str, Any] = {}  # passed to materials.summary.search
    energy_thermo_type: Name = "GGA_GGA+U"
    chunk_size: PositiveInt = 1000


class DataSection(Section):
    """`data`: where the snapshot's records come from and where the snapshot is written."""

    source: Literal["file", "mp-api"]
    path: str
    cgcnn_property: str | None = None
    max_records: PositiveInt | None = None
    require_property: str | None = None
    subsample_seed: NonNegativeInt = 0
    mp_api: MpApiSection = MpApiSection()
    snapshot_dir: Name
    vintage: str | None = None  # the data's own date, free text


# ---------------------------------------------------------------- properties, property_specs
class PropertySpecEntry(Section):
    """`property_specs.<property>`: how an MP field becomes a learning target."""

    field: Name
    unit: str
    transform: Literal["none", "log10"]
    better: Literal["lower", "higher", None]


# ---------------------------------------------------------------- graph
class GraphSection(Section):
    """`graph`: the crystal-graph settings (GraphSettings) and the cache folder."""

    radius: float = Field(gt=0)
    max_neighbors: PositiveInt
    first_search_radius: float = Field(gt=0)
    gaussian_dmin: float = Field(ge=0)
    gaussian_step: float = Field(gt=0)
    gaussian_width: float = Field(gt=0)
    cache_dir: Name

    @model_validator(mode="after")
    def _check(self) -> GraphSection:
        if self.first_search_radius > self.radius:
            raise Invalid("first_search_radius",
                          f"must be <= graph.radius ({self.radius:g}) (got {self.first_search_radius:g})")
        if self.gaussian_dmin >= self.radius:
            raise Invalid("gaussian_dmin",
                          f"must be < graph.radius ({self.radius:g}) (got {self.gaussian_dmin:g})")
        return self


# ---------------------------------------------------------------- split
class SplitSection(Section):
    """`split`: the fixed test split and the train/val fraction."""

    test_fraction: float = Field(gt=0, lt=1)
    val_fraction: float = Field(gt=0, lt=1)
    seed: NonNegativeInt
    dir: Name


# ---------------------------------------------------------------- presets
class PresetEntry(Section):
    """`presets.<name>`: a full set of CGCNN hyperparameters (the fields of Hyperparams that
    train.* does not give)."""

    n_conv: PositiveInt
    n_h: PositiveInt
    atom_fea_len: PositiveInt
    h_fea_len: PositiveInt
    lr: float = Field(gt=0)
    lr_decay_epoch: PositiveInt
    optimizer: Optimizer
    epochs: PositiveInt
    # optional: default from train.*
    loss: Loss | None = None
    lr_schedule: LrSchedule | None = None
    rank_weight: float | None = Field(default=None, ge=0)
    weight_decay: float | None = Field(default=None, ge=0)
    batch_size: PositiveInt | None = None
    ensemble: PositiveInt | None = None  # members trained (default train.ensemble)
    # the modern recipe's extras (Hyperparams documents them; absent = off)
    warmup_epochs: NonNegativeInt | None = None
    ema_decay: float | None = Field(default=None, ge=0, lt=1)
    early_stop_patience: NonNegativeInt | None = None
    element_offsets: bool | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # a preset without `loss` takes train.loss: leave it out of the dump
        return {k: v for k, v in handler(self).items() if v is not None}


# ---------------------------------------------------------------- train
class TrainSection(Section):
    """`train`: settings shared by every training run, and the screening metric."""

    batch_size: PositiveInt
    momentum: float = Field(ge=0, le=1)
    weight_decay: float = Field(ge=0)
    seed: NonNegativeInt
    torch_threads: PositiveInt | None = None  # null: torch's default
    models_dir: Name
    screening_top_percent: Percent
    loss: Loss = "mse"
    huber_delta: float = Field(default=1.0, gt=0)  # in standard deviations of the target
    lr_schedule: LrSchedule = "step"
    # pairwise ranking term (screening-aware training): weight (0 = off), the top share of
    # the train targets whose pairs with the rest it orders, and the margin (std units)
    rank_weight: float = Field(default=0.0, ge=0)
    rank_top_percent: Percent = 10
    rank_margin: float = Field(default=0.5, ge=0)
    # K models per `mpprop train`: an ensemble (one bundle, mean and std) or, with
    # ensemble_keep: best, the member with the best validation MAE alone (K seeds)
    ensemble: PositiveInt = 1
    ensemble_keep: Literal["all", "best"] = "all"
    ensemble_bootstrap: bool = False  # members on bootstrap resamples of the train split
    # where train, tune, evaluate and predict run (mpprop.device): auto = CUDA when visible
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # bf16 = autocast of the forward pass (weights and loss in float32); off by default
    precision: Literal["fp32", "bf16"] = "fp32"
    # fine-tuning (registry.resolve_parent reads the reference) and per-epoch checkpoints
    init_from: str | None = None
    freeze_trunk_epochs: NonNegativeInt = 0
    trunk_lr_scale: float = Field(default=1.0, gt=0)
    checkpoint_every: NonNegativeInt = 1


# ---------------------------------------------------------------- tune
# the Hyperparams fields a study may search (epochs is tune.epochs)
SEARCHABLE = (tuple(f.name for f in fields(Hyperparams) if f.name != "epochs")
              + GRAPH_SEARCHABLE + FINETUNE_SEARCHABLE)


class SearchRange(Section):
    """`tune.search_space.<name>: {low, high[, step, log]}` (ints or floats)."""

    low: Number
    high: Number
    step: Number | None = Field(default=None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> SearchRange:
        if self.low > self.high:
            raise Invalid("low", f"must be <= high ({self.high:g}) (got {self.low:g})")
        if self.log and self.low <= 0:
            raise Invalid("low", f"must be > 0 with log: true (got {self.low:g})")
        if self.log and self.step is not None:
            raise Invalid("step", "cannot be combined with log: true")
        return self

    @model_serializer(mode="wrap")
    def _only_given(self, handler: Any) -> dict[str, Any]:
        # dumped as written: a default step or log would change how Optuna samples
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


def _search_kind(value: Any) -> str | None:
    if isinstance(value, dict | SearchRange):
        return "range"
    return "choices" if isinstance(value, list) else None


# a range or a non-empty list of choices (the tags are left out of error messages)
_SEARCH_TAGS = ("range", "choices")
SearchEntry = Annotated[
    Annotated[SearchRange, Tag("range")] | Annotated[list[Any], Field(min_length=1), Tag("choices")],
    Discriminator(_search_kind, custom_error_type="search_entry",
                  custom_error_message="must be {low, high[, step, log]} or a list of choices"),
]


class TuneSection(Section):
    """`tune`: the Optuna study (trials, pruner, storage, heartbeat) and its search space."""

    n_trials: PositiveInt
    epochs: PositiveInt
    sampler_seed: NonNegativeInt
    # tpe: the paper's; gp: Optuna's Gaussian-process sampler (for studies of < ~100 trials)
    sampler: Literal["tpe", "gp"] = "tpe"
    pruner_percentile: Number = Field(ge=0, le=100)
    pruner_warmup_steps: NonNegativeInt
    # completed trials before the percentile pruner prunes at all (Optuna's default 5)
    pruner_startup_trials: NonNegativeInt = 5
    storage: Name  # "{property}" is replaced by the property key
    progress_every: NonNegativeInt = 0  # epochs between progress lines in a trial; 0 = none
    heartbeat_interval: PositiveInt  # s
    grace_period: PositiveInt  # s, > heartbeat_interval
    failed_trial_max_retry: NonNegativeInt
    best_params_dir: Name
    final_epochs: PositiveInt | None = None  # null: presets.xie.epochs
    # mae: the paper's (min val MAE); screening: max the smoothed val top-N% precision (ties
    # by MAE); pareto: both (multi-objective, no pruning)
    objective: Literal["mae", "screening", "pareto"] = "mae"
    screening_percents: list[Percent] = [2, 3, 4, 5]
    screening_tie_weight: float = Field(default=0.01, ge=0)
    pareto_mae_tolerance: float = Field(default=0.05, ge=0)
    pruner: Pruner = "percentile"
    hyperband_reduction_factor: PositiveInt = 3  # keep 1/factor of the trials per rung
    # opt-in: keys merged over search_space when extend_search_space is true
    extend_search_space: bool = False
    extended_search_space: dict[str, SearchEntry] = {}
    # baseline points for a new study; their keys are checked by tuning.enqueue_baselines
    enqueue: list[dict[str, Any]] = []
    search_space: dict[str, SearchEntry]

    @field_validator("search_space", "extended_search_space")
    @classmethod
    def _searchable(cls, space: dict[str, Any]) -> dict[str, Any]:
        for name in space:
            if name not in SEARCHABLE:
                raise Invalid(name, f"not a searchable hyperparameter (one of {', '.join(SEARCHABLE)})")
        return space

    @model_validator(mode="after")
    def _check(self) -> TuneSection:
        if self.grace_period <= self.heartbeat_interval:
            raise Invalid("grace_period", f"must be > tune.heartbeat_interval ({self.heartbeat_interval}) "
                                          f"(got {self.grace_period})")
        return self


# ---------------------------------------------------------------- mlflow, predict
class MlflowSection(Section):
    """`mlflow`: tracking server, experiment and model-registry names."""

    tracking_uri: Name
    artifact_location: Name
    experiment: Name
    registry_prefix: str
    champion_alias: Name
    pretrained_alias: Name
    # mpprop's own shipped models (mpprop.shipped), registered by import-pretrained
    shipped_alias: Name = "mpprop-2026"
    system_metrics: bool = False  # CPU, memory (and GPU where present) of training runs


class PredictSection(Section):
    """`predict`: inference settings."""

    batch_size: PositiveInt
    # out-of-distribution score (mpprop.ood), stored with each model at training time
    ood_k: PositiveInt = 5  # nearest training materials averaged
    ood_quantile: float = Field(default=0.99, gt=0, le=1)  # of validation scores: the flag
    ood_max_reference: PositiveInt = 5000  # training embeddings kept in the bundle
    # the published band-gap model (xie-2018) saw non-metals only: 0 where the published
    # metal classifier says metal (the CSV's model column names the classifier); false = off
    xie_band_gap_metal_gate: bool = True
    # bounds on one structure's work, checked before the neighbour search
    # (inference.StructureLimits, whose defaults these are; 0 = no bound): rows outside
    # them get an error naming the number, the batch goes on
    max_atoms: NonNegativeInt = 1000
    min_volume_per_atom: float = Field(default=1.0, ge=0)  # Å^3; crystals have > ~5
    min_distance: float = Field(default=0.3, ge=0)  # Å, periodic images included
    # calibrated prediction intervals (mpprop.intervals): the share of materials like the
    # calibration ones whose truth the interval holds
    interval_coverage: float = Field(default=0.9, gt=0, lt=1)


# ---------------------------------------------------------------- evaluate, report
class EvaluateSection(Section):
    """`evaluate`: the compared presets, the screening curve and the bootstrap intervals."""

    presets: list[Name] = Field(min_length=1)
    curve_min_percent: Percent
    curve_max_percent: Percent
    curve_step_percent: Number = Field(gt=0)
    metrics_dir: Name
    plots_dir: Name
    bootstrap_resamples: PositiveInt = 1000
    bootstrap_seed: NonNegativeInt = 0
    # `mpprop evaluate --extrapolation`: the top share of a property held out of training
    extrapolation_top_percent: Percent = 3

    @model_validator(mode="after")
    def _check(self) -> EvaluateSection:
        if self.curve_min_percent > self.curve_max_percent:
            raise Invalid("curve_min_percent", f"must be <= evaluate.curve_max_percent "
                          f"({self.curve_max_percent:g}) (got {self.curve_min_percent:g})")
        return self


class ReportSection(Section):
    """`report`: where Table 2 is written."""

    dir: Name


class PretrainSection(Section):
    """`pretrain`: the trunk (one CGCNN on the largest labelled set, away from every
    property's test set) that the tuned models fine-tune when enabled."""

    enabled: bool = False
    property: Name = "formation_energy_per_atom"
    preset: Name = "modern"
    epochs: PositiveInt | None = None  # null: the preset's
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    dir: Name = "models/trunk"


# ---------------------------------------------------------------- the whole file
class PromoteSection(Section):
    """`promote`: how the champion of each property is chosen among the candidate runs."""

    # val_mae: lowest validation MAE (the paper's); val_screening: highest validation
    # screening signal (tune.screening_percents), for screening-first use
    select_by: Literal["val_mae", "val_screening"] = "val_mae"


class ParamsSchema(Section):
    """params.yaml: every section, and the rules that tie sections together."""

    data: DataSection
    properties: list[Name] = Field(min_length=1)
    property_specs: dict[str, PropertySpecEntry]
    graph: GraphSection
    split: SplitSection
    presets: dict[str, PresetEntry]
    train: TrainSection
    tune: TuneSection
    mlflow: MlflowSection
    predict: PredictSection
    evaluate: EvaluateSection
    report: ReportSection
    promote: PromoteSection = PromoteSection()
    pretrain: PretrainSection = PretrainSection()

    @model_validator(mode="after")
    def _check(self) -> ParamsSchema:
        for i, prop in enumerate(self.properties):
            if prop in self.properties[:i]:
                raise Invalid(("properties", i), f"{prop!r} is listed twice")
            if prop not in self.property_specs:
                raise Invalid(("properties", i), f"{prop!r} has no entry in property_specs")
        if "tuned" in self.presets:
            raise Invalid(("presets", "tuned"), "is reserved (read from tune.best_params_dir)")
        for i, preset in enumerate(self.evaluate.presets):
            if preset != "tuned" and preset not in self.presets:
                raise Invalid(("evaluate", "presets", i),
                              f"{preset!r} is not a preset (known: tuned, {', '.join(self.presets)})")
        req = self.data.require_property
        if req is not None and req not in self.properties:
            raise Invalid(("data", "require_property"), f"must be null or one of the properties "
                                                        f"(got {req!r})")
        return self


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
    loc = tuple(part for part in err["loc"] if part not in _SEARCH_TAGS)
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
