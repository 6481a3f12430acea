"""Training that survives a kill (per-epoch checkpoints resumed exactly), fine-tuning from a
parent's trunk, and the modern recipe's parts (AdamW, warm-up + cosine, EMA, early stop)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import AUX_LABELS, six_crystals

from mpprop.graphs import graphs_from_structures
from mpprop.losses import warmup_cosine_factor
from mpprop.model import CrystalGraphConvNet, TrunkMismatchError, load_trunk, trunk_state
from mpprop.settings import ConfigError, GraphSettings, Hyperparams
from mpprop.training import CheckpointMismatchError, EpochStats, FineTuning, fit, predict

SETTINGS = GraphSettings()
MODERN = Hyperparams(n_conv=2, n_h=2, atom_fea_len=16, h_fea_len=16, lr=0.01,
                     lr_decay_epoch=100, optimizer="AdamW", epochs=6, batch_size=3,
                     weight_decay=0.01, loss="l1", lr_schedule="warmup_cosine",
                     warmup_epochs=2, ema_decay=0.9)


class Killed(Exception):
    """Stands in for a kill at a chosen epoch."""


@pytest.fixture(scope="module")
def cache():
    return graphs_from_structures(six_crystals(), SETTINGS)


def _fit(cache, hp=MODERN, **kw):
    torch.set_num_threads(1)
    y = np.array([0.1, -0.4, 0.7, 1.2, 0.3, 0.2])
    return fit(hp, SETTINGS, cache, np.arange(4), y[:4], np.arange(4, 6), y[4:], seed=3, **kw)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("every, aux", [(1, None), (2, None), (1, AUX_LABELS)],
                         ids=["every-1", "every-2", "multi-task"])
def test_killed_training_resumes_to_the_same_weights(cache, tmp_path, every, aux):
    whole = _fit(cache, aux_train_targets=aux)
    ckpt = tmp_path / "run.ckpt"

    def kill_at_4(s: EpochStats) -> None:
        if s.epoch == 4:
            raise Killed

    with pytest.raises(Killed):
        _fit(cache, checkpoint=ckpt, checkpoint_every=every, on_epoch=kill_at_4,
             aux_train_targets=aux)
    assert ckpt.exists()
    seen: list[int] = []
    resumed = _fit(cache, checkpoint=ckpt, checkpoint_every=every,
                   on_epoch=lambda s: seen.append(s.epoch), aux_train_targets=aux)
    # every=1 saved epoch 4; every=2 saved epoch 4 as well (4 % 2 == 0): epochs 5, 6 rerun
    assert seen == [5, 6]
    _same_weights(whole.model, resumed.model)
    assert [h.val_mae for h in resumed.history] == [h.val_mae for h in whole.history]
    assert resumed.best_epoch == whole.best_epoch


def test_checkpoint_of_other_settings_is_refused(cache, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    _fit(cache, hp=replace(MODERN, epochs=3), checkpoint=ckpt)
    with pytest.raises(CheckpointMismatchError, match="another training run"):
        _fit(cache, checkpoint=ckpt)


def test_finished_checkpoint_trains_nothing_more(cache, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    first = _fit(cache, checkpoint=ckpt)
    seen: list[int] = []
    again = _fit(cache, checkpoint=ckpt, on_epoch=lambda s: seen.append(s.epoch))
    assert seen == []
    _same_weights(first.model, again.model)


def test_ema_keeps_averaged_weights(cache):
    plain = _fit(cache, hp=replace(MODERN, ema_decay=0.0))
    averaged = _fit(cache)
    # same seed, same raw trajectory: only the kept (averaged) weights differ
    assert not torch.equal(plain.model.fc_out.weight, averaged.model.fc_out.weight)
    assert set(averaged.model.state_dict()) == set(plain.model.state_dict())


def test_early_stopping_stops_after_patience(cache):
    hp = replace(MODERN, epochs=40, ema_decay=0.0, early_stop_patience=2, lr=0.3)
    result = _fit(cache, hp=hp)
    last = result.history[-1].epoch
    assert last < 40
    assert last - result.best_epoch == 2


def test_stop_epoch_keeps_that_epoch_not_the_best(cache, tmp_path):
    # a refit's validation materials are in its training data: it trains on its schedule up
    # to the epoch its twin's validation chose and keeps that epoch, also when resumed
    hp = replace(MODERN, epochs=10, lr=0.05)
    whole = _fit(cache, hp=hp)
    assert whole.best_epoch == 4  # this run's best validation epoch is not the one kept
    seen: list[int] = []
    stopped = _fit(cache, hp=hp, stop_epoch=7, checkpoint=tmp_path / "run.ckpt",
                   on_epoch=lambda s: seen.append(s.epoch))
    assert seen == list(range(1, 8)) and stopped.best_epoch == 7
    assert [h.val_mae for h in stopped.history] == [h.val_mae for h in whole.history[:7]]
    kept_val = predict(stopped.model, stopped.normalizer, cache, np.arange(4, 6), 8)
    assert np.mean(np.abs(kept_val - np.array([0.3, 0.2]))) == pytest.approx(
        whole.history[6].val_mae) == pytest.approx(stopped.best_val_mae)
    assert not torch.equal(whole.model.fc_out.weight, stopped.model.fc_out.weight)
    again = _fit(cache, hp=hp, stop_epoch=7, checkpoint=tmp_path / "run.ckpt")
    _same_weights(stopped.model, again.model)
    with pytest.raises(ValueError, match="no early stopping"):
        _fit(cache, hp=replace(hp, early_stop_patience=2), stop_epoch=7)
    with pytest.raises(ValueError, match="a fixed epoch in 1..10"):
        _fit(cache, hp=hp, stop_epoch=11)


def test_warmup_cosine_factor():
    f = [warmup_cosine_factor(e, 2, 10) for e in range(11)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))
    with pytest.raises(ConfigError, match="warmup_epochs"):
        replace(MODERN, warmup_epochs=6)


def test_fine_tuning_starts_from_the_parent_trunk_and_freezes_it(cache):
    parent = _fit(cache, hp=replace(MODERN, ema_decay=0.0, epochs=3)).model
    trunk = trunk_state(parent.state_dict())
    assert trunk and all(k.startswith(("embedding.", "convs.")) for k in trunk)
    frozen = _fit(cache, hp=replace(MODERN, ema_decay=0.0, epochs=3),
                  fine_tuning=FineTuning(trunk, freeze_epochs=3))
    # frozen for every epoch: the trunk is the parent's, the head has trained
    for k, v in trunk.items():
        if not k.endswith("num_batches_tracked"):  # a counter, unused at a set momentum
            assert torch.equal(frozen.model.state_dict()[k], v), k
    free = _fit(cache, hp=replace(MODERN, ema_decay=0.0, epochs=3),
                fine_tuning=FineTuning(trunk, freeze_epochs=0, trunk_lr_scale=0.1))
    assert not torch.equal(free.model.embedding.weight, trunk["embedding.weight"])


def test_trunk_of_another_shape_is_one_line_error():
    small = CrystalGraphConvNet(replace(MODERN, n_conv=2, atom_fea_len=16), SETTINGS)
    big = CrystalGraphConvNet(replace(MODERN, n_conv=3, atom_fea_len=16), SETTINGS)
    with pytest.raises(TrunkMismatchError, match=r"n_conv=3.*n_conv=2"):
        load_trunk(small, trunk_state(big.state_dict()))


def test_element_offsets_carry_the_composition_part(cache):
    # targets that are exactly a per-element sum: the least-squares references explain
    # them, so the untrained network's part is small and the fit starts near the answer
    refs = {11: -1.3, 17: -1.8, 14: -5.4, 55: -0.9, 3: -1.9, 26: -8.3, 8: -4.9}
    x = cache.composition(np.arange(len(cache)))
    y = x[:, list(refs)] @ np.array(list(refs.values()))
    hp = replace(MODERN, element_offsets=True, epochs=3, ema_decay=0.0)
    result = fit(hp, SETTINGS, cache, np.arange(4), y[:4], np.arange(4, 6), y[4:], seed=0,
                 on_epoch=None)
    assert result.model.element_offsets.shape == (101,)
    # the train rows' compositions are reproduced to float precision by the references
    offsets = result.model.element_offsets.double().numpy() * result.normalizer.std
    np.testing.assert_allclose(x[:4] @ offsets + result.normalizer.mean, y[:4], atol=1e-5)
    # saved and loaded with the weights (a bundle round trip keeps the buffer)
    state = result.model.state_dict()
    assert "element_offsets" in state
    fresh = CrystalGraphConvNet(hp, SETTINGS)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.element_offsets, result.model.element_offsets)


def test_moving_average_warms_up_from_the_trained_weights():
    """The average follows the trained weights from the first steps (no pull towards the
    initial ones), then averages with the full decay."""
    from mpprop.training import ema_with_warmup

    update = ema_with_warmup(0.999)
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    update(avg, cur, torch.tensor(0))  # first update: weight 1 - 1/10
    assert torch.allclose(avg[0], torch.full((3,), 0.9))
    for n in range(1, 2000):
        update(avg, cur, torch.tensor(n))
    assert torch.allclose(avg[0], torch.ones(3), atol=1e-6)
    counters = [torch.tensor(5)]
    update(counters, [torch.tensor(9)], torch.tensor(3))
    assert int(counters[0]) == 9
