"""The experiment API the benchmarks drive (mpprop.experiment, mpprop.experiment_runs) and the
statistics it shares with `mpprop evaluate` (mpprop.stats), on hand-made numbers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from filelock import FileLock

from mpprop import experiment
from mpprop import experiment_runs as runs
from mpprop.experiment import (
    CHECKPOINT_FILE,
    LOCK_FILE,
    RESULT_FILE,
    Job,
    JobBusy,
    JobSplit,
    Twin,
    _as_served,
    compare_models,
    compare_recall,
    job_folder,
    run_ensemble,
    run_job,
    screening_warning,
    summaries,
)
from mpprop.intervals import calibrate
from mpprop.settings import Hyperparams
from mpprop.stats import bootstrap_resamples, paired_intervals, quality_intervals

Y = np.arange(20, dtype=float)
EXACT = Y.copy()
OFF_BY_ONE = Y + 1.0
REVERSED = Y[::-1].copy()  # ranks the top last


def hp(epochs: int = 3, **kw) -> Hyperparams:
    return Hyperparams(n_conv=1, n_h=1, atom_fea_len=8, h_fea_len=8, lr=0.01,
                       lr_decay_epoch=2, optimizer="Adam", epochs=epochs, **kw)


def test_quality_and_paired_intervals_hold_the_metrics_evaluate_reports() -> None:
    res = bootstrap_resamples(len(Y), 50, 0)
    q = quality_intervals(Y, OFF_BY_ONE, res, 10.0, "higher")
    assert q["test_mae"].value == q["test_mae"].low == q["test_mae"].high == 1.0
    assert q["screening"].value == 100.0  # a constant shift keeps the ranking
    assert "screening" not in quality_intervals(Y, OFF_BY_ONE, res, 10.0, None)
    d = paired_intervals(Y, EXACT, OFF_BY_ONE, res, 10.0, "higher")
    assert (d["mae_diff"].value, d["mae_diff"].low, d["mae_diff"].high) == (-1.0, -1.0, -1.0)
    assert d["mae_diff"].excludes_zero
    assert paired_intervals(Y, REVERSED, EXACT, res, 10.0, "higher")["screening_diff"].value == -100.0


def test_summaries_pair_models_on_the_same_materials_and_keep_seed_records() -> None:
    res = bootstrap_resamples(len(Y), 50, 0)
    preds = {"a": np.stack([EXACT, OFF_BY_ONE]), "b": OFF_BY_ONE}
    per_seed = {"a": [{"best_val_mae": 0.1, "best_epoch": 2, "seconds": 5.0,
                       "hyperparams": {"epochs": 3}},
                      {"best_val_mae": 0.2, "best_epoch": 3, "seconds": 6.0,
                       "hyperparams": {"epochs": 3}}]}
    models, diffs = summaries(Y, preds, [("a", "b")], res, 10.0, "higher", per_seed)
    assert models["a"]["n_seeds"] == 2 and models["b"]["n_seeds"] == 1
    assert models["a"]["test_mae"]["value"] == 0.5  # seed-averaged: (0 + 1) / 2
    assert models["a"]["test_mae_per_seed"] == [0.0, 1.0]
    assert models["a"]["best_val_mae_per_seed"] == [0.1, 0.2]
    assert "best_val_mae_per_seed" not in models["b"]
    assert list(diffs) == ["a-b"]
    assert diffs["a-b"]["mae_diff"]["value"] == -0.5


def test_compare_models_adds_the_averaged_precision_and_drops_predictions() -> None:
    res = bootstrap_resamples(len(Y), 50, 0)
    models, diffs = compare_models(Y, {"good": EXACT, "bad": REVERSED}, [("good", "bad")], res,
                                   10.0, "higher", [5.0, 10.0])
    assert "test_pred_per_seed" not in models["good"]
    assert models["good"]["screening_signal"]["value"] == 100.0
    assert models["bad"]["screening_signal"]["value"] == 0.0
    assert diffs["good-bad"]["screening_signal_diff"]["value"] == 100.0


def test_compare_recall_scores_each_ranking_and_the_pairs() -> None:
    is_top = np.array([False] * 8 + [True] * 2)
    finds = np.arange(10, dtype=float)  # ranks the two top materials first ("higher")
    misses = finds[::-1].copy()
    out = compare_recall(is_top, {"finds": finds, "misses": misses}, [("finds", "misses")],
                         bootstrap_resamples(10, 30, 0), "higher")
    assert out["finds"]["value"] == 1.0 and out["misses"]["value"] == 0.0
    assert out["finds-misses"]["value"] == 1.0


def test_screening_warning_only_for_few_top_materials() -> None:
    assert screening_warning(100, 3.0, "higher") == "only 3 materials in the top 3% of the test set"
    assert screening_warning(1000, 3.0, "higher") is None
    assert screening_warning(100, 3.0, None) is None


def test_cached_records_are_used_only_for_the_same_hyperparameters(tmp_path) -> None:
    path = runs.record_path(tmp_path, runs.FINAL_DIR, "tuned", 3, 1)
    assert path == tmp_path / "final" / "tuned-1-3.json"
    # extrapolation's seed 0 keeps the name of results from before several seeds
    assert runs.record_path(tmp_path, runs.EXTRAPOLATION_DIR, "xie", 3, 0).name == "xie-3.json"
    assert runs.record_path(tmp_path, runs.EXTRAPOLATION_DIR, "xie", 3, 2).name == "xie-3-seed2.json"
    assert runs.read_record(path, hp().as_dict()) is None
    runs.restore_final(tmp_path, "tuned", hp().as_dict(), [[1.0, 2.0], [3.0, 4.0]])
    assert runs.read_record(path, hp().as_dict())["test_pred"] == [3.0, 4.0]
    assert runs.read_record(path, hp(rank_weight=1.0).as_dict()) is None
    # restoring never overwrites a record that is there
    runs.restore_final(tmp_path, "tuned", hp().as_dict(), [[9.0], [9.0]])
    assert json.loads(path.read_text())["test_pred"] == [3.0, 4.0]


def test_final_models_reads_every_cached_seed_without_training(tmp_path) -> None:
    runs.restore_final(tmp_path, "xie", hp().as_dict(), [[1.0], [2.0]])
    lines: list[str] = []
    got = runs.final_models(tmp_path, "p", {"xie": (hp(), [])}, 2, 1, lines.append)
    assert [r["test_pred"] for r in got["xie"]] == [[1.0], [2.0]]
    assert "0 final models to train (2 done before)" in lines[0]


def test_extrapolation_summary_of_restored_rankings(tmp_path) -> None:
    is_top = [False, False, True]
    runs.restore_extrapolation(tmp_path, "a", hp().as_dict(), [[0.0, 1.0, 2.0]], is_top)
    runs.restore_extrapolation(tmp_path, "b", hp().as_dict(), [[2.0, 1.0, 0.0]], is_top)
    rankings = runs.extrapolation_rankings(tmp_path, "p", {"a": (hp(), []), "b": (hp(), [])},
                                           5.0, 1, 1, lambda _: None)
    out = runs.extrapolation_summary(rankings, [("a", "b")], 20, "higher", 5.0)
    assert (out["n_top"], out["n_pool"]) == (1, 3)
    assert out["random_recall"] == pytest.approx(1 / 3)
    assert out["a"]["value"] == 1.0 and out["b"]["value"] == 0.0
    assert out["a-b"]["value"] == 1.0
    assert out["rankings"]["a"]["pred_per_seed"] == [[0.0, 1.0, 2.0]]


def test_seeds_done_counts_leading_rounds_every_model_finished() -> None:
    records = {("a", 0): {}, ("b", 0): {}, ("a", 1): {}}
    assert runs.seeds_done(["a", "b"], records, 3) == 1
    assert runs.seeds_done(["a"], records, 2) == 2


def test_run_in_workers_returns_records_in_job_order() -> None:
    seen: list[int] = []
    out = runs.run_in_workers(dict, [([("i", 0)],), ([("i", 1)],)], 1,
                              lambda rec, n: seen.append(n))
    assert out == [{"i": 0}, {"i": 1}] and seen == [1, 2]


def test_an_ensemble_needs_members_of_one_validation_split(tmp_path) -> None:
    # averaging models validated on different materials would leave no honest validation MAE
    a = Job("a", "band_gap", {}, seed=0)
    with pytest.raises(ValueError, match="validation split"):
        run_ensemble(None, None, "e", [(a, tmp_path), (Job("b", "band_gap", {}, seed=1),
                                                      tmp_path)], tmp_path, set())
    with pytest.raises(ValueError, match="zero floor"):
        run_ensemble(None, None, "e", [(a, tmp_path), (Job("c", "band_gap", {},
                                                          zero_floor=True), tmp_path)],
                     tmp_path, set())


def test_a_refit_needs_its_twin_and_an_ensemble_of_refits_the_ensemble_of_their_twins(
        tmp_path) -> None:
    refit = Job("r-a", "band_gap", {}, refit_of="a")
    with pytest.raises(ValueError, match="a refit needs its twin"):
        run_job(None, None, refit, Hyperparams, tmp_path, {"mp-1"})
    with pytest.raises(ValueError, match="only a refit has one"):
        run_job(None, None, Job("a", "band_gap", {}), Hyperparams, tmp_path, {"mp-1"},
                twin_dir=tmp_path)
    # a refit is another job (its own folder), and the twin's key is unchanged
    assert refit.key({"mp-1"}, "p") != Job("r-a", "band_gap", {}).key({"mp-1"}, "p")
    members = [(refit, tmp_path), (Job("r-b", "band_gap", {}, refit_of="b"), tmp_path)]
    with pytest.raises(ValueError, match="ensemble of their twins"):
        run_ensemble(None, None, "r-e", members, tmp_path, set())
    twins = tmp_path / "e-0123"
    twins.mkdir()
    (twins / RESULT_FILE).write_text(json.dumps({"job": "e", "members": ["b", "a"]}))
    with pytest.raises(ValueError, match=r"\['a', 'b'\]\); got \['b', 'a'\]"):
        run_ensemble(None, None, "r-e", members, tmp_path, set(), twin_dir=twins)


def test_a_refit_is_served_with_its_twins_floor_and_calibration_and_no_validation_mae() -> None:
    targets = np.array([0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 0.0, 1.5])
    data = SimpleNamespace(test_rows=np.array([6, 7]), pool_rows=np.arange(6),
                           test_targets=targets[6:])
    split = JobSplit(data, np.arange(6), targets[:6], np.arange(4), np.array([4, 5]))
    ws = SimpleNamespace(cache=SimpleNamespace(material_id=np.array([f"mp-{i}" for i in
                                                                     range(8)])))
    val_pred, test_pred = np.array([0.2, 2.9]), np.array([0.3, 1.2])
    cal = calibrate(np.array([0.0, 1.0, 2.0]), np.array([0.1, 1.2, 1.7]))
    twin = Twin("a-0123", 0.25, 30, 0.4, cal)
    served = _as_served(ws, split, val_pred, test_pred, True, twin)
    assert served.calibration is cal
    r = served.record
    assert r["zero_below"] == 0.4 and r["test_pred"] == [0.0, 1.2]  # the twin's floor
    assert r["val_mae"] is None and r["n_val"] == 0 and r["n_train"] == 6
    assert r["refit_of"] == "a-0123" and r["twin_val_mae"] == 0.25
    assert r["val_mae_in_training"] == pytest.approx(0.05)
    # its twin: the floor fitted on its validation split, and a validation MAE
    own = _as_served(ws, split, val_pred, test_pred, True).record
    assert own["n_train"] == 4 and own["n_val"] == 2 and own["val_mae"] is not None


def test_a_twin_without_a_calibration_is_calibrated_on_its_served_validation_predictions(
        tmp_path, monkeypatch) -> None:
    # an older twin bundle has no calibration: the refit takes one fitted on the twin's
    # validation predictions as served (its floor applied), not on the raw ones
    rng = np.random.default_rng(0)
    val_rows, val_targets = np.arange(3, 43), rng.uniform(0.0, 3.0, 40)
    served = np.maximum(val_targets + rng.normal(0.0, 0.5, 40), 0.0)  # what predict_rows gives
    stored = SimpleNamespace(calibration=None, zero_below=0.3)
    calls = []

    def fake_predict_rows(model, cache, rows, batch_size):
        calls.append((model, rows.tolist(), batch_size))
        return served, np.zeros_like(served)

    monkeypatch.setattr(experiment, "load_model", lambda path, name: stored)
    monkeypatch.setattr(experiment, "predict_rows", fake_predict_rows)
    folder = tmp_path / "a-0123"
    folder.mkdir()
    (folder / RESULT_FILE).write_text(json.dumps({"job": "a", "best_val_mae": 0.4,
                                                  "best_epoch": 12}))
    ws = SimpleNamespace(cache="cache")
    twin = experiment._twin(folder, "a", ws, val_rows, val_targets, 64)
    assert calls == [(stored, list(range(3, 43)), 64)]
    expected = calibrate(val_targets, served)
    assert twin.calibration.q_absolute == expected.q_absolute
    assert twin.calibration.q_absolute != calibrate(val_targets, served + 0.05).q_absolute
    assert twin.calibration.source == "validation split (40 materials) of a"
    assert (twin.name, twin.val_mae, twin.best_epoch, twin.zero_below) == ("a-0123", 0.4, 12, 0.3)
    # a twin with its own calibration keeps it (nothing is predicted)
    cal = calibrate(np.array([0.0, 1.0, 2.0]), np.array([0.1, 1.2, 1.7]))
    stored.calibration = cal
    assert experiment._twin(folder, None, ws, val_rows, val_targets, 64).calibration is cal
    assert len(calls) == 1
    with pytest.raises(ValueError, match="holds a, not the twin b"):
        experiment._twin(folder, "b", ws, val_rows, val_targets, 64)


def test_an_init_seed_makes_another_job_on_the_same_split_and_keeps_earlier_keys() -> None:
    # the keys of jobs without an init seed are those their finished results are stored under
    job = Job("a", "band_gap", {"lr": 0.1}, seed=2)
    floored = Job("a", "band_gap", {"lr": 0.1}, seed=2, zero_floor=True)
    assert job.key({"mp-1"}, "p") == "b6c161595566aba5"
    assert floored.key({"mp-1"}, "p") == "214422cde46f8a96"
    other = Job("a", "band_gap", {"lr": 0.1}, seed=2, init_seed=7)
    keys = {other.key({"mp-1"}, "p"), Job("a", "band_gap", {"lr": 0.1}, seed=2,
                                          init_seed=8).key({"mp-1"}, "p")}
    assert job.key({"mp-1"}, "p") not in keys and len(keys) == 2


def test_a_job_another_process_trains_is_refused_and_its_folder_left_alone(tmp_path) -> None:
    # two processes resuming one checkpoint would interleave their epochs
    job = Job("a", "band_gap", {"epochs": 3}, seed=0)
    folder = job_folder(tmp_path, job, {"mp-1"}, None)
    folder.mkdir()
    (folder / CHECKPOINT_FILE).write_bytes(b"epoch 2")
    with FileLock(folder / LOCK_FILE):
        with pytest.raises(JobBusy, match="a is being trained by another process"):
            run_job(None, None, job, Hyperparams, tmp_path, {"mp-1"})
    assert (folder / CHECKPOINT_FILE).read_bytes() == b"epoch 2"
    # once free, a finished result is read (not trained again)
    (folder / RESULT_FILE).write_text(json.dumps({"job": "a", "test_mae": 0.5}))
    assert run_job(None, None, job, Hyperparams, tmp_path, {"mp-1"})["test_mae"] == 0.5
