"""Model quality per property: the Xie preset vs the tuned preset vs the published checkpoint,
at equal final-training budgets, on the same fixed test materials, with bootstrap intervals.

    python benchmarks/quality.py [--property P ...] [--trials 16] [--tune-epochs 30]
                                 [--final-epochs 60] [--seeds 3] [--workers 2] [--quick]

Per property (each written separately, so a run can be spread over several sittings; a
property whose result exists is skipped, and within a property the study and every finished
final model are kept in the work folder, so a killed run resumes where it stopped):
1. workspace: the property's records of the shared snapshot (all for the elastic set and
   energy_per_atom; a seeded subsample of --large-records for the ~31k-record properties),
   built through the real CLI (fetch, featurize, split);
2. tuning: `mpprop tune` with --workers worker processes on one Optuna study (the paper's
   space, sampler and PercentilePruner; the warm-up and the LR-decay range scaled from the
   paper's 200 epochs to --tune-epochs; the Xie architecture enqueued as trial 0);
3. final training: Xie preset and tuned preset, each for --final-epochs with --seeds seeds
   (Xie's LR decay at the paper's 80% of the epochs, the tuned decay epoch scaled by
   final/tune epochs), on the fixed train/val split (train.seed) of the non-test pool;
4. the published CGCNN checkpoint (xie-2018) on the same test set; it was trained on a 2017
   MP list from which most of these records come, so its test error is optimistic;
5. statistics (mpprop.stats): per model the seed-averaged test MAE and top-N% precision with
   95% bootstrap intervals, mean ± std over seeds, the paired bootstrap intervals of
   MAE(tuned) - MAE(Xie) and MAE(tuned) - MAE(published), near-constant flags.

Writes benchmarks/results/quality/<P>.json, <P>.tuned.yaml (usable as tuned/<P>.yaml: the
final-training hyperparameters) and table.md (all properties done so far).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from workspace import DEFAULT_DATA, REPO, build_workspace

from mpprop import presets
from mpprop.config import Hyperparams, load_params
from mpprop.experiment import model_summary, paired
from mpprop.snapshot import atomic_output
from mpprop.stats import (
    MIN_TOP_MATERIALS,
    bootstrap_resamples,
    n_top,
)

RESULTS = REPO / "benchmarks" / "results" / "quality"
# properties with ~31k records here: a seeded subsample keeps the benchmark within hours
LARGE_PROPERTIES = ("formation_energy_per_atom", "band_gap", "efermi")
# the paper's protocol: decay at 800 of 1000 epochs (Xie); warm-up 30 and decay range
# 50-150 of 200 epochs (tuning): kept as fractions when the epochs are scaled down
XIE_DECAY_FRACTION = 0.8
PAPER_TUNE_EPOCHS = 200
BOOTSTRAP_SEED = 0
PROGRESS_EVERY = 10  # epochs between progress lines of a final-training job


def scaled_tune_overrides(params_file: Path, tune_epochs: int) -> list[str]:
    """Warm-up and LR-decay range of the paper's 200-epoch protocol at `tune_epochs`."""
    tune = load_params(params_file).tune
    scale = tune_epochs / PAPER_TUNE_EPOCHS
    decay = tune["search_space"]["lr_decay_epoch"]
    low = max(1, round(decay["low"] * scale))
    high = max(low, round(decay["high"] * scale))
    warmup = max(1, math.floor(tune["pruner_warmup_steps"] * scale))
    return [f"tune.search_space.lr_decay_epoch={{low: {low}, high: {high}}}",
            f"tune.pruner_warmup_steps={warmup}"]


def run_tuning(root: Path, prop: str, args: argparse.Namespace, overrides: list[str],
               study: str | None = None, best_dir: Path | None = None) -> dict:
    """`mpprop tune` workers on one study in the workspace; resumes a study that exists."""
    study = study or f"quality-{prop}"
    best_dir = best_dir or root / "tuned"
    mpprop = str(Path(sys.executable).with_name("mpprop"))
    sets = [x for item in overrides for x in ("-S", item)]
    cmd = [mpprop, "--params", str(root / "params.yaml"), *sets, "tune", "--property", prop,
           "--n-trials", str(args.trials), "--epochs", str(args.tune_epochs),
           "--storage", f"sqlite:///{root / 'optuna.db'}", "--study-name", study]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    t0 = time.perf_counter()
    workers = []
    for i in range(args.workers):
        log = open(root / f"{study}-worker-{i}.log", "a")  # noqa: SIM115 - closed below
        workers.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=root), log))
        time.sleep(2)  # the first worker creates the study and queues the baseline
    for proc, log in workers:
        proc.wait()
        log.close()
    failed = [i for i, (p, _) in enumerate(workers) if p.returncode != 0]
    if failed:
        raise SystemExit(f"tuning worker(s) {failed} failed; see {root}/{study}-worker-*.log")
    best = yaml.safe_load((best_dir / f"{prop}.yaml").read_text())
    return {**best, "wall_seconds": time.perf_counter() - t0}


