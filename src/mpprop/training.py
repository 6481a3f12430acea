"""Training and evaluation of one CGCNN: the one batch loop serves train, val, test and predict.

Imports only torch, numpy and the core's own numpy/torch modules (no pymatgen, no MLflow), so
it runs on a saved graph cache on a machine with nothing else. It runs where the model is:
`fit` places a new model on its `device`, and `run_batches` moves each batch there once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from mpprop.batches import collect_in_row_order, iterate_batches
from mpprop.device import autocast, pin_host_memory
from mpprop.graph_cache import GraphCache
from mpprop.losses import (
    LossSettings,
    MultiTaskLoss,
    TrainingLoss,
    make_scheduler,
    regression_loss,
)
from mpprop.model import (
    TRUNK_PREFIXES,
    CrystalGraphConvNet,
    CrystalGraphMultiTask,
    Normalizer,
    load_trunk,
)
from mpprop.settings import GraphSettings, Hyperparams
from mpprop.stats import screening_precision
from mpprop.write_errors import writing

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
    after_step: Callable[[], None] | None = None,
) -> np.ndarray:
    """One pass over `rows` on the model's device; trains when an optimizer is given, else
    predicts. `after_step` runs after every optimizer step (the weight average's update).

    Returns the standardised predictions in the order of `rows` (from the forward pass
    of each batch, i.e. before that batch's update when training): shape (len(rows),), or
    (len(rows), n_outputs) for a multi-task model. `loss_fn` (pred, target)
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
                if after_step is not None:
                    after_step()
            positions.append(pos)
            outputs.append(out.detach())
    shape = (len(rows), *outputs[0].shape[1:]) if outputs else (len(rows),)
    return collect_in_row_order(positions, outputs, np.empty(shape, dtype=np.float64))


def predict(
    model: CrystalGraphConvNet,
    normalizer: Normalizer,
    cache: GraphCache,
    rows: np.ndarray | None = None,
    batch_size: int = 512,
    precision: str = "fp32",
) -> np.ndarray:
    """Predictions in target units (after the target transform, e.g. log10 GPa); of a
    multi-task model, its main property's."""
    rows = np.arange(len(cache)) if rows is None else rows
    standardised = run_batches(model, cache, rows, batch_size, precision=precision)
    return normalizer.denorm(_main_output(standardised))


def _main_output(standardised: np.ndarray) -> np.ndarray:
    """run_batches' predictions of the main property: a multi-task model's first column."""
    return standardised[:, 0] if standardised.ndim == 2 else standardised


def make_optimizer(model: nn.Module, hp: Hyperparams,
                   trunk_lr_scale: float | None = None) -> torch.optim.Optimizer:
    """The optimizer of `hp`; with `trunk_lr_scale`, the trunk (model.TRUNK_PREFIXES) is its
    own parameter group at lr x trunk_lr_scale (fine-tuning)."""
    params: list | object = model.parameters()
    if trunk_lr_scale is not None:
        named = list(model.named_parameters())
        trunk = [p for n, p in named if n.startswith(TRUNK_PREFIXES)]
        head = [p for n, p in named if not n.startswith(TRUNK_PREFIXES)]
        params = [{"params": trunk, "lr": hp.lr * trunk_lr_scale}, {"params": head}]
    if hp.optimizer == "SGD":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay)
    if hp.optimizer == "RAdam":
        return torch.optim.RAdam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)


