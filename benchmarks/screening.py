"""Screening-aware tuning vs MAE tuning vs the Xie preset, at the quality benchmark's budget.

    python benchmarks/screening.py [--property bulk_modulus --property band_gap] [--workers 2]

Builds on benchmarks/quality.py (run it first for the property): same workspace, same fixed
test set, same trials x epochs and final epochs. Per property:
1. a second study with `tune.objective: screening` (the smoothed validation top-N%
   precision, ties by MAE), same budget and workers as the MAE study;
2. the screening-tuned preset trained for the final epochs with the same seeds;
3. on the fixed test set: MAE and top-3% precision with 95% bootstrap intervals, paired
   against the MAE-tuned and Xie models of quality.py (their stored test predictions);
4. extrapolation (mpprop.stages.extrapolation): the top 3% held out of training, one model
   per preset (seed 0), recall of the held-out top in the model's top of the candidate pool,
   with intervals and paired differences.
Writes benchmarks/results/screening.json (one entry per property, resumable) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import quality
from quality import RESULTS, final_hyperparams, run_tuning, scaled_tune_overrides, train_job
from workspace import REPO

from mpprop import stats
from mpprop.config import Hyperparams, load_params
from mpprop.data import open_workspace, property_data
from mpprop.stages.extrapolation import (
    bootstrap_recall,
    bootstrap_recall_diff,
    extrapolation_split,
    rank_candidates,
)

OUT = REPO / "benchmarks" / "results" / "screening.json"


def extrapolation_recall(root: Path, overrides: list[str], prop: str, hp: Hyperparams,
                         top_percent: float) -> dict:
    """One model trained without the top (a worker process, one torch thread); its ranking
    of the candidate pool (mpprop.stages.extrapolation, as `mpprop evaluate --extrapolation`)."""
    import torch

    torch.set_num_threads(1)
    params = load_params(root / "params.yaml", overrides)
    data = property_data(params, open_workspace(params), prop)
    sp = extrapolation_split(data, top_percent, data.spec.better)
    pred, _ = rank_candidates(params, data, sp, hp)
    return {"pred": pred.tolist(), "is_top": sp["cand_top"].tolist()}


def run_property(prop: str, args: argparse.Namespace) -> dict:
    base = json.loads((args.quality_dir / f"{prop}.json").read_text())
    budget = base["budget"]
    root = args.workdir / prop
    qargs = argparse.Namespace(trials=budget["tune_trials"], tune_epochs=budget["tune_epochs_per_trial"],
                               workers=args.workers)
    params_file = root / "params.yaml"
    overrides = ["train.torch_threads=1", f"tune.best_params_dir={root / 'tuned-screening'}",
                 "tune.objective=screening",
                 *scaled_tune_overrides(params_file, qargs.tune_epochs), *args.overrides]
    tuned = run_tuning(root, prop, qargs, overrides, study=f"screening-{prop}",
                       best_dir=root / "tuned-screening")
    hp = final_hyperparams(params_file, overrides, prop, "tuned", budget["final_epochs"])
    seeds = budget["seeds"]
    final_dir = root / "final"
    jobs, records = [], {}
    for seed in range(seeds):
        out = final_dir / f"screening-{seed}-{hp.epochs}.json"
        if out.exists():
            records[seed] = json.loads(out.read_text())
        else:
            jobs.append((str(root), overrides, prop, "screening", hp.as_dict(), seed, str(out)))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        for rec in pool.map(train_job, *zip(*jobs, strict=True)) if jobs else []:
            records[rec["seed"]] = rec
    params = load_params(params_file, overrides)
    data = property_data(params, open_workspace(params), prop)
    y, better = data.test_targets, data.spec.better
    top = float(params.train["screening_top_percent"])
    res = stats.bootstrap_resamples(len(y), budget["bootstrap_resamples"], quality.BOOTSTRAP_SEED)
    preds = {"xie": np.array(base["models"]["xie"]["test_pred_per_seed"]),
             "mae_tuned": np.array(base["models"]["tuned"]["test_pred_per_seed"]),
             "screening_tuned": np.array([records[s]["test_pred"] for s in range(seeds)])}
    models = {k: quality.model_summary(y, v, res, top, better) for k, v in preds.items()}
    paired = {f"screening_tuned-{k}": quality.paired(y, preds["screening_tuned"], preds[k], res,
                                                     top, better) for k in ("mae_tuned", "xie")}
    # extrapolation: one model per preset, seed 0, the final epochs
    hps = {"xie": final_hyperparams(params_file, overrides, prop, "xie", budget["final_epochs"]),
           "mae_tuned": Hyperparams(**base["models"]["tuned"]["hyperparams"]),
           "screening_tuned": hp}
    ext_top = float(params.raw["evaluate"]["extrapolation_top_percent"])
    with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        futures = {k: pool.submit(extrapolation_recall, root, overrides, prop, h, ext_top)
                   for k, h in hps.items()}
        ext = {k: f.result() for k, f in futures.items()}
    is_top = np.array(ext["xie"]["is_top"])
    eres = stats.bootstrap_resamples(len(is_top), budget["bootstrap_resamples"], quality.BOOTSTRAP_SEED)
    pool_preds = {name: np.array(e["pred"]) for name, e in ext.items()}
    extrapolation = {"n_top": int(is_top.sum()), "n_pool": len(is_top),
                     "random_recall": float(is_top.mean())}
    for name, pred in pool_preds.items():
        extrapolation[name] = bootstrap_recall(is_top, pred, better, eres).as_dict()
    for other in ("mae_tuned", "xie"):
        extrapolation[f"screening_tuned-{other}"] = bootstrap_recall_diff(
            is_top, pool_preds["screening_tuned"], pool_preds[other], better, eres).as_dict()
    for m in models.values():
        m.pop("test_pred_per_seed", None)
    return {"property": prop, "unit": base["unit"], "budget": {**budget, "extrapolation_seed": 0},
            "screening_tuned_hyperparams": hp.as_dict(),
            "tuning": {k: tuned.get(k) for k in ("best_val_mae", "best_val_screening", "best_trial")},
            "models": models, "paired": paired, "extrapolation": extrapolation}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--property", dest="props", action="append", default=None)
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "work" / "quality")
    ap.add_argument("--quality-dir", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for prop in args.props or ["bulk_modulus", "band_gap"]:
        if prop in results:
            print(f"[{prop}] done before")
            continue
        results[prop] = run_property(prop, args)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        r = results[prop]
        for k, m in r["models"].items():
            scr = m.get("screening", {})
            print(f"[{prop}] {k:<16} MAE {m['test_mae']['value']:.4f} top-3% "
                  f"{scr.get('value', float('nan')):.1f} [{scr.get('low', 0):.1f}, "
                  f"{scr.get('high', 0):.1f}] extrapolation recall "
                  f"{r['extrapolation'][k]['value']:.2f}")
        for k, d in r["paired"].items():
            print(f"[{prop}] {k}: MAE {d['mae_diff']['value']:+.4f} [{d['mae_diff']['low']:+.4f}, "
                  f"{d['mae_diff']['high']:+.4f}], top-3% {d['screening_diff']['value']:+.1f} "
                  f"[{d['screening_diff']['low']:+.1f}, {d['screening_diff']['high']:+.1f}]")


if __name__ == "__main__":
    main()
