"""The typed settings the core reads: property specs, graph settings, hyperparameters, loss
settings, the bounds on one structure's work.

Plain dataclasses (standard library only), so the core (model, batches, the batch loop) runs
where only torch and numpy are installed; `mpprop.config` validates params.yaml and builds them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

Optimizer = Literal["SGD", "RAdam", "Adam", "AdamW"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
# training loss on standardised targets; "huber" with delta train.huber_delta
Loss = Literal["mse", "l1", "huber"]
LOSSES: tuple[str, ...] = get_args(Loss)
# step: LR x 0.1 once at lr_decay_epoch (the paper); cosine: cosine decay to 0 over the epochs;
# warmup_cosine: linear warm-up over warmup_epochs, then cosine decay to 0
LrSchedule = Literal["step", "cosine", "warmup_cosine"]
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)


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
    zero_floor: bool = False  # fit a zero floor on validation (bundle.fit_zero_below)


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
    loss: str = "mse"
    lr_schedule: str = "step"
    # weight of the pairwise ranking term (losses.ranking_loss) added to the regression loss
    rank_weight: float = 0.0
    # the modern recipe (0 = off, the paper's protocol): epochs of linear LR warm-up (with
    # lr_schedule warmup_cosine), decay of an exponential moving average of the weights
    # (validated, kept and saved instead of the raw weights), epochs without a better
    # validation MAE before training stops
    warmup_epochs: int = 0
    ema_decay: float = 0.0
    early_stop_patience: int = 0
    # per-element reference offsets: a composition-weighted sum of per-element values fitted
    # by least squares on the train split, with the network learning the rest (as machine-
    # learned potentials do for total energies)
    element_offsets: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                              f"not {self.optimizer!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                              f"not {self.lr_schedule!r}")
        if self.rank_weight < 0 or self.weight_decay < 0:
            raise ConfigError("rank_weight and weight_decay must be >= 0")
        for name in ("n_conv", "n_h", "atom_fea_len", "h_fea_len", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_epochs < 0 or self.early_stop_patience < 0:
            raise ConfigError("warmup_epochs and early_stop_patience must be >= 0")
        if self.lr_schedule == "warmup_cosine" and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs "
                              f"({self.epochs})")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LossSettings:
    """The `train:` keys a loss needs beyond Hyperparams (see params.yaml; built by
    `config.Params.loss_settings`)."""

    huber_delta: float
    rank_top_percent: float
    rank_margin: float


@dataclass(frozen=True)
class StructureLimits:
    """Bounds on the work one structure may cost, checked before the neighbour search
    (predict.max_atoms, predict.min_volume_per_atom, predict.min_distance; 0 = no bound;
    built by `config.Params.structure_limits`; inference checks them).

    The search visits every periodic image within the graph radius: a cell far denser than
    any crystal (a 0.02 Å cube: 8e-6 Å^3 per atom) or with a tiny lattice vector has
    millions of them (18 GB, 29 s for one atom), so such cells are refused, not searched.
    Real crystals have > ~5 Å^3 per atom and bonds > 0.7 Å (H2); the warning for atoms
    closer than inference.OVERLAP_DISTANCE stays a warning above min_distance. The defaults are those
    of params.yaml; the served model (tracking.CGCNNPyfunc) uses them too.
    """

    max_atoms: int = 1000
    min_volume_per_atom: float = 1.0  # Å^3
    min_distance: float = 0.3  # Å, periodic images included
