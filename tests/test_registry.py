"""Registry and batch prediction on real MP records: promote, import-pretrained, predict, serve.

One small workspace per module (150 real records with a bulk modulus): two tiny training runs
and one fake tuning trial feed the promotion; the published checkpoints are imported once.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO, require_shared_data
from mlflow.tracking import MlflowClient
from pymatgen.core import Lattice, Structure

from mpprop.cli import main
from mpprop.config import Params, load_params

PROP = "bulk_modulus"
N_RECORDS = 150
N_FORMATION = 50
EPOCHS = 2
SERVE_TIMEOUT_S = 180

pytestmark = pytest.mark.e2e  # real MP records from ../shared/data
SMALL_PRESET = {  # a second preset, different from xie, for the promotion race
    "n_conv": 1, "n_h": 1, "atom_fea_len": 16, "h_fea_len": 16, "lr": 0.003,
    "lr_decay_epoch": 100, "optimizer": "RAdam", "epochs": EPOCHS,
}


def read_records(n: int, needs: str) -> list[dict]:
    out = []
    with gzip.open(require_shared_data(), "rt") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get(needs) is not None:
                out.append(rec)
                if len(out) == n:
                    break
    return out


class Workspace:
    def __init__(self, root: Path, records: list[dict]) -> None:
        self.root = root
        self.records = records
        self.params_file = root / "params.yaml"

    @property
    def params(self) -> Params:
        return load_params(self.params_file)

    def cli(self, *args: str, ok: bool = True) -> str:
        result = CliRunner().invoke(main, ["--params", str(self.params_file), *args])
        if ok:
            assert result.exit_code == 0, result.output + repr(result.exception)
        else:
            assert result.exit_code != 0, result.output
        return result.output

    def client(self) -> MlflowClient:
        mlflow.set_tracking_uri(self.params.tracking_uri())
        return MlflowClient()


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("registry")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["presets"]["small"] = SMALL_PRESET
    raw["train"].update(batch_size=32, torch_threads=1)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    records = read_records(N_RECORDS, PROP)
    source = root / "records.jsonl.gz"
    with gzip.open(source, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    workspace = Workspace(root, records)
    workspace.cli("-S", f"data.path={source}", "fetch")
    workspace.cli("featurize", "--workers", "1")
    return workspace


@pytest.fixture(scope="module")
def trained(ws: Workspace) -> dict[str, dict]:
    from mpprop.training import train_property

    return {
        preset: train_property(ws.params, PROP, preset, {"epochs": EPOCHS}, progress=False)
        for preset in ("xie", "small")
    }


@pytest.fixture(scope="module")
def champion(ws: Workspace, trained: dict[str, dict]) -> str:
    """The champion's version (promoted here unless the promotion test already did)."""
    from mpprop.registry import get_version_by_alias

    mv = get_version_by_alias(ws.client(), f"mpprop-{PROP}", "champion")
    if mv is None:
        ws.cli("promote", "--property", PROP)
        mv = get_version_by_alias(ws.client(), f"mpprop-{PROP}", "champion")
    return str(mv.version)


@pytest.fixture(scope="module")
def pretrained(ws: Workspace) -> str:
    return ws.cli("import-pretrained")


def log_fake_trial(ws: Workspace, bundle: Path, val_history: list[float]) -> str:
    """A completed tuning trial as the tuner logs it: val_mae per epoch and its model."""
    from mpprop.tracking import log_model, setup_mlflow

    params = ws.params
    setup_mlflow(params)
    current = json.loads((params.snapshot_dir() / "snapshot.json").read_text())
    with mlflow.start_run(run_name="trial-0") as run:
        mlflow.set_tags({
            "mpprop.property": PROP, "mpprop.kind": "tune-trial",
            "snapshot_sha256": current["sha256"],
        })
        for step, v in enumerate(val_history, start=1):
            mlflow.log_metric("val_mae", v, step=step)
        log_model(bundle)
    return run.info.run_id


