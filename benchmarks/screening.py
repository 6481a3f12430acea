"""Screening-aware tuning and training vs MAE tuning vs the Xie preset, at the quality
benchmark's budget.

    python benchmarks/screening.py [--property bulk_modulus --property band_gap] [--workers 2]
        [--variant screening_tuned --variant mae_tuned_rank --variant pareto_tuned]

Builds on benchmarks/quality.py (run it first for the property): its workspace (rebuilt when
absent, checked to give its test materials), test set, trials x epochs, final epochs and seeds.
The variants (VARIANTS): screening_tuned, a study with `tune.objective: screening` (validation
precision averaged over tune.screening_percents); mae_tuned_rank, the MAE-tuned set with the
ranking term of mpprop.losses at RANK_WEIGHT, fixed in advance; pareto_tuned, a study with
`tune.objective: pareto` (tune's pareto pick). The studies search the paper's space plus the
ranking weight (RANK_WEIGHTS); every ranking term looks at pairs straddling the train set's top
train.screening_top_percent. On the fixed test set (mpprop.experiment.compare_models): MAE and
top-N% precision with 95% bootstrap intervals, paired against quality's MAE-tuned and Xie
models. Extrapolation (mpprop.holdout, as `evaluate --extrapolation`): one model per preset and
seed trained without the top, recall of the held-out top, with intervals and paired differences.
Models, studies and rankings are cached in the workspace (mpprop.experiment_runs); the result
carries each variant's hyperparameters, test predictions and rankings, so a rerun on a fresh
workspace restores them. Writes benchmarks/results/screening.json and screening.md (the table;
`--table` rewrites it alone).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from quality import RESULTS
from workspace import DEFAULT_DATA, REPO, build_workspace

from mpprop import experiment_runs as runs
from mpprop.config import load_params
from mpprop.experiment import compare_models
from mpprop.settings import Hyperparams
from mpprop.snapshot import atomic_output
from mpprop.stats import bootstrap_resamples

OUT = REPO / "benchmarks" / "results" / "screening.json"
LABELS = {"xie": "Xie", "mae_tuned": "MAE-tuned", "screening_tuned": "screening-tuned",
          "pareto_tuned": "pareto-tuned", "mae_tuned_rank": "MAE-tuned + ranking term"}
# the ranking term's weight in the tuned studies' search space (0 = off, the paper's loss)
RANK_WEIGHTS = [0.0, 0.3, 1.0, 3.0]
# mae_tuned_rank's weight, chosen before any run: the ranking hinge and the standardised MSE
# are both O(0.1-1) once training settles, so weight 1 gives them equal say
RANK_WEIGHT = 1.0
# in the order a default run does them (the pareto study, unpruned, is the longest)
VARIANTS = {
    "screening_tuned": {"objective": "screening"},
    "mae_tuned_rank": {"rank_weight": RANK_WEIGHT},
    "pareto_tuned": {"objective": "pareto"},
}
BASELINES = ("mae_tuned", "xie")


def ensure_workspace(root: Path, prop: str, base: dict, args: argparse.Namespace) -> None:
    """Quality's workspace, rebuilt when absent; its test materials must be quality's."""
    build_workspace(root, args.data, prop, base["budget"]["subsample"], args.workers)
    _, ids, _ = runs.test_set(root, [], prop)
    if ids != base["test_material_ids"]:
        raise SystemExit(f"[{prop}] the workspace in {root} has other test materials than "
                         f"{args.quality_dir / (prop + '.json')}: remove it and rerun")


def shared_overrides(top_percent: float) -> list[str]:
    """Overrides of every model here: one torch thread per worker; the ranking term (where
    on) on pairs straddling the screening metric's top N%."""
    return ["train.torch_threads=1", f"train.rank_top_percent={top_percent:g}"]


def variant_overrides(root: Path, name: str, top_percent: float, tune_epochs: int) -> list[str]:
    """The params overrides of one variant (its own tuned/ folder and objective)."""
    sets = [*shared_overrides(top_percent), f"tune.best_params_dir={root / ('tuned-' + name)}"]
    spec = VARIANTS[name]
    if "objective" in spec:
        sets += [f"tune.objective={spec['objective']}",
                 f"tune.search_space.rank_weight={json.dumps(RANK_WEIGHTS)}",
                 *runs.scaled_tune_overrides(root / "params.yaml", tune_epochs)]
    return sets


