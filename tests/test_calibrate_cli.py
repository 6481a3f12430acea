"""Calibrated intervals end to end on real MP records: `mpprop train` calibrates on its
validation split (bundle, run params, registry tags), `mpprop calibrate` calibrates the
published checkpoint on a labelled file and registers a new version whose predictions have
intervals; the uncalibrated version keeps predicting without them."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import run_cli, shared_record_lines, small_project
from mlflow.tracking import MlflowClient

from mpprop.bundle import load_model
from mpprop.config import load_params
from mpprop.data import open_workspace, property_data, train_val_split, transform_target
from mpprop.inference import predict_rows
from mpprop.intervals import NO_CALIBRATION_NOTE, conformal_quantile
from mpprop.snapshot import sha256_file

PROP = "bulk_modulus"
N_PROJECT = 80  # records of the project's workspace (train)
N_LABELLED = 80  # the next records with a bulk modulus: the labelled file (calibrate)
NAME = f"mpprop-{PROP}"
pytestmark = pytest.mark.e2e  # real MP records from ../shared/data


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = small_project(tmp_path_factory.mktemp("calibrate"),
                         shared_record_lines(PROP, N_PROJECT), PROP)
    # the next records with the property: the labelled file calibrate reads
    with gzip.open(root / "labelled.jsonl.gz", "wt") as fh:
        fh.writelines(shared_record_lines(PROP, N_LABELLED, skip=N_PROJECT))
    return root


cli = run_cli


def client(root: Path) -> MlflowClient:
    mlflow.set_tracking_uri(load_params(root / "params.yaml").tracking_uri())
    return MlflowClient()


def predict_csv(root: Path, out: str, *options: str) -> dict[str, dict[str, str]]:
    """`mpprop predict` of the labelled file with these options (e.g. --alias xie-2018)."""
    cli(root, "predict", "--property", PROP, "--input", str(root / "labelled.jsonl.gz"),
        "--output", str(root / out), *options)
    with open(root / out, newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def labels(root: Path) -> dict[str, float]:
    """Material id -> log10 bulk modulus (model units) of the labelled file."""
    spec = load_params(root / "params.yaml").property_spec(PROP)
    with gzip.open(root / "labelled.jsonl.gz", "rt") as fh:
        records = [json.loads(line) for line in fh]
    return {r["material_id"]: float(transform_target(np.array([r[PROP]["vrh"]]), spec)[0])
            for r in records}


def test_train_calibrates_on_its_validation_split(project: Path) -> None:
    out = cli(project, "train", "--property", PROP, "--epochs", "2")
    metrics = json.JSONDecoder().raw_decode(out[out.index("{"):])[0]
    loaded = load_model(project / f"models/{PROP}/xie/model.pt", "trained")
    cal = loaded.calibration
    assert cal is not None and cal.method == "absolute"  # one model
    assert cal.n == metrics["n_val"] and "validation split" in cal.source
    # the quantile is that of the validation residuals (not train's, not test's)
    params = load_params(project / "params.yaml")
    data = property_data(params, open_workspace(params), PROP)
    _, va = train_val_split(len(data.pool_rows), params.split.val_fraction,
                            int(params.train.seed))
    pred, _ = predict_rows(loaded, data.cache, data.pool_rows[va])
    q90 = conformal_quantile(np.abs(pred - data.pool_targets[va]), 0.9)
    assert cal.quantile(0.9) == (0.9, pytest.approx(q90, rel=1e-6))
    assert cal.quantile(0.95) is None  # 13 validation materials: too few for 0.95
    assert 0 <= metrics["test_interval_coverage_90"] <= 1
    assert metrics["test_interval_width_90"] == pytest.approx(2 * q90, rel=1e-6)
    run = client(project).get_run(metrics["run_id"])
    assert run.data.params["interval_method"] == "absolute"
    assert float(run.data.params["interval_q90"]) == pytest.approx(q90, rel=1e-5)
    # promote copies them onto the registry version
    cli(project, "promote", "--property", PROP)
    tags = client(project).get_model_version_by_alias(NAME, "champion").tags
    assert tags["interval_method"] == "absolute" and tags["interval_q95"] == "inf"
    assert float(tags["interval_q90"]) == pytest.approx(q90, rel=1e-5)


def test_calibrate_registers_a_version_whose_predictions_have_intervals(project: Path) -> None:
    cli(project, "import-pretrained", "--property", PROP)
    published = client(project).get_model_version_by_alias(NAME, "xie-2018")
    assert published.tags["interval_note"] == NO_CALIBRATION_NOTE
    before = predict_csv(project, "before.csv", "--alias", "xie-2018")
    assert all(r["lo"] == "" and r["interval_note"] == NO_CALIBRATION_NOTE
               for r in before.values())

    out = cli(project, "calibrate", "--property", PROP, "--alias", "xie-2018", "--input",
              str(project / "labelled.jsonl.gz"))
    assert "registered" in out and f"from v{published.version}" in out
    new = client(project).get_model_version_by_alias(NAME, "xie-2018")
    assert int(new.version) > int(published.version)
    sha = sha256_file(project / "labelled.jsonl.gz")
    assert new.tags["calibrated_on"] == f"labelled.jsonl.gz sha256 {sha} n={N_LABELLED}"
    assert new.tags["calibrated_from"] == f"{NAME} v{published.version}"
    assert new.tags["checkpoint_sha256"] == published.tags["checkpoint_sha256"]
    assert "interval_note" not in new.tags
    # q90 is the conformal quantile of the published model's errors on the file
    y = labels(project)
    residuals = np.array([abs(float(r["prediction"]) - y[i]) for i, r in before.items()])
    q90 = conformal_quantile(residuals, 0.9)
    # (the CSV's predictions have 4 significant digits: q90 agrees to their rounding)
    assert float(new.tags["interval_q90"]) == pytest.approx(q90, abs=2e-3)

    after = predict_csv(project, "after.csv", "--alias", "xie-2018")
    for i, r in after.items():
        pred, lo, hi = float(r["prediction"]), float(r["lo"]), float(r["hi"])
        assert pred == pytest.approx(float(before[i]["prediction"]))  # the same weights
        assert lo <= pred <= hi and hi - lo == pytest.approx(2 * q90, abs=4e-3)
        assert float(r["value_lo"]) == pytest.approx(10 ** lo, rel=3e-3)
        assert r["interval_coverage"] == "0.9" and r["interval_note"] == ""
    inside = np.mean([float(r["lo"]) <= y[i] <= float(r["hi"]) for i, r in after.items()])
    assert inside >= 0.9  # on its own calibration set, by construction

    # the same calibration again: no second version
    again = cli(project, "calibrate", "--property", PROP, "--version", published.version,
                "--input", str(project / "labelled.jsonl.gz"))
    assert f"v{new.version} (already registered" in again
    # a bundle file only: the same calibration, nothing registered
    n_versions = len(client(project).search_model_versions(f"name = '{NAME}'"))
    cli(project, "calibrate", "--property", PROP, "--version", published.version, "--input",
        str(project / "labelled.jsonl.gz"), "--no-register", "--output",
        str(project / "calibrated.pt"))
    cal = load_model(project / "calibrated.pt", "file").calibration
    assert cal.tags()["interval_q90"] == new.tags["interval_q90"]
    assert len(client(project).search_model_versions(f"name = '{NAME}'")) == n_versions
    # the published version itself keeps predicting without intervals
    v1 = predict_csv(project, "v1.csv", "--version", published.version)
    assert all(r["lo"] == "" and r["interval_note"] == NO_CALIBRATION_NOTE for r in v1.values())


def test_calibrate_refuses_what_it_cannot_do(project: Path, tmp_path: Path) -> None:
    few = tmp_path / "few.jsonl"
    few.write_text("".join(shared_record_lines(PROP, 5)))
    out = cli(project, "calibrate", "--property", PROP, "--alias", "xie-2018", "--input",
              str(few), ok=False)
    error = out.strip().splitlines()[-1]  # (after MLflow's download progress)
    assert error.startswith("Error: ") and "5 usable labelled materials" in error
    assert "at least 9" in error and "Traceback" not in out
    out = cli(project, "calibrate", "--property", PROP, "--alias", "nope", "--input",
              str(few), ok=False)
    assert "no version with alias 'nope'" in out.strip().splitlines()[-1]
    assert "Traceback" not in out
