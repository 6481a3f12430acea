"""What a user-filed issue found about failures that printed tracebacks, served bare NaN, left
runs RUNNING, raced, echoed the MP API key or shared another folder's artifacts:

1. one line, exit code 1, naming the file / model / database and the cause: an --output on a
   read-only file system, a registered version whose model.pt is gone, a corrupt or empty
   mlruns/mlflow.db, a full disk during fetch / featurize / train, an unloadable bundle under
   evaluate, a truncated snapshot.npz under split and train;
2. the served model answers null, never NaN, and refuses a request without a structure
   column with a 400 (MlflowException INVALID_PARAMETER_VALUE) that names the columns;
3. any command that opens the store ends the runs of this host's killed processes;
4. two promotions at once register one version;
5. (tests/test_fetch.py: the MP API key is never shown);
6. a copied project folder refuses to read and write the original's artifacts.

Projects are tiny (eight two-atom crystals, one-epoch models); failures are triggered at a
chosen point (a write monkeypatched to raise ENOSPC, a file truncated), never by timing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import REPO, nacl, tiny_registered_model
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pymatgen.core import Lattice, Structure

import mpprop.stages.promote as promote_stage
import mpprop.write_errors as write_errors
from mpprop.cli import main
from mpprop.config import load_params
from mpprop.faults import HOST_TAG, PID_TAG
from mpprop.prediction_csv import RegisteredModel
from mpprop.served_model import CGCNNPyfunc, json_safe
from mpprop.write_errors import DiskFullError, WriteError, write_error

PROP = "band_gap"
PAIRS = [("Na", "Cl"), ("K", "Br"), ("Li", "F"), ("Cs", "I"), ("Rb", "Cl"), ("Na", "F"),
         ("K", "Cl"), ("Li", "Cl")]
SETS = ("data.source=file", "train.torch_threads=1", "presets.xie.epochs=1",
        f"properties=[{PROP}]")
TORCH_WRITE_FAILURE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


# ---------------------------------------------------------------- helpers
def write_records(path: Path) -> Path:
    lines = []
    for i, (a, b) in enumerate(PAIRS):
        s = Structure(Lattice.cubic(5.0 + 0.1 * i), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])
        lines.append(json.dumps({"material_id": f"mp-{i + 1}", "structure": s.as_dict(),
                                 "band_gap": 1.0 + i}))
    path.write_text("\n".join(lines) + "\n")
    return path


def mpprop(root: Path, *args: str, sets: tuple[str, ...] = ()) -> Result:
    argv = ["--params", str(root / "params.yaml")]
    for s in (*SETS, f"data.path={root / 'records.jsonl'}", *sets):
        argv += ["-S", s]
    return CliRunner().invoke(main, [*argv, *args])


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def error_line(result: Result, code: int = 1) -> str:
    """The one `Error:` line of a failed command (progress bars share stderr)."""
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # click's, not a crash
    lines = [line[line.index("Error:"):] for line in result.output.splitlines()
             if "Error:" in line]
    assert len(lines) == 1, result.output
    return lines[0]


def new_project(root: Path, *steps: str) -> Path:
    """params.yaml + records, then the given steps among fetch, featurize, split, train."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    write_records(root / "records.jsonl")
    commands = {"fetch": ["fetch"], "featurize": ["featurize", "--workers", "1"],
                "split": ["split", "--property", PROP], "train": ["train", "--property", PROP]}
    for step in steps:
        ok(mpprop(root, *commands[step]))
    return root


