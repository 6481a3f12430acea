"""The zero floor of band-gap models (bundle zero_below): fitted on held-out materials,
stored in the bundle, applied wherever the model predicts, on hand-made numbers and crystals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli, shared_record_lines, small_project
from pymatgen.core import Lattice, Structure

from mpprop.bundle import fit_zero_below, floor_to_zero, floored, load_model, save_bundle
from mpprop.graphs import graphs_from_structures
from mpprop.inference import predict_rows, predict_structures
from mpprop.model import CrystalGraphConvNet, Normalizer
from mpprop.settings import GraphSettings, Hyperparams, PropertySpec
from mpprop.training import predict

SPEC = PropertySpec("band_gap", "band_gap", "eV", "none", "higher")
HP = Hyperparams(2, 1, 16, 8, 0.01, 10, "SGD", 1)


def gaps_and_predictions(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half metals (gap 0) predicted a little above 0, half semiconductors (1-4 eV)
    predicted with an error of a few tenths."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.zeros(200), rng.uniform(1.0, 4.0, 200)])
    pred = np.concatenate([rng.uniform(-0.1, 0.4, 200), y[200:] + rng.normal(0, 0.3, 200)])
    return y, pred


def mae_floored(y: np.ndarray, pred: np.ndarray, t: float) -> float:
    return float(np.mean(np.abs(y - floored(pred, t))))


def test_threshold_fitted_on_held_out_materials_floors_the_metals() -> None:
    y, pred = gaps_and_predictions()
    t = fit_zero_below(y, pred)
    # the metals' predictions reach 0.4 and the semiconductors' start near 0.1: the best
    # threshold lies between, and floors the metals to exact zeros
    assert 0.3 < t < 0.8
    after = floored(pred, t)
    assert (after[:200] == 0).mean() > 0.95
    assert mae_floored(y, pred, t) < float(np.mean(np.abs(y - pred))) - 0.07
    # it generalises: on other materials drawn the same way it helps as much
    y2, pred2 = gaps_and_predictions(seed=1)
    assert mae_floored(y2, pred2, t) < float(np.mean(np.abs(y2 - pred2))) - 0.07


def test_no_floor_beyond_the_negatives_where_no_target_is_zero() -> None:
    rng = np.random.default_rng(2)
    y = rng.uniform(1.0, 4.0, 300)
    pred = y + rng.normal(0, 0.2, 300)
    assert fit_zero_below(y, pred) == 0.0


def test_floor_keeps_nan_and_zeroes_the_spread_of_floored_values() -> None:
    values = np.array([np.nan, -0.2, 0.1, 0.5, 2.0])
    stds = np.array([np.nan, 0.1, 0.1, 0.1, np.nan])
    v, s = floor_to_zero(values, stds, 0.3)
    assert np.isnan(v[0]) and np.isnan(s[0]) and np.isnan(s[4])
    assert v[1:].tolist() == [0.0, 0.0, 0.5, 2.0]
    assert s[1:4].tolist() == [0.0, 0.0, 0.1]
    same = floor_to_zero(values, stds, None)
    assert same[0] is values and same[1] is stds


def test_bundle_keeps_the_threshold_and_every_prediction_path_applies_it(tmp_path) -> None:
    torch.manual_seed(0)
    model = CrystalGraphConvNet(HP, GraphSettings()).eval()
    structures = [Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [x, z],
                                            [[0, 0, 0], [.5, .5, .5]])
                  for a, x, z in ((5.64, "Na", "Cl"), (6.29, "K", "Cl"), (4.21, "Mg", "O"),
                                  (5.13, "Li", "Cl"), (5.97, "Na", "Br"), (4.81, "Ca", "O"))]
    cache = graphs_from_structures(structures, GraphSettings())
    normalizer = Normalizer(0.0, 1.0)
    raw = predict(model, normalizer, cache)
    threshold = float(np.median(raw))  # half of them below
    path = save_bundle(tmp_path / "model.pt", model, normalizer, SPEC, zero_below=threshold)
    loaded = load_model(path, "gap")
    assert loaded.zero_below == pytest.approx(threshold)
    expected = np.where(raw < threshold, 0.0, raw)
    assert (expected == 0).sum() == 3
    np.testing.assert_allclose(predict_rows(loaded, cache)[0], expected, atol=1e-6)
    served = predict_structures([loaded], structures).values[0]
    np.testing.assert_allclose(served, expected, atol=1e-6)
    # a bundle without the key predicts as before
    plain = load_model(save_bundle(tmp_path / "plain.pt", model, normalizer, SPEC), "plain")
    assert plain.zero_below is None
    np.testing.assert_allclose(predict_rows(plain, cache)[0], raw, atol=1e-6)


def test_train_fits_the_floor_of_a_property_that_asks_for_it(tmp_path) -> None:
    root = small_project(tmp_path, shared_record_lines("band_gap", 120), "band_gap")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["property_specs"]["band_gap"]["zero_floor"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    out = run_cli(root, "train", "--property", "band_gap", "--epochs", "1")
    metrics = json.loads((root / "models/band_gap/xie/metrics.json").read_text())
    assert metrics["zero_below"] >= 0.0 and "zero_below" in out
    loaded = load_model(root / "models/band_gap/xie/model.pt", "gap")
    assert loaded.zero_below == metrics["zero_below"] and loaded.spec.zero_floor
