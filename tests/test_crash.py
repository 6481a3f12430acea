"""Stage outputs as units: a command killed at any moment leaves the previous complete outputs
intact, two writers of one output fail clearly instead of mixing, interrupted MLflow runs end
KILLED, and the next run leaves no temp litter (outputs.py, faults.py).

Kills happen at named pause points (faults.pause_point, MPPROP_PAUSE_AT): the real `mpprop`
command runs in a subprocess, writes MPPROP_PAUSE_FILE when it reaches the point and sleeps
there until the test kills it. The workspace is tiny and real: the first records of the
shared MP snapshot; fetches of 60 and of 80 records tell the old snapshot from the new one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO, require_shared_data, small_structures

from mpprop import outputs
from mpprop.cli import main
from mpprop.config import load_params
from mpprop.graphs import load_graph_cache
from mpprop.outputs import OutputBusyError, default_dir_mode, output_dir, readable_dir
from mpprop.snapshot import (
    Snapshot,
    _temp_file_prefix,
    atomic_output,
    default_file_mode,
    load_snapshot,
    save_snapshot,
)

PROP = "bulk_modulus"
MPPROP = str(Path(sys.executable).parent / "mpprop")
SOURCE_LINES = 400  # ~140 records with a bulk modulus: enough for 80
N_OLD, N_NEW = 60, 80
FAST = ["-S", "presets.xie.epochs=1", "-S", "train.torch_threads=1", "-S", "train.batch_size=32"]
# the killed trainings use another learning rate: their model differs from the old one
NEW_LR = ["--lr", "0.003"]
PAUSE_TIMEOUT_S = 120


@pytest.fixture(scope="module", autouse=True)
def umask_022():
    """A known umask, so that 'the umask's mode' differs from mkdtemp's 0700."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first lines of the shared MP snapshot, as a file source that fetches in a second."""
    shared = require_shared_data()
    path = tmp_path_factory.mktemp("source") / "mp_head.jsonl.gz"
    with gzip.open(shared, "rt", encoding="utf-8") as src, \
            gzip.open(path, "wt", encoding="utf-8") as dst:
        for _, line in zip(range(SOURCE_LINES), src, strict=False):
            dst.write(line)
    return path


def cli_args(root: Path, source: Path, n_records: int) -> list[str]:
    return ["--params", str(root / "params.yaml"), "-S", f"data.path={source}",
            "-S", f"data.max_records={n_records}", "-S", f"data.require_property={PROP}", *FAST]


