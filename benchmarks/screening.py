"""Screening-aware tuning and training vs MAE tuning vs the Xie preset, at the quality
benchmark's budget.

    python benchmarks/screening.py [--property bulk_modulus --property band_gap] [--workers 2]
        [--variant screening_tuned --variant mae_tuned_rank --variant pareto_tuned]

Builds on benchmarks/quality.py (run it first for the property): the same workspace (rebuilt
here from the shared snapshot when absent, and checked to give quality's test materials),
the same fixed test set, trials x epochs and final epochs. The variants (VARIANTS):
- screening_tuned: a second study with `tune.objective: screening` (the validation top-N%
  precision averaged over tune.screening_percents, ties by MAE);
- mae_tuned_rank: the MAE-tuned hyperparameters with the ranking term of mpprop.losses at
  weight RANK_WEIGHT, fixed in advance (no test data chose it): what screening-aware
  training alone does;
- pareto_tuned: a study with `tune.objective: pareto` (val MAE and val precision; no pruning;
  tuned/<P>.yaml = tune's pareto pick).
The tuned studies search the paper's space plus the ranking term's weight (RANK_WEIGHTS),
and every variant's ranking term looks at pairs straddling the train set's top
train.screening_top_percent (the metric's N). Each variant is trained for the final epochs
with quality's seeds; on the fixed test set: MAE and top-N% precision with 95% bootstrap
intervals, paired against the MAE-tuned and Xie models of quality.py (their stored test
predictions). Extrapolation (mpprop.stages.extrapolation): the top held out of training, one
model per preset and seed (quality's seeds), recall of the held-out top in the model's top of
the candidate pool averaged over seeds, with intervals and paired differences.
Writes benchmarks/results/screening.json (per property and variant, resumable: studies,
models and extrapolation rankings are cached in the workspace, and the result carries each
variant's tuned hyperparameters, test predictions and extrapolation ranking, so a rerun on a
fresh workspace restores them instead of retuning) and screening.md (the table; `--table`
rewrites it alone).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import quality
from quality import (
    RESULTS,
    final_hyperparams,
    run_tuning,
    scaled_tune_overrides,
    test_set,
    train_job,
)
from workspace import DEFAULT_DATA, REPO, build_workspace

from mpprop import experiment, stats
from mpprop.config import Hyperparams, load_params
from mpprop.data import open_workspace, property_data
from mpprop.snapshot import atomic_output
from mpprop.stages.extrapolation import (
    bootstrap_recall,
    bootstrap_recall_diff,
    extrapolation_split,
    rank_candidates,
)

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


def extrapolation_recall(root: Path, overrides: list[str], prop: str, hp: Hyperparams,
                         top_percent: float, seed: int, out: str) -> dict:
    """One model (model seed `seed`) trained without the top (a worker process, one torch
    thread); its ranking of the candidate pool (mpprop.stages.extrapolation, as `mpprop
    evaluate --extrapolation`). Writes `out` (the cache a rerun reads)."""
    import torch

    torch.set_num_threads(1)
    params = load_params(root / "params.yaml", overrides)
    data = property_data(params, open_workspace(params), prop)
    sp = extrapolation_split(data, top_percent, data.spec.better)
    pred, _ = rank_candidates(params, data, sp, hp, seed)
    record = {"hyperparams": hp.as_dict(), "seed": seed, "pred": pred.tolist(),
              "is_top": sp["cand_top"].tolist()}
    with atomic_output(out) as tmp:
        Path(tmp).write_text(json.dumps(record) + "\n")
    return record


def ensure_workspace(root: Path, prop: str, base: dict, args: argparse.Namespace) -> None:
    """Quality's workspace, rebuilt when absent; its test materials must be quality's."""
    build_workspace(root, args.data, prop, base["budget"]["subsample"], args.workers)
    _, ids, _ = test_set(root, [], prop)
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
                 *scaled_tune_overrides(root / "params.yaml", tune_epochs)]
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
    qargs = argparse.Namespace(trials=budget["tune_trials"], tune_epochs=budget["tune_epochs_per_trial"],
                               workers=args.workers)
    tuned = run_tuning(root, prop, qargs, overrides, study=f"{name}-{prop}",
                       best_dir=root / f"tuned-{name}")
    hp = final_hyperparams(root / "params.yaml", overrides, prop, "tuned", budget["final_epochs"])
    summary = {k: tuned.get(k) for k in ("best_val_mae", "best_val_screening", "best_trial",
                                         "wall_seconds")}
    return hp, summary


def read_cache(path: Path, hyperparams: dict) -> dict | None:
    """A cached model record, if there is one for these hyperparameters (one trained with
    others, e.g. before quality's tuned preset changed, is trained again)."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record["hyperparams"] == hyperparams else None


def final_cache(root: Path, name: str, epochs: int, seed: int) -> Path:
    """One final model's cached record (test predictions)."""
    return root / "final" / f"{name}-{seed}-{epochs}.json"


def final_models(root: Path, prop: str, name: str, overrides: list[str], hp: Hyperparams,
                 seeds: int, workers: int) -> list[dict]:
    """The variant trained with each seed (cached per seed in the workspace)."""
    (root / "final").mkdir(exist_ok=True)
    jobs, records = [], {}
    for seed in range(seeds):
        out = final_cache(root, name, hp.epochs, seed)
        cached = read_cache(out, hp.as_dict())
        if cached is not None:
            records[seed] = cached
        else:
            jobs.append((str(root), overrides, prop, name, hp.as_dict(), seed, str(out)))
    print(f"[{prop}] {name}: {len(jobs)} final models to train ({len(records)} done before)",
          flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for rec in pool.map(train_job, *zip(*jobs, strict=True)) if jobs else []:
            records[rec["seed"]] = rec
    return [records[s] for s in range(seeds)]


def extrapolation_cache(root: Path, name: str, epochs: int, seed: int) -> Path:
    """One extrapolation model's cached ranking (seed 0 keeps the one-seed name)."""
    return root / "extrapolation" / f"{name}-{epochs}{'' if seed == 0 else f'-seed{seed}'}.json"


def extrapolation_rankings(root: Path, prop: str, hps: dict[str, tuple[Hyperparams, list[str]]],
                           top_percent: float, seeds: int, workers: int) -> dict[str, dict]:
    """Each preset's ranking of the extrapolation candidate pool, one model per seed
    (cached per model): {name: {"hyperparams", "pred_per_seed", "is_top"}}."""
    (root / "extrapolation").mkdir(exist_ok=True)
    done, todo = {}, {}
    for name, (hp, overrides) in hps.items():
        for seed in range(seeds):
            out = extrapolation_cache(root, name, hp.epochs, seed)
            cached = read_cache(out, hp.as_dict())
            if cached is not None:
                done[name, seed] = cached
            else:
                todo[name, seed] = (hp, overrides, str(out))
    print(f"[{prop}] extrapolation: {len(todo)} models to train ({len(done)} done before)",
          flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {key: pool.submit(extrapolation_recall, root, ov, prop, hp, top_percent,
                                    key[1], out)
                   for key, (hp, ov, out) in todo.items()}
        done.update({key: f.result() for key, f in futures.items()})
    return {name: {"hyperparams": done[name, 0]["hyperparams"], "is_top": done[name, 0]["is_top"],
                   "pred_per_seed": [done[name, s]["pred"] for s in range(seeds)]}
            for name in hps}


def restore_caches(root: Path, entry: dict) -> None:
    """Write the final-model and extrapolation caches of an earlier result into a fresh
    workspace (where absent), so that a rerun trains only what that result lacks."""
    (root / "final").mkdir(exist_ok=True)
    (root / "extrapolation").mkdir(exist_ok=True)
    for name, v in entry.get("variants", {}).items():
        for seed, pred in enumerate(v.get("test_pred_per_seed", [])):
            out = final_cache(root, name, v["hyperparams"]["epochs"], seed)
            if not out.exists():
                out.write_text(json.dumps({"preset": name, "seed": seed,
                                           "hyperparams": v["hyperparams"],
                                           "test_pred": pred}) + "\n")
    ext = entry.get("extrapolation", {})
    for name, r in ext.get("rankings", {}).items():
        # results older than the multi-seed extrapolation hold seed 0 alone, as "pred"
        for seed, pred in enumerate(r.get("pred_per_seed", [r.get("pred")])):
            out = extrapolation_cache(root, name, r["hyperparams"]["epochs"], seed)
            if not out.exists():
                out.write_text(json.dumps({"hyperparams": r["hyperparams"], "seed": seed,
                                           "pred": pred, "is_top": ext["is_top"]}) + "\n")


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
    top = float(params.train["screening_top_percent"])
    overrides = variant_overrides(root, name, top, base["budget"]["tune_epochs_per_trial"])
    t0 = time.perf_counter()
    hp, tuning = variant_hyperparams(root, prop, name, overrides, base, args, stored)
    print(f"[{prop}] {name}: {hp.as_dict()}", flush=True)
    records = final_models(root, prop, name, overrides, hp, base["budget"]["seeds"], args.workers)
    return {"overrides": overrides, "hyperparams": hp.as_dict(), "tuning": tuning,
            "test_pred_per_seed": [r["test_pred"] for r in records],
            "wall_seconds": (stored or {}).get("wall_seconds", time.perf_counter() - t0)}


def compare_models(y: np.ndarray, preds: dict[str, np.ndarray], pairs: list[tuple[str, str]],
                   resamples: np.ndarray, top_percent: float, better: str,
                   percents: list[float]) -> tuple[dict, dict]:
    """Each model's MAE, top-N% precision and precision averaged over `percents` (seed-
    averaged, 95% bootstrap intervals over `resamples`), and the paired differences of
    `pairs` ((a, b): a - b on the same resampled materials)."""
    models = {k: experiment.model_summary(y, p, resamples, top_percent, better)
              for k, p in preds.items()}
    paired = {f"{a}-{b}": experiment.paired(y, preds[a], preds[b], resamples, top_percent,
                                            better) for a, b in pairs}

    # secondary: the screening studies' own objective (precision averaged over
    # tune.screening_percents), less step-like than one N on few top materials
    def signal(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        return stats.screening_signal(y_true, y_pred, percents, better)

    for k, m in models.items():
        m.pop("test_pred_per_seed", None)
        m["screening_signal"] = stats.bootstrap_metric(y, preds[k], signal, resamples).as_dict()
    for a, b in pairs:
        paired[f"{a}-{b}"]["screening_signal_diff"] = stats.bootstrap_paired_difference(
            y, preds[a], preds[b], signal, resamples).as_dict()
    return models, paired


def summarise(prop: str, base: dict, variants: dict[str, dict], args: argparse.Namespace) -> dict:
    """Test metrics, paired differences and extrapolation of every variant (run_variant's
    records by name)."""
    root = args.workdir / prop
    budget = base["budget"]
    params = load_params(root / "params.yaml")
    data = property_data(params, open_workspace(params), prop)
    y, better = data.test_targets, data.spec.better
    top = float(params.train["screening_top_percent"])
    res = stats.bootstrap_resamples(len(y), budget["bootstrap_resamples"], quality.BOOTSTRAP_SEED)
    preds = {"xie": np.array(base["models"]["xie"]["test_pred_per_seed"]),
             "mae_tuned": np.array(base["models"]["tuned"]["test_pred_per_seed"]),
             **{v: np.array(r["test_pred_per_seed"]) for v, r in variants.items()}}
    percents = [float(x) for x in params.tune["screening_percents"]]
    models, paired = compare_models(y, preds, [(v, b) for v in variants for b in BASELINES],
                                    res, top, better, percents)
    # extrapolation: one model per preset and seed (quality's seeds), the final epochs
    base_overrides = shared_overrides(top)
    hps = {"xie": (final_hyperparams(root / "params.yaml", base_overrides, prop, "xie",
                                     budget["final_epochs"]), base_overrides),
           "mae_tuned": (Hyperparams(**base["models"]["tuned"]["hyperparams"]), base_overrides),
           **{v: (Hyperparams(**r["hyperparams"]), r["overrides"]) for v, r in variants.items()}}
    ext_top = float(params.raw["evaluate"]["extrapolation_top_percent"])
    ext = extrapolation_rankings(root, prop, hps, ext_top, budget["seeds"], args.workers)
    is_top = np.array(ext["xie"]["is_top"])
    eres = stats.bootstrap_resamples(len(is_top), budget["bootstrap_resamples"], quality.BOOTSTRAP_SEED)
    pool_preds = {name: np.array(e["pred_per_seed"]) for name, e in ext.items()}
    extrapolation = {"n_top": int(is_top.sum()), "n_pool": len(is_top),
                     "random_recall": float(is_top.mean()), "top_percent": ext_top,
                     "is_top": is_top.tolist(),
                     "rankings": {name: {"hyperparams": e["hyperparams"],
                                         "pred_per_seed": e["pred_per_seed"]}
                                  for name, e in ext.items()}}
    for name, pred in pool_preds.items():
        extrapolation[name] = bootstrap_recall(is_top, pred, better, eres).as_dict()
    for v in variants:
        for b in BASELINES:
            extrapolation[f"{v}-{b}"] = bootstrap_recall_diff(
                is_top, pool_preds[v], pool_preds[b], better, eres).as_dict()
    return {"property": prop, "unit": base["unit"], "top_percent": top,
            "screening_percents": percents,
            "budget": {**budget, "extrapolation_seeds": budget["seeds"],
                       "rank_weights_searched": RANK_WEIGHTS},
            "variants": {v: {k: r[k] for k in ("overrides", "hyperparams", "tuning",
                                               "wall_seconds", "test_pred_per_seed")}
                         for v, r in variants.items()},
            "models": models, "paired": paired, "extrapolation": extrapolation}


def print_entry(r: dict) -> None:
    prop = r["property"]
    for k, m in r["models"].items():
        scr = m.get("screening", {})
        print(f"[{prop}] {k:<16} MAE {m['test_mae']['value']:.4f} top-{r['top_percent']:g}% "
              f"{scr.get('value', float('nan')):.1f} [{scr.get('low', 0):.1f}, "
              f"{scr.get('high', 0):.1f}] extrapolation recall "
              f"{r['extrapolation'][k]['value']:.2f}")
    for k, d in r["paired"].items():
        e = r["extrapolation"][k]
        print(f"[{prop}] {k}: MAE {d['mae_diff']['value']:+.4f} [{d['mae_diff']['low']:+.4f}, "
              f"{d['mae_diff']['high']:+.4f}], top-{r['top_percent']:g}% "
              f"{d['screening_diff']['value']:+.1f} [{d['screening_diff']['low']:+.1f}, "
              f"{d['screening_diff']['high']:+.1f}], extrapolation recall {e['value']:+.3f} "
              f"[{e['low']:+.3f}, {e['high']:+.3f}]")


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
            print_entry(results[prop])


if __name__ == "__main__":
    main()
