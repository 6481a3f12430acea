"""Training and evaluation of one CGCNN: the one batch loop serves train, val, test and predict.

Imports only torch, numpy and the core's own numpy/torch modules (no pymatgen, no MLflow), so
it runs on a saved graph cache on a machine with nothing else. It runs where the model is:
`fit` places a new model on its `device`, and `run_batches` moves each batch there once.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from mpprop.batches import collect_in_row_order, iterate_batches
from mpprop.device import autocast, pin_host_memory
from mpprop.graph_cache import GraphCache
from mpprop.losses import LossSettings, TrainingLoss, make_scheduler, regression_loss
from mpprop.model import CrystalGraphConvNet, Normalizer
from mpprop.settings import GraphSettings, Hyperparams
from mpprop.stats import screening_precision

if TYPE_CHECKING:  # only its attributes are read here: the core needs no pymatgen
    from mpprop.data import PropertyData


def set_torch_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_batches(
    model: CrystalGraphConvNet,
    cache: GraphCache,
    rows: np.ndarray,
    batch_size: int,
    targets_norm: np.ndarray | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    rng: np.random.Generator | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """One pass over `rows` on the model's device; trains when an optimizer is given, else
    predicts.

    Returns the standardised predictions in the order of `rows` (from the forward pass
    of each batch, i.e. before that batch's update when training). `loss_fn` (pred, target)
    defaults to the MSE of the original CGCNN. precision "bf16" autocasts the forward pass;
    the loss is taken in float32.
    """
    training = optimizer is not None
    model.train(training)
    device = model_device(model)
    pin = pin_host_memory(device)
    loss_fn = loss_fn or nn.MSELoss()
    positions: list[np.ndarray] = []
    outputs: list[torch.Tensor] = []
    with torch.set_grad_enabled(training):
        for pos, batch in iterate_batches(
            cache, rows, batch_size, targets_norm, rng if training else None
        ):
            batch = batch.to(device, pin)
            with autocast(device, precision):
                out = model(batch)
            out = out.float()
            if training:
                loss = loss_fn(out, batch.target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            positions.append(pos)
            outputs.append(out.detach())
    return collect_in_row_order(positions, outputs, np.empty(len(rows), dtype=np.float64))


def predict(
    model: CrystalGraphConvNet,
    normalizer: Normalizer,
    cache: GraphCache,
    rows: np.ndarray | None = None,
    batch_size: int = 512,
    precision: str = "fp32",
) -> np.ndarray:
    """Predictions in target units (after the target transform, e.g. log10 GPa)."""
    rows = np.arange(len(cache)) if rows is None else rows
    return normalizer.denorm(run_batches(model, cache, rows, batch_size, precision=precision))


def make_optimizer(model: nn.Module, hp: Hyperparams) -> torch.optim.Optimizer:
    if hp.optimizer == "SGD":
        return torch.optim.SGD(
            model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
    if hp.optimizer == "RAdam":
        return torch.optim.RAdam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)


@dataclass
class EpochStats:
    epoch: int
    train_mae: float
    val_mae: float
    seconds: float
    val_pred: np.ndarray | None = field(default=None, repr=False)  # target units


@dataclass
class FitResult:
    model: CrystalGraphConvNet
    normalizer: Normalizer
    best_epoch: int
    best_val_mae: float
    history: list[EpochStats] = field(default_factory=list)


EpochCallback = Callable[[EpochStats], None]


def fit_on_pool(
    hp: Hyperparams,
    graph: GraphSettings,
    data: PropertyData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    seed: int,
    on_epoch: EpochCallback | None,
    eval_batch_size: int,
    loss_settings: LossSettings,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> FitResult:
    """`fit` on one train/val split of a property's non-test pool (indices into the pool),
    as both `mpprop train` and every tuning trial do."""
    return fit(
        hp, graph, data.cache,
        data.pool_rows[train_idx], data.pool_targets[train_idx],
        data.pool_rows[val_idx], data.pool_targets[val_idx],
        seed=seed, on_epoch=on_epoch, eval_batch_size=eval_batch_size,
        loss_settings=loss_settings, better=data.spec.better, device=device,
        precision=precision,
    )


# the fewest labelled records `fit` trains on: a train std needs two values, a best epoch
# needs one validation value (below that, the MAEs are NaN and metrics.json not JSON)
MIN_TRAIN_LABELS = 2
MIN_VAL_LABELS = 1


class TrainingDataError(ValueError):
    """Training data that cannot give a model and finite metrics."""


def fit(
    hp: Hyperparams,
    graph: GraphSettings,
    cache: GraphCache,
    train_rows: np.ndarray,
    train_targets: np.ndarray,
    val_rows: np.ndarray,
    val_targets: np.ndarray,
    seed: int,
    on_epoch: EpochCallback | None = None,
    eval_batch_size: int = 512,
    loss_settings: LossSettings | None = None,
    better: str | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> FitResult:
    """Train with target standardisation, the LR schedule of `hp`, best-val checkpointing.

    The loss is `hp.loss` plus `hp.rank_weight` x the ranking term (mpprop.losses), which
    needs `loss_settings` and the property's `better` direction; without loss_settings only
    the plain MSE / L1 losses can be used.

    The model is made on `device` (a torch device; mpprop.device.resolve_device turns
    `train.device` into one) and stays there; `precision` as in run_batches.
    `on_epoch` sees each epoch's stats; it may raise (e.g. optuna.TrialPruned) to stop.
    MAEs are in target units. Too few labelled records (MIN_TRAIN_LABELS, MIN_VAL_LABELS) or
    a target that is not finite is a TrainingDataError (a ValueError), before any training.
    """
    n_train, n_val = len(train_rows), len(val_rows)
    if n_train < MIN_TRAIN_LABELS or n_val < MIN_VAL_LABELS:
        raise TrainingDataError(
            f"too few labelled records to train: {n_train} train and {n_val} validation "
            f"(at least {MIN_TRAIN_LABELS} and {MIN_VAL_LABELS} are needed; the property has "
            "too few labels in this snapshot)"
        )
    if len(train_targets) != n_train or len(val_targets) != n_val:
        raise ValueError(
            f"{len(train_targets)} train / {len(val_targets)} val targets for "
            f"{n_train} / {n_val} rows"
        )
    for name, t in (("train", train_targets), ("validation", val_targets)):
        if not np.isfinite(t).all():
            raise TrainingDataError(
                f"{int((~np.isfinite(t)).sum())} {name} target(s) are not finite numbers"
            )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    normalizer = Normalizer.fit(train_targets)
    # made on the CPU, then moved: the same initial weights for a seed on every device
    model = CrystalGraphConvNet(hp, graph).to(device)
    optimizer = make_optimizer(model, hp)
    scheduler = make_scheduler(optimizer, hp)
    train_norm = normalizer.norm(train_targets)
    if loss_settings is None:
        if hp.loss == "huber" or hp.rank_weight > 0:
            raise ValueError(f"loss {hp.loss!r} with rank_weight {hp.rank_weight} needs loss_settings")
        loss_fn = regression_loss(hp.loss, huber_delta=0.0)
    else:
        loss_fn = TrainingLoss(hp, loss_settings, better, train_norm)
    best_state, best_val, best_epoch = None, float("inf"), -1
    history: list[EpochStats] = []
    for epoch in range(1, hp.epochs + 1):
        t0 = time.perf_counter()
        train_pred = run_batches(
            model, cache, train_rows, hp.batch_size, train_norm, optimizer, rng, loss_fn,
            precision,
        )
        scheduler.step()
        train_mae = float(np.mean(np.abs(normalizer.denorm(train_pred) - train_targets)))
        val_pred = predict(model, normalizer, cache, val_rows, eval_batch_size, precision)
        val_mae = float(np.mean(np.abs(val_pred - val_targets)))
        stats = EpochStats(epoch, train_mae, val_mae, time.perf_counter() - t0, val_pred)
        history.append(stats)
        if not np.isfinite(val_mae):
            raise FloatingPointError(f"validation MAE is {val_mae} at epoch {epoch}: diverged")
        if val_mae < best_val:
            best_val, best_epoch = val_mae, epoch
            best_state = copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(stats)
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(model, normalizer, best_epoch, best_val, history)


def evaluate(
    result: FitResult, data: PropertyData, top_percent: float, batch_size: int
) -> dict[str, float | None]:
    """Test MAE (target units) and screening precision of a fitted model."""
    pred = predict(result.model, result.normalizer, data.cache, data.test_rows, batch_size)
    return {
        "test_mae": float(np.mean(np.abs(pred - data.test_targets))),
        "test_screening_precision": screening_precision(
            data.test_targets, pred, top_percent, data.spec.better
        ),
    }
