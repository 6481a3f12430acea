"""Screening on unseen materials: the models of screening.py and quality.py judged on every
record of the property that quality's seeded subsample left out.

    python benchmarks/screening_unseen.py [--property band_gap] [--workers 1]
        [--model mae_tuned --model screening_tuned ...] [--table]

The fixed test set of a subsampled property (band gap: 1,200 materials) holds ~36 top-3%
materials, so a top-3% precision difference needs ~8 points to show. The snapshot has ~25k
more band-gap records that neither training, validation, tuning nor the test set of the
quality benchmark touched. Here each model (quality's Xie and MAE-tuned presets, and the
screening variants, with their stored final hyperparameters and quality's seeds) is trained
again exactly as before (same workspace, split, seed, one torch thread: the retrained test
predictions are checked against the stored ones) and predicts those unseen materials:
test MAE, top-N% precision and the averaged top-N% precision with 95% bootstrap intervals,
paired differences on the same materials. Nothing here chooses anything: the models and
their hyperparameters are fixed by the earlier benchmarks.

Resumable: each model's predictions are cached in the workspace (`<P>/unseen/`), and the
result's predictions file restores them on a fresh workspace. Writes
benchmarks/results/screening_unseen.json (metrics), screening_unseen_predictions.json.gz
(material ids, targets and every model's predictions) and screening_unseen.md (the table).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import screening
from quality import RESULTS
from workspace import DEFAULT_DATA, REPO, build_workspace

from mpprop import experiment_runs as runs
from mpprop.config import load_params
from mpprop.experiment import compare_models
from mpprop.snapshot import atomic_output
from mpprop.stats import bootstrap_resamples, n_top

OUT = REPO / "benchmarks" / "results" / "screening_unseen.json"
# the retrained models must reproduce the stored test predictions (target units) to this
REPRODUCE_TOLERANCE = 1e-3
# the bootstrap over ~25k materials: 1,000 resamples keep each summary to minutes
BOOTSTRAP_RESAMPLES = 1000


def predictions_path(out: Path) -> Path:
    return out.with_name(out.stem + "_predictions.json.gz")


def all_records_root(workdir: Path, prop: str) -> Path:
    """The workspace of every record of the property (the unseen ones are read from it)."""
    return workdir / f"{prop}-all-records"


def model_specs(base: dict, entry: dict, chosen: list[str] | None) -> dict[str, dict]:
    """{name: {"hyperparams", "overrides", "stored_test_pred"}}: quality's Xie and MAE-tuned
    presets and screening.py's variants, as their results recorded them."""
    specs = {"xie": base["models"]["xie"], "mae_tuned": base["models"]["tuned"]}
    specs = {k: {"hyperparams": m["hyperparams"], "overrides": base["budget"]["overrides"],
                 "stored_test_pred": m["test_pred_per_seed"]} for k, m in specs.items()}
    for name, v in entry.get("variants", {}).items():
        specs[name] = {"hyperparams": v["hyperparams"], "overrides": v["overrides"],
                       "stored_test_pred": v["test_pred_per_seed"]}
    names = chosen or list(specs)
    missing = [n for n in names if n not in specs]
    if missing:
        raise SystemExit(f"no stored result for {missing}: run quality.py / screening.py first")
    return {n: specs[n] for n in names}


def restore_caches(root: Path, stored: dict) -> None:
    """Write the per-model records of an earlier predictions file (where absent)."""
    for name, m in stored.get("models", {}).items():
        for seed, (test_pred, pred) in enumerate(zip(m["test_pred_per_seed"],
                                                     m["unseen_pred_per_seed"], strict=True)):
            runs.restore_record(
                runs.record_path(root, runs.UNSEEN_DIR, name, m["hyperparams"]["epochs"], seed),
                {"name": name, "seed": seed, "hyperparams": m["hyperparams"],
                 "test_pred": test_pred, "unseen_pred": pred})


