"""params.yaml's schema: one pydantic model per section, `ParamsSchema` at the top.

Unknown keys are errors (a typo is never ignored) and values are not coerced ("3" is not a
number). To add a key, add a field to its section's model, with a default so that older
params files still load, its range in `Field(...)`, and rules that tie several keys together
in the model's `_check` validator (raise `Invalid(key, problem)` to name the key in the
message). `config.load_params` validates a file against it and words the errors.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WrapValidator,
    field_validator,
    model_serializer,
    model_validator,
)

from mpprop.settings import Hyperparams, Loss, LrSchedule, Optimizer

# graph settings a study may search (each value its own graph cache, built on demand)
GRAPH_SEARCHABLE = ("radius", "max_neighbors", "gaussian_step")
# fine-tuning settings a study may search when train.init_from is set
FINETUNE_SEARCHABLE = ("freeze_trunk_epochs", "trunk_lr_scale")
# percentile: the paper's PercentilePruner; hyperband: Optuna's HyperbandPruner (budget-aware)
Pruner = Literal["percentile", "hyperband"]

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
    # predictions under a threshold fitted on the validation split are reported as exactly 0
    # (bundle.fit_zero_below): for band gap, the model's own metal decision
    zero_floor: bool = False


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
SEARCH_TAGS = ("range", "choices")
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