def versions(client: MlflowClient, name: str) -> list:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def test_promote_picks_lowest_validation_mae_and_is_idempotent(ws, trained):
    client = ws.client()
    name = f"mpprop-{PROP}"
    best = min(trained.values(), key=lambda m: m["best_val_mae"])

    out = ws.cli("promote", "--property", PROP)
    assert "new version" in out and "2 candidates" in out
    champ = client.get_model_version_by_alias(name, "champion")
    assert str(champ.version) == "1"
    tags = champ.tags
    assert tags["source_run_id"] == best["run_id"]
    assert tags["preset"] == best["preset"]
    assert float(tags["val_mae"]) == pytest.approx(best["best_val_mae"])
    assert float(tags["test_mae"]) == pytest.approx(best["test_mae"])
    assert json.loads(tags["hyperparams"])["epochs"] == EPOCHS
    assert json.loads(tags["graph_settings"])["max_neighbors"] == 12
    run = client.get_run(best["run_id"])
    assert tags["snapshot_sha256"] == run.data.tags["snapshot_sha256"]
    assert tags["graph_cache_key"] == run.data.tags["graph_cache_key"]
    assert champ.source == best["model_uri"]  # models:/m-... of the training run

    # again: same model, no new version
    out = ws.cli("promote", "--property", PROP)
    assert "existing version" in out
    assert len(versions(client, name)) == 1

    # a tuning trial that validated better takes over; the old version stays
    trial = log_fake_trial(ws, ws.root / f"models/{PROP}/xie/model.pt", [0.5, 1e-4, 0.3])
    ws.cli("promote", "--property", PROP)
    champ = client.get_model_version_by_alias(name, "champion")
    assert str(champ.version) == "2" and champ.tags["source_run_id"] == trial
    assert champ.tags["mpprop.kind"] == "tune-trial"
    assert champ.tags["preset"] == "tune-trial"  # no study tags on this fake trial
    assert float(champ.tags["val_mae"]) == pytest.approx(1e-4)
    assert "min(val_mae)" in champ.tags["selection"]
    assert "test_mae" not in champ.tags  # the trial has no test MAE
    assert [str(v.version) for v in versions(client, name)] == ["1", "2"]

    # a property without any trained model: clear error, non-zero exit
    out = ws.cli("promote", "--property", "band_gap", ok=False)
    assert "no candidate model for band_gap" in out


def test_import_pretrained_registers_seven_usable_models(ws, pretrained):
    from mpprop.model import PRETRAINED_FILES

    client = ws.client()
    assert pretrained.count("(registered;") == len(PRETRAINED_FILES)
    structures = pd.DataFrame({"structure": [json.dumps(r["structure"]) for r in ws.records[:3]]})
    for prop in PRETRAINED_FILES:
        mv = client.get_model_version_by_alias(f"mpprop-{prop}", "xie-2018")
        assert mv.tags["mpprop.kind"] == "pretrained"
        assert "2017" in mv.tags["training_data"] and "60/20/20" in mv.tags["split"]
        assert len(mv.tags["checkpoint_sha256"]) == 64
        pred = mlflow.pyfunc.load_model(f"models:/mpprop-{prop}@xie-2018").predict(structures)
        assert np.isfinite(pred["prediction"]).all(), prop
    # bulk modulus: log10(GPa), as the labels of our model; real values are 10-400 GPa
    pred = mlflow.pyfunc.load_model("models:/mpprop-bulk_modulus@xie-2018").predict(structures)
    truth = np.log10([r["bulk_modulus"]["vrh"] for r in ws.records[:3]])
    assert np.abs(pred["prediction"].to_numpy() - truth).max() < 0.5

    again = ws.cli("import-pretrained")
    assert again.count("already registered") == len(PRETRAINED_FILES)
    assert len(versions(client, "mpprop-formation_energy_per_atom")) == 1


def _write_inputs(ws: Workspace, folder: Path) -> dict[str, bool]:
    """Structure files of every supported kind plus bad ones; id -> should it predict."""
    folder.mkdir()
    s = [Structure.from_dict(r["structure"]) for r in ws.records[:4]]
    s[0].to(filename=str(folder / "a.cif"))
    s[1].to(filename=str(folder / "POSCAR"), fmt="poscar")
    s[2].to(filename=str(folder / "c.vasp"), fmt="poscar")
    (folder / "d.json").write_text(json.dumps(s[3].as_dict()))
    (folder / "sub").mkdir()
    (folder / "sub" / "record.json").write_text(json.dumps(ws.records[4]))  # an MP record
    (folder / "garbage.cif").write_text("this is not a crystal\n\x00\x01")
    # mendelevium (Z=101) is outside the CGCNN element table (1-100)
    Structure(Lattice.cubic(3.5), ["Md"], [[0, 0, 0]]).to(
        filename=str(folder / "Md.vasp"), fmt="poscar")
    (folder / "notes.md").write_text("not a structure")
    (folder / ".hidden").write_text("skipped")
    return {"a.cif": True, "POSCAR": True, "c.vasp": True, "d.json": True,
            "sub/record.json": True, "garbage.cif": False, "Md.vasp": False, "notes.md": False}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_folder_and_list_with_all_pretrained(ws, pretrained, tmp_path):
    from mpprop.model import PRETRAINED_FILES

    expect = _write_inputs(ws, tmp_path / "in")
    lst = tmp_path / "list.txt"
    lst.write_text("# structures\nin/a.cif\n\nin/missing.cif\n")
    expect.update({"in/a.cif": True, "in/missing.cif": False})
    out = tmp_path / "preds.csv"
    text = ws.cli("predict", "--property", "all", "--alias", "xie-2018",
                  "--input", str(tmp_path / "in"), "--input", str(lst), "--output", str(out))
    rows = read_csv(out)
    assert list(rows[0]) == ["id", "property", "prediction", "value", "unit", "model", "error"]
    assert len(rows) == len(expect) * len(PRETRAINED_FILES)  # rows in = rows out
    for r in rows:
        good = expect[r["id"]]
        assert (r["error"] == "") == good, r
        if good:
            assert np.isfinite(float(r["prediction"])) and np.isfinite(float(r["value"]))
            assert r["model"].startswith(f"mpprop-{r['property']}@xie-2018 v")
    by = {(r["id"], r["property"]): r for r in rows}
    assert "outside the CGCNN" in by[("Md.vasp", "band_gap")]["error"]
    assert "unsupported file type" in by[("notes.md", "band_gap")]["error"]
    bulk = by[("a.cif", "bulk_modulus")]
    assert bulk["unit"] == "GPa"
    assert float(bulk["value"]) == pytest.approx(10 ** float(bulk["prediction"]))
    n_good = sum(expect.values())
    assert f"band_gap: {n_good} ok, {len(expect) - n_good} failed" in text
    assert "structures/s" in text


