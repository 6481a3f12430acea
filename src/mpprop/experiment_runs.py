"""The runs the benchmarks make on a workspace (a project folder of the shared snapshot's
records, built through the CLI): a tuning study of `mpprop tune` worker processes, a
configuration's final models for K seeds on the workspace's fixed train/val split, the
extrapolation rankings of `evaluate --extrapolation`, and retrained models' predictions for
materials outside the workspace.

Every model is trained in a spawned worker process with one torch thread and its record
(hyperparameters, seed, test predictions) written atomically to a cache file named by
(configuration name, seed, epochs); a cached record is used only where its hyperparameters
are the ones asked for, so a killed run resumes and a changed configuration is retrained.
A benchmark's stored result can write its records back (`restore_record`), so a fresh
checkout retrains nothing it already has. The statistics are mpprop.experiment's.
Uses the core and config; no stage, MLflow or click (tuning runs the `mpprop` executable).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml

from mpprop import presets
from mpprop.config import Params, load_params
from mpprop.data import PropertyData, open_workspace, property_data, train_val_split, transform_target
from mpprop.experiment import compare_recall
from mpprop.holdout import extrapolation_split, rank_candidates
from mpprop.model import load_checkpoint, pretrained_path
from mpprop.settings import Hyperparams
from mpprop.snapshot import atomic_output
from mpprop.stats import bootstrap_resamples
from mpprop.training import EpochStats, FitResult, fit_on_pool, predict, set_torch_threads

PARAMS_FILE = "params.yaml"
FINAL_DIR, EXTRAPOLATION_DIR, UNSEEN_DIR = "final", "extrapolation", "unseen"
# the paper's protocol: decay at 800 of 1000 epochs (Xie); warm-up 30 and decay range
# 50-150 of 200 epochs (tuning): kept as fractions when the epochs are scaled down
XIE_DECAY_FRACTION = 0.8
PAPER_TUNE_EPOCHS = 200
BOOTSTRAP_SEED = 0  # the benchmarks' bootstrap resamples
PROGRESS_EVERY = 10  # epochs between progress lines of a final-training job
UNSEEN_DECIMALS = 4  # predictions for unseen materials (target units), as stored
STARTUP_SECONDS = 2  # between tuning workers: the first creates the study, queues the baseline


class TuningError(RuntimeError):
    """A tuning worker process failed (its log says why)."""


def workspace_params(root: Path, overrides: list[str] | None = None) -> Params:
    return load_params(root / PARAMS_FILE, overrides or [])


# --- tuning -------------------------------------------------------------------------------

def scaled_tune_overrides(params_file: Path, tune_epochs: int) -> list[str]:
    """Warm-up and LR-decay range of the paper's 200-epoch protocol at `tune_epochs`."""
    tune = load_params(params_file).tune
    scale = tune_epochs / PAPER_TUNE_EPOCHS
    decay = tune.search_space["lr_decay_epoch"]
    low = max(1, round(decay.low * scale))
    high = max(low, round(decay.high * scale))
    warmup = max(1, math.floor(tune.pruner_warmup_steps * scale))
    return [f"tune.search_space.lr_decay_epoch={{low: {low}, high: {high}}}",
            f"tune.pruner_warmup_steps={warmup}"]


def study_url(root: Path) -> str:
    return f"sqlite:///{root / 'optuna.db'}"