def study_record(root: Path, prop: str) -> dict:
    import optuna

    study = optuna.load_study(study_name=f"quality-{prop}", storage=f"sqlite:///{root / 'optuna.db'}")
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({"number": t.number, "state": t.state.name, "value": t.value,
                       "epochs_run": len(t.intermediate_values), "params": t.params,
                       "enqueued": bool(t.user_attrs.get("enqueued_baseline"))})
    return {"trials": trials}


def final_hyperparams(params_file: Path, overrides: list[str], prop: str, preset: str,
                      final_epochs: int) -> Hyperparams:
    """The final-training hyperparameters: mpprop train's own rule (stages.train) at
    `final_epochs`: the tuned set (tune.best_params_dir of `overrides`) with its LR decay
    moved in proportion, the Xie preset with its decay at the paper's 80%."""
    params = load_params(params_file, [*overrides, f"tune.final_epochs={final_epochs}"])
    if preset == "xie":
        decay = max(1, round(XIE_DECAY_FRACTION * final_epochs))
        return presets.final_hyperparams(params, prop, "xie",
                                             {"epochs": final_epochs, "lr_decay_epoch": decay})
    return presets.final_hyperparams(params, prop, "tuned")


def fit_final(root: str, overrides: list[str], prop: str, preset: str, hp: dict,
              seed: int) -> tuple[Any, Any, Any, float]:
    """One final model on the workspace's fixed train/val split of the non-test pool (in a
    worker process with one torch thread): (FitResult, params, PropertyData, seconds)."""
    import torch

    from mpprop.data import open_workspace, property_data, train_val_split
    from mpprop.losses import LossSettings
    from mpprop.training import EpochStats, fit_on_pool

    torch.set_num_threads(1)
    params = load_params(Path(root) / "params.yaml", overrides)
    data = property_data(params, open_workspace(params), prop)
    tr, va = train_val_split(len(data.pool_rows), params.split["val_fraction"],
                             int(params.train["seed"]))
    hparams = Hyperparams(**hp)

    def progress(s: EpochStats) -> None:
        if s.epoch % PROGRESS_EVERY == 0 or s.epoch == hparams.epochs:
            print(f"  {prop} {preset} seed {seed}: epoch {s.epoch}/{hparams.epochs} "
                  f"val_mae {s.val_mae:.4f} ({s.seconds:.1f} s/epoch)", flush=True)

    t0 = time.perf_counter()
    result = fit_on_pool(hparams, params.graph_settings(), data, tr, va, seed, progress,
                         params.predict["batch_size"], LossSettings.from_train(params.train))
    return result, params, data, time.perf_counter() - t0


def train_job(root: str, overrides: list[str], prop: str, preset: str, hp: dict, seed: int,
              out: str) -> dict:
    """One final model and its test predictions; writes `out`."""
    from mpprop.training import predict

    result, params, data, seconds = fit_final(root, overrides, prop, preset, hp, seed)
    pred = predict(result.model, result.normalizer, data.cache, data.test_rows,
                   params.predict["batch_size"])
    record = {"preset": preset, "seed": seed, "hyperparams": hp,
              "best_val_mae": result.best_val_mae, "best_epoch": result.best_epoch,
              "seconds": seconds, "test_pred": pred.tolist()}
    with atomic_output(out) as tmp:  # a killed job leaves no half-written record
        Path(tmp).write_text(json.dumps(record) + "\n")
    return record


def published_predictions(root: Path, overrides: list[str], prop: str) -> tuple[np.ndarray, dict]:
    from mpprop.data import open_workspace, property_data
    from mpprop.model import load_checkpoint, pretrained_path
    from mpprop.training import predict

    params = load_params(root / "params.yaml", overrides)
    ws = open_workspace(params)
    data = property_data(params, ws, prop)
    model, normalizer, hp = load_checkpoint(pretrained_path(prop), params.graph_settings())
    pred = predict(model, normalizer, data.cache, data.test_rows, params.predict["batch_size"])
    return pred, {"hyperparams": hp.as_dict(), "normalizer": normalizer.state_dict()}


def test_set(root: Path, overrides: list[str], prop: str) -> tuple[np.ndarray, list[str], Any]:
    from mpprop.data import open_workspace, property_data

    params = load_params(root / "params.yaml", overrides)
    ws = open_workspace(params)
    data = property_data(params, ws, prop)
    ids = ws.cache.material_id[data.test_rows].tolist()
    return data.test_targets, ids, data.spec