def test_predict_jsonl_snapshot_matches_labels(ws, pretrained, tmp_path):
    prop = "formation_energy_per_atom"
    records = read_records(N_FORMATION, prop)
    path = tmp_path / "records.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
        fh.write("{broken json\n")
        fh.write(json.dumps({"material_id": "mp-nostructure"}) + "\n")
    out = tmp_path / "fe.csv"
    ws.cli("predict", "--property", prop, "--alias", "xie-2018", "--input", str(path),
           "--output", str(out), "--batch-size", "16")
    rows = read_csv(out)
    assert len(rows) == N_FORMATION + 2
    assert [r["id"] for r in rows[:N_FORMATION]] == [r["material_id"] for r in records]
    assert rows[-2]["id"] == "records.jsonl.gz:51" and rows[-2]["error"]
    assert rows[-1]["id"] == "mp-nostructure" and "structure" in rows[-1]["error"]
    pred = np.array([float(r["prediction"]) for r in rows[:N_FORMATION]])
    truth = np.array([r[prop] for r in records])
    # the published model is good: ~0.04 eV/atom on its test set
    assert np.mean(np.abs(pred - truth)) < 0.3


def test_predict_snapshot_folder_with_champion(ws, champion, tmp_path):
    out = tmp_path / "bulk.csv"
    text = ws.cli("predict", "--property", PROP, "--input", str(ws.params.snapshot_dir()),
                  "--output", str(out))
    rows = read_csv(out)
    assert len(rows) == N_RECORDS and all(r["error"] == "" for r in rows)
    assert rows[0]["model"].startswith(f"mpprop-{PROP}@champion v")
    assert f"{N_RECORDS} ok, 0 failed" in text
    # a version instead of an alias; a missing alias is a clear error
    ws.cli("predict", "--property", PROP, "--version", "1", "--input",
           str(ws.params.snapshot_dir()), "--output", str(out))
    assert read_csv(out)[0]["model"] == f"mpprop-{PROP} v1"
    bad = ws.cli("predict", "--property", "band_gap", "--input", str(out),
                 "--output", str(tmp_path / "x.csv"), ok=False)
    assert "no version with alias 'champion'" in bad
    assert not (tmp_path / "x.csv").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_with_the_champion(ws, champion):
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if not mlflow_bin.exists():
        mlflow_bin = Path(shutil.which("mlflow") or "mlflow")
    port = _free_port()
    # the server execs `uvicorn` by name (bash -c "exec uvicorn ..."): the venv's bin must be
    # on PATH, as in an activated venv; a bare /work/venv/bin/pytest does not put it there
    path = os.pathsep.join([str(mlflow_bin.parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": ws.params.tracking_uri()}
    proc = subprocess.Popen(
        [str(mlflow_bin), "models", "serve", "-m", f"models:/mpprop-{PROP}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        cwd=ws.root,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited: {proc.stdout.read().decode()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
            time.sleep(1)
        body = {"dataframe_split": {"columns": ["structure"],
                                    "data": [[json.dumps(ws.records[0]["structure"])]]}}
        req = urllib.request.Request(
            f"{base}/invocations", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        pred = answer["predictions"][0]
        assert np.isfinite(pred["prediction"]) and pred["error"] == ""
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (its own process group, started by this test)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def test_a_batch_that_fails_is_split_to_isolate_the_bad_row():
    from mpprop.config import PropertySpec
    from mpprop.predict import InputRow, RegisteredModel, predict_rows

    class Flaky:  # fails any call that contains the poisoned structure
        def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
            if "poison" in frame["structure"].tolist():
                raise RuntimeError("graph building failed")
            return pd.DataFrame({"prediction": [1.0] * len(frame), "error": [""] * len(frame)})

    spec = PropertySpec("bulk_modulus", "bulk_modulus.vrh", "log10(GPa)", "log10", "higher")
    model = RegisteredModel("bulk_modulus", "m@a v1", "models:/m/1", spec, Flaky())
    rows = [InputRow("a", "ok"), InputRow("b", "poison"), InputRow("c", error="unreadable"),
            InputRow("d", "ok")]
    out = predict_rows([model], rows)
    assert [r["id"] for r in out] == ["a", "b", "c", "d"]
    assert [r["value"] for r in out] == [10.0, None, None, 10.0]
    assert "graph building failed" in out[1]["error"] and out[2]["error"] == "unreadable"