def summarise(prop: str, base: dict, specs: dict, records: dict, seeds: int, y: np.ndarray,
              ids: list[str], params: object, n_resamples: int) -> tuple[dict, dict]:
    """Metrics over the first `seeds` seeds of every model, and the predictions file entry."""
    better, top = base["better"], float(base["top_percent"])
    percents = [float(x) for x in params.tune.screening_percents]
    preds = {n: np.array([records[n, s]["unseen_pred"] for s in range(seeds)]) for n in specs}
    pairs = [(a, b) for a in specs for b in screening.BASELINES
             if b in specs and a != b and not (a == "xie" and b == "mae_tuned")]
    res = bootstrap_resamples(len(y), n_resamples, runs.BOOTSTRAP_SEED)
    models, paired = compare_models(y, preds, pairs, res, top, better, percents)
    for n in specs:
        stored = np.array(specs[n]["stored_test_pred"][:seeds])
        again = np.array([records[n, s]["test_pred"] for s in range(seeds)])
        diff = float(np.max(np.abs(again - stored)))
        models[n]["retrained_test_max_abs_diff"] = diff
        # else these are models of the same recipe and seeds, not the very ones of the test table
        models[n]["reproduced"] = diff <= REPRODUCE_TOLERANCE
        if diff > REPRODUCE_TOLERANCE:
            print(f"[{prop}] warning: {n} retrained gives test predictions up to {diff:.3g} away "
                  "from the stored ones (another machine or torch?)", flush=True)
        models[n]["hyperparams"] = specs[n]["hyperparams"]
    result = {"property": prop, "unit": base["unit"], "better": better, "top_percent": top,
              "screening_percents": percents, "n_unseen": len(y),
              "n_top": n_top(len(y), top),
              "budget": {k: base["budget"][k] for k in ("records", "n_test", "tune_trials",
                                                        "tune_epochs_per_trial", "final_epochs",
                                                        "seeds")}
                        | {"seeds_used": seeds, "bootstrap_resamples": n_resamples},
              "models": models, "paired": paired}
    predictions = {"material_ids": ids, "y": np.round(y, runs.UNSEEN_DECIMALS).tolist(),
                   "models": {n: {"hyperparams": specs[n]["hyperparams"],
                                  "test_pred_per_seed": [records[n, s]["test_pred"]
                                                         for s in range(seeds)],
                                  "unseen_pred_per_seed": preds[n].tolist()} for n in specs}}
    return result, predictions


def table(results: dict) -> str:
    out = []
    for prop, r in results.items():
        digits = 3 if r["unit"] in ("eV", "eV/atom") else 4
        top, pcts, b = r["top_percent"], r["screening_percents"], r["budget"]
        span = f"top {pcts[0]:g}-{pcts[-1]:g}% mean precision"
        out += [f"**{prop}** ({r['unit']}; {r['n_unseen']} unseen materials, {r['n_top']} in the "
                f"top {top:g}%; models of the quality budget: tuning {b['tune_trials']} x "
                f"{b['tune_epochs_per_trial']} epochs on {b['records']} records, final "
                f"{b['final_epochs']} epochs x {b['seeds_used']} seeds)", "",
                f"| model | MAE | top-{top:g}% precision | {span} |", "|---|---|---|---|"]
        for name, m in r["models"].items():
            out.append(f"| {screening.LABELS.get(name, name)} | {screening._ci(m['test_mae'], digits)} "
                       f"| {screening._ci(m['screening'], 1)} "
                       f"| {screening._ci(m['screening_signal'], 1)} |")
        out += ["", f"| paired difference | MAE | top-{top:g}% precision | {span} |",
                "|---|---|---|---|"]
        for key, d in r["paired"].items():
            a, base = key.split("-")
            out.append(f"| {screening.LABELS.get(a, a)} − {screening.LABELS.get(base, base)} "
                       f"| {screening._ci(d['mae_diff'], digits, True)} "
                       f"| {screening._ci(d['screening_diff'], 1, True)} "
                       f"| {screening._ci(d['screening_signal_diff'], 1, True)} |")
        out.append("")
    out.append("Unseen: the property's records of the snapshot outside the quality benchmark's "
               "seeded subsample (no model, study or test set saw them). Intervals: 95% bootstrap "
               "over those materials; differences paired on the same materials, * = the "
               "interval excludes zero. MAE and precision: the mean over seeds.")
    return "\n".join(out) + "\n"


