"""The published band-gap model's domain (non-metals) and the metal classifier that gates it.

The band-gap checkpoint was trained on non-metals only, so it gives metals a gap (fcc Cu
~1.7 eV); the published metal / non-metal classifier (the eighth checkpoint) decides metals,
and `mpprop predict` with the xie-2018 band-gap model reports 0 for them by default.
"""

from __future__ import annotations

import csv
import gzip
import json
import pickle
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import require_shared_data
from mlflow.tracking import MlflowClient
from pymatgen.core import Lattice, Structure

from mpprop.bundle import (
    BUNDLE_FORMAT,
    PLAIN_FORMAT,
    TASK_CLASSIFICATION,
    BundleError,
    attach_metal_gate,
    load_model,
    save_bundle,
)
from mpprop.cli import main
from mpprop.inference import predict_structures
from mpprop.model import (
    DOMAIN_NON_METALS,
    METAL_CLASSIFIER,
    METAL_CLASSIFIER_CLASSES,
    CrystalGraphClassifier,
    load_checkpoint,
    pretrained_path,
    read_checkpoint,
)
from mpprop.settings import GraphSettings, PropertySpec
from mpprop.shipped import shipped_models

GRAPH = GraphSettings()
BAND_GAP = PropertySpec("band_gap", "band_gap", "eV", "none", "higher")
IS_METAL = PropertySpec(METAL_CLASSIFIER, "is_metal", "probability", "none", None)
N_SNAPSHOT = 300  # seeded random snapshot materials for the classifier's accuracy
MIN_ACCURACY = 0.85  # measured: 0.93 on 500, 0.926 on 3000 random snapshot materials


def _fcc(element: str, a: float) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [element], [[0, 0, 0]])


def _rocksalt(a_site: str, b_site: str, a: float) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [a_site, b_site],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])


METALS = {"Cu": _fcc("Cu", 3.61), "Au": _fcc("Au", 4.08), "Al": _fcc("Al", 4.05)}
NON_METALS = {
    "Si": Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.43), ["Si"], [[0, 0, 0]]),
    "NaCl": _rocksalt("Na", "Cl", 5.64),
    "MgO": _rocksalt("Mg", "O", 4.21),
    "GaAs": Structure.from_spacegroup("F-43m", Lattice.cubic(5.65), ["Ga", "As"],
                                      [[0, 0, 0], [0.25, 0.25, 0.25]]),
}
STRUCTURES = {**METALS, **NON_METALS}


def _saved(tmp_path: Path, key: str) -> Path:
    """A published checkpoint as a bundle, the way import-pretrained writes it."""
    model, normalizer, _ = load_checkpoint(pretrained_path(key), GRAPH)
    classifier = key == METAL_CLASSIFIER
    return save_bundle(tmp_path / f"{key}.pt", model, normalizer,
                       IS_METAL if classifier else BAND_GAP,
                       domain="" if classifier else DOMAIN_NON_METALS,
                       classes=METAL_CLASSIFIER_CLASSES if classifier else None)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundles")
    return {key: _saved(folder, key) for key in (METAL_CLASSIFIER, "band_gap")}


