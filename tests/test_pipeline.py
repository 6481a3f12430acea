"""The whole DVC pipeline (`dvc repro`, the real dvc and mpprop commands) on a tiny subsample
of the real MP snapshot: report, champions, batch prediction, and fine-grained invalidation.

The repo's pipeline files (dvc.yaml, params.yaml, and src/ for the code dependencies) are
copied into a fresh git + DVC project; data, models and MLflow stay inside it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import REPO, require_shared_data
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.e2e

# three properties: two with a screening direction (one log10-transformed), one without
PROPS = ["band_gap", "bulk_modulus", "poisson_ratio"]
NO_SCREENING = {"poisson_ratio"}
# the elastic properties are ~15% of the records: 400 gives ~60 of each (>= 30 needed)
MAX_RECORDS = 400
MIN_LABELLED = 30
N_PREDICT = 4  # structures written as CIFs for `mpprop predict`
CHANGED_PROP = "bulk_modulus"
VENV_BIN = Path(sys.executable).parent


def tiny_params(raw: dict, data: Path) -> dict:
    """The repo's params with a budget of seconds: 3 properties, 2 trials of 2 epochs."""
    raw["data"].update(source="file", path=str(data), max_records=MAX_RECORDS)
    raw["properties"] = PROPS
    raw["presets"]["xie"]["epochs"] = 3
    raw["train"].update(torch_threads=1)
    raw["tune"].update(n_trials=2, epochs=2)
    return raw


def sh(args: list[str], cwd: Path) -> str:
    env = dict(os.environ)
    # DVC runs each stage's cmd in a shell: `mpprop` must be on its PATH
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"{' '.join(args)} failed ({proc.returncode})\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    )
    return proc.stdout


def dvc(*args: str, cwd: Path) -> str:
    return sh([str(VENV_BIN / "dvc"), *args], cwd)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = require_shared_data()
    root = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(REPO / "src", root / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    raw = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()), data)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    # as run.sh's demo: dvc.yaml with the plots of these properties only
    sh([str(VENV_BIN / "mpprop"), "--params", str(root / "params.yaml"), "show-pipeline",
        "--source", str(REPO / "dvc.yaml"), "--out", str(root / "dvc.yaml")], REPO)
    sh(["git", "init", "-q"], root)
    dvc("init", "-q", cwd=root)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")  # mpprop's templates
    dvc("repro", cwd=root)
    return root


def tracking(root: Path) -> MlflowClient:
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_pipeline_is_up_to_date_after_repro(pipeline: Path) -> None:
    # nothing the pipeline writes is left undeclared or nondeterministic in its own lock
    assert json.loads(dvc("status", "--json", cwd=pipeline)) == {}
    meta = json.loads((pipeline / "data/snapshot/snapshot.json").read_text())
    for prop in PROPS:
        assert meta["counts"][prop] >= MIN_LABELLED, meta["counts"]


def test_report_table(pipeline: Path) -> None:
    with (pipeline / "reports/table2.csv").open() as fh:
        rows = {r["property"]: r for r in csv.DictReader(fh)}
    assert list(rows) == PROPS
    for prop, row in rows.items():
        assert int(row["n_test"]) > 0
        for preset in ("xie", "tuned"):
            assert math.isfinite(float(row[f"test_mae_{preset}"]))
            scr = row[f"test_screening_precision_{preset}"]
            if prop in NO_SCREENING:
                assert scr == ""
            else:
                assert 0.0 <= float(scr) <= 100.0
            # evaluate re-predicts from the saved file: the same number training logged
            trained = json.loads((pipeline / f"models/{prop}/{preset}/metrics.json").read_text())
            assert float(row[f"test_mae_{preset}"]) == pytest.approx(trained["test_mae"], rel=1e-6)
        assert row["champion_version"]
    markdown = (pipeline / "reports/table2.md").read_text()
    assert "Reference: the paper's Table 2" in markdown
    assert all(f"| {p} |" in markdown for p in PROPS)

    # the truth about each number: budget, intervals, n_top, near-constant flags, paired diff
    assert "budget xie" in markdown and "MAE tuned-xie" in markdown
    # screening: how many top materials, and the paired difference in points; one symbol for
    # a missing value, another for a property without a screening direction
    assert "| n_top |" in markdown and "| screening tuned-xie (points) |" in markdown
    for prop in PROPS:
        line = next(x for x in markdown.splitlines() if x.startswith(f"| {prop} |"))
        if prop in NO_SCREENING:
            assert "not screened" in line and "| dimensionless |" in line
        else:
            assert "not screened" not in line and "| - |" not in line
    metrics = json.loads((pipeline / "metrics/band_gap.json").read_text())
    assert set(metrics) == {"xie", "tuned", "paired:tuned-xie"}
    xie, tuned = metrics["xie"], metrics["tuned"]
    assert xie["test_mae_low"] <= xie["test_mae"] <= xie["test_mae_high"]
    assert xie["n_top"] >= 1 and isinstance(xie["near_constant"], bool)
    # equal budgets: the tuned preset trains for the Xie preset's epochs
    assert tuned["budget"]["epochs"] == xie["budget"]["epochs"] == 3
    assert tuned["budget"]["tune_trials"] == 2 and tuned["budget"]["tune_epochs_per_trial"] == 2
    diff = metrics["paired:tuned-xie"]
    assert diff["mae_diff"] == pytest.approx(tuned["test_mae"] - xie["test_mae"])
    assert diff["mae_diff_low"] <= diff["mae_diff"] <= diff["mae_diff_high"]
    assert json.loads((pipeline / "metrics/poisson_ratio.json").read_text())["tuned"][
        "test_screening_precision"] is None