def run_tuning(root: Path, prop: str, trials: int, tune_epochs: int, workers: int,
               overrides: list[str], study: str, best_dir: Path) -> dict[str, Any]:
    """`mpprop tune` in `workers` processes on one study of the workspace (a study that
    exists resumes); the tuned file it writes in `best_dir`, plus the wall seconds."""
    mpprop = str(Path(sys.executable).with_name("mpprop"))
    sets = [x for item in overrides for x in ("-S", item)]
    cmd = [mpprop, "--params", str(root / PARAMS_FILE), *sets, "tune", "--property", prop,
           "--n-trials", str(trials), "--epochs", str(tune_epochs),
           "--storage", study_url(root), "--study-name", study]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    t0 = time.perf_counter()
    procs = []
    for i in range(workers):
        log = open(root / f"{study}-worker-{i}.log", "a")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       cwd=root), log))
        time.sleep(STARTUP_SECONDS)
    for proc, log in procs:
        proc.wait()
        log.close()
    failed = [i for i, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed:
        raise TuningError(f"tuning worker(s) {failed} failed; see {root}/{study}-worker-*.log")
    best = yaml.safe_load((best_dir / f"{prop}.yaml").read_text())
    return {**best, "wall_seconds": time.perf_counter() - t0}


def study_record(root: Path, study: str) -> dict[str, Any]:
    """Every trial of the workspace's study: state, value, epochs run, parameters."""
    s = optuna.load_study(study_name=study, storage=study_url(root))
    return {"trials": [{"number": t.number, "state": t.state.name, "value": t.value,
                        "epochs_run": len(t.intermediate_values), "params": t.params,
                        "enqueued": bool(t.user_attrs.get("enqueued_baseline"))}
                       for t in s.get_trials(deepcopy=False)]}


def final_hyperparams(params_file: Path, overrides: list[str], prop: str, preset: str,
                      final_epochs: int) -> Hyperparams:
    """The final-training hyperparameters: mpprop train's own rule (presets) at
    `final_epochs`: the tuned set (tune.best_params_dir of `overrides`) with its LR decay
    moved in proportion, the Xie preset with its decay at the paper's 80%."""
    params = load_params(params_file, [*overrides, f"tune.final_epochs={final_epochs}"])
    if preset == "xie":
        decay = max(1, round(XIE_DECAY_FRACTION * final_epochs))
        return presets.final_hyperparams(params, prop, "xie",
                                         {"epochs": final_epochs, "lr_decay_epoch": decay})
    return presets.final_hyperparams(params, prop, "tuned")


# --- the workspace's test set and the published checkpoint --------------------------------

def test_set(root: Path, overrides: list[str], prop: str) -> tuple[np.ndarray, list[str], Any]:
    """The fixed test set: targets (model units), material ids, the property's spec."""
    params = workspace_params(root, overrides)
    ws = open_workspace(params)
    data = property_data(params, ws, prop)
    return data.test_targets, ws.cache.material_id[data.test_rows].tolist(), data.spec


def published_predictions(root: Path, overrides: list[str], prop: str
                          ) -> tuple[np.ndarray, dict[str, Any]]:
    """The published (xie-2018) checkpoint's test predictions and its description."""
    params = workspace_params(root, overrides)
    data = property_data(params, open_workspace(params), prop)
    model, normalizer, hp = load_checkpoint(pretrained_path(prop), params.graph_settings())
    pred = predict(model, normalizer, data.cache, data.test_rows, params.predict.batch_size)
    return pred, {"hyperparams": hp.as_dict(), "normalizer": normalizer.state_dict()}


# --- cached model records -----------------------------------------------------------------

def record_path(root: Path, kind: str, name: str, epochs: int, seed: int) -> Path:
    """One model's cache file in the workspace (extrapolation: seed 0 keeps the name of the
    one-seed results)."""
    if kind == EXTRAPOLATION_DIR:
        return root / kind / f"{name}-{epochs}{'' if seed == 0 else f'-seed{seed}'}.json"
    return root / kind / f"{name}-{seed}-{epochs}.json"


def cached_records(root: Path, kind: str, configs: dict[str, tuple[Hyperparams, list[str]]],
                   seeds: int) -> tuple[dict[tuple[str, int], dict[str, Any]],
                                        dict[tuple[str, int], tuple[Hyperparams, list[str], Path]]]:
    """Each (configuration, seed)'s cached record of `kind`, and those still to train with
    their hyperparameters, overrides and cache file; makes the cache folder."""
    done: dict[tuple[str, int], dict[str, Any]] = {}
    todo: dict[tuple[str, int], tuple[Hyperparams, list[str], Path]] = {}
    for name, (hp, overrides) in configs.items():
        for seed in range(seeds):
            out = record_path(root, kind, name, hp.epochs, seed)
            cached = read_record(out, hp.as_dict())
            if cached is not None:
                done[name, seed] = cached
            else:
                todo[name, seed] = (hp, overrides, out)
    (root / kind).mkdir(parents=True, exist_ok=True)
    return done, todo


def read_record(path: Path, hyperparams: dict[str, Any]) -> dict[str, Any] | None:
    """A cached record, if there is one for these hyperparameters (one trained with others,
    e.g. before a tuned preset changed, is trained again)."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record["hyperparams"] == hyperparams else None


def write_record(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    with atomic_output(path) as tmp:  # a killed job leaves no half-written record
        Path(tmp).write_text(json.dumps(record) + "\n")
    return record


def restore_record(path: Path, record: dict[str, Any]) -> None:
    """Write a record of a stored result where the cache lacks it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record) + "\n")


def restore_final(root: Path, name: str, hyperparams: dict[str, Any],
                  test_preds: list[list[float]]) -> None:
    """A stored result's final models of one configuration (test predictions per seed)."""
    for seed, pred in enumerate(test_preds):
        restore_record(record_path(root, FINAL_DIR, name, hyperparams["epochs"], seed),
                       {"preset": name, "seed": seed, "hyperparams": hyperparams,
                        "test_pred": pred})