class _Payload:
    """Unpickling this writes a marker file: the proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_classifier_checkpoint_loads_weights_only_and_nothing_else_is_allowed(tmp_path):
    path = pretrained_path(METAL_CLASSIFIER)
    # the file holds a numpy scalar: plain weights_only refuses it, the allow-list admits it
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(path, map_location="cpu", weights_only=True)
    assert read_checkpoint(path)["args"]["task"] == "classification"
    model, normalizer, hp = load_checkpoint(path, GRAPH)
    assert isinstance(model, CrystalGraphClassifier) and model.fc_out.out_features == 2
    assert (normalizer.mean, normalizer.std) == (0.0, 1.0)
    assert (hp.n_conv, hp.atom_fea_len, hp.h_fea_len) == (4, 64, 32)
    # a checkpoint that carries code is still refused, and the code never runs
    marker = tmp_path / "marker"
    bad = tmp_path / "bad.pth.tar"
    torch.save({**read_checkpoint(path), "extra": _Payload(marker)}, bad)
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(bad)
    assert not marker.exists()


def _p_metal(bundle: Path) -> dict[str, float]:
    out = predict_structures([load_model(bundle, "clf")], list(STRUCTURES.values()))
    assert out.errors == [""] * len(STRUCTURES)
    return dict(zip(STRUCTURES, out.values[0].tolist(), strict=True))


def test_classifier_says_metal_for_metals_and_not_for_semiconductors(bundles):
    loaded = load_model(bundles[METAL_CLASSIFIER], "clf")
    assert loaded.task == TASK_CLASSIFICATION and loaded.classes == ["non-metal", "metal"]
    assert loaded.bundle["format"] == PLAIN_FORMAT
    p = _p_metal(bundles[METAL_CLASSIFIER])
    assert all(0.0 <= v <= 1.0 for v in p.values()), p
    for name in METALS:
        assert p[name] > 1 - p[name], (name, p)  # metal is the more probable class
    for name in NON_METALS:
        assert p[name] < 1 - p[name], (name, p)


@pytest.mark.e2e
def test_classifier_agrees_with_snapshot_band_gaps(bundles):
    """Class 1 = metal on real MP materials (band_gap == 0 is a metal)."""
    lines = gzip.open(require_shared_data(), "rt").readlines()
    rng = np.random.default_rng(0)
    records = []
    for i in rng.permutation(len(lines)):
        record = json.loads(lines[i])
        if record.get("band_gap") is not None:
            records.append(record)
        if len(records) == N_SNAPSHOT:
            break
    out = predict_structures([load_model(bundles[METAL_CLASSIFIER], "clf")],
                             [Structure.from_dict(r["structure"]) for r in records])
    ok = np.array([e == "" for e in out.errors])
    metal = np.array([r["band_gap"] == 0 for r in records])
    said_metal = out.values[0] > 1 - out.values[0]
    assert ok.mean() > 0.95 and 0.2 < metal.mean() < 0.8  # both kinds are there
    assert np.mean(said_metal[ok] == metal[ok]) > MIN_ACCURACY


def test_gate_zeroes_metals_on_the_same_graphs(bundles):
    plain = load_model(bundles["band_gap"], "bg")
    gated = attach_metal_gate(load_model(bundles["band_gap"], "bg gated"),
                              load_model(bundles[METAL_CLASSIFIER], "clf"))
    assert plain.domain == DOMAIN_NON_METALS
    out = predict_structures([plain, gated], list(STRUCTURES.values()))
    ungated = dict(zip(STRUCTURES, out.values[0].tolist(), strict=True))
    gate = dict(zip(STRUCTURES, out.values[1].tolist(), strict=True))
    for name in METALS:
        assert gate[name] == 0.0 and ungated[name] > 0.5, (name, ungated[name])
    for name in NON_METALS:
        assert gate[name] == ungated[name] != 0.0, name
    # a gate must be a metal classifier reading the same graphs
    with pytest.raises(BundleError, match="not a metal classifier"):
        attach_metal_gate(load_model(bundles["band_gap"], "a"), load_model(bundles["band_gap"], "b"))
    other = load_model(bundles[METAL_CLASSIFIER], "clf")
    other.model.graph_settings = GraphSettings(radius=6.0)
    with pytest.raises(BundleError, match="other graphs"):
        attach_metal_gate(load_model(bundles["band_gap"], "a"), other)


def test_bundles_of_format_1_still_load_and_newer_ones_are_refused(bundles, tmp_path):
    data = torch.load(bundles["band_gap"], weights_only=True)
    old = {k: v for k, v in data.items() if k not in ("format", "task", "domain", "classes")}
    torch.save(old, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt", "old")
    assert loaded.task == "regression" and loaded.domain == "" and loaded.gate is None
    assert type(loaded.model).__name__ == "CrystalGraphConvNet"
    torch.save({**data, "format": BUNDLE_FORMAT + 1}, tmp_path / "new.pt")
    with pytest.raises(BundleError, match="newer than this mpprop reads"):
        load_model(tmp_path / "new.pt", "new")


# ---------------------------------------------------------------- registry and predict


def _read_csv(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {Path(r["id"]).stem: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """A folder without params.yaml (built-in defaults), MLflow at MLFLOW_TRACKING_URI, the
    band-gap checkpoint imported (which brings the classifier), structure files in `in/`."""
    root = tmp_path_factory.mktemp("gate")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        result = CliRunner().invoke(main, ["import-pretrained", "--property", "band_gap"])
        assert result.exit_code == 0, result.output
        assert "mpprop-is_metal@xie-2018 -> v1 (registered" in result.output
        assert "mpprop-band_gap@xie-2018 -> v1 (registered" in result.output
    (root / "in").mkdir()
    for name, s in STRUCTURES.items():
        s.to(filename=str(root / "in" / f"{name}.cif"))
    return root


@pytest.fixture
def in_registry(registry, monkeypatch) -> Path:
    monkeypatch.chdir(registry)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registry / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{registry / 'mlflow.db'}")
    return registry


def _predict(*overrides: str, ok: bool = True) -> str:
    sets = [a for o in overrides for a in ("-S", o)]
    result = CliRunner().invoke(main, [*sets, "predict", "--property", "band_gap", "--alias",
                                       "xie-2018", "--input", "in", "--output", "out.csv"])
    assert (result.exit_code == 0) == ok, result.output
    return result.output


def test_import_tags_the_domain_and_registers_the_classifier(in_registry):
    client = MlflowClient()
    gap = client.get_model_version_by_alias("mpprop-band_gap", "xie-2018").tags
    clf = client.get_model_version_by_alias("mpprop-is_metal", "xie-2018").tags
    assert gap["mpprop.domain"] == DOMAIN_NON_METALS and gap["mpprop.task"] == "regression"
    assert gap["metal_gate"].startswith("mpprop-is_metal")
    assert clf["mpprop.task"] == "classification" and clf["mpprop.kind"] == "pretrained"
    assert json.loads(clf["classes"]) == ["non-metal", "metal"]
    assert clf["split"].startswith("80/10/10") and gap["split"].startswith("60/20/20")


def test_xie_band_gap_prediction_is_gated_by_default(in_registry):
    _predict()
    rows = _read_csv(in_registry / "out.csv")
    assert all(r["error"] == "" for r in rows.values())
    assert {r["model"] for r in rows.values()} == {"mpprop-band_gap@xie-2018 v1+metal-classifier v1"}
    for name in METALS:
        assert float(rows[name]["value"]) == 0.0, name
    for name in NON_METALS:
        assert float(rows[name]["value"]) > 0.0, name
    gated = {n: float(r["value"]) for n, r in rows.items()}

    # the option off: the published model alone, metals get a gap, the model column says so
    _predict("predict.xie_band_gap_metal_gate=false")
    rows = _read_csv(in_registry / "out.csv")
    assert {r["model"] for r in rows.values()} == {"mpprop-band_gap@xie-2018 v1"}
    for name in METALS:
        assert float(rows[name]["value"]) > 0.5, name
    for name in NON_METALS:
        assert float(rows[name]["value"]) == pytest.approx(gated[name]), name


def test_served_xie_band_gap_model_is_gated_too(in_registry):
    frame = pd.DataFrame({"structure": [json.dumps(s.as_dict()) for s in STRUCTURES.values()]})
    gap = mlflow.pyfunc.load_model("models:/mpprop-band_gap@xie-2018").predict(frame)
    clf = mlflow.pyfunc.load_model("models:/mpprop-is_metal@xie-2018").predict(frame)
    gap = dict(zip(STRUCTURES, gap["value"].tolist(), strict=True))
    p = dict(zip(STRUCTURES, clf["value"].tolist(), strict=True))
    for name in METALS:
        assert gap[name] == 0.0 and p[name] > 0.5, name
    for name in NON_METALS:
        assert gap[name] > 0.0 and p[name] < 0.5, name


def test_missing_classifier_is_a_clear_error_and_reimport_upgrades(in_registry):
    client = MlflowClient()
    client.delete_registered_model_alias("mpprop-is_metal", "xie-2018")
    out = _predict(ok=False)
    assert "mpprop import-pretrained" in out and "xie_band_gap_metal_gate: false" in out
    _predict("predict.xie_band_gap_metal_gate=false")  # the option off needs no classifier
    # a version registered by an older import (no import format): re-import registers anew
    old = client.get_model_version_by_alias("mpprop-band_gap", "xie-2018").version
    client.delete_model_version_tag("mpprop-band_gap", old, "import_format")
    client.delete_model_version_tag("mpprop-band_gap", old, "mpprop.domain")
    latest = max(int(v.version) for v in client.search_model_versions("name='mpprop-band_gap'"))
    result = CliRunner().invoke(main, ["import-pretrained", "--property", "band_gap"])
    assert result.exit_code == 0, result.output
    assert "mpprop-is_metal@xie-2018 -> v1 (alias moved to existing version" in result.output
    assert f"mpprop-band_gap@xie-2018 -> v{latest + 1} (registered" in result.output
    _predict()
    rows = _read_csv(in_registry / "out.csv")
    assert rows["Cu"]["model"] == f"mpprop-band_gap@xie-2018 v{latest + 1}+metal-classifier v1"
    assert float(rows["Cu"]["value"]) == 0.0
    again = CliRunner().invoke(main, ["import-pretrained", "--property", "band_gap"]).output
    # the published pair, and mpprop's own band-gap model where one is shipped
    shipped = sum(m.prop == "band_gap" for m in shipped_models())
    assert again.count("already registered") == 2 + shipped
