"""Training losses (mpprop.losses) on hand-made tensors: the ranking term orders the top."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpprop.losses import LossSettings, TrainingLoss, make_scheduler, ranking_loss, regression_loss
from mpprop.settings import Hyperparams

SETTINGS = LossSettings(huber_delta=1.0, rank_top_percent=25, rank_margin=0.5)


def hp(**kw) -> Hyperparams:
    return Hyperparams(**{"n_conv": 1, "n_h": 1, "atom_fea_len": 8, "h_fea_len": 8, "lr": 0.01,
                          "lr_decay_epoch": 5, "optimizer": "SGD", "epochs": 10, **kw})


def test_gradient_pushes_a_wrongly_ordered_pair_apart() -> None:
    # material 0 is truly top (higher is better) but predicted below material 1
    target = torch.tensor([2.0, 0.0])
    pred = torch.tensor([0.1, 0.3], requires_grad=True)
    loss = ranking_loss(pred, target, threshold=1.0, sign=1.0, margin=0.5)
    assert loss.item() == pytest.approx(0.5 - (0.1 - 0.3))
    loss.backward()
    # descent raises the top one and lowers the other
    assert pred.grad[0] < 0 < pred.grad[1]


def test_lower_is_better_flips_the_order() -> None:
    target = torch.tensor([-2.0, 0.0])  # material 0 is top when lower is better
    pred = torch.tensor([0.0, -1.0], requires_grad=True)
    loss = ranking_loss(pred, target, threshold=-1.0, sign=-1.0, margin=0.5)
    assert loss.item() == pytest.approx(0.5 + 1.0)
    loss.backward()
    assert pred.grad[0] > 0 > pred.grad[1]  # descent lowers the top one


def test_well_ordered_pairs_and_batches_without_a_top_cost_nothing() -> None:
    target = torch.tensor([2.0, 0.0, -1.0])
    pred = torch.tensor([3.0, 0.0, -1.0], requires_grad=True)
    assert ranking_loss(pred, target, 1.0, 1.0, 0.5).item() == 0.0
    none_top = ranking_loss(pred, torch.zeros(3), 1.0, 1.0, 0.5)
    assert none_top.item() == 0.0
    none_top.backward()  # still differentiable
    assert torch.equal(pred.grad, torch.zeros(3))


def test_training_loss_adds_the_weighted_term_with_a_train_set_threshold() -> None:
    train_norm = np.arange(8, dtype=float)  # top 25% (higher better): values >= 5.25
    loss = TrainingLoss(hp(rank_weight=2.0), SETTINGS, "higher", train_norm)
    assert loss.threshold == pytest.approx(np.percentile(train_norm, 75))
    pred, target = torch.tensor([6.0, 7.0]), torch.tensor([7.0, 1.0])
    mse = torch.mean((pred - target) ** 2).item()
    expected = mse + 2.0 * max(0.0, 0.5 - (6.0 - 7.0))
    assert loss(pred, target).item() == pytest.approx(expected)
    assert TrainingLoss(hp(), SETTINGS, None, train_norm)(pred, target).item() == pytest.approx(mse)
    with pytest.raises(ValueError, match="screening direction"):
        TrainingLoss(hp(rank_weight=1.0), SETTINGS, None, train_norm)


def test_regression_losses_and_schedules() -> None:
    pred, target = torch.tensor([0.0, 3.0]), torch.tensor([1.0, 0.0])
    assert regression_loss("l1", 1.0)(pred, target).item() == pytest.approx(2.0)
    assert regression_loss("huber", 1.0)(pred, target).item() == pytest.approx((0.5 + 2.5) / 2)
    for schedule, lr_at_end in (("step", 0.001), ("cosine", 0.0)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
        sched = make_scheduler(opt, hp(lr_schedule=schedule))
        for _ in range(10):
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at_end, abs=1e-9)
