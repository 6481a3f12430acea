"""End to end on real MP data: fetch (file source) -> featurize -> train, tracked in MLflow."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import require_shared_data

from mpprop.cli import main

pytestmark = pytest.mark.e2e

PROP = "formation_energy_per_atom"


def invoke(project, *args):
    result = CliRunner().invoke(
        main, ["--params", str(project / "params.yaml"), *args], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_fetch_featurize_train_on_real_records(project):
    data = require_shared_data()
    sets = ["-S", f"data.path={data}", "-S", "data.max_records=400"]
    out = invoke(project, *sets, "fetch")
    meta = json.loads((project / "data/snapshot/snapshot.json").read_text())
    assert meta["n_records"] == 400
    assert meta["counts"][PROP] > 350
    assert PROP in out

    out = invoke(project, *sets, "featurize", "--workers", "1")
    assert "400 graphs" in out
    current = json.loads((project / "data/graphs/current.json").read_text())
    assert current["snapshot_sha256"] == meta["sha256"]
    assert (project / "data/graphs" / current["key"] / "edge_distance.npy").exists()
    # train reads the split stage's output and never writes it
    no_split = CliRunner().invoke(main, ["--params", str(project / "params.yaml"), *sets,
                                         "train", "--property", PROP])
    assert no_split.exit_code != 0 and "mpprop split" in no_split.output
    invoke(project, *sets, "split", "--property", PROP)

    out = invoke(
        project, *sets, "-S", "train.batch_size=32", "-S", "train.device=cpu", "train",
        "--property", PROP,
        "--epochs", "8", "--optimizer", "RAdam", "--lr", "0.01",
    )
    metrics = json.loads((project / f"models/{PROP}/xie/metrics.json").read_text())

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns/mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(metrics["run_id"])
    val = [m.value for m in client.get_metric_history(run.info.run_id, "val_mae")]
    assert len(val) == 8
    # learning happened: the best val MAE is well below the first epoch's
    assert min(val) < 0.8 * val[0]
    assert metrics["best_val_mae"] == pytest.approx(min(val))
    assert np.isfinite(run.data.metrics["test_mae"])
    assert 0.0 <= run.data.metrics["test_screening_precision"] <= 100.0
    assert run.data.params["n_conv"] == "4"
    assert (run.data.params["device"], run.data.params["precision"]) == ("cpu", "fp32")
    assert run.data.params["snapshot_sha256"] == meta["sha256"]
    assert run.data.tags["graph_cache_key"] == current["key"]

    # the logged model predicts from structures
    model = mlflow.pyfunc.load_model(metrics["model_uri"])
    from mpprop.snapshot import load_snapshot

    snap, _ = load_snapshot(project / "data/snapshot")
    frame = __import__("pandas").DataFrame(
        {"structure": [json.dumps(snap.structure(i).as_dict()) for i in range(5)]}
    )
    pred = model.predict(frame)
    assert np.isfinite(pred["prediction"].astype(float)).all()
    # loading and predicting leave the process's autograd state alone
    assert torch.is_grad_enabled()
    # the same structures as CIF text give the same numbers; garbage is reported, not fatal
    from pymatgen.io.cif import CifWriter

    cifs = [str(CifWriter(snap.structure(i))) for i in range(5)] + ["not a cif"]
    by_cif = model.predict(__import__("pandas").DataFrame({"cif": cifs}))
    np.testing.assert_allclose(by_cif["prediction"][:5].astype(float),
                               pred["prediction"].astype(float), atol=1e-4)
    assert by_cif["prediction"][5] is None and by_cif["error"][5]  # null when served, not NaN
