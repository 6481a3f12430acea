"""What pruning saves: the same Optuna study (same seed, same trial count) with the paper's
PercentilePruner and without pruning, on the bulk moduli of the shared MP snapshot.

    python benchmarks/tune_pruning.py [--n-records N] [--n-trials 20] [--epochs 40]
                                      [--warmup-fraction 0.15] [-S section.key=value ...]

Builds a workspace of the records that have a bulk modulus (snapshot, graph cache, fixed
test split) in --workdir (kept, so a rerun skips it), runs both studies with
`mpprop.stages.tune.tune_property`, writes benchmarks/results/tune_pruning.json and prints a table.
The pruner's warmup is the paper's fraction of the epochs (30 of 200) unless given.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from workspace import DEFAULT_DATA, REPO, build_workspace

from mpprop.config import load_params

PROP = "bulk_modulus"


def run_study(root: Path, overrides: list[str], name: str, n_trials: int, epochs: int,
              prune: bool) -> dict:
    import optuna

    from mpprop.stages.tune import tune_property
    from mpprop.study import epochs_run

    params = load_params(root / "params.yaml", overrides)
    t0 = time.perf_counter()
    summary = tune_property(params, PROP, n_trials=n_trials, epochs=epochs, study_name=name,
                            prune=prune)
    seconds = time.perf_counter() - t0
    study = optuna.load_study(study_name=name, storage=params.optuna_storage())
    trials = [
        {"number": t.number, "state": t.state.name, "value": t.value,
         "epochs_run": epochs_run(t), "params": t.params,
         "seconds": (t.datetime_complete - t.datetime_start).total_seconds()}
        for t in study.get_trials()
    ]
    return {**summary, "seconds": seconds, "trials": trials}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    # default outside the repo: the workspace is a rebuildable cache, not a result
    ap.add_argument("--workdir", type=Path, default=None,
                    help="default: <tmp>/mpprop-bench-tune-pruning-<n-records|all>")
    ap.add_argument("--n-records", type=int, default=None, help="default: all with the label")
    ap.add_argument("--n-trials", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--warmup-fraction", type=float, default=None,
                    help="pruner warmup as a fraction of --epochs (default: the paper's, "
                         "tune.pruner_warmup_steps / tune.epochs)")
    ap.add_argument("--workers", type=int, default=None, help="graph-building processes")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", type=Path,
                    default=REPO / "benchmarks" / "results" / "tune_pruning.json")
    args = ap.parse_args()

    if args.workdir is None:
        args.workdir = (Path(tempfile.gettempdir())
                        / f"mpprop-bench-tune-pruning-{args.n_records or 'all'}")
    ws_info = build_workspace(args.workdir, args.data, PROP, args.n_records, args.workers or 2)
    print(f"workspace: {ws_info}")

    paper = load_params(REPO / "params.yaml").tune
    fraction = (args.warmup_fraction if args.warmup_fraction is not None
                else paper.pruner_warmup_steps / paper.epochs)
    warmup = max(1, math.floor(fraction * args.epochs))
    overrides = [*args.overrides, f"tune.pruner_warmup_steps={warmup}"]
    tag = f"{args.n_trials}x{args.epochs}"
    results = {
        "property": PROP,
        "workspace": ws_info,
        "n_trials": args.n_trials,
        "epochs": args.epochs,
        "pruner": {"percentile": load_params(REPO / "params.yaml", overrides).tune.pruner_percentile,
                   "warmup_steps": warmup},
        "overrides": overrides,
        "studies": {},
    }
    for label, prune in (("pruning", True), ("no_pruning", False)):
        print(f"\n== {label} ==")
        results["studies"][label] = run_study(
            args.workdir, overrides, f"bench-{label}-{tag}", args.n_trials, args.epochs, prune
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    print(f"\nbulk modulus (log10 GPa), {ws_info['n_pool']} train+val structures, "
          f"{args.n_trials} trials x {args.epochs} epochs, PercentilePruner("
          f"{results['pruner']['percentile']}, warmup {warmup})")
    print(f"{'study':<12} {'complete':>8} {'pruned':>6} {'epochs run':>10} {'wall s':>8} "
          f"{'best val MAE':>12} {'best trial':>10}")
    for label, s in results["studies"].items():
        print(f"{label:<12} {s['n_trials_complete']:>8} {s['n_trials_pruned']:>6} "
              f"{s['epochs_run']:>10} {s['seconds']:>8.0f} {s['best_val_mae']:>12.4f} "
              f"{s['best_trial']:>10}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