def test_plots_and_mlflow(pipeline: Path) -> None:
    for prop in PROPS:
        parity = list(csv.DictReader((pipeline / f"plots/{prop}/parity.csv").open()))
        curve = list(csv.DictReader((pipeline / f"plots/{prop}/screening.csv").open()))
        n_test = json.loads((pipeline / f"metrics/{prop}.json").read_text())["xie"]["n_test"]
        for label in ("Xie preset", "tuned preset"):
            rows = [r for r in parity if r["model"] == label]
            assert len(rows) == n_test and all(math.isfinite(float(r["predicted"])) for r in rows)
            points = [r for r in curve if r["model"] == label]
            assert (not points) if prop in NO_SCREENING else len(points) > 1
        for preset in ("xie", "tuned"):
            assert (pipeline / f"plots/{prop}/{preset}.png").stat().st_size > 0
        # `dvc metrics show`: one row per property, the same few columns, the unit named
        summary = json.loads((pipeline / f"metrics/{prop}.summary.json").read_text())
        full = json.loads((pipeline / f"metrics/{prop}.json").read_text())
        assert summary["n_test"] == n_test and summary["unit"]
        assert summary["test_mae"]["tuned"] == pytest.approx(full["tuned"]["test_mae"], rel=1e-3)
        assert set(summary["test_mae"]) == {"xie", "tuned", "tuned-xie"}
    client = tracking(pipeline)
    # every training run has its evaluation under the same names: Compare pairs them
    for preset in ("xie", "tuned"):
        run_id = json.loads((pipeline / f"models/band_gap/{preset}/metrics.json").read_text())["run_id"]
        # at the root: the UI's Compare pairs files the runs share, and skips folders
        logged = {a.path for a in client.list_artifacts(run_id) if not a.is_dir}
        assert logged == {"evaluation.png", "parity.csv", "screening.csv"}, logged
        # its page says what it is: property, unit, preset, test MAE with its interval
        run = client.get_run(run_id)
        note = run.data.tags["mlflow.note.content"]
        label = {"xie": "Xie preset", "tuned": "tuned preset"}[preset]
        assert note.startswith(f"band_gap (eV), {label}: test MAE"), note
        low, high = run.data.metrics["test_mae_low"], run.data.metrics["test_mae_high"]
        assert f"95% interval {low:.4g} to {high:.4g}" in note
        assert low <= run.data.metrics["test_mae"] <= high
    reports = client.search_runs(
        [client.get_experiment_by_name("mpprop").experiment_id],
        filter_string="tags.`mpprop.kind` = 'report'",
    )
    assert reports  # newest first
    assert math.isfinite(reports[0].data.metrics["bulk_modulus.tuned.test_mae"])
    assert {a.path for a in client.list_artifacts(reports[0].info.run_id)} >= {
        "table2.md", "table2.csv"}
    # `dvc plots show` renders every declared plot (HTML, no browser)
    dvc("plots", "show", "-o", str(pipeline / "dvc_plots"), cwd=pipeline)
    assert (pipeline / "dvc_plots" / "index.html").exists()
    # dvc.yaml's top-level plots on the real outputs: per property Xie and tuned in one plot,
    # named by model; none fails to load (show-pipeline left out the other properties)
    shown = json.loads(dvc("plots", "show", "--json", cwd=pipeline))
    assert not shown.get("errors"), shown.get("errors")
    for prop in PROPS:
        kinds = ["parity"] + ([] if prop in NO_SCREENING else ["screening"])
        assert (f"{prop} screening" in shown["data"]) == (prop not in NO_SCREENING)
        for kind in kinds:
            rows = shown["data"][f"{prop} {kind}"][0]["content"]["data"]["values"]
            assert {r["model"] for r in rows} == {"Xie preset", "tuned preset"}