def run_property(prop: str, args: argparse.Namespace) -> dict:
    root = args.workdir / prop
    n_records = args.large_records if prop in LARGE_PROPERTIES else args.records
    t_start = time.perf_counter()
    ws_info = build_workspace(root, args.data, prop, n_records, args.workers)
    print(f"[{prop}] workspace: {ws_info['n_records']} records, {ws_info['n_pool']} train+val, "
          f"{ws_info['n_test']} test", flush=True)
    params_file = root / "params.yaml"
    overrides = ["train.torch_threads=1", f"tune.best_params_dir={root / 'tuned'}",
                 *scaled_tune_overrides(params_file, args.tune_epochs), *args.overrides]
    params = load_params(params_file, overrides)
    top_percent = float(params.train["screening_top_percent"])

    print(f"[{prop}] tuning: {args.trials} trials x {args.tune_epochs} epochs, "
          f"{args.workers} workers", flush=True)
    tuned = run_tuning(root, prop, args, overrides)
    print(f"[{prop}] tuned: {tuned['hyperparams']} (val MAE {tuned['best_val_mae']:.4g}, "
          f"trial {tuned['best_trial']}) in {tuned['wall_seconds']:.0f} s", flush=True)

    hps = {preset: final_hyperparams(params_file, overrides, prop, preset, args.final_epochs)
           for preset in ("xie", "tuned")}
    jobs, records = [], {}
    final_dir = root / "final"
    final_dir.mkdir(exist_ok=True)
    for preset, hp in hps.items():
        for seed in range(args.seeds):
            out = final_dir / f"{preset}-{seed}-{hp.epochs}.json"
            if out.exists():
                records[(preset, seed)] = json.loads(out.read_text())
            else:
                jobs.append((str(root), overrides, prop, preset, hp.as_dict(), seed, str(out)))
    t0 = time.perf_counter()
    print(f"[{prop}] final training: {len(jobs)} models to train "
          f"({len(records)} done before), {args.final_epochs} epochs each", flush=True)
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for rec in pool.map(train_job, *zip(*jobs, strict=True)) if jobs else []:
            records[(rec["preset"], rec["seed"])] = rec
            print(f"[{prop}] {rec['preset']} seed {rec['seed']}: best val MAE "
                  f"{rec['best_val_mae']:.4g} ({rec['seconds']:.0f} s)", flush=True)
    final_seconds = time.perf_counter() - t0

    y, ids, spec = test_set(root, overrides, prop)
    resamples = bootstrap_resamples(len(y), args.bootstrap, BOOTSTRAP_SEED)
    preds = {preset: np.array([records[(preset, s)]["test_pred"] for s in range(args.seeds)])
             for preset in hps}
    published, published_info = published_predictions(root, overrides, prop)
    models = {
        preset: model_summary(y, preds[preset], resamples, top_percent, spec.better,
                              [records[(preset, s)] for s in range(args.seeds)])
        for preset in hps
    }
    models["published"] = {
        **model_summary(y, published, resamples, top_percent, spec.better),
        **published_info,
        "note": "xie-2018 checkpoint, trained on 60% of a 2017 MP list that overlaps this "
                "snapshot (its test error here is optimistic)"
                + ("; trained on non-metals only" if prop == "band_gap" else ""),
    }
    comparisons = {
        "tuned-xie": paired(y, preds["tuned"], preds["xie"], resamples, top_percent, spec.better),
        "tuned-published": paired(y, preds["tuned"], published, resamples, top_percent,
                                  spec.better),
        "xie-published": paired(y, preds["xie"], published, resamples, top_percent, spec.better),
    }
    n_top_test = n_top(len(y), top_percent)
    result = {
        "property": prop,
        "unit": spec.unit,
        "better": spec.better,
        "quick": args.quick,
        "budget": {
            "records": ws_info["n_records"],
            "subsample": n_records,
            "n_pool": ws_info["n_pool"],
            "n_test": ws_info["n_test"],
            "tune_trials": args.trials,
            "tune_epochs_per_trial": args.tune_epochs,
            "tune_workers": args.workers,
            "final_epochs": args.final_epochs,
            "seeds": args.seeds,
            "bootstrap_resamples": args.bootstrap,
            "overrides": overrides,
            "tune_wall_seconds": tuned["wall_seconds"],
            "final_wall_seconds": final_seconds,
            "total_wall_seconds": time.perf_counter() - t_start,
            "machine": f"{os.cpu_count()} cores",
        },
        "top_percent": top_percent,
        "n_top_test": n_top_test,
        "screening_warning": (
            f"only {n_top_test} materials in the top {top_percent:g}% of the test set"
            if spec.better is not None and n_top_test < MIN_TOP_MATERIALS else None),
        "tuning": {k: tuned[k] for k in ("hyperparams", "best_val_mae", "best_trial",
                                         "n_trials_complete", "n_trials_pruned")}
                  | study_record(root, prop),
        "models": models,
        "paired": comparisons,
        "test_material_ids": ids,
    }
    tuned_yaml = {
        "hyperparams": {k: hps["tuned"].as_dict()[k] for k in (
            "n_conv", "n_h", "atom_fea_len", "h_fea_len", "lr", "lr_decay_epoch", "optimizer",
            "epochs")},
        "best_val_mae": tuned["best_val_mae"],
        "best_trial": tuned["best_trial"],
        "property": prop,
        "note": f"quality benchmark: tuned at {args.trials} trials x {args.tune_epochs} epochs; "
                f"lr_decay_epoch scaled to {args.final_epochs} final epochs",
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{prop}.tuned.yaml").write_text(yaml.safe_dump(tuned_yaml, sort_keys=False))
    with atomic_output(args.out_dir / f"{prop}.json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _ci(d: dict, digits: int) -> str:
    return f"{d['value']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def table(results: list[dict]) -> str:
    """Markdown: per property MAE and top-N% precision of each model, and paired differences."""
    lines = [
        "| property (unit) | records / test | tuning | final epochs x seeds | MAE Xie | MAE tuned "
        "| MAE published | tuned - Xie | tuned - published | top-3% Xie | top-3% tuned "
        "| top-3% published |",
        "|" + "---|" * 12,
    ]
    for r in results:
        m, p, b = r["models"], r["paired"], r["budget"]
        digits = 3 if r["unit"] in ("eV", "eV/atom") else 4

        def scr(name: str, m: dict = m) -> str:
            return _ci(m[name]["screening"], 1) if "screening" in m[name] else "-"

        def flag(name: str, m: dict = m) -> str:
            return " (near-constant)" if m[name]["near_constant"] else ""

        def diff(key: str, digits: int = digits, p: dict = p) -> str:
            d = p[key]["mae_diff"]
            return _ci(d, digits) + (" *" if d["excludes_zero"] else "")

        lines.append(
            f"| {r['property']} ({r['unit']}) | {b['records']} / {b['n_test']} "
            f"| {b['tune_trials']} x {b['tune_epochs_per_trial']} | {b['final_epochs']} x {b['seeds']} "
            f"| {_ci(m['xie']['test_mae'], digits)}{flag('xie')} "
            f"| {_ci(m['tuned']['test_mae'], digits)}{flag('tuned')} "
            f"| {_ci(m['published']['test_mae'], digits)}{flag('published')} "
            f"| {diff('tuned-xie')} | {diff('tuned-published')} "
            f"| {scr('xie')} | {scr('tuned')} | {scr('published')} |"
        )
    lines.append("")
    lines.append("MAE: seed-averaged test MAE with its 95% bootstrap interval; differences are "
                 "paired (same resampled test materials), * = the interval excludes zero. "
                 "Published: the xie-2018 checkpoints, trained on data overlapping this test "
                 "set (optimistic).")
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path) -> Path:
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    path = out_dir / "table.md"
    path.write_text(table(results))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--property", dest="props", action="append", default=None)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "work" / "quality",
                    help="workspaces, studies and finished models (a cache; default ignored by git)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--records", type=int, default=None,
                    help="records of the smaller properties (default: all with the label)")
    ap.add_argument("--large-records", type=int, default=6000,
                    help=f"seeded subsample for {', '.join(LARGE_PROPERTIES)}")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--tune-epochs", type=int, default=30)
    ap.add_argument("--final-epochs", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--quick", action="store_true",
                    help="CI: one property, tiny budget, results in --out-dir (correctness only)")
    ap.add_argument("--force", action="store_true", help="redo properties that have a result")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    if args.quick:
        args.props = args.props or ["bulk_modulus"]
        args.records, args.large_records = 300, 300
        args.trials, args.tune_epochs, args.final_epochs = 3, 3, 3
        args.seeds, args.bootstrap = 2, 200
    props = args.props or list(load_params(REPO / "params.yaml").properties)
    for prop in props:
        if (args.out_dir / f"{prop}.json").exists() and not args.force:
            print(f"[{prop}] done before: {args.out_dir / f'{prop}.json'}")
            continue
        r = run_property(prop, args)
        write_table(args.out_dir)
        m = r["models"]
        print(f"[{prop}] test MAE Xie {m['xie']['test_mae']['value']:.4g}, tuned "
              f"{m['tuned']['test_mae']['value']:.4g}, published "
              f"{m['published']['test_mae']['value']:.4g}; tuned - Xie "
              f"{_ci(r['paired']['tuned-xie']['mae_diff'], 4)}", flush=True)
    print(table([json.loads(p.read_text()) for p in sorted(args.out_dir.glob("*.json"))]))
    print(f"-> {write_table(args.out_dir)}")


if __name__ == "__main__":
    main()