@dataclass(frozen=True)
class FineTuning:
    """Start from a parent's trunk (model.trunk_state) with a new head; the trunk is frozen
    for the first `freeze_epochs` epochs and trains at lr x `trunk_lr_scale`."""

    trunk: dict[str, torch.Tensor]
    freeze_epochs: int = 0
    trunk_lr_scale: float = 1.0
    parent: str = ""  # what the trunk came from (a registry name and version, a path)

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.freeze_epochs}/{self.trunk_lr_scale}".encode())
        for key in sorted(self.trunk):
            h.update(key.encode())
            h.update(self.trunk[key].numpy().tobytes())
        return h.hexdigest()


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
# torch's default, which the original CGCNN uses
BATCH_NORM_MOMENTUM = 0.1


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
    fine_tuning: FineTuning | None = None,
    checkpoint: Path | str | None = None,
    checkpoint_every: int = 1,
) -> FitResult:
    """`fit` on one train/val split of a property's non-test pool (indices into the pool),
    as both `mpprop train` and every tuning trial do."""
    return fit(
        hp, graph, data.cache,
        data.pool_rows[train_idx], data.pool_targets[train_idx],
        data.pool_rows[val_idx], data.pool_targets[val_idx],
        seed=seed, on_epoch=on_epoch, eval_batch_size=eval_batch_size,
        loss_settings=loss_settings, better=data.spec.better, device=device,
        precision=precision, fine_tuning=fine_tuning, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
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
    fine_tuning: FineTuning | None = None,
    checkpoint: Path | str | None = None,
    checkpoint_every: int = 1,
    aux_train_targets: np.ndarray | None = None,
    aux_weight: float = 1.0,
    stop_epoch: int | None = None,
) -> FitResult:
    """Train with target standardisation, the LR schedule of `hp`, best-val checkpointing.

    The loss is `hp.loss` plus `hp.rank_weight` x the ranking term (mpprop.losses), which
    needs `loss_settings` and the property's `better` direction; without loss_settings only
    the plain MSE / L1 losses can be used. With hp.ema_decay > 0 the exponential moving
    average of the weights is what is validated and kept; hp.early_stop_patience > 0 stops
    after that many epochs without a better validation MAE.

    The model is made on `device` (a torch device; mpprop.device.resolve_device turns
    `train.device` into one) and stays there; `precision` as in run_batches.
    `fine_tuning` starts from a parent's trunk. `checkpoint`: a file where the whole training
    state is saved every `checkpoint_every` epochs (atomically); a rerun with the same inputs
    resumes from it and ends with the same weights as an uninterrupted run.
    `on_epoch` sees each epoch's stats; it may raise (e.g. optuna.TrialPruned) to stop.
    `aux_train_targets` (len(train_rows), n_aux; NaN where a material has no label) makes
    the model multi-task: it also learns those properties (each standardised on its own
    labels, losses.MultiTaskLoss), is validated on the main one, and the returned model is
    the main property's (CrystalGraphMultiTask.main_task); `aux_weight` scales the
    auxiliary losses. MAEs are in target units.
    `stop_epoch` ends training after that epoch (the learning-rate schedule is still
    hp.epochs') and keeps its weights, not the best-validation ones: a model refitted on train
    and validation together, for the epochs its twin's validation chose, whose own validation
    MAE chooses nothing (best_epoch and best_val_mae are then that epoch's). It excludes early
    stopping.
    Too few labelled records (MIN_TRAIN_LABELS, MIN_VAL_LABELS) or a target that is not
    finite is a TrainingDataError (a ValueError), before any training.
    """
    _check_training_data(train_rows, train_targets, val_rows, val_targets)
    if stop_epoch is not None and (hp.early_stop_patience or not 1 <= stop_epoch <= hp.epochs):
        raise ValueError(f"stop_epoch {stop_epoch}: a fixed epoch in 1..{hp.epochs}, and no "
                         "early stopping")
    last_epoch = hp.epochs if stop_epoch is None else stop_epoch
    aux_norm = _standardise_auxiliary(aux_train_targets, len(train_rows))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    normalizer = Normalizer.fit(train_targets)
    # made on the CPU, then moved: the same initial weights for a seed on every device (the
    # output layer is made last, so a multi-task model's trunk starts as the single one's)
    model = (CrystalGraphConvNet(hp, graph) if aux_norm is None
             else CrystalGraphMultiTask(hp, graph, 1 + aux_norm.shape[1]))
    if hp.element_offsets:
        normalizer = _fit_element_offsets(model, cache, train_rows, train_targets)
    if fine_tuning is not None:
        load_trunk(model, fine_tuning.trunk)
    model = model.to(device)
    optimizer = make_optimizer(model, hp, fine_tuning.trunk_lr_scale if fine_tuning else None)
    scheduler = make_scheduler(optimizer, hp)
    ema = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=ema_with_warmup(hp.ema_decay), use_buffers=True)
        if hp.ema_decay > 0 else None)
    kept = ema.module if ema is not None else model  # the weights validated and kept
    train_norm = normalizer.norm(train_targets)
    loss_fn = _training_loss(hp, loss_settings, better, train_norm)
    if aux_norm is not None:
        huber_delta = loss_settings.huber_delta if loss_settings is not None else 0.0
        loss_fn = MultiTaskLoss(loss_fn, regression_loss(hp.loss, huber_delta), aux_weight)
        train_norm = np.column_stack([train_norm, aux_norm])
    state = _TrainingState()
    saver = None
    if checkpoint is not None:
        saver = _Checkpoint(Path(checkpoint), max(1, int(checkpoint_every)), _fingerprint(
            hp, graph, seed, train_rows, train_targets, val_rows, val_targets, fine_tuning,
            aux_train_targets,
            # only a weight other than 1: equal-weight checkpoints keep their fingerprint
            None if aux_norm is None or aux_weight == 1.0 else np.float64(aux_weight)))
        saver.resume(state, model, optimizer, scheduler, ema, rng)
    after_step = (lambda: ema.update_parameters(model)) if ema is not None else None
    for epoch in range(state.epoch + 1, last_epoch + 1):
        if state.stopped_early(hp):
            break
        t0 = time.perf_counter()
        _freeze_trunk(model, fine_tuning is not None and epoch <= fine_tuning.freeze_epochs)
        train_pred = run_batches(model, cache, train_rows, hp.batch_size, train_norm,
                                 optimizer, rng, loss_fn, precision, after_step)
        scheduler.step()
        train_mae = float(np.mean(np.abs(normalizer.denorm(_main_output(train_pred))
                                         - train_targets)))
        val_pred = predict(kept, normalizer, cache, val_rows, eval_batch_size, precision)
        val_mae = float(np.mean(np.abs(val_pred - val_targets)))
        stats = EpochStats(epoch, train_mae, val_mae, time.perf_counter() - t0, val_pred)
        if not np.isfinite(val_mae):
            raise FloatingPointError(f"validation MAE is {val_mae} at epoch {epoch}: diverged")
        state.record(stats, kept)
        if saver is not None and (epoch % saver.every == 0 or epoch == last_epoch):
            saver.save(state, model, optimizer, ema, rng)
        if on_epoch is not None:
            on_epoch(stats)
    assert state.best_state is not None
    best_epoch, best_val = state.best_epoch, state.best_val
    if stop_epoch is not None:  # its weights (restored as saved when resumed after it)
        best_epoch, best_val = state.epoch, state.history[-1].val_mae
    else:
        kept.load_state_dict(state.best_state)
    kept.eval()
    if isinstance(kept, CrystalGraphMultiTask):
        kept = kept.main_task()
    return FitResult(kept, normalizer, best_epoch, best_val, state.history)