def test_champions_and_batch_prediction(pipeline: Path) -> None:
    from mpprop.snapshot import load_snapshot

    client = tracking(pipeline)
    promoted = json.loads((pipeline / "reports/promoted.json").read_text())
    for prop in PROPS:
        mv = client.get_model_version_by_alias(f"mpprop-{prop}", "champion")
        assert str(promoted[prop]["version"]) == str(mv.version)
        # the registry's pages describe the model and the version
        unit = yaml.safe_load((pipeline / "params.yaml").read_text())["property_specs"][prop]["unit"]
        assert client.get_registered_model(f"mpprop-{prop}").description.startswith(
            f"CGCNN models of {prop} ({unit})")
        assert f"Validation MAE {float(mv.tags['val_mae']):.4g} {unit}" in mv.description
        assert "the test set is not used to choose" in mv.description

    snap, _ = load_snapshot(pipeline / "data/snapshot")
    cifs = pipeline / "cifs"
    cifs.mkdir()
    for i in range(N_PREDICT):
        snap.structure(i).to(filename=str(cifs / f"{snap.material_id[i]}.cif"))
    sh([str(VENV_BIN / "mpprop"), "predict", "--property", "all", "--input", str(cifs),
        "--output", "preds.csv"], pipeline)
    with (pipeline / "preds.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_PREDICT * len(PROPS)
    assert {r["property"] for r in rows} == set(PROPS)
    for r in rows:
        assert not r["error"], r
        assert math.isfinite(float(r["prediction"]))


def test_one_property_change_reruns_only_its_stages(pipeline: Path) -> None:
    path = pipeline / "params.yaml"
    original = path.read_text()
    raw = yaml.safe_load(original)
    raw["property_specs"][CHANGED_PROP]["better"] = "lower"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        stale = set(json.loads(dvc("status", "--json", cwd=pipeline)))
        assert stale == {f"{stage}@{CHANGED_PROP}"
                         for stage in ("tune", "train-xie", "train-tuned", "evaluate")}
        dry = dvc("repro", "--dry", cwd=pipeline)
        ran = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
        # the per-property stages of the other properties stay put; only aggregates follow
        assert all(s.endswith(f"@{CHANGED_PROP}") or "@" not in s for s in ran), ran
        assert ran >= stale
    finally:
        path.write_text(original)
    assert json.loads(dvc("status", "--json", cwd=pipeline)) == {}


def test_extrapolation_evaluation_and_report_columns(pipeline: Path) -> None:
    # last in this file: it adds metrics/<P>.extrapolation.json, which the report reads
    prop = "band_gap"
    sh([str(VENV_BIN / "mpprop"), "evaluate", "--property", prop, "--extrapolation"], pipeline)
    out = json.loads((pipeline / f"metrics/{prop}.extrapolation.json").read_text())
    split = json.loads((pipeline / f"data/splits/{prop}.json").read_text())
    n_test, n_pool_part = len(split["test"]), len(split["pool"])
    assert out["n_top"] == math.ceil((n_test + n_pool_part) * out["top_percent"] / 100)
    # candidates: the random test set and the held-out top (some of it may be in the test set)
    assert n_test <= out["n_pool"] <= n_test + out["n_top"]
    held_out_of_pool = out["n_pool"] - n_test
    assert out["n_train"] + out["n_val"] == n_pool_part - held_out_of_pool
    assert out["random_recall"] == pytest.approx(out["n_top"] / out["n_pool"])
    for preset in ("xie", "tuned"):
        r = out[preset]
        assert 0.0 <= r["recall_low"] <= r["recall"] <= r["recall_high"] <= 1.0
        assert r["enrichment"] == pytest.approx(r["recall"] / out["random_recall"])
    diff = out["paired:tuned-xie"]
    assert diff["recall_diff"] == pytest.approx(out["tuned"]["recall"] - out["xie"]["recall"])

    sh([str(VENV_BIN / "mpprop"), "report", "--no-mlflow"], pipeline)
    markdown = (pipeline / "reports/table2.md").read_text()
    assert "extrapolation recall xie" in markdown and "extrapolation recall tuned" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {prop} |"))
    assert f"{out['xie']['recall']:.2f} [{out['xie']['recall_low']:.2f}" in row
