"""Registry and batch prediction on real MP records: promote, import-pretrained, predict, serve.

One small workspace per module (150 real records with a bulk modulus): two tiny training runs
and one fake tuning trial feed the promotion; the published checkpoints are imported once.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
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
from conftest import REPO, nacl, require_shared_data
from mlflow.tracking import MlflowClient
from pymatgen.core import Lattice, Structure

from mpprop.cli import main
from mpprop.config import Params, load_params
from mpprop.prediction_csv import OUTPUT_COLUMNS
from mpprop.shipped import shipped_models

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
    workspace.cli("split", "--property", PROP)
    return workspace


@pytest.fixture(scope="module")
def trained(ws: Workspace) -> dict[str, dict]:
    from mpprop.stages.train import train_property

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


def test_import_pretrained_registers_eight_usable_models(ws, pretrained):
    """Seven regressions and the metal classifier (tests/test_metal_gate.py: its use)."""
    from mpprop.model import PRETRAINED_CLASSIFIER_FILES, PRETRAINED_FILES

    published = [*PRETRAINED_FILES, *PRETRAINED_CLASSIFIER_FILES]
    client = ws.client()
    shipped = shipped_models()
    registered = re.findall(r"@(\S+) -> v\d+ \(registered;", pretrained)
    assert registered.count("xie-2018") == len(published) == 8
    assert registered.count("mpprop-2026") == len(shipped) >= 3
    assert pretrained.count("(registered;") == len(published) + len(shipped)
    structures = pd.DataFrame({"structure": [json.dumps(r["structure"]) for r in ws.records[:3]]})
    for prop in published:
        mv = client.get_model_version_by_alias(f"mpprop-{prop}", "xie-2018")
        assert mv.tags["mpprop.kind"] == "pretrained"
        split = "80/10/10" if prop in PRETRAINED_CLASSIFIER_FILES else "60/20/20"
        assert "2017" in mv.tags["training_data"] and split in mv.tags["split"]
        assert len(mv.tags["checkpoint_sha256"]) == 64
        pred = mlflow.pyfunc.load_model(f"models:/mpprop-{prop}@xie-2018").predict(structures)
        assert np.isfinite(pred["prediction"].astype(float)).all(), prop
    for model in shipped:  # calibrated on their validation split: intervals in the CSV
        mv = client.get_model_version_by_alias(f"mpprop-{model.prop}", "mpprop-2026")
        assert mv.tags["interval_method"] == "absolute" and int(mv.tags["interval_n"]) >= 50
        assert 0.8 < float(mv.tags["test_interval_coverage_90"]) < 1.0
        served = mlflow.pyfunc.load_model(f"models:/mpprop-{model.prop}@mpprop-2026")
        out = served.predict(structures)
        pred = out["prediction"].to_numpy(float)
        assert np.isfinite(pred).all(), model.prop
        assert (out["lo"].to_numpy(float) <= pred).all() and (pred <= out["hi"]).all()
        if model.prop == "band_gap":  # its zero floor: no negative gaps
            assert (pred >= 0).all()
    # bulk modulus: log10(GPa), as the labels of our model; real values are 10-400 GPa
    pred = mlflow.pyfunc.load_model("models:/mpprop-bulk_modulus@xie-2018").predict(structures)
    truth = np.log10([r["bulk_modulus"]["vrh"] for r in ws.records[:3]])
    assert np.abs(pred["prediction"].to_numpy(float) - truth).max() < 0.5

    # each property has the published version and, if shipped, its own (other tests of this
    # module's workspace may have registered more); importing again adds none
    shipped_props = {model.prop for model in shipped}
    before = {prop: len(versions(client, f"mpprop-{prop}")) for prop in PRETRAINED_FILES}
    assert all(before[prop] >= 1 + (prop in shipped_props) for prop in PRETRAINED_FILES)
    again = ws.cli("import-pretrained")
    assert again.count("already registered") == len(published) + len(shipped)
    assert {prop: len(versions(client, f"mpprop-{prop}")) for prop in PRETRAINED_FILES} == before


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
    assert tuple(rows[0]) == OUTPUT_COLUMNS
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
    assert bulk["value_unit"] == "GPa" and bulk["model_unit"] == "log10(GPa)"
    # 4 significant digits each: equal to the rounding
    assert float(bulk["value"]) == pytest.approx(10 ** float(bulk["prediction"]), rel=3e-3)
    assert len(bulk["prediction"].lstrip("-").replace(".", "").lstrip("0")) <= 4
    # a published model: one member (so no spread), and no OOD reference, said so
    assert bulk["n_members"] == "1" and bulk["std"] == ""
    assert bulk["ood_score"] == "" and bulk["ood_threshold"] == ""
    assert bulk["ood_note"].startswith("no OOD reference")
    n_good = sum(expect.values())
    assert f"band_gap: {n_good} ok, {len(expect) - n_good} failed" in text
    assert "structures/s" in text


def test_predict_robust_input(ws, pretrained, tmp_path):
    """Truncated gzip, multi-block CIF, odd structures: rows with errors or warnings, and
    the batch goes on; no input or a missing one is a usage error; --fail-on-error."""
    from pymatgen.io.cif import CifWriter

    good = [Structure.from_dict(r["structure"]) for r in ws.records[:3]]
    (tmp_path / "in").mkdir()
    full = gzip.compress("".join(json.dumps(r) + "\n" for r in ws.records[:20]).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])  # truncated
    blocks = [str(CifWriter(s)).replace("data_", f"data_b{i}_", 1) for i, s in enumerate(good)]
    (tmp_path / "in" / "three.cif").write_text("\n".join(blocks))
    # two Cl 0.45 Å apart: a warning (closer than 0.5 Å), above predict.min_distance (0.3 Å,
    # below which the row is an error: tests/test_input_guards.py)
    overlap = Structure(Lattice.cubic(5.6), ["Na", "Cl", "Cl"],
                        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.58]])
    overlap.to(filename=str(tmp_path / "in" / "overlap.vasp"), fmt="poscar")
    graphene = Structure(Lattice.hexagonal(2.46, 20.0), ["C", "C"],
                         [[1 / 3, 2 / 3, 0.5], [2 / 3, 1 / 3, 0.5]])
    graphene.to(filename=str(tmp_path / "in" / "graphene.vasp"), fmt="poscar")
    squeezed = good[0].copy()
    squeezed.scale_lattice(good[0].volume * 0.5**3)
    squeezed.to(filename=str(tmp_path / "in" / "squeezed.vasp"), fmt="poscar")
    out = tmp_path / "p.csv"
    args = ["predict", "--property", "bulk_modulus", "--alias", "xie-2018",
            "--input", str(tmp_path / "in"), "--input", str(tmp_path / "cut.jsonl.gz"),
            "--output", str(out)]
    ws.cli(*args)
    rows = {r["id"]: r for r in read_csv(out)}
    cif_ids = sorted(k for k in rows if k.startswith("three.cif#"))
    assert len(cif_ids) == 3 and all(rows[k]["error"] == "" for k in cif_ids)
    cut_errors = [r for k, r in rows.items() if r["error"].startswith("cannot read")]
    assert len(cut_errors) == 1 and "cut.jsonl.gz" in cut_errors[0]["error"]
    assert sum(1 for r in rows.values() if r["error"] == "" and r["id"].startswith("mp-")) >= 1
    assert "closer than 0.5" in rows["overlap.vasp"]["warning"]
    assert rows["overlap.vasp"]["error"] == ""
    assert "20.0 Å of vacuum" in rows["graphene.vasp"]["warning"]
    assert rows["graphene.vasp"]["error"] == "" and rows["graphene.vasp"]["prediction"] != ""
    assert "compressed cell" in rows["squeezed.vasp"]["warning"]
    assert all(rows[k]["warning"] == "" for k in cif_ids)  # bulk MP crystals: no warning
    # --fail-on-error: the CSV is written, the exit code says some rows failed
    result = CliRunner().invoke(main, ["--params", str(ws.params_file), *args, "--fail-on-error"])
    assert result.exit_code == 1 and "row(s) with an error" in result.output
    assert out.exists()
    # a missing input and an input without structures are usage errors; nothing written
    for bad in (tmp_path / "nope.cif", tmp_path / "empty"):
        if bad.name == "empty":
            bad.mkdir()
        target = tmp_path / f"{bad.name}.csv"
        result = CliRunner().invoke(main, ["--params", str(ws.params_file), "predict",
                                           "--property", "bulk_modulus", "--alias", "xie-2018",
                                           "--input", str(bad), "--output", str(target)])
        assert result.exit_code == 2, result.output
        assert not target.exists()


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


def test_a_structure_whose_graph_fails_is_isolated(monkeypatch):
    """One structure that breaks graph building fails its own row, not the batch."""
    import mpprop.inference as inference
    from mpprop.bundle import LoadedModel
    from mpprop.model import CrystalGraphConvNet, Normalizer
    from mpprop.predict_inputs import InputRow
    from mpprop.prediction_csv import RegisteredModel, predict_rows
    from mpprop.settings import GraphSettings, Hyperparams, PropertySpec

    real = inference.graphs_from_structures
    poison = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])

    def flaky(structures, settings):
        if any(s is poison for s in structures):
            raise RuntimeError("graph building failed")
        return real(structures, settings)

    monkeypatch.setattr(inference, "graphs_from_structures", flaky)
    spec = PropertySpec("bulk_modulus", "bulk_modulus.vrh", "log10(GPa)", "log10", "higher")
    hp = Hyperparams(1, 1, 8, 8, 0.01, 10, "SGD", 1)
    net = CrystalGraphConvNet(hp, GraphSettings()).eval()
    model = RegisteredModel("bulk_modulus", "models:/m/1",
                            LoadedModel("m@a v1", net, Normalizer(1.0, 0.0), spec, {}))
    ok = Structure(Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    rows = [InputRow("a", ok), InputRow("b", poison), InputRow("c", error="unreadable"),
            InputRow("d", ok)]
    out = predict_rows([model], rows)
    assert [r["id"] for r in out] == ["a", "b", "c", "d"]
    values = [r["value"] for r in out]
    assert values[1] is None and values[2] is None
    assert np.isfinite(values[0]) and values[0] == pytest.approx(values[3])
    assert "graph building failed" in out[1]["error"] and out[2]["error"] == "unreadable"


class _Payload:
    """Unpickling this writes a marker file: the proof that code from the store ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _champion_artifacts(ws: Workspace) -> Path:
    client = ws.client()
    mv = client.get_model_version_by_alias(f"mpprop-{PROP}", "champion")
    from mpprop.stages.promote import version_model_id

    model_id = version_model_id(mv)
    location = client.get_logged_model(model_id).artifact_location
    return Path(location.removeprefix("file://"))


