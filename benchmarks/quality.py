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
import os
import time
from pathlib import Path

import numpy as np
import yaml
from workspace import DEFAULT_DATA, REPO, build_workspace

from mpprop import experiment_runs as runs
from mpprop.config import load_params
from mpprop.experiment import screening_warning, summaries
from mpprop.snapshot import atomic_output
from mpprop.stats import bootstrap_resamples, n_top

RESULTS = REPO / "benchmarks" / "results" / "quality"
# properties with ~31k records here: a seeded subsample keeps the benchmark within hours
LARGE_PROPERTIES = ("formation_energy_per_atom", "band_gap", "efermi")
PRESETS = ("xie", "tuned")


def run_property(prop: str, args: argparse.Namespace) -> dict:
    root = args.workdir / prop
    n_records = args.large_records if prop in LARGE_PROPERTIES else args.records
    t_start = time.perf_counter()
    ws_info = build_workspace(root, args.data, prop, n_records, args.workers)
    print(f"[{prop}] workspace: {ws_info['n_records']} records, {ws_info['n_pool']} train+val, "
          f"{ws_info['n_test']} test", flush=True)
    params_file = root / "params.yaml"
    overrides = ["train.torch_threads=1", f"tune.best_params_dir={root / 'tuned'}",
                 *runs.scaled_tune_overrides(params_file, args.tune_epochs), *args.overrides]
    top_percent = float(load_params(params_file, overrides).train.screening_top_percent)

    print(f"[{prop}] tuning: {args.trials} trials x {args.tune_epochs} epochs, "
          f"{args.workers} workers", flush=True)
    study = f"quality-{prop}"
    tuned = runs.run_tuning(root, prop, args.trials, args.tune_epochs, args.workers, overrides,
                            study, root / "tuned")
    print(f"[{prop}] tuned: {tuned['hyperparams']} (val MAE {tuned['best_val_mae']:.4g}, "
          f"trial {tuned['best_trial']}) in {tuned['wall_seconds']:.0f} s", flush=True)

    hps = {preset: runs.final_hyperparams(params_file, overrides, prop, preset, args.final_epochs)
           for preset in PRESETS}
    t0 = time.perf_counter()
    records = runs.final_models(root, prop, {p: (hp, overrides) for p, hp in hps.items()},
                                args.seeds, args.workers,
                                lambda line: print(line, flush=True))
    final_seconds = time.perf_counter() - t0

    y, ids, spec = runs.test_set(root, overrides, prop)
    resamples = bootstrap_resamples(len(y), args.bootstrap, runs.BOOTSTRAP_SEED)
    preds = {p: np.array([r["test_pred"] for r in records[p]]) for p in PRESETS}
    preds["published"], published_info = runs.published_predictions(root, overrides, prop)
    models, comparisons = summaries(
        y, preds, [("tuned", "xie"), ("tuned", "published"), ("xie", "published")], resamples,
        top_percent, spec.better, records)
    models["published"].update(published_info, note=(
        "xie-2018 checkpoint, trained on 60% of a 2017 MP list that overlaps this snapshot "
        "(its test error here is optimistic)"
        + ("; trained on non-metals only" if prop == "band_gap" else "")))
    result = {
        "property": prop, "unit": spec.unit, "better": spec.better, "quick": args.quick,
        "budget": {
            "records": ws_info["n_records"], "subsample": n_records,
            "n_pool": ws_info["n_pool"], "n_test": ws_info["n_test"],
            "tune_trials": args.trials, "tune_epochs_per_trial": args.tune_epochs,
            "tune_workers": args.workers, "final_epochs": args.final_epochs,
            "seeds": args.seeds, "bootstrap_resamples": args.bootstrap, "overrides": overrides,
            "tune_wall_seconds": tuned["wall_seconds"], "final_wall_seconds": final_seconds,
            "total_wall_seconds": time.perf_counter() - t_start,
            "machine": f"{os.cpu_count()} cores",
        },
        "top_percent": top_percent,
        "n_top_test": n_top(len(y), top_percent),
        "screening_warning": screening_warning(len(y), top_percent, spec.better),
        "tuning": {k: tuned[k] for k in ("hyperparams", "best_val_mae", "best_trial",
                                         "n_trials_complete", "n_trials_pruned")}
                  | runs.study_record(root, study),
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