@pytest.fixture(scope="module")
def data_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Snapshot, graph cache and split of the eight crystals (no MLflow store)."""
    return new_project(tmp_path_factory.mktemp("base"), "fetch", "featurize", "split")


@pytest.fixture
def project(data_project: Path, tmp_path: Path) -> Path:
    """A copy of data_project of its own (it has no MLflow store yet: nothing to share)."""
    root = tmp_path / "project"
    shutil.copytree(data_project, root)
    return root


def tracking_db(root: Path) -> Path:
    return root / "mlruns" / "mlflow.db"


def client_of(root: Path) -> MlflowClient:
    return MlflowClient(load_params(root / "params.yaml").tracking_uri())


def tiny_model() -> RegisteredModel:
    return tiny_registered_model(PROP)


# ---------------------------------------------------------------- 1: one line, not a traceback
def test_output_on_a_read_only_file_system_is_one_line(project, monkeypatch):
    model = tiny_model()
    monkeypatch.setattr("mpprop.stages.predict.resolve_models",
                        lambda params, prop, alias=None, version=None: [model])
    nacl().to(filename=str(project / "NaCl.cif"))
    read_only = project / "ro"
    read_only.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):  # the file system under ro/ is mounted read-only
        if Path(kwargs.get("dir", "")).resolve() == read_only.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(read_only))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    out = read_only / "preds.csv"
    line = error_line(mpprop(project, "predict", "--property", PROP, "--input",
                             str(project / "NaCl.cif"), "--output", str(out)))
    assert line == f"Error: cannot write {out}: read-only file system"
    assert list(read_only.iterdir()) == []


def test_a_version_whose_model_file_is_gone_names_model_and_version(tmp_path):
    root = new_project(tmp_path / "p")
    ok(mpprop(root, "import-pretrained", "--property", "bulk_modulus"))
    (bundle,) = (root / "mlruns").rglob("model.pt")
    bundle.unlink()  # deleted from the artifact store by hand
    nacl().to(filename=str(root / "NaCl.cif"))
    line = error_line(mpprop(root, "predict", "--property", "bulk_modulus", "--alias",
                             "xie-2018", "--input", str(root / "NaCl.cif"), "--output",
                             str(root / "p.csv")))
    assert line.startswith("Error: mpprop-bulk_modulus@xie-2018 v1: models:/mpprop-bulk_modulus/1:"
                           " its bundle file"), line
    assert "missing from the artifact store" in line
    assert tempfile.gettempdir() not in line  # not the folder it was downloaded to
    assert not (root / "p.csv").exists()


PREDICT = ("predict", "--property", PROP, "--input", "records.jsonl", "--output", "p.csv")
PROMOTE = ("promote", "--property", PROP)
TRAIN = ("train", "--property", PROP)


@pytest.mark.parametrize("command", [PREDICT, PROMOTE, TRAIN], ids=["predict", "promote", "train"])
def test_a_corrupt_tracking_database_is_one_line_naming_it(project, monkeypatch, command):
    monkeypatch.chdir(project)
    db = tracking_db(project)
    db.parent.mkdir()
    garbage = bytes(range(256)) * 8
    db.write_bytes(garbage)
    line = error_line(mpprop(project, *command))
    assert line == (f"Error: the MLflow tracking database {db} is corrupt (not an SQLite "
                    "database): the runs, models and registry it held may be gone; restore it "
                    "from a backup (or, to start a new store on purpose, move it aside)")
    assert db.read_bytes() == garbage
    assert not list(project.glob("models/*/*/model.pt"))


@pytest.mark.parametrize("command", [PREDICT, PROMOTE, TRAIN], ids=["predict", "promote", "train"])
def test_an_empty_tracking_database_is_not_recreated_empty(project, monkeypatch, command):
    monkeypatch.chdir(project)
    db = tracking_db(project)
    db.parent.mkdir()
    db.touch()
    line = error_line(mpprop(project, *command))
    assert line.startswith(f"Error: the MLflow tracking database {db} is empty (0 bytes): "
                           "the runs, models and registry it held may be gone"), line
    assert "restore it from a backup" in line
    assert "import-pretrained" not in line and "mpprop train" not in line
    assert db.stat().st_size == 0  # not made into a new, empty store


def test_disk_full_during_fetch_names_the_snapshot_file(project, monkeypatch):
    snap = project / "data" / "snapshot"
    before = {p.name: p.read_bytes() for p in snap.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full)
    line = error_line(mpprop(project, "fetch"))
    assert line == f"Error: disk full while writing {snap / 'snapshot.npz'}"
    assert {p.name: p.read_bytes() for p in snap.iterdir()} == before  # the previous one
    assert not list(snap.parent.glob(".snapshot.tmp-*"))


def test_disk_full_during_featurize_names_the_cache_file(project, monkeypatch):
    graphs = project / "data" / "graphs"
    key = json.loads((graphs / "current.json").read_text())["key"]
    shutil.rmtree(graphs)
    real_save = np.save

    def full(path, *args, **kwargs):
        if Path(path).name == "edge_src.npy":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(np, "save", full)
    line = error_line(mpprop(project, "featurize", "--workers", "1"))
    assert line == f"Error: disk full while writing {graphs / key / 'edge_src.npy'}"
    assert [p.name for p in graphs.iterdir()] == [f".{key}.mpprop-output.lock"]  # no half cache


@pytest.mark.parametrize("failure", ["torch", "oserror"])
def test_disk_full_during_train_names_the_model_file(project, monkeypatch, failure):
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if Path(f).name == "model.pt":  # the bundle; the per-epoch checkpoints still work
            if failure == "torch":  # what torch.save's C++ writer raises on ENOSPC
                raise RuntimeError(TORCH_WRITE_FAILURE)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(write_errors, "free_bytes", lambda path: 0)  # the disk is full
    line = error_line(mpprop(project, *TRAIN))
    assert line == f"Error: disk full while writing {project / 'models' / PROP / 'xie' / 'model.pt'}"
    assert not (project / "models" / PROP / "xie").exists()
    run = client_of(project).search_runs(["1"])[0]
    assert run.info.status == "FAILED"


def test_a_failed_torch_write_with_space_left_keeps_torchs_reason(tmp_path):
    err = write_error(RuntimeError(TORCH_WRITE_FAILURE), tmp_path / "model.pt")
    assert type(err) is WriteError
    assert str(err) == f"cannot write {tmp_path / 'model.pt'}: {TORCH_WRITE_FAILURE}"
    assert write_error(RuntimeError("CUDA out of memory"), tmp_path / "x") is None
    assert write_error(OSError(errno.ENOENT, "No such file"), tmp_path / "x") is None
    quota = write_error(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path / "x")
    assert isinstance(quota, DiskFullError)
    assert str(quota) == f"disk quota exceeded while writing {tmp_path / 'x'}"


def test_evaluate_of_an_unloadable_bundle_is_one_line(project):
    model = project / "models" / PROP / "xie" / "model.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"PK\x03\x04 half a zip")
    line = error_line(mpprop(project, "evaluate", "--property", PROP, "--preset", "xie",
                             "--no-mlflow"))
    assert line.startswith(f"Error: {model} is not a loadable mpprop model bundle: "), line


@pytest.mark.parametrize("command", [("split", "--property", PROP, "--overwrite"), TRAIN],
                         ids=["split", "train"])
def test_a_truncated_snapshot_is_one_line_naming_it(project, command):
    data = project / "data" / "snapshot" / "snapshot.npz"
    split = project / "data" / "splits" / f"{PROP}.json"
    split_before = split.read_bytes()
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    line = error_line(mpprop(project, *command))
    assert line == (f"Error: {data} does not match the SHA-256 recorded in snapshot.json "
                    "(truncated or changed since `mpprop fetch` wrote it); fetch it again "
                    "(`mpprop fetch`, or `dvc checkout` of the snapshot folder)")
    assert split.read_bytes() == split_before
    assert not list(project.glob("models/*/*/model.pt"))


# ---------------------------------------------------------------- 2: serving
@pytest.fixture
def served(tmp_path: Path) -> CGCNNPyfunc:
    """The pyfunc of a saved bundle, loaded as `mlflow models serve` loads it."""
    from types import SimpleNamespace

    from mpprop.bundle import save_bundle
    from mpprop.served_model import MODEL_ARTIFACT

    m = tiny_model().loaded
    path = save_bundle(tmp_path / "model.pt", m.model, m.normalizer, m.spec)
    pyfunc = CGCNNPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={MODEL_ARTIFACT: str(path)}))
    return pyfunc


def _refuse_constant(name: str) -> None:
    raise ValueError(f"bare {name} in the answer")


def test_served_answers_are_strict_json_with_null_for_missing_values(served):
    from io import StringIO

    from mlflow.pyfunc.scoring_server import predictions_to_json

    frame = pd.DataFrame({"structure": [json.dumps(nacl().as_dict()), "not json"]})
    out = served.predict(None, frame)
    records = json.loads(json.dumps(out.to_dict(orient="records"), allow_nan=False))
    good, bad = records
    assert isinstance(good["prediction"], float) and good["error"] == ""
    assert good["std"] is None  # one model: no spread
    assert bad["prediction"] is None and bad["value"] is None and bad["ood_score"] is None
    assert bad["error"].startswith("JSONDecodeError")
    # what the scoring server writes: no NaN token anywhere
    text = StringIO()
    predictions_to_json(out, text)
    answer = json.loads(text.getvalue(), parse_constant=_refuse_constant)
    assert answer["predictions"][1]["prediction"] is None


def test_json_safe_keeps_values_and_turns_nan_into_none():
    frame = pd.DataFrame({"x": [1.5, np.nan], "flag": [True, False], "s": ["a", ""]})
    safe = json_safe(frame)
    assert safe.to_dict(orient="records") == [{"x": 1.5, "flag": True, "s": "a"},
                                              {"x": None, "flag": False, "s": ""}]


def test_a_request_without_a_structure_column_is_a_400_naming_the_columns(served):
    with pytest.raises(MlflowException) as info:
        served.predict(None, pd.DataFrame({"smiles": ["CCO"], "id": [1]}))
    exc = info.value
    assert exc.error_code == "INVALID_PARAMETER_VALUE"
    assert exc.get_http_status_code() == 400
    assert exc.message == ("the input needs one of the columns structure, cif, poscar (a "
                           "pymatgen Structure as JSON, CIF text or POSCAR text); got: smiles, id")
    assert "/" not in exc.message  # no server paths
    assert exc.serialize_as_json().count("Traceback") == 0
    # served, the signature drops unknown columns first: the message then names none
    with pytest.raises(MlflowException, match=r"POSCAR text\)$"):
        served.predict(None, pd.DataFrame(index=[0]))


# ---------------------------------------------------------------- 3: runs of killed processes
def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: a zombie would still look alive
    return proc.pid


def test_promote_ends_the_runs_of_killed_processes_of_every_kind(project, monkeypatch):
    monkeypatch.chdir(project)
    client = client_of(project)  # a new store, opened here without mpprop
    artifacts = (project / "mlruns" / "artifacts").resolve()
    exp = client.create_experiment("mpprop", artifact_location=artifacts.as_uri())
    alive = subprocess.Popen(["sleep", "120"])
    try:
        host = socket.gethostname()
        runs = {}
        for kind, pid in [("report", _dead_pid()), ("tune-trial", _dead_pid()),
                          ("extrapolation", alive.pid)]:
            runs[kind] = client.create_run(exp, tags={"mpprop.kind": kind, HOST_TAG: host,
                                                      PID_TAG: str(pid)}).info.run_id
        other_host = client.create_run(exp, tags={"mpprop.kind": "report",
                                                  HOST_TAG: "elsewhere",
                                                  PID_TAG: str(_dead_pid())}).info.run_id
        error_line(mpprop(project, *PROMOTE))  # no candidate: but the store was opened
        status = {k: client.get_run(r).info.status for k, r in runs.items()}
        assert status == {"report": "KILLED", "tune-trial": "KILLED",
                          "extrapolation": "RUNNING"}
        assert client.get_run(other_host).info.status == "RUNNING"  # not this host's to judge
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------- 4: promote serialised
def test_two_promotions_at_once_register_one_version(project, monkeypatch):
    monkeypatch.chdir(project)
    ok(mpprop(project, *TRAIN))
    params = load_params(project / "params.yaml", list(SETS))
    first_inside, release, second_inside = (threading.Event() for _ in range(3))
    arrivals: list[str] = []

    def hold(name: str) -> None:  # the first promotion waits inside its critical section
        if name != "promote.before_register":
            return
        arrivals.append(threading.current_thread().name)
        if len(arrivals) == 1:
            first_inside.set()
            assert release.wait(120)
        else:
            second_inside.set()

    monkeypatch.setattr(promote_stage, "pause_point", hold)
    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            results[name] = promote_stage.promote(params, PROP)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test below
            results[name] = exc

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert first_inside.wait(120)
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    # without the lock the second would find no version and register its own by now
    assert not second_inside.wait(5), "the second promotion entered while the first held it"
    release.set()
    first.join(120)
    second.join(120)
    a, b = results["first"], results["second"]
    assert not isinstance(a, BaseException) and not isinstance(b, BaseException), results
    assert (a.created, b.created) == (True, False)
    assert a.version == b.version == "1"
    assert len(client_of(project).search_model_versions(f"name = 'mpprop-{PROP}'")) == 1


# ---------------------------------------------------------------- 6: copied projects
def test_a_copied_project_refuses_the_originals_artifacts(project, tmp_path):
    error_line(mpprop(project, *PROMOTE))  # makes the store (no candidate yet)
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    original = (project / "mlruns" / "artifacts").resolve()
    line = error_line(mpprop(copy, *PROMOTE))
    assert line.startswith(f"Error: the MLflow store {tracking_db(copy)} keeps the artifacts of "
                           f"experiment 'mpprop' in {original}, outside this project folder "
                           f"{copy.resolve()}: the project was copied or moved"), line
    assert f"-S mlflow.artifact_location={original}" in line
    # said on purpose: the check passes (and promote reports what it lacks instead)
    line = error_line(mpprop(copy, *PROMOTE, sets=(f"mlflow.artifact_location={original}",)))
    assert "no candidate model" in line
    assert "no candidate model" in error_line(mpprop(project, *PROMOTE))  # the original is fine