def restore_extrapolation(root: Path, name: str, hyperparams: dict[str, Any],
                          preds: list[list[float]], is_top: list[bool]) -> None:
    """A stored result's extrapolation rankings of one configuration (per seed)."""
    for seed, pred in enumerate(preds):
        restore_record(record_path(root, EXTRAPOLATION_DIR, name, hyperparams["epochs"], seed),
                       {"hyperparams": hyperparams, "seed": seed, "pred": pred, "is_top": is_top})


def run_in_workers(fn: Callable[..., dict[str, Any]], jobs: list[tuple], workers: int,
                   on_done: Callable[[dict[str, Any], int], None] | None = None
                   ) -> list[dict[str, Any]]:
    """fn(*job) for each job in `workers` spawned processes (fresh torch state, one thread
    each); on_done(record, count) as each finishes. The records in the jobs' order."""
    if not jobs:
        return []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        out: dict[int, dict[str, Any]] = {}
        for n, future in enumerate(as_completed(futures), 1):
            out[futures[future]] = future.result()
            if on_done is not None:
                on_done(out[futures[future]], n)
    return [out[i] for i in range(len(jobs))]


# --- final models, K seeds ----------------------------------------------------------------

def fit_final(root: Path | str, overrides: list[str], prop: str, name: str,
              hp: dict[str, Any], seed: int) -> tuple[FitResult, Params, PropertyData, float]:
    """One final model on the workspace's fixed train/val split (train.seed) of the non-test
    pool, model seed `seed`, one torch thread: (FitResult, params, PropertyData, seconds)."""
    set_torch_threads(1)
    params = workspace_params(Path(root), overrides)
    data = property_data(params, open_workspace(params), prop)
    tr, va = train_val_split(len(data.pool_rows), params.split.val_fraction,
                             int(params.train.seed))
    hparams = Hyperparams(**hp)

    def progress(s: EpochStats) -> None:
        if s.epoch % PROGRESS_EVERY == 0 or s.epoch == hparams.epochs:
            print(f"  {prop} {name} seed {seed}: epoch {s.epoch}/{hparams.epochs} "
                  f"val_mae {s.val_mae:.4f} ({s.seconds:.1f} s/epoch)", flush=True)

    t0 = time.perf_counter()
    result = fit_on_pool(hparams, params.graph_settings(), data, tr, va, seed, progress,
                         params.predict.batch_size, params.loss_settings())
    return result, params, data, time.perf_counter() - t0


def train_final(root: str, overrides: list[str], prop: str, name: str, hp: dict[str, Any],
                seed: int, out: str) -> dict[str, Any]:
    """One final model and its test predictions (a worker's job); writes `out`."""
    result, params, data, seconds = fit_final(root, overrides, prop, name, hp, seed)
    pred = predict(result.model, result.normalizer, data.cache, data.test_rows,
                   params.predict.batch_size)
    return write_record(Path(out), {
        "preset": name, "seed": seed, "hyperparams": hp, "best_val_mae": result.best_val_mae,
        "best_epoch": result.best_epoch, "seconds": seconds, "test_pred": pred.tolist()})


def final_models(root: Path, prop: str, configs: dict[str, tuple[Hyperparams, list[str]]],
                 seeds: int, workers: int, progress: Callable[[str], None] = print
                 ) -> dict[str, list[dict[str, Any]]]:
    """Each configuration ({name: (hyperparameters, params overrides)}) trained with seeds
    0..seeds-1, each seed's record cached: {name: [record per seed]}."""
    done, todo = cached_records(root, FINAL_DIR, configs, seeds)
    jobs = [(str(root), overrides, prop, name, hp.as_dict(), seed, str(out))
            for (name, seed), (hp, overrides, out) in todo.items()]
    progress(f"[{prop}] {', '.join(configs)}: {len(jobs)} final models to train "
             f"({len(done)} done before)")

    def report(rec: dict[str, Any], _: int) -> None:
        progress(f"[{prop}] {rec['preset']} seed {rec['seed']}: best val MAE "
                 f"{rec['best_val_mae']:.4g} ({rec['seconds']:.0f} s)")

    for rec in run_in_workers(train_final, jobs, workers, report):
        done[rec["preset"], rec["seed"]] = rec
    return {name: [done[name, s] for s in range(seeds)] for name in configs}


# --- extrapolation: the top held out of training ------------------------------------------

