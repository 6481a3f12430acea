"""Calibrated prediction intervals (mpprop.intervals): the conformal quantile, its coverage on
exchangeable data, the bundle that stores it, and the columns `mpprop predict` and the served
model give, on tiny hand-made models and crystals (no MLflow, no shared data)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_structures

from mpprop.bundle import BundleError, load_model, save_bundle, with_calibration
from mpprop.inference import model_intervals, predict_structures
from mpprop.intervals import (
    METHOD_ABSOLUTE,
    METHOD_NORMALIZED,
    NO_CALIBRATION_NOTE,
    Calibration,
    calibrate,
    conformal_quantile,
    coverage_grid,
    interval_metrics,
    min_calibration_size,
)
from mpprop.model import CrystalGraphClassifier, CrystalGraphConvNet, Normalizer
from mpprop.prediction_csv import OUTPUT_COLUMNS, RegisteredModel
from mpprop.served_model import MODEL_ARTIFACT, CGCNNPyfunc
from mpprop.settings import GraphSettings, Hyperparams, PropertySpec
from mpprop.stages.predict import run_prediction

SPEC = PropertySpec("bulk_modulus", "bulk_modulus.vrh", "log10(GPa)", "log10", "higher")
HP = Hyperparams(1, 1, 8, 8, 0.01, 10, "SGD", 1)


def net(seed: int = 0) -> CrystalGraphConvNet:
    torch.manual_seed(seed)
    return CrystalGraphConvNet(HP, GraphSettings()).eval()


def absolute(q90: float) -> Calibration:
    """A single model's calibration whose 0.9 quantile is q90 (the others scaled from it)."""
    grid = coverage_grid()
    return Calibration(METHOD_ABSOLUTE, grid, tuple(q90 * c / 0.9 for c in grid), None, None,
                       100, "test")


# ---------------------------------------------------------------- the quantile


def test_conformal_quantile_of_known_residuals() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 11.0))  # 1..10, any order
    # the ceil((n+1) c)-th smallest of n = 10: ranks 6, 9, 10 and 11 (> n: infinite)
    assert conformal_quantile(scores, 0.5) == 6.0
    assert conformal_quantile(scores, 0.8) == 9.0
    assert conformal_quantile(scores, 0.9) == 10.0
    assert conformal_quantile(scores, 0.95) == math.inf
    # (n+1) c = 9 exactly for n = 9 at 0.9: rank 9, despite 0.9 * 10 = 9.000000000000002
    assert conformal_quantile(np.arange(1.0, 10.0), 0.9) == 9.0
    assert [min_calibration_size(c) for c in (0.5, 0.9, 0.95)] == [1, 9, 19]
    with pytest.raises(ValueError):
        conformal_quantile(scores, 1.0)