def test_a_planted_pickle_is_never_run_by_predict_or_promote(ws, champion, tmp_path):
    """A model whose MLmodel is rewritten to load a malicious pickle (what anyone who can
    write to the tracking server could publish): mpprop reads only the bundle."""
    import cloudpickle

    from mpprop.stages.promote import _bundle_of

    marker = tmp_path / "marker"
    folder = _champion_artifacts(ws)
    mlmodel_file = folder / "MLmodel"
    original = mlmodel_file.read_text()
    try:
        (folder / "python_model.pkl").write_bytes(cloudpickle.dumps(_Payload(marker)))
        mlmodel = yaml.safe_load(original)
        pyfunc = mlmodel["flavors"]["python_function"]
        pyfunc.pop("model_code_path", None)
        pyfunc["python_model"] = "python_model.pkl"
        pyfunc["loader_module"] = "mlflow.pyfunc.model"
        mlmodel_file.write_text(yaml.safe_dump(mlmodel))
        # the plant is real: MLflow's own loader runs it
        uri = ws.params.tracking_uri()
        subprocess.run([sys.executable, "-c", "import mlflow; mlflow.set_tracking_uri("
                        f"{uri!r}); mlflow.pyfunc.load_model('models:/mpprop-{PROP}@champion')"],
                       cwd=tmp_path, capture_output=True, check=False)
        assert marker.exists(), "the planted pickle should run under mlflow.pyfunc.load_model"
        marker.unlink()
        out = tmp_path / "p.csv"
        ws.cli("predict", "--property", PROP, "--input", str(ws.params.snapshot_dir()),
               "--output", str(out))
        assert len(read_csv(out)) == N_RECORDS and not marker.exists()
        mv = ws.client().get_model_version_by_alias(f"mpprop-{PROP}", "champion")
        assert _bundle_of(f"models:/{mv.name}/{mv.version}")["property"]["key"] == PROP
        assert not marker.exists()
    finally:
        mlmodel_file.write_text(original)
        (folder / "python_model.pkl").unlink(missing_ok=True)