def variant_hyperparams(root: Path, prop: str, name: str, overrides: list[str], base: dict,
                        args: argparse.Namespace, stored: dict | None
                        ) -> tuple[Hyperparams, dict | None]:
    """The variant's final hyperparameters, and its study's summary (tuned variants).
    `stored`: the variant's record in an earlier result of this budget (its study is not
    rerun)."""
    budget = base["budget"]
    spec = VARIANTS[name]
    if "objective" not in spec:
        mae_tuned = Hyperparams(**base["models"]["tuned"]["hyperparams"])
        return replace(mae_tuned, rank_weight=spec["rank_weight"]), None
    if stored is not None:
        print(f"[{prop}] {name}: hyperparameters of the stored result (study not rerun)", flush=True)
        return Hyperparams(**stored["hyperparams"]), stored["tuning"]
    tuned = runs.run_tuning(root, prop, budget["tune_trials"], budget["tune_epochs_per_trial"],
                            args.workers, overrides, f"{name}-{prop}", root / f"tuned-{name}")
    hp = runs.final_hyperparams(root / "params.yaml", overrides, prop, "tuned",
                                budget["final_epochs"])
    summary = {k: tuned.get(k) for k in ("best_val_mae", "best_val_screening", "best_trial",
                                         "wall_seconds")}
    return hp, summary


def restore_caches(root: Path, entry: dict) -> None:
    """Write the final-model and extrapolation records of an earlier result into a fresh
    workspace (where absent), so that a rerun trains only what that result lacks."""
    for name, v in entry.get("variants", {}).items():
        runs.restore_final(root, name, v["hyperparams"], v.get("test_pred_per_seed", []))
    ext = entry.get("extrapolation", {})
    for name, r in ext.get("rankings", {}).items():
        # results older than the multi-seed extrapolation hold seed 0 alone, as "pred"
        runs.restore_extrapolation(root, name, r["hyperparams"],
                                   r.get("pred_per_seed", [r.get("pred")]), ext["is_top"])


def stored_variants(entry: dict, base: dict) -> dict[str, dict]:
    """An earlier result's variants, where that result has quality's budget (else none)."""
    same = {k: v for k, v in entry.get("budget", {}).items() if k in base["budget"]}
    return entry.get("variants", {}) if same and same == base["budget"] else {}


def run_variant(prop: str, name: str, base: dict, args: argparse.Namespace,
                stored: dict | None = None) -> dict:
    """Tune (where the variant does) and train one variant (cached: a rerun reads it back;
    `stored`: its record in an earlier result)."""
    root = args.workdir / prop
    params = load_params(root / "params.yaml")
    top = float(params.train.screening_top_percent)
    overrides = variant_overrides(root, name, top, base["budget"]["tune_epochs_per_trial"])
    t0 = time.perf_counter()
    hp, tuning = variant_hyperparams(root, prop, name, overrides, base, args, stored)
    print(f"[{prop}] {name}: {hp.as_dict()}", flush=True)
    records = runs.final_models(root, prop, {name: (hp, overrides)}, base["budget"]["seeds"],
                                args.workers, lambda line: print(line, flush=True))[name]
    return {"overrides": overrides, "hyperparams": hp.as_dict(), "tuning": tuning,
            "test_pred_per_seed": [r["test_pred"] for r in records],
            "wall_seconds": (stored or {}).get("wall_seconds", time.perf_counter() - t0)}


def summarise(prop: str, base: dict, variants: dict[str, dict], args: argparse.Namespace) -> dict:
    """Test metrics, paired differences and extrapolation of every variant (run_variant's
    records by name)."""
    root = args.workdir / prop
    budget = base["budget"]
    params = load_params(root / "params.yaml")
    y, _, spec = runs.test_set(root, [], prop)
    better = spec.better
    top = float(params.train.screening_top_percent)
    res = bootstrap_resamples(len(y), budget["bootstrap_resamples"], runs.BOOTSTRAP_SEED)
    preds = {"xie": np.array(base["models"]["xie"]["test_pred_per_seed"]),
             "mae_tuned": np.array(base["models"]["tuned"]["test_pred_per_seed"]),
             **{v: np.array(r["test_pred_per_seed"]) for v, r in variants.items()}}
    percents = [float(x) for x in params.tune.screening_percents]
    pairs = [(v, b) for v in variants for b in BASELINES]
    models, paired = compare_models(y, preds, pairs, res, top, better, percents)
    # extrapolation: one model per preset and seed (quality's seeds), the final epochs
    base_overrides = shared_overrides(top)
    hps = {"xie": (runs.final_hyperparams(root / "params.yaml", base_overrides, prop, "xie",
                                          budget["final_epochs"]), base_overrides),
           "mae_tuned": (Hyperparams(**base["models"]["tuned"]["hyperparams"]), base_overrides),
           **{v: (Hyperparams(**r["hyperparams"]), r["overrides"]) for v, r in variants.items()}}
    ext_top = float(params.evaluate.extrapolation_top_percent)
    ext = runs.extrapolation_rankings(root, prop, hps, ext_top, budget["seeds"], args.workers,
                                      lambda line: print(line, flush=True))
    extrapolation = runs.extrapolation_summary(ext, pairs, budget["bootstrap_resamples"], better,
                                               ext_top)
    return {"property": prop, "unit": base["unit"], "top_percent": top,
            "screening_percents": percents,
            "budget": {**budget, "extrapolation_seeds": budget["seeds"],
                       "rank_weights_searched": RANK_WEIGHTS},
            "variants": {v: {k: r[k] for k in ("overrides", "hyperparams", "tuning",
                                               "wall_seconds", "test_pred_per_seed")}
                         for v, r in variants.items()},
            "models": models, "paired": paired, "extrapolation": extrapolation}