def ema_with_warmup(decay: float) -> Callable[[list, list, torch.Tensor], None]:
    """The moving average's update with the decay warmed up, min(decay, (1 + n) / (10 + n))
    after n updates: without it the average keeps the initial weights (and batch-norm
    statistics) for ~1/(1 - decay) steps, far from the trained ones. Integer buffers (batch
    counters) are copied."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
               num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        if averaged and torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def _check_training_data(train_rows: np.ndarray, train_targets: np.ndarray,
                         val_rows: np.ndarray, val_targets: np.ndarray) -> None:
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


def _fit_element_offsets(model: CrystalGraphConvNet, cache: GraphCache, rows: np.ndarray,
                         targets: np.ndarray) -> Normalizer:
    """Per-element references by least squares on the train split (composition fractions
    x, y ~ x.w), put into the model in standardised units; the returned normalizer
    standardises the rest, y - x.w, which is what the network learns."""
    x = cache.composition(rows)
    present = np.flatnonzero(x.any(axis=0))
    w = np.zeros(x.shape[1])
    w[present] = np.linalg.lstsq(x[:, present], targets, rcond=None)[0]
    normalizer = Normalizer.fit(targets - x @ w)
    with torch.no_grad():
        model.element_offsets.copy_(torch.as_tensor(w / normalizer.std, dtype=torch.float32))
    return normalizer


def _standardise_auxiliary(targets: np.ndarray | None, n_train: int) -> np.ndarray | None:
    """Auxiliary targets (n_train, n_aux), each column standardised with the mean and std
    of its labels (NaN stays NaN); None stays None."""
    if targets is None:
        return None
    targets = np.asarray(targets, dtype=np.float64)
    if targets.ndim != 2 or len(targets) != n_train:
        raise ValueError(f"auxiliary targets of shape {targets.shape} for {n_train} "
                         "training rows: expected (n_train, n_aux)")
    labelled = np.isfinite(targets).sum(axis=0)
    if (labelled < MIN_TRAIN_LABELS).any():
        raise TrainingDataError(f"auxiliary targets with {labelled.tolist()} labels per column: "
                                f"each needs at least {MIN_TRAIN_LABELS}")
    mean = np.nanmean(targets, axis=0)
    std = np.nanstd(targets, axis=0, ddof=1)
    return (targets - mean) / np.where(std > 0, std, 1.0)


def _training_loss(hp: Hyperparams, loss_settings: LossSettings | None, better: str | None,
                   train_norm: np.ndarray) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if loss_settings is None:
        if hp.loss == "huber" or hp.rank_weight > 0:
            raise ValueError(f"loss {hp.loss!r} with rank_weight {hp.rank_weight} needs loss_settings")
        return regression_loss(hp.loss, huber_delta=0.0)
    return TrainingLoss(hp, loss_settings, better, train_norm)


def _freeze_trunk(model: nn.Module, frozen: bool) -> None:
    # a frozen parameter gets no gradient (every optimizer here skips those), and the trunk's
    # batch norms keep the parent's running statistics (momentum 0) while frozen
    for name, module in model.named_modules():
        if not name.startswith(tuple(p.rstrip(".") for p in TRUNK_PREFIXES)):
            continue
        for param in module.parameters(recurse=False):
            param.requires_grad_(not frozen)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0 if frozen else BATCH_NORM_MOMENTUM


@dataclass
class _TrainingState:
    """What an epoch loop carries from one epoch to the next (all of it checkpointed)."""

    epoch: int = 0
    best_val: float = float("inf")
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    history: list[EpochStats] = field(default_factory=list)

    def record(self, stats: EpochStats, kept: nn.Module) -> None:
        self.epoch = stats.epoch
        self.history.append(stats)
        if stats.val_mae < self.best_val:
            self.best_val, self.best_epoch = stats.val_mae, stats.epoch
            self.best_state = copy.deepcopy(kept.state_dict())

    def stopped_early(self, hp: Hyperparams) -> bool:
        patience = hp.early_stop_patience
        return bool(patience) and self.epoch - self.best_epoch >= patience


def _fingerprint(hp: Hyperparams, graph: GraphSettings, seed: int, *arrays_and_init: object) -> str:
    """Hash of everything that changes a training run, so a checkpoint resumes only its own."""
    h = hashlib.sha256(json.dumps([hp.as_dict(), asdict(graph), seed], sort_keys=True).encode())
    for item in arrays_and_init:
        if isinstance(item, FineTuning):
            h.update(item.digest().encode())
        elif item is not None:
            h.update(np.ascontiguousarray(item).tobytes())
    return h.hexdigest()


class CheckpointMismatchError(ValueError):
    """A training checkpoint written for other settings or data."""


@dataclass
class _Checkpoint:
    """The whole training state in one file, replaced atomically; read back with
    torch.load(weights_only=True) (tensors, numbers, strings and containers only)."""

    path: Path
    every: int
    fingerprint: str

    def save(self, state: _TrainingState, model: nn.Module, optimizer: torch.optim.Optimizer,
             ema: torch.optim.swa_utils.AveragedModel | None, rng: np.random.Generator) -> None:
        data = {
            "fingerprint": self.fingerprint, "epoch": state.epoch,
            "best_val": state.best_val, "best_epoch": state.best_epoch,
            "best_state": state.best_state, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng": json.dumps(rng.bit_generator.state),
            "history": [[h.epoch, h.train_mae, h.val_mae, h.seconds] for h in state.history],
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with writing(self.path, permission=True):  # a full disk: one line naming the file
                self.path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(data, tmp)
                os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a half-written checkpoint would only take space
            raise

    def resume(self, state: _TrainingState, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler,
               ema: torch.optim.swa_utils.AveragedModel | None,
               rng: np.random.Generator) -> None:
        if not self.path.exists():
            return
        device = model_device(model)
        data = torch.load(self.path, map_location=device, weights_only=True)
        if data.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatchError(
                f"{self.path} is the checkpoint of another training run (other settings, "
                "data or seed); remove it to start this one from scratch")
        model.load_state_dict(data["model"])
        if ema is not None:
            ema.load_state_dict(data["ema"])
        rng.bit_generator.state = json.loads(data["rng"])
        # the schedulers here are functions of the epoch: replaying the steps restores them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "step before optimizer.step"
            for _ in range(data["epoch"]):
                scheduler.step()
        # after the replay, which rewrote the learning rates the state also holds
        optimizer.load_state_dict(data["optimizer"])
        state.epoch, state.best_val = data["epoch"], data["best_val"]
        state.best_epoch, state.best_state = data["best_epoch"], data["best_state"]
        state.history = [EpochStats(int(e), t, v, s) for e, t, v, s in data["history"]]


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