def invoke(root: Path, source: Path, n_records: int, *command: str) -> str:
    result = CliRunner().invoke(main, [*cli_args(root, source, n_records), *command],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def base_workspace(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Path:
    """Snapshot of 60 records, graph cache, split and a trained xie model (one epoch)."""
    root = tmp_path_factory.mktemp("crash_ws")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    for command in (["fetch"], ["featurize", "--workers", "1"], ["split", "--property", PROP],
                    ["train", "--property", PROP]):
        invoke(root, source, N_OLD, *command)
    return root


@pytest.fixture
def project(base_workspace: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(base_workspace, root)
    # MLflow keeps absolute artifact locations: the copy's store points at the base's
    # artifacts, which a copied project must say it uses on purpose (else it is refused)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["mlflow"]["artifact_location"] = str(base_workspace / "mlruns" / "artifacts")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


class Spawned:
    """`mpprop` subprocesses of a test, paused at a pause point; killed at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, root: Path, source: Path, n_records: int, command: list[str],
              pause_at: str) -> subprocess.Popen:
        marker = self.tmp_path / f"paused-{len(self.procs)}"
        log = self.tmp_path / f"mpprop-{len(self.procs)}.log"
        env = {**os.environ, "MPPROP_PAUSE_AT": pause_at, "MPPROP_PAUSE_FILE": str(marker),
               "OMP_NUM_THREADS": "1"}
        with open(log, "w") as fh:
            proc = subprocess.Popen([MPPROP, *cli_args(root, source, n_records), *command],
                                    cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"`mpprop {' '.join(command)}` ended (rc {proc.returncode}) before "
                            f"{pause_at}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"`mpprop {' '.join(command)}` did not reach {pause_at} in "
                            f"{PAUSE_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        return proc

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
        os.kill(proc.pid, sig)
        return proc.wait(timeout=60)  # reaped: a zombie would still look alive


@pytest.fixture
def spawned(tmp_path: Path):
    s = Spawned(tmp_path)
    yield s
    for proc in s.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def litter(root: Path) -> list[Path]:
    """Temp folders and files that mpprop writers leave when killed."""
    return sorted(p for p in root.rglob(".*.tmp-*") if "mlruns" not in p.parts)


def assert_unit_modes(folder: Path) -> None:
    mode = stat.S_IMODE(folder.stat().st_mode)
    assert mode == default_dir_mode() == 0o755, f"{folder} has mode {oct(mode)}"
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == default_file_mode(), f


def mlflow_client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(load_params(root / "params.yaml").tracking_uri())


def run_of_pid(root: Path, pid: int):
    client = mlflow_client(root)
    exp = client.get_experiment_by_name("mpprop")
    runs = client.search_runs([exp.experiment_id], f"tags.`mpprop.pid` = '{pid}'")
    assert len(runs) == 1, f"{len(runs)} runs tagged with pid {pid}"
    return runs[0]


# ------------------------------------------------------------------- finding 1: fetch
def test_fetch_killed_before_swap_keeps_previous_snapshot(
        project: Path, source: Path, spawned: Spawned) -> None:
    snap_dir = project / "data" / "snapshot"
    before = file_digests(snap_dir)
    proc = spawned.start(project, source, N_NEW, ["fetch"], "fetch.before_swap")
    (pending,) = litter(project)  # the new snapshot, complete but not swapped in yet
    assert sorted(p.name for p in pending.iterdir()) == ["snapshot.json", "snapshot.npz"]
    spawned.kill(proc)

    snap, meta = load_snapshot(snap_dir, verify=True)  # the old one, whole
    assert len(snap) == meta["n_records"] == N_OLD
    assert file_digests(snap_dir) == before
    invoke(project, source, N_OLD, "featurize", "--workers", "1")  # still usable

    invoke(project, source, N_NEW, "fetch")
    snap, meta = load_snapshot(snap_dir, verify=True)
    assert len(snap) == meta["n_records"] == N_NEW
    assert litter(project) == []
    assert_unit_modes(snap_dir)


# ---------------------------------------------------------- finding 2: two fetches at once
def test_second_fetch_fails_clearly_while_the_first_writes(
        project: Path, source: Path, spawned: Spawned) -> None:
    snap_dir = project / "data" / "snapshot"
    before = file_digests(snap_dir)
    proc = spawned.start(project, source, N_NEW, ["fetch"], "fetch.before_swap")
    (pending,) = litter(project)

    result = CliRunner().invoke(main, [*cli_args(project, source, N_OLD), "fetch"])
    assert result.exit_code == 1, result.output
    assert f"{snap_dir} is being written by another `mpprop fetch`" in result.output
    assert pending.is_dir()  # the first writer's temp folder is not the second's to remove
    assert file_digests(snap_dir) == before

    spawned.kill(proc)
    snap, _ = load_snapshot(snap_dir, verify=True)
    assert len(snap) == N_OLD


# --------------------------------------------------------- finding 1 + 3: train killed -9
def test_train_killed_keeps_previous_model_and_next_train_ends_its_run(
        project: Path, source: Path, spawned: Spawned) -> None:
    model_dir = project / "models" / PROP / "xie"
    before = file_digests(model_dir)
    old_run = json.loads((model_dir / "metrics.json").read_text())["run_id"]
    proc = spawned.start(project, source, N_OLD, ["train", "--property", PROP, *NEW_LR],
                         "train.between_model_and_metrics")
    (pending,) = litter(project)
    assert [p.name for p in pending.iterdir()] == ["model.pt"]  # new model, no metrics yet
    spawned.kill(proc)

    assert file_digests(model_dir) == before  # the old model.pt + metrics.json pair
    killed = run_of_pid(project, proc.pid)
    assert killed.info.status == "RUNNING"  # nobody could end it: kill -9

    invoke(project, source, N_OLD, "train", "--property", PROP, *NEW_LR)
    assert mlflow_client(project).get_run(killed.info.run_id).info.status == "KILLED"
    after = file_digests(model_dir)
    assert set(after) == {"model.pt", "metrics.json"}
    assert after["model.pt"] != before["model.pt"]
    new_run = json.loads((model_dir / "metrics.json").read_text())["run_id"]
    assert new_run not in (old_run, killed.info.run_id)
    assert mlflow_client(project).get_run(new_run).info.status == "FINISHED"
    assert mlflow_client(project).get_run(old_run).info.status == "FINISHED"
    assert litter(project) == []
    assert_unit_modes(model_dir)


# --------------------------------------------------------- finding 3: train stopped (TERM)
def test_train_terminated_ends_its_run_killed_and_removes_its_temp_folder(
        project: Path, source: Path, spawned: Spawned) -> None:
    model_dir = project / "models" / PROP / "xie"
    before = file_digests(model_dir)
    proc = spawned.start(project, source, N_OLD, ["train", "--property", PROP, *NEW_LR],
                         "train.between_model_and_metrics")
    assert len(litter(project)) == 1
    assert spawned.kill(proc, signal.SIGTERM) != 0

    assert run_of_pid(project, proc.pid).info.status == "KILLED"
    assert file_digests(model_dir) == before
    assert litter(project) == []  # unwound: its temp folder is gone already


# ----------------------------------------------- finding 4: MLflow store made by two at once
SETUP_SCRIPT = """
import sys, time
from pathlib import Path
from mpprop.config import load_params
from mpprop.tracking import setup_mlflow
params = load_params(sys.argv[1])
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.005)
print(setup_mlflow(params))
"""


def test_setup_mlflow_from_processes_starting_at_once_on_a_fresh_store(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    go = tmp_path / "go"
    procs, ready = [], []
    for i in range(2):
        ready.append(tmp_path / f"ready-{i}")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", SETUP_SCRIPT, str(tmp_path / "params.yaml"), str(ready[-1]),
             str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"}))
    try:
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while not all(r.exists() for r in ready):  # every one imported and waits: a barrier
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        go.touch()
        results = [p.communicate(timeout=PAUSE_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert len({out.strip() for out, _ in results}) == 1  # one experiment


# ------------------------------------------------------- finding 1 + 5: featurize killed
def test_featurize_killed_before_swap_keeps_cache_and_rerun_leaves_no_litter(
        project: Path, source: Path, spawned: Spawned) -> None:
    graphs = project / "data" / "graphs"
    key = json.loads((graphs / "current.json").read_text())["key"]
    before = file_digests(graphs / key)
    proc = spawned.start(project, source, N_OLD, ["featurize", "--workers", "1"],
                         "featurize.before_swap")
    spawned.kill(proc)
    assert [p.name.startswith(f".{key}.tmp-") for p in litter(project)] == [True]
    assert file_digests(graphs / key) == before
    params = load_params(project / "params.yaml")
    _, meta = load_snapshot(params.snapshot_dir())
    assert len(load_graph_cache(graphs, meta["sha256"], params.graph_settings())) == N_OLD

    invoke(project, source, N_OLD, "featurize", "--workers", "1")
    assert litter(project) == []
    assert_unit_modes(graphs / key)


# ------------------------------------------------------------ finding 1: evaluate outputs
def test_evaluate_failing_midway_keeps_previous_plots_and_metrics(
        project: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mpprop.stages.evaluate as evaluate

    invoke(project, source, N_OLD, "evaluate", "--property", PROP, "--preset", "xie",
           "--no-mlflow")
    plots = project / "plots" / PROP
    metrics = project / "metrics" / f"{PROP}.json"
    before, metrics_before = file_digests(plots), metrics.read_bytes()
    assert {"parity.csv", "screening.csv", "xie.png"} <= set(before)
    assert_unit_modes(plots)

    def broken_figure(path: Path, *args: object) -> None:
        path.write_text("half a figure")
        raise RuntimeError("disk full")

    monkeypatch.setattr(evaluate, "plot_figure", broken_figure)
    with pytest.raises(RuntimeError, match="disk full"):
        evaluate.evaluate_property(load_params(project / "params.yaml", FAST[1::2]), PROP,
                                   ["xie"], log_mlflow=False)
    assert file_digests(plots) == before
    assert metrics.read_bytes() == metrics_before
    assert litter(project) == []


# ------------------------------------------------------------- outputs.py on its own
def tiny_snapshot(n: int) -> Snapshot:
    structures = small_structures()[:n]
    return Snapshot.from_structures([f"mp-{i}" for i in range(n)], structures,
                                    np.arange(n, dtype=float).reshape(n, 1), ["band_gap"])


def test_second_writer_in_one_process_is_refused_too(tmp_path: Path) -> None:
    target = tmp_path / "unit"
    with output_dir(target, "train") as tmp, pytest.raises(OutputBusyError, match="mpprop train"):
        (tmp / "a").write_text("1")
        with output_dir(target, "train"):
            pass
    assert (target / "a").read_text() == "1"


def test_failed_block_leaves_target_and_no_temp_folder(tmp_path: Path) -> None:
    target = tmp_path / "unit"
    with output_dir(target, "x") as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(KeyboardInterrupt), output_dir(target, "x") as tmp:
        (tmp / "a").write_text("new")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["unit"]
    assert (target / "a").read_text() == "old"


def test_without_rename_exchange_a_writer_killed_between_its_renames_is_recovered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "exchange", lambda a, b: False)
    snap_dir = tmp_path / "snapshot"
    save_snapshot(tiny_snapshot(2), snap_dir, {"snapshot_date": "old"})
    save_snapshot(tiny_snapshot(3), snap_dir, {"snapshot_date": "new"})  # rename-aside path
    assert len(load_snapshot(snap_dir, verify=True)[0]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snapshot.mpprop-output.lock",
                                                         "snapshot"]
    # killed after moving the old folder aside, before moving the new one in
    aside = tmp_path / ".snapshot.old-12345-abcd1234"
    os.rename(snap_dir, aside)
    (tmp_path / ".snapshot.tmp-12345-xyz").mkdir()
    assert readable_dir(snap_dir) == aside
    assert len(load_snapshot(snap_dir, verify=True)[0]) == 3  # readers fall back to it
    save_snapshot(tiny_snapshot(4), snap_dir, {"snapshot_date": "newer"})
    assert len(load_snapshot(snap_dir, verify=True)[0]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".snapshot.mpprop-output.lock",
                                                         "snapshot"]
    assert_unit_modes(snap_dir)


def test_atomic_output_removes_temp_files_of_dead_writers_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / (_temp_file_prefix(path, dead.pid) + "abcdefgh")
    live = tmp_path / (_temp_file_prefix(path, os.getpid()) + "abcdefgh")
    other = tmp_path / f".metrics.json.tmp-zzzzzz-{dead.pid}-abcdefgh"  # another host's
    for p in (stale, live, other):
        p.write_text("partial")
    with atomic_output(path) as tmp:
        Path(tmp).write_text("{}\n")
    assert path.read_text() == "{}\n"
    assert not stale.exists() and live.exists() and other.exists()
    assert stat.S_IMODE(path.stat().st_mode) == default_file_mode()
