"""What a researcher sees, in a real browser (Debian's Chromium, driven by Playwright): the
MLflow UI at `mpprop ui-url`'s link opens on the training runs table, model-training view,
with the metric columns that compare the runs; and the offline `dvc plots show` page draws
every plot with no network (tests/test_plots.py builds that project).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from conftest import headless_browser, run_cli

from mpprop.config import load_params
from mpprop.tracking import KIND_TRAIN, KIND_TRIAL, TAG_KIND, TAG_PRESET, TAG_PROPERTY, setup_mlflow

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
SERVER_START_S = 120  # `mlflow server` takes ~10 s to answer here; more on a loaded machine
PAGE_LOAD_MS = 90_000
# two training runs (the tuned one better) and a tuning trial the link must leave out
RUNS = {"bulk_modulus-xie": ("xie", 0.0583), "bulk_modulus-tuned": ("tuned", 0.0543)}
TRIAL = "bulk_modulus trial 3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


@pytest.fixture
def mlflow_ui(project: Path):
    """The project's store with two training runs and a trial, served by `mlflow server`."""
    params = load_params(project / "params.yaml")
    setup_mlflow(params)
    for name, (preset, mae) in RUNS.items():
        with mlflow.start_run(run_name=name):
            mlflow.set_tags({TAG_KIND: KIND_TRAIN, TAG_PROPERTY: "bulk_modulus",
                             TAG_PRESET: preset})
            mlflow.log_metrics({"test_mae": mae, "best_val_mae": mae + 0.01})
    with mlflow.start_run(run_name=TRIAL):
        mlflow.set_tags({TAG_KIND: KIND_TRIAL, TAG_PROPERTY: "bulk_modulus"})
        mlflow.log_metrics({"test_mae": 0.01, "best_val_mae": 0.01})
    port = free_port()
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", params.tracking_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base, SERVER_START_S)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_ui_url_opens_the_training_runs_table_with_metric_columns(
        project: Path, mlflow_ui: str, tmp_path: Path) -> None:
    url = run_cli(project, "ui-url", "--base", mlflow_ui).strip().splitlines()[-1]
    with headless_browser() as browser:
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(url)
        page.get_by_text("bulk_modulus-tuned").first.wait_for(timeout=PAGE_LOAD_MS)
        page.screenshot(path=str(tmp_path / "runs.png"))
        grid = page.locator("[role=grid]").first
        text = grid.inner_text()
        # the model-training view's runs table (not the GenAI view's traces)
        assert page.get_by_text("Model training").first.is_visible()
        # the metric columns that compare the runs, and the runs' property and preset
        for column in ("test_mae", "best_val_mae", "mpprop.preset", "mpprop.property"):
            assert column in text, (column, text)
        # training runs only, best test MAE first
        assert TRIAL not in text
        assert text.index("bulk_modulus-tuned") < text.index("bulk_modulus-xie")
        assert "0.0543" in text and "0.0583" in text