def _ci(d: dict, digits: int, signed: bool = False) -> str:
    f = f"{'+' if signed else ''}.{digits}f"
    star = " *" if signed and d.get("excludes_zero") else ""
    return f"{d['value']:{f}} [{d['low']:{f}}, {d['high']:{f}}]{star}"


def _signal(d: dict, key: str, digits: int, signed: bool = False) -> str:
    """The averaged-precision column (absent from results older than it)."""
    return _ci(d[key], digits, signed) if key in d else "–"


def table(results: dict) -> str:
    """Markdown per property: each model's test MAE, top-N% precision and extrapolation
    recall, then each variant's paired differences against MAE-tuned and Xie."""
    out = []
    for prop, r in results.items():
        digits = 3 if r["unit"] in ("eV", "eV/atom") else 4
        top = r.get("top_percent", 3)
        ext, b = r["extrapolation"], r["budget"]
        pcts = r.get("screening_percents")
        span = f"top {pcts[0]:g}-{pcts[-1]:g}% mean" if pcts else "top-N% mean"
        out += [f"**{prop}** ({r['unit']}; {b['records']} records, {b['n_test']} test; tuning "
                f"{b['tune_trials']} x {b['tune_epochs_per_trial']} epochs; final "
                f"{b['final_epochs']} epochs x {b['seeds']} seeds; extrapolation: "
                f"{ext['n_top']} top materials held out, pool of {ext['n_pool']}, random recall "
                f"{ext['random_recall']:.2f}, {b.get('extrapolation_seeds', 1)} seed(s))", "",
                f"| model | test MAE | top-{top:g}% precision | {span} precision "
                "| extrapolation recall |", "|---|---|---|---|---|"]
        for name, m in r["models"].items():
            out.append(f"| {LABELS.get(name, name)} | {_ci(m['test_mae'], digits)} "
                       f"| {_ci(m['screening'], 1)} | {_signal(m, 'screening_signal', 1)} "
                       f"| {_ci(ext[name], 2)} |")
        out += ["", f"| paired difference | MAE | top-{top:g}% precision | {span} precision "
                "| extrapolation recall |", "|---|---|---|---|---|"]
        for key, d in r["paired"].items():
            a, base = key.split("-")
            out.append(f"| {LABELS.get(a, a)} − {LABELS.get(base, base)} "
                       f"| {_ci(d['mae_diff'], digits, True)} "
                       f"| {_ci(d['screening_diff'], 1, True)} "
                       f"| {_signal(d, 'screening_signal_diff', 1, True)} "
                       f"| {_ci(ext[key], 3, True)} |")
        if r.get("note"):
            out += ["", f"({r['note']}.)"]
        out.append("")
    out.append("Intervals: 95% bootstrap over the test materials (the candidate pool for "
               "recall); differences paired on the same materials, * = the interval excludes "
               "zero. MAE and precision: the mean over seeds. Mean precision: top-N% precision "
               "averaged over the N of tune.screening_percents (the screening studies' "
               "validation objective), a secondary, smoother reading of the same ranking.")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--property", dest="props", action="append", default=None)
    ap.add_argument("--variant", dest="variants", action="append", choices=list(VARIANTS),
                    default=None, help="default: all, in the order of VARIANTS")
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "work" / "quality")
    ap.add_argument("--quality-dir", type=Path, default=RESULTS)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--table", action="store_true",
                    help="only rewrite the markdown table (screening.md) from --out")
    args = ap.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    table_path = args.out.with_suffix(".md")
    if args.table:
        table_path.write_text(table(results))
        print(table_path.read_text())
        return
    for prop in args.props or ["bulk_modulus", "band_gap"]:
        base = json.loads((args.quality_dir / f"{prop}.json").read_text())
        ensure_workspace(args.workdir / prop, prop, base, args)
        # variants of an earlier run at this budget stay in the result (restored from it)
        stored = stored_variants(results.get(prop, {}), base)
        if stored:
            restore_caches(args.workdir / prop, results[prop])
        earlier = [v for v in stored if v in VARIANTS]
        chosen = args.variants or list(VARIANTS)
        variants = {}
        for name in [*earlier, *(v for v in chosen if v not in earlier)]:
            variants[name] = run_variant(prop, name, base, args, stored.get(name))
            results[prop] = summarise(prop, base, variants, args)
            with atomic_output(args.out) as tmp:  # a killed run keeps the last whole result
                Path(tmp).write_text(json.dumps(results, indent=1) + "\n")
            table_path.write_text(table(results))
            print(table({prop: results[prop]}), flush=True)


if __name__ == "__main__":
    main()