def _exchangeable(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """Targets, predictions and member spreads whose errors scale with the spread."""
    spread = rng.lognormal(-2.0, 0.8, n)
    pred = rng.normal(0.0, 1.0, n)
    y = pred + spread * rng.standard_t(5, n)
    return y, pred, spread


@pytest.mark.parametrize("coverage", [0.68, 0.9])
def test_coverage_holds_on_exchangeable_data(coverage: float) -> None:
    """Averaged over 300 draws of 200 calibration and 1,000 test materials, the share of test
    errors inside the interval is the nominal coverage (at most 1/(n+1) above it), for both
    methods; where the errors grow with the spread, the absolute intervals undercover the
    materials of large spread, the normalized ones (chosen) much less (eps, the median
    spread, keeps them from adapting fully)."""
    rng = np.random.default_rng(1)
    n = 200
    cover: dict[str, list[float]] = {METHOD_ABSOLUTE: [], METHOD_NORMALIZED: []}
    wide: dict[str, list[float]] = {METHOD_ABSOLUTE: [], METHOD_NORMALIZED: []}
    for _ in range(300):
        cal = calibrate(*_exchangeable(rng, n))
        assert cal.method == METHOD_NORMALIZED
        y, pred, spread = _exchangeable(rng, 1000)
        top = spread > np.quantile(spread, 0.75)
        for method in cover:
            one = Calibration(method, cal.coverages, cal.q_absolute, cal.q_normalized, cal.eps,
                              cal.n, "")
            m = interval_metrics(y, pred, spread, one, coverage)
            assert m["test_interval_nominal"] == coverage
            cover[method].append(m["test_interval_coverage"])
            wide[method].append(interval_metrics(y[top], pred[top], spread[top], one,
                                                 coverage)["test_interval_coverage"])
    for method, shares in cover.items():
        assert coverage - 0.01 < np.mean(shares) < coverage + 1 / (n + 1) + 0.01, method
    shortfall = {m: coverage - np.mean(shares) for m, shares in wide.items()}
    assert shortfall[METHOD_ABSOLUTE] > 0.15
    assert shortfall[METHOD_ABSOLUTE] - shortfall[METHOD_NORMALIZED] > 0.08


def test_method_choice() -> None:
    rng = np.random.default_rng(2)
    y, pred, spread = _exchangeable(rng, 500)
    single = calibrate(y, pred, np.full(500, np.nan))  # one model: no spread
    assert single.method == METHOD_ABSOLUTE and single.q_normalized is None
    assert calibrate(y, pred, spread).method == METHOD_NORMALIZED
    # a spread that says nothing about the error: normalizing would only add noise
    unrelated = rng.permutation(spread)
    noise = calibrate(y, pred, unrelated)
    assert noise.method == METHOD_ABSOLUTE
    # both quantiles are stored, whichever method is used
    r = np.abs(y - pred)
    at90 = noise.coverages.index(0.9)
    assert noise.q_absolute[at90] == conformal_quantile(r, 0.9)
    assert noise.eps == np.median(unrelated)
    assert noise.q_normalized[at90] == conformal_quantile(r / (unrelated + noise.eps), 0.9)


def test_off_grid_coverage_uses_the_next_stored_one() -> None:
    cal = absolute(0.3)
    used, half = cal.half_width(0.85, np.zeros(2))
    assert used == 0.9 and half.tolist() == [0.3, 0.3]
    assert cal.half_width(0.99, np.zeros(2)) is None and "0.99" in cal.note(0.99)
    # too few materials for 0.95: no interval there, one at 0.9
    few = calibrate(np.arange(10.0), np.zeros(10))
    assert few.quantile(0.95) is None and few.quantile(0.9) == (0.9, 9.0)
    assert few.tags()["interval_q95"] == "inf" and few.tags()["interval_q90"] == "9"


# ---------------------------------------------------------------- the bundle


def test_bundle_round_trip_with_and_without_calibration(tmp_path: Path) -> None:
    cal = calibrate(*_exchangeable(np.random.default_rng(3), 50), source="validation split")
    with_cal = load_model(save_bundle(tmp_path / "a.pt", net(), Normalizer(2.0, 0.5), SPEC,
                                      calibration=cal), "a")
    assert with_cal.calibration == cal
    without = load_model(save_bundle(tmp_path / "b.pt", net(), Normalizer(2.0, 0.5), SPEC), "b")
    assert without.calibration is None
    # a copy with the calibration: the same weights and keys, plus the calibration
    copy = load_model(with_calibration(tmp_path / "b.pt", tmp_path / "c.pt", cal), "c")
    assert copy.calibration == cal
    assert set(copy.bundle) == set(without.bundle) | {"calibration"}
    for key, value in without.model.state_dict().items():
        assert torch.equal(copy.model.state_dict()[key], value)
    # a classifier has no interval
    clf = CrystalGraphClassifier(HP, GraphSettings())
    with pytest.raises(ValueError, match="no prediction intervals"):
        save_bundle(tmp_path / "d.pt", clf, Normalizer(0.0, 1.0), SPEC, classes=["a", "b"],
                    calibration=cal)
    # a malformed calibration is a bundle error, not a crash at prediction
    data = torch.load(tmp_path / "a.pt", weights_only=True)
    data["calibration"]["method"] = "guess"
    torch.save(data, tmp_path / "e.pt")
    with pytest.raises(BundleError, match="calibration"):
        load_model(tmp_path / "e.pt", "e")


def test_an_older_bundle_predicts_without_intervals(tmp_path: Path) -> None:
    """A format-1 bundle (no format, task or calibration key) loads and predicts, its rows
    with empty intervals and the note saying how to get them."""
    model = net()
    old = {"state_dict": model.state_dict(), "normalizer": {"mean": 2.0, "std": 0.5},
           "hyperparams": HP.as_dict(), "graph_settings": vars(GraphSettings()),
           "property": vars(SPEC), "extra": {}}
    torch.save(old, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt", "old")
    assert loaded.calibration is None
    out = predict_structures([loaded], small_structures())
    assert np.all(np.isfinite(out.values[0]))
    assert np.all(np.isnan(out.lo[0])) and np.all(np.isnan(out.hi[0]))
    assert out.interval_coverage == [None] and out.interval_notes == [NO_CALIBRATION_NOTE]
    rows = _predict_csv(tmp_path, loaded)
    assert all(r["lo"] == r["hi"] == r["value_lo"] == r["interval_coverage"] == "" for r in rows)
    assert {r["interval_note"] for r in rows} == {NO_CALIBRATION_NOTE}


def test_a_classifier_gets_no_interval() -> None:
    clf = CrystalGraphClassifier(HP, GraphSettings()).eval()
    loaded = load_model_from(clf, classes=["non-metal", "metal"])
    lo, hi, used, note = model_intervals(loaded, np.zeros(2), np.zeros(2))
    assert np.all(np.isnan(lo)) and np.all(np.isnan(hi)) and used is None and note == ""


def load_model_from(model: CrystalGraphConvNet, **kwargs) -> object:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return load_model(save_bundle(Path(tmp) / "m.pt", model, Normalizer(0.0, 1.0), SPEC,
                                      **kwargs), "m")


# ---------------------------------------------------------------- the CSV and the served model


def _predict_csv(tmp_path: Path, loaded, coverage: float = 0.9) -> list[dict[str, str]]:
    folder = tmp_path / "cifs"
    folder.mkdir(exist_ok=True)
    for i, s in enumerate(small_structures()):
        s.to(filename=str(folder / f"s{i}.cif"))
    out = tmp_path / "pred.csv"
    run_prediction([RegisteredModel("bulk_modulus", "models:/m/1", loaded)], [folder], out,
                   batch_size=8, progress=False, coverage=coverage)
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == OUTPUT_COLUMNS
        return list(reader)


def test_predict_csv_has_calibrated_intervals(tmp_path: Path) -> None:
    loaded = load_model(save_bundle(tmp_path / "m.pt", net(), Normalizer(2.0, 0.5), SPEC,
                                    calibration=absolute(0.3)), "m")
    rows = _predict_csv(tmp_path, loaded, coverage=0.85)
    assert len(rows) == 4
    for r in rows:
        pred, lo, hi = float(r["prediction"]), float(r["lo"]), float(r["hi"])
        # the CSV gives 4 significant digits
        assert lo <= pred <= hi and hi - lo == pytest.approx(0.6, abs=2e-3)
        # natural units by the inverse transform (log10 GPa -> GPa)
        assert float(r["value_lo"]) == pytest.approx(10 ** lo, rel=3e-3)
        assert float(r["value_hi"]) == pytest.approx(10 ** hi, rel=3e-3)
        assert float(r["value_lo"]) <= float(r["value"]) <= float(r["value_hi"])
        assert float(r["interval_coverage"]) == 0.9 and r["interval_note"] == ""  # next stored
        assert r["std"] == ""  # one model: no member spread


def test_an_ensemble_gets_normalized_intervals(tmp_path: Path) -> None:
    members = [(net(s), Normalizer(2.0, 0.5)) for s in range(3)]
    grid = coverage_grid()
    cal = Calibration(METHOD_NORMALIZED, grid, (1.0,) * len(grid), (2.0,) * len(grid), 0.1,
                      100, "test")
    loaded = load_model(save_bundle(tmp_path / "m.pt", *members[0], SPEC, members=members[1:],
                                    calibration=cal), "m")
    out = predict_structures([loaded], small_structures())
    std = out.stds[0]
    assert np.all(std > 0)
    np.testing.assert_allclose(out.hi[0] - out.values[0], 2.0 * (std + 0.1))
    np.testing.assert_allclose(out.values[0] - out.lo[0], 2.0 * (std + 0.1))


def test_served_model_answers_with_intervals(tmp_path: Path) -> None:
    path = save_bundle(tmp_path / "m.pt", net(), Normalizer(2.0, 0.5), SPEC,
                       calibration=absolute(0.3))
    pyfunc = CGCNNPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={MODEL_ARTIFACT: str(path)}))
    frame = pd.DataFrame({"structure": [json.dumps(s.as_dict()) for s in small_structures()]
                          + ["not json"]})
    out = pyfunc.predict(None, frame)
    numbers = ("prediction", "lo", "hi", "value_lo", "value_hi", "interval_coverage")
    assert set(numbers) | {"interval_note"} <= set(out.columns)
    out = out.astype({c: float for c in numbers})  # null (None) in the JSON answer: NaN here
    ok = out.iloc[:4]
    assert np.all(ok["lo"] <= ok["prediction"]) and np.all(ok["prediction"] <= ok["hi"])
    np.testing.assert_allclose(ok["hi"] - ok["lo"], 0.6)
    np.testing.assert_allclose(ok["value_hi"], 10 ** ok["hi"])
    assert ok["interval_coverage"].tolist() == [0.9] * 4
    bad = out.iloc[4]
    assert bad["error"] and np.isnan(bad["lo"]) and np.isnan(bad["interval_coverage"])