def write_outputs(out: Path, results: dict, predictions: dict) -> None:
    with atomic_output(out) as tmp:
        Path(tmp).write_text(json.dumps(results, indent=1) + "\n")
    with atomic_output(predictions_path(out)) as tmp:
        with gzip.open(tmp, "wt") as f:
            json.dump(predictions, f)
    out.with_suffix(".md").write_text(table(results))


def run_property(prop: str, args: argparse.Namespace, results: dict, predictions: dict) -> None:
    base = json.loads((args.quality_dir / f"{prop}.json").read_text())
    if not base["budget"].get("subsample"):
        raise SystemExit(f"[{prop}] quality used every record: no unseen materials")
    entry = json.loads(args.screening.read_text()).get(prop, {}) if args.screening.exists() else {}
    specs = model_specs(base, entry, args.models)
    root, root_all = args.workdir / prop, all_records_root(args.workdir, prop)
    screening.ensure_workspace(root, prop, base, args)
    build_workspace(root_all, args.data, prop, None, args.workers)
    rows, ids, y = runs.unseen_rows(root, root_all, prop)
    print(f"[{prop}] {len(y)} unseen materials ({n_top(len(y), base['top_percent'])} in "
          f"the top {base['top_percent']:g}%)", flush=True)
    stored = predictions.get(prop, {})
    if stored.get("material_ids") == ids:
        restore_caches(root, stored)
    (root / runs.UNSEEN_DIR).mkdir(exist_ok=True)
    records, jobs = {}, []
    for seed in range(base["budget"]["seeds"]):  # seed-major: each round completes every model
        for name, spec in specs.items():
            out = runs.record_path(root, runs.UNSEEN_DIR, name, spec["hyperparams"]["epochs"], seed)
            cached = runs.read_record(out, spec["hyperparams"])
            if cached is not None:
                records[name, seed] = cached
            else:
                jobs.append((str(root), str(root_all), spec["overrides"], prop, name,
                             spec["hyperparams"], seed, rows.tolist(), str(out)))
    print(f"[{prop}] {len(jobs)} models to train ({len(records)} done before)", flush=True)
    params = load_params(root / "params.yaml")
    n_seeds = base["budget"]["seeds"]

    def write_summary(seeds: int) -> None:
        results[prop], predictions[prop] = summarise(prop, base, specs, records, seeds, y, ids,
                                                     params, args.bootstrap)
        write_outputs(args.out, results, predictions)
        print(table({prop: results[prop]}), flush=True)

    t0 = time.perf_counter()
    summarised = runs.seeds_done(specs, records, n_seeds)

    def done(rec: dict, i: int) -> None:
        nonlocal summarised
        records[rec["name"], rec["seed"]] = rec
        print(f"[{prop}] {rec['name']} seed {rec['seed']} done ({rec['seconds']:.0f} s; "
              f"{i}/{len(jobs)}, {time.perf_counter() - t0:.0f} s)", flush=True)
        rounds = runs.seeds_done(specs, records, n_seeds)
        if summarised < rounds < n_seeds:  # a round of seeds is complete: a partial result
            write_summary(rounds)
        summarised = rounds

    runs.run_in_workers(runs.train_unseen, jobs, args.workers, done)
    write_summary(n_seeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--property", dest="props", action="append", default=None)
    ap.add_argument("--model", dest="models", action="append", default=None,
                    help="xie, mae_tuned or a screening.py variant (default: all stored)")
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "work" / "quality")
    ap.add_argument("--quality-dir", type=Path, default=RESULTS)
    ap.add_argument("--screening", type=Path, default=screening.OUT)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=BOOTSTRAP_RESAMPLES)
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown table")
    args = ap.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.table:
        args.out.with_suffix(".md").write_text(table(results))
        return
    pred_file = predictions_path(args.out)
    predictions = json.loads(gzip.open(pred_file, "rt").read()) if pred_file.exists() else {}
    for prop in args.props or ["band_gap"]:
        run_property(prop, args, results, predictions)


if __name__ == "__main__":
    main()