def extrapolation_ranking(root: Path, overrides: list[str], prop: str, hp: Hyperparams,
                          top_percent: float, seed: int, out: str) -> dict[str, Any]:
    """One model (model seed `seed`) trained without the top, ranking the candidate pool as
    `mpprop evaluate --extrapolation` does (a worker's job); writes `out`."""
    set_torch_threads(1)
    params = workspace_params(root, overrides)
    data = property_data(params, open_workspace(params), prop)
    sp = extrapolation_split(data, top_percent, data.spec.better)
    pred, _ = rank_candidates(params, data, sp, hp, seed)
    return write_record(Path(out), {"hyperparams": hp.as_dict(), "seed": seed,
                                     "pred": pred.tolist(), "is_top": sp["cand_top"].tolist()})


def extrapolation_rankings(root: Path, prop: str, configs: dict[str, tuple[Hyperparams, list[str]]],
                           top_percent: float, seeds: int, workers: int,
                           progress: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Each configuration's ranking of the candidate pool, one model per seed (cached):
    {name: {"hyperparams", "pred_per_seed", "is_top"}}."""
    done, missing = cached_records(root, EXTRAPOLATION_DIR, configs, seeds)
    todo = {(name, seed): (root, overrides, prop, hp, top_percent, seed, str(out))
            for (name, seed), (hp, overrides, out) in missing.items()}
    progress(f"[{prop}] extrapolation: {len(todo)} models to train ({len(done)} done before)")
    done.update(zip(todo, run_in_workers(extrapolation_ranking, list(todo.values()), workers),
                    strict=True))
    return {name: {"hyperparams": done[name, 0]["hyperparams"], "is_top": done[name, 0]["is_top"],
                   "pred_per_seed": [done[name, s]["pred"] for s in range(seeds)]}
            for name in configs}


def extrapolation_summary(rankings: dict[str, dict[str, Any]], pairs: list[tuple[str, str]],
                          n_resamples: int, better: str, top_percent: float) -> dict[str, Any]:
    """The pool, each configuration's ranking, recall and the recall differences of `pairs`
    (experiment.compare_recall) of extrapolation_rankings' result."""
    is_top = np.array(next(iter(rankings.values()))["is_top"])
    resamples = bootstrap_resamples(len(is_top), n_resamples, BOOTSTRAP_SEED)
    preds = {name: np.array(e["pred_per_seed"]) for name, e in rankings.items()}
    return {"n_top": int(is_top.sum()), "n_pool": len(is_top),
            "random_recall": float(is_top.mean()), "top_percent": top_percent,
            "is_top": is_top.tolist(),
            "rankings": {name: {"hyperparams": e["hyperparams"],
                                "pred_per_seed": e["pred_per_seed"]}
                         for name, e in rankings.items()},
            **compare_recall(is_top, preds, pairs, resamples, better)}


# --- materials outside the workspace ------------------------------------------------------

def unseen_rows(root: Path, root_all: Path, prop: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Rows of the all-records workspace `root_all` whose material is not in workspace
    `root` (train, validation and test), their ids and transformed targets."""
    params_all = workspace_params(root_all)
    ws_all = open_workspace(params_all, in_memory=False)
    seen = set(open_workspace(workspace_params(root), in_memory=False).cache.material_id.tolist())
    ids_all = ws_all.cache.material_id.tolist()
    if not seen <= set(ids_all):
        raise ValueError(f"[{prop}] {root} holds materials that {root_all} lacks: another snapshot?")
    labels = ws_all.raw_labels(prop)
    rows = np.array([i for i, m in enumerate(ids_all) if m not in seen and np.isfinite(labels[i])],
                    dtype=np.int64)
    y = transform_target(labels[rows], params_all.property_spec(prop))
    return rows, [ids_all[i] for i in rows], y


def train_unseen(root: str, root_all: str, overrides: list[str], prop: str, name: str,
                 hp: dict[str, Any], seed: int, rows: list[int], out: str) -> dict[str, Any]:
    """One final model retrained (a worker's job): its test predictions and those for
    `rows` of the all-records workspace; writes `out`."""
    result, params, data, seconds = fit_final(root, overrides, prop, name, hp, seed)
    batch = params.predict.batch_size
    test_pred = predict(result.model, result.normalizer, data.cache, data.test_rows, batch)
    cache_all = open_workspace(workspace_params(Path(root_all))).cache
    pred = predict(result.model, result.normalizer, cache_all, np.asarray(rows), batch)
    return write_record(Path(out), {
        "name": name, "seed": seed, "hyperparams": hp, "seconds": seconds,
        "test_pred": test_pred.tolist(), "unseen_pred": np.round(pred, UNSEEN_DECIMALS).tolist()})


def seeds_done(names: Iterable[str], records: dict[tuple[str, int], Any], seeds: int) -> int:
    """How many leading seeds every model has finished (the rounds a summary can use)."""
    names = list(names)
    return next((s for s in range(seeds) if any((n, s) not in records for n in names)), seeds)
