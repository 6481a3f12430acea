"""Training losses on standardised targets: the regression loss, and a pairwise ranking
term for screening (the paper's next step: training that knows what screening needs).

The ranking term looks at pairs that straddle the top of the property's ranking: one
material among the train set's top `rank_top_percent` (by the property's better direction)
and one outside it, in the same batch. It is zero when the model already puts the top one
ahead by `margin` (standard deviations), and grows linearly otherwise (a margin ranking
loss, as in RankNet-style pairwise learning to rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from mpprop.settings import Hyperparams, LossSettings


def regression_loss(kind: str, huber_delta: float) -> nn.Module:
    if kind == "mse":
        return nn.MSELoss()
    if kind == "l1":
        return nn.L1Loss()
    if kind == "huber":
        return nn.HuberLoss(delta=huber_delta)
    raise ValueError(f"unknown loss {kind!r}")


def ranking_loss(pred: torch.Tensor, target: torch.Tensor, threshold: float, sign: float,
                 margin: float) -> torch.Tensor:
    """Mean hinge over the batch's (top, rest) pairs: relu(margin - sign*(pred_top - pred_rest)).

    `sign` is +1 where higher is better, -1 where lower is better; a material is "top" when
    sign*target >= sign*threshold. No such pair in the batch: zero (with a gradient path).
    """
    top = sign * target >= sign * threshold
    if not bool(top.any()) or bool(top.all()):
        return pred.sum() * 0.0
    gap = sign * (pred[top][:, None] - pred[~top][None, :])  # (n_top, n_rest)
    return torch.relu(margin - gap).mean()


class TrainingLoss:
    """Regression loss plus `rank_weight` x ranking term (off at weight 0)."""

    def __init__(self, hp: Hyperparams, settings: LossSettings, better: str | None,
                 train_targets_norm: np.ndarray) -> None:
        self.regression = regression_loss(hp.loss, settings.huber_delta)
        self.rank_weight = float(hp.rank_weight)
        self.margin = settings.rank_margin
        self.sign, self.threshold = 1.0, 0.0
        if self.rank_weight > 0:
            if better not in ("lower", "higher"):
                raise ValueError("rank_weight > 0 needs a property with a screening direction "
                                 f"(better: lower or higher), not {better!r}")
            self.sign = 1.0 if better == "higher" else -1.0
            q = 100.0 - settings.rank_top_percent if better == "higher" else settings.rank_top_percent
            self.threshold = float(np.percentile(train_targets_norm, q))

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.regression(pred, target)
        if self.rank_weight > 0:
            loss = loss + self.rank_weight * ranking_loss(pred, target, self.threshold,
                                                          self.sign, self.margin)
        return loss


class MultiTaskLoss:
    """A multi-task model's loss (pred and target (B, 1 + n_aux), standardised): the main
    property's loss on column 0 plus the regression loss of each auxiliary column over the
    crystals that have that label (NaN = unlabelled), each times `aux_weight`. A sum, not a
    mean: the main property gets the same gradient as alone, the auxiliary ones add to the
    trunk's (a weight under 1 lets them pull the shared layers less)."""

    def __init__(self, main: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 auxiliary: nn.Module, aux_weight: float = 1.0) -> None:
        if not aux_weight > 0:
            raise ValueError(f"aux_weight must be > 0, got {aux_weight}")
        self.main, self.auxiliary, self.aux_weight = main, auxiliary, float(aux_weight)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.main(pred[:, 0], target[:, 0])
        for col in range(1, target.shape[1]):
            labelled = torch.isfinite(target[:, col])
            if bool(labelled.any()):
                loss = loss + self.aux_weight * self.auxiliary(pred[labelled, col],
                                                               target[labelled, col])
        return loss


def warmup_cosine_factor(epoch: int, warmup: int, epochs: int) -> float:
    """LR multiplier after `epoch` scheduler steps: linear from 1/(warmup+1) to 1 over the
    warm-up, then a cosine from 1 to 0 at `epochs`."""
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))


def make_scheduler(optimizer: torch.optim.Optimizer, hp: Hyperparams) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch: the paper's single x0.1 decay, a cosine decay to 0, or a
    linear warm-up then a cosine decay (warmup_cosine)."""
    if hp.lr_schedule == "warmup_cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: warmup_cosine_factor(e, hp.warmup_epochs, hp.epochs))
    if hp.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[hp.lr_decay_epoch], gamma=0.1)
