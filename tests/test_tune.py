"""`mpprop tune`: one worker on SQLite, several workers on PostgreSQL, and a worker killed
mid-trial whose trial is failed by heartbeat and retried by another worker.

A small real workspace (the first elastic records of the shared MP snapshot) is built once
per session; each test works in its own copy of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState
from optuna_dashboard import get_note
from optuna_integration.mlflow.mlflow import RUN_ID_ATTRIBUTE_KEY

from mpprop.cli import main
from mpprop.config import load_params
from mpprop.presets import hyperparams
from mpprop.search import TRIAL_ENQUEUED
from mpprop.study import ATTR_PARENT_RUN, OBJECTIVE_NAME, TRIAL_MLFLOW_RUN
from mpprop.study_storage import storage_url, study_storage
from mpprop.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

REPO = Path(__file__).resolve().parents[1]
SHARED_SNAPSHOT = REPO.parent / "shared" / "data" / "mp_snapshot.jsonl.gz"
PROP = "bulk_modulus"
N_RECORDS = 200  # enough for an 8:2 split of a 160-record pool, small enough for 2 cores
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
MPPROP = str(Path(sys.executable).parent / "mpprop")
# small batches so a 3-epoch trial takes a few optimiser steps; one torch thread per worker
BASE_SETS = ["-S", "train.batch_size=32", "-S", "train.torch_threads=1"]


def build_workspace(root: Path, n_records: int) -> None:
    """params.yaml + snapshot + graph cache + fixed split of n real elastic records (the CLI)."""
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    sets = ["--params", str(root / "params.yaml"), "-S", f"data.path={SHARED_SNAPSHOT}",
            "-S", f"data.max_records={n_records}", "-S", f"data.require_property={PROP}"]
    for command in (["fetch"], ["featurize", "--workers", "1"], ["split", "--property", PROP]):
        result = CliRunner().invoke(main, [*sets, *command], catch_exceptions=False)
        assert result.exit_code == 0, result.output


@pytest.fixture(scope="session")
def base_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SHARED_SNAPSHOT.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have the shared data at {SHARED_SNAPSHOT}")
        pytest.skip(f"real MP data not found at {SHARED_SNAPSHOT}")
    root = tmp_path_factory.mktemp("tune_ws")
    build_workspace(root, N_RECORDS)
    return root


@pytest.fixture
def project(base_workspace: Path, tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(base_workspace, root)
    return root


def invoke(project: Path, *args: str) -> str:
    result = CliRunner().invoke(
        main, ["--params", str(project / "params.yaml"), *BASE_SETS, *args],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return result.output


def check_mlflow(tracking_uri: str, study: optuna.Study, prop: str = PROP) -> dict:
    """Every trial has a nested run under the study's one parent run, with its state tag,
    per-epoch val MAE and (complete trials) a logged model."""
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    parent_id = study.user_attrs[ATTR_PARENT_RUN]
    parent = client.get_run(parent_id)
    exp_id = parent.info.experiment_id
    assert parent.data.tags["mpprop.kind"] == "tune-study"
    parents = client.search_runs(
        [exp_id], f"tags.`mpprop.kind` = 'tune-study' and tags.`mpprop.study` = "
                  f"'{study.study_name}'")
    assert [r.info.run_id for r in parents] == [parent_id]  # one parent per study
    children = {
        r.info.run_id: r for r in client.search_runs(
            [exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000)
    }
    by_state: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            continue
        run = children[t.system_attrs[RUN_ID_ATTRIBUTE_KEY]]
        # optuna-dashboard shows user attrs, not system attrs: the way from a trial to its run
        assert t.user_attrs[TRIAL_MLFLOW_RUN] == run.info.run_id
        tags = run.data.tags
        assert tags["state"] == t.state.name
        assert tags["mpprop.kind"] == "tune-trial"
        assert tags["mpprop.property"] == prop
        assert tags["mpprop.study"] == study.study_name
        assert tags["snapshot_sha256"] == study.user_attrs["mpprop.snapshot_sha256"]
        assert tags["graph_cache_key"] == study.user_attrs["mpprop.graph_cache_key"]
        # the search space is the study's, not repeated as tags on every trial
        assert not [k for k in tags if k.endswith("_distribution")]
        assert run.data.params["split_seed"] == str(t.user_attrs["split_seed"])
        assert run.data.params["lr"] == str(t.params["lr"])
        history = client.get_metric_history(run.info.run_id, "val_mae")
        if t.state == TrialState.FAIL:
            # a worker killed between logging an epoch to MLflow and reporting it to Optuna
            assert len(history) - len(t.intermediate_values) in (0, 1)
        else:
            assert len(history) == len(t.intermediate_values)
        models = client.search_logged_models(
            experiment_ids=[exp_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        if t.state == TrialState.COMPLETE:
            assert len(models) == 1, f"trial {t.number} has {len(models)} models"
            assert run.data.metrics["best_val_mae"] == pytest.approx(t.value)
            assert t.user_attrs["model_uri"].startswith("models:/")
        else:
            assert len(models) == 0
        by_state[t.state.name] = by_state.get(t.state.name, 0) + 1
    return by_state


def test_single_worker_prunes_writes_best_params_and_resumes(project):
    """8 trials with an aggressive pruner, then the same study continued to 10."""
    t0 = time.perf_counter()
    sets = ["-S", "tune.pruner_percentile=1", "-S", "tune.pruner_warmup_steps=1"]
    out = invoke(project, *sets, "tune", "--property", PROP, "--n-trials", "8",
                 "--epochs", "3")
    assert out.count("trial ") >= 8 and "PRUNED" in out

    params = load_params(project / "params.yaml")
    storage = study_storage(params, PROP)
    study = optuna.load_study(study_name=f"mpprop-{PROP}", storage=storage)
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 8
    assert sorted(t.number for t in trials) == list(range(8))
    # the pruner starts after 5 complete trials; at the 1st percentile nearly all later
    # trials are worse than the best at epoch 1 or 2
    assert states.count(TrialState.COMPLETE) >= 5
    assert states.count(TrialState.PRUNED) >= 1
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert all(len(t.intermediate_values) < 3 for t in pruned)
    # new split per trial
    assert len({t.user_attrs["split_seed"] for t in trials}) == 8
    # trial 0 is the enqueued baseline: the Xie architecture of tune.enqueue
    first = min(trials, key=lambda t: t.number)
    assert first.user_attrs.get(TRIAL_ENQUEUED) is True
    assert {k: first.params[k] for k in params.tune.enqueue[0]} == params.tune.enqueue[0]
    assert not any(t.user_attrs.get(TRIAL_ENQUEUED) for t in trials if t.number != first.number)
    assert study.metric_names == [f"{OBJECTIVE_NAME} (log10(GPa))"]
    note = get_note(study)  # optuna-dashboard's study note: objective, unit, caveats
    assert f"lowest validation MAE of {PROP} (log10(GPa))" in note
    assert "after 5 finished trials and 1 warm-up epochs" in note
    assert "below about 30 trials it is noise" in note
    # progress inside a trial (tune.progress_every epochs), not only when it ends
    assert "epoch 3/3 val_mae" in out

    tuned = yaml.safe_load(params.best_params_path(PROP).read_text())
    assert tuned["best_trial"] == study.best_trial.number
    assert tuned["best_val_mae"] == pytest.approx(study.best_value)
    assert tuned["n_trials_complete"] + tuned["n_trials_pruned"] == 8
    hp = hyperparams(params, "tuned", PROP)
    assert hp.epochs == 3 and hp.batch_size == params.train.batch_size
    assert {k: getattr(hp, k) for k in study.best_params} == study.best_params

    by_state = check_mlflow(params.tracking_uri(), study)
    assert by_state.get("PRUNED", 0) >= 1
    client = mlflow.MlflowClient()
    parent = client.get_run(study.user_attrs[ATTR_PARENT_RUN])
    assert parent.data.metrics["n_trials_complete"] + parent.data.metrics["n_trials_pruned"] == 8
    assert parent.data.metrics["best_val_mae"] == pytest.approx(study.best_value)
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    best_run = client.get_run(study.best_trial.system_attrs[RUN_ID_ATTRIBUTE_KEY])
    assert best_run.info.run_name.startswith(f"{PROP} trial {study.best_trial.number} (conv ")
    assert "Optuna trial" in best_run.data.tags["mlflow.note.content"]

    # resume: the same command with a higher target continues the same study and parent run
    invoke(project, *sets, "tune", "--property", PROP, "--n-trials", "10")
    study = optuna.load_study(study_name=f"mpprop-{PROP}", storage=storage)
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(study.get_trials()) == len(done) == 10
    assert all(t.user_attrs["epochs"] == 3 for t in done)  # the study's epochs were kept
    check_mlflow(params.tracking_uri(), study)
    # already at target: a further run starts no trial
    out = invoke(project, *sets, "tune", "--property", PROP, "--n-trials", "10")
    assert "COMPLETE" not in out and "PRUNED" not in out
    print(f"single-worker test {time.perf_counter() - t0:.1f} s")


def test_failed_trials_are_tagged_and_bounded(project, monkeypatch):
    """A diverging trial is FAIL in Optuna and MLflow and the study goes on; a study that
    only fails stops with an error instead of looping."""
    import mpprop.training
    from mpprop.stages.tune import TuneError, tune_property

    real_fit = mpprop.training.fit
    calls = {"n": 0}

    def fit_failing_first(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise FloatingPointError("validation MAE is nan at epoch 1: diverged")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(mpprop.training, "fit", fit_failing_first)
    params = load_params(project / "params.yaml", ["train.batch_size=32"])
    lines: list[str] = []
    summary = tune_property(params, PROP, n_trials=2, epochs=1, echo=lines.append)
    assert (summary["n_trials_failed"], summary["n_trials_complete"]) == (1, 2)
    assert any("FAIL" in line and "FloatingPointError" in line for line in lines)
    study = optuna.load_study(study_name=f"mpprop-{PROP}", storage=study_storage(params, PROP))
    assert check_mlflow(params.tracking_uri(), study) == {"FAIL": 1, "COMPLETE": 2}
    failed = study.get_trials(states=(TrialState.FAIL,))[0]
    run = mlflow.MlflowClient().get_run(failed.system_attrs[RUN_ID_ATTRIBUTE_KEY])
    assert "FloatingPointError" in run.data.tags["error"]

    def fit_always_failing(*args, **kwargs):
        raise FloatingPointError("diverged")

    monkeypatch.setattr(mpprop.training, "fit", fit_always_failing)
    with pytest.raises(TuneError, match="failed trials"):
        tune_property(params, PROP, n_trials=3, echo=lines.append)
    assert len(study.get_trials(states=(TrialState.FAIL,))) == 3


# --------------------------------------------------------------------------- PostgreSQL


def _pg_connect(dbname: str = "test"):
    import psycopg2

    conn = psycopg2.connect(dbname=dbname, connect_timeout=3, **PG)
    conn.autocommit = True
    return conn


@pytest.fixture
def pg_databases():
    """Two fresh databases (Optuna, MLflow), dropped afterwards."""
    try:
        admin = _pg_connect()
    except Exception as exc:  # noqa: BLE001 - any connection problem means "not available"
        pytest.skip(f"PostgreSQL not reachable at {PG['host']}:{PG['port']} ({exc})")
    names = [f"mpprop_tune_{uuid.uuid4().hex[:10]}_{k}" for k in ("optuna", "mlflow")]
    with admin.cursor() as cur:
        for name in names:
            cur.execute(f'CREATE DATABASE "{name}"')
    # Optuna gets a bare postgresql:// URL (mpprop picks the installed driver); MLflow needs
    # the driver named: SQLAlchemy 2.1 maps postgresql:// to psycopg 3, not installed here
    urls = [f"postgresql{drv}://{PG['user']}@{PG['host']}:{PG['port']}/{n}"
            for drv, n in zip(("", "+psycopg2"), names, strict=True)]
    try:
        yield urls
    finally:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def worker_cmd(project: Path, storage: str, tracking: str, *args: str) -> list[str]:
    return [
        MPPROP, "--params", str(project / "params.yaml"), *BASE_SETS,
        "-S", f"mlflow.tracking_uri={tracking}",
        "-S", "tune.heartbeat_interval=1", "-S", "tune.grace_period=3",
        *args, "--storage", storage,
    ]


@pytest.mark.postgres
def test_three_workers_share_one_study_on_postgres(project, pg_databases):
    storage, tracking = pg_databases
    db_url = storage_url(storage)
    t0 = time.perf_counter()
    cmd = worker_cmd(project, storage, tracking,
                     "tune", "--property", PROP, "--n-trials", "6", "--epochs", "2")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    print(f"3 workers done in {time.perf_counter() - t0:.1f} s")
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out

    study = optuna.load_study(study_name=f"mpprop-{PROP}", storage=db_url)
    trials = study.get_trials()
    assert len(trials) == 6, [(t.number, t.state) for t in trials]  # none lost, none extra
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # every worker ran trials of the one study, with distinct configurations
    assert sum(o.count("COMPLETE") for o in outs) >= 6
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    assert check_mlflow(tracking, study) == {"COMPLETE": 6}
    print(f"3-worker test {time.perf_counter() - t0:.1f} s")


@pytest.mark.postgres
def test_killed_worker_trial_is_failed_and_retried(project, pg_databases):
    storage, tracking = pg_databases
    db_url = storage_url(storage)
    t0 = time.perf_counter()
    args = ("tune", "--property", PROP, "--n-trials", "3", "--epochs", "12")
    victim = subprocess.Popen(worker_cmd(project, storage, tracking, *args),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 120
    try:
        while killed is None and time.monotonic() < deadline:
            time.sleep(0.3)
            assert victim.poll() is None, victim.communicate()[0]
            try:
                study = optuna.load_study(study_name=f"mpprop-{PROP}", storage=db_url)
            except KeyError:
                continue  # the study does not exist yet
            running = [t for t in study.get_trials(states=(TrialState.RUNNING,))
                       if t.intermediate_values]
            if running:  # mid-trial: at least one epoch reported
                os.kill(victim.pid, signal.SIGKILL)
                killed = running[0]
    finally:
        if victim.poll() is None and killed is None:
            victim.kill()
        victim.communicate()
    assert killed is not None, "the worker never reached a running trial"

    rescuer = subprocess.run(worker_cmd(project, storage, tracking, *args),
                             capture_output=True, text=True, timeout=300)
    assert rescuer.returncode == 0, rescuer.stdout + rescuer.stderr
    assert "worker lost" in rescuer.stdout

    study = optuna.load_study(study_name=f"mpprop-{PROP}", storage=db_url)
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [killed.number]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.params == killed.params
    assert retry.user_attrs["split_seed"] == killed.user_attrs["split_seed"]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(done) == 3 and len(trials) == 4

    by_state = check_mlflow(tracking, study)
    assert by_state["FAIL"] == 1
    dead_run = mlflow.MlflowClient().get_run(failed[0].system_attrs[RUN_ID_ATTRIBUTE_KEY])
    assert dead_run.info.status == "FAILED"
    print(f"kill/retry test {time.perf_counter() - t0:.1f} s")


def test_screening_and_pareto_objectives(project):
    """tune.objective screening maximises the smoothed val precision; pareto keeps both
    objectives (no pruning), logs the front, and picks by the MAE-tolerance rule."""
    from mpprop.study import SCREENING_NAME, _best_trial

    params = load_params(project / "params.yaml")
    for objective in ("screening", "pareto"):
        name = f"obj-{objective}"
        out = invoke(project, "-S", f"tune.objective={objective}", "tune", "--property", PROP,
                     "--n-trials", "4", "--epochs", "2", "--study-name", name)
        study = optuna.load_study(study_name=name, storage=study_storage(params, PROP))
        tuned = yaml.safe_load(params.best_params_path(PROP).read_text())
        assert tuned["objective"] == objective
        done = study.get_trials(states=(TrialState.COMPLETE,))
        assert len(done) == 4
        assert all(0 <= t.user_attrs["val_screening"] <= 100 for t in done)
        if objective == "screening":
            assert study.metric_names == [f"{SCREENING_NAME} (%)"]
            best = max(done, key=lambda t: t.value)
            assert tuned["best_trial"] == best.number
            # the value is the precision signal less a small MAE tie-breaker
            assert best.value <= best.user_attrs["val_screening"]
        else:
            assert "no pruning" in out
            assert study.metric_names == [f"{OBJECTIVE_NAME} (log10(GPa))", f"{SCREENING_NAME} (%)"]
            front = study.best_trials
            pick = _best_trial(study, params.tune.pareto_mae_tolerance)
            assert tuned["best_trial"] == pick.number and pick in front
            best_mae = min(t.values[0] for t in front)
            assert pick.values[0] <= best_mae * (1 + params.tune.pareto_mae_tolerance)
            client = mlflow.MlflowClient()
            artifacts = {a.path for a in client.list_artifacts(study.user_attrs[ATTR_PARENT_RUN])}
            assert {"pareto_front.csv", "pareto_front.png"} <= artifacts
