"""A multi-task trunk: formation energy learnt with auxiliary properties (band gap, Fermi
energy) beside it, their labels only where the auxiliary property's own training split has
them; what comes out is an ordinary single-property model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import AUX_LABELS, six_crystals

from mpprop import experiment, training
from mpprop.batches import Batch
from mpprop.experiment import Job, JobSplit, auxiliary_targets
from mpprop.graphs import graphs_from_structures
from mpprop.losses import MultiTaskLoss
from mpprop.model import CrystalGraphConvNet, CrystalGraphMultiTask, trunk_state
from mpprop.settings import GraphSettings, Hyperparams
from mpprop.training import CheckpointMismatchError, TrainingDataError, fit

SETTINGS = GraphSettings()
HP = Hyperparams(n_conv=2, n_h=2, atom_fea_len=16, h_fea_len=16, lr=0.01, lr_decay_epoch=100,
                 optimizer="AdamW", epochs=5, batch_size=3, weight_decay=0.01, loss="l1",
                 lr_schedule="warmup_cosine", warmup_epochs=2, ema_decay=0.9)
Y = np.array([0.1, -0.4, 0.7, 1.2, 0.3, 0.2])


@pytest.fixture(scope="module")
def cache():
    return graphs_from_structures(six_crystals(), SETTINGS)


def _fit(cache, aux=AUX_LABELS, **kw):
    torch.set_num_threads(1)
    return fit(HP, SETTINGS, cache, np.arange(4), Y[:4], np.arange(4, 6), Y[4:], seed=3,
               aux_train_targets=aux, **kw)


def test_the_main_task_model_predicts_the_first_output(cache) -> None:
    torch.manual_seed(0)
    multi = CrystalGraphMultiTask(HP, SETTINGS, n_outputs=3).eval()
    batch = Batch.from_arrays(cache.gather(np.arange(len(cache))))
    with torch.no_grad():
        all_outputs = multi(batch)
        main = multi.main_task()(batch)
    assert all_outputs.shape == (len(cache), 3)
    assert type(multi.main_task()) is CrystalGraphConvNet
    torch.testing.assert_close(main, all_outputs[:, 0])


def test_unlabelled_auxiliary_entries_add_nothing_to_the_loss() -> None:
    pred = torch.tensor([[0.0, 1.0, 2.0], [1.0, 3.0, 0.0]])
    target = torch.tensor([[0.5, np.nan, 1.0], [0.0, 2.0, np.nan]])
    loss = MultiTaskLoss(torch.nn.L1Loss(), torch.nn.L1Loss())(pred, target)
    # main |0-0.5|, |1-0| -> 0.75; first aux only row 1: 1.0; second only row 0: 1.0
    assert float(loss) == pytest.approx(0.75 + 1.0 + 1.0)
    # weighted down: the main loss as it was, each auxiliary one a quarter
    weighted = MultiTaskLoss(torch.nn.L1Loss(), torch.nn.L1Loss(), aux_weight=0.25)(pred, target)
    assert float(weighted) == pytest.approx(0.75 + 0.25 * (1.0 + 1.0))
    with pytest.raises(ValueError, match="aux_weight"):
        MultiTaskLoss(torch.nn.L1Loss(), torch.nn.L1Loss(), aux_weight=0.0)


def test_auxiliary_labels_train_the_trunk_and_the_result_is_single_task(cache) -> None:
    single = _fit(cache, aux=None)
    multi = _fit(cache)
    assert type(multi.model) is CrystalGraphConvNet
    assert multi.model.fc_out.weight.shape == single.model.fc_out.weight.shape == (1, 16)
    trunk_a, trunk_b = trunk_state(single.model.state_dict()), trunk_state(multi.model.state_dict())
    assert any(not torch.equal(trunk_a[k], trunk_b[k]) for k in trunk_a)
    # with no auxiliary label anywhere but two, training differs only through those two
    sparse = _fit(cache, aux=np.array([[1.0], [np.nan], [np.nan], [3.0]]))
    assert sparse.best_val_mae != multi.best_val_mae
    # the auxiliary losses' weight reaches training
    assert _fit(cache, aux_weight=0.2).best_val_mae != multi.best_val_mae


def test_a_checkpoint_resumes_only_its_own_auxiliary_weight(cache, tmp_path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    _fit(cache, checkpoint=ckpt)
    with pytest.raises(CheckpointMismatchError):
        _fit(cache, checkpoint=ckpt, aux_weight=0.2)
    # at weight 1 the fingerprint is the one checkpoints had before the weight existed
    # (everything that changes the run, without the weight), so those resume
    before = training._fingerprint(HP, SETTINGS, 3, np.arange(4), Y[:4], np.arange(4, 6), Y[4:],
                                   None, AUX_LABELS)
    assert torch.load(ckpt, weights_only=True)["fingerprint"] == before


def test_too_few_auxiliary_labels_are_refused_before_training(cache) -> None:
    with pytest.raises(TrainingDataError, match="each needs at least 2"):
        _fit(cache, aux=np.array([[1.0], [np.nan], [np.nan], [np.nan]]))
    with pytest.raises(ValueError, match="expected \\(n_train, n_aux\\)"):
        _fit(cache, aux=np.ones(4))


def test_auxiliary_labels_only_from_the_auxiliary_properties_training_split(monkeypatch) -> None:
    # cache rows 10..15 labelled for band gap; its own split trains on 10, 12, 14 and
    # validates on 11, 13 (15 is in no split: a test material)
    def fake_split(params, ws, job, excluded):
        assert job.prop == "band_gap" and not job.aux_props and job.seed == 4
        rows = np.arange(10, 15)
        return JobSplit(None, rows, rows / 10.0, np.array([0, 2, 4]), np.array([1, 3]))

    monkeypatch.setattr(experiment, "job_split", fake_split)
    job = Job("mt", "formation_energy_per_atom", {}, seed=4, aux_props=("band_gap",))
    labels = auxiliary_targets(None, None, job, set(), np.array([10, 11, 12, 15, 3]))
    assert labels.shape == (5, 1)
    np.testing.assert_array_equal(labels[:, 0], [1.0, np.nan, 1.2, np.nan, np.nan])
    assert auxiliary_targets(None, None, replace(job, aux_props=()), set(), np.arange(3)) is None


def test_auxiliary_properties_make_another_job_and_keep_earlier_keys() -> None:
    plain = Job("a", "band_gap", {"lr": 0.1}, seed=2)
    # the key jobs without auxiliary properties had before (their results are stored under it)
    assert plain.key({"mp-1"}, "p") == "b6c161595566aba5"
    keys = {replace(plain, aux_props=aux).key({"mp-1"}, "p")
            for aux in [("efermi",), ("efermi", "formation_energy_per_atom")]}
    assert plain.key({"mp-1"}, "p") not in keys and len(keys) == 2
    # a weight of 1 is the multi-task job as it was; another weight is another job
    multi = replace(plain, aux_props=("efermi",))
    assert replace(multi, aux_weight=1.0).key({"mp-1"}, "p") in keys
    assert replace(multi, aux_weight=0.2).key({"mp-1"}, "p") not in keys