def test_a_bundle_holding_a_pickle_is_refused(ws, champion, tmp_path):
    """weights_only=True: a model.pt that needs unpickling is an error, and nothing runs."""
    import torch

    marker = tmp_path / "marker"
    bundle = _champion_artifacts(ws) / "artifacts" / "model.pt"
    original = bundle.read_bytes()
    try:
        torch.save({"state_dict": _Payload(marker)}, bundle)
        out = ws.cli("predict", "--property", PROP, "--input", str(ws.params.snapshot_dir()),
                     "--output", str(tmp_path / "p.csv"), ok=False)
        assert "not a loadable mpprop model bundle" in out
        assert not marker.exists() and not (tmp_path / "p.csv").exists()
    finally:
        bundle.write_bytes(original)


def test_import_and_predict_outside_a_project_folder(tmp_path, monkeypatch):
    """No params.yaml: built-in defaults; MLflow at MLFLOW_TRACKING_URI when set."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runner = CliRunner()
    result = runner.invoke(main, ["import-pretrained", "--property", "band_gap"])
    assert result.exit_code == 0, result.output
    # rock salt (a CsCl-type cell stretched to 5.64 Å, atoms 4.9 Å apart, is called a metal
    # by the classifier that gates the published band-gap model: tests/test_metal_gate.py)
    nacl().to(filename=str(tmp_path / "NaCl.cif"))
    result = runner.invoke(main, ["predict", "--property", "band_gap", "--alias", "xie-2018",
                                  "--input", "NaCl.cif", "--output", "out.csv"])
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out.csv")
    assert rows[0]["error"] == "" and float(rows[0]["value"]) > 1.0  # NaCl is an insulator
    assert (tmp_path / "elsewhere" / "mlflow.db").exists()
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
