"""Calibrated prediction intervals of the published checkpoints: measured coverage and width.

    python benchmarks/intervals.py [--work benchmarks/work/fulldata] [--property P ...]

Per property, in the full-data workspace (benchmarks/work/fulldata: snapshot, graph cache
and the fixed splits of all seven properties; only read): the published CGCNN checkpoint
(xie-2018; band gap behind its metal classifier, as `mpprop predict` runs it) predicts the
validation part of the property's pool (the train:val split `mpprop train` draws) and its
fixed test set. Split conformal calibration on the validation residuals
(mpprop.intervals.calibrate, as `mpprop calibrate` does; one model: absolute intervals), then
on the test set: the share of materials whose label lies inside its interval at nominal 0.68
and 0.9 (95% binomial interval) and the mean width (model units).

The published models were trained on a 2017 MP list that most of these materials come from:
their validation and test residuals are both optimistic, so this checks the calibration
procedure on exchangeable data, not the coverage on materials new to the models.

Ensembles (absolute vs normalized intervals): the quality benchmark's stored test predictions
(benchmarks/results/quality/<P>.json, 3 seeds per preset = an ensemble of 3, as trust.py
reads them; labels from the shared snapshot). Its models are not saved and have no stored
validation predictions, so each test set is split at random into a calibration and an
evaluation half (REPEATS times): the method calibrate() picks, and for both methods the
coverage and mean width at 0.9 on the evaluation half, overall and on its quarter of largest
member spread (where the absolute interval, the same width everywhere, falls short).

Prints two tables and writes benchmarks/results/intervals.json. No training; one torch thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from trust import stored_ensembles
from workspace import DEFAULT_DATA

from mpprop.bundle import gate_metals
from mpprop.config import load_params
from mpprop.data import (
    PropertyData,
    open_workspace,
    property_data,
    train_val_split,
)
from mpprop.intervals import (
    METHOD_ABSOLUTE,
    METHOD_NORMALIZED,
    Calibration,
    calibrate,
    interval_metrics,
)
from mpprop.model import (
    DOMAIN_NON_METALS,
    METAL_CLASSIFIER,
    PRETRAINED_DOMAINS,
    PRETRAINED_FILES,
    load_checkpoint,
    pretrained_path,
)
from mpprop.training import predict, set_torch_threads

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "work" / "fulldata"
OUT = REPO / "benchmarks" / "results" / "intervals.json"
NOMINAL = (0.68, 0.9)
REPEATS = 200  # random calibration / evaluation halves of each ensemble's test set
ENSEMBLE_NOMINAL = 0.9


def published_predictions(params: Any, data: PropertyData, prop: str, rows: np.ndarray
                          ) -> np.ndarray:
    """The published checkpoint's predictions (model units) on cache rows; the band-gap
    model is gated by the metal classifier (0 where it says metal), as predict runs it."""
    graph = params.graph_settings()
    bs = int(params.predict.batch_size)
    model, normalizer, _ = load_checkpoint(pretrained_path(prop), graph)
    pred = predict(model.eval(), normalizer, data.cache, rows, bs)
    if PRETRAINED_DOMAINS.get(prop) == DOMAIN_NON_METALS:
        clf, clf_norm, _ = load_checkpoint(pretrained_path(METAL_CLASSIFIER), graph)
        p_metal = predict(clf.eval(), clf_norm, data.cache, rows, bs)
        pred, _ = gate_metals(pred, np.zeros_like(pred), p_metal)
    return pred


def binomial_interval(share: float, n: int) -> tuple[float, float]:
    """95% Wilson interval of a share of n."""
    z = 1.96
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def measure(params: Any, ws: Any, prop: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = property_data(params, ws, prop)
    _, va = train_val_split(len(data.pool_rows), params.split.val_fraction,
                            int(params.train.seed))
    val_pred = published_predictions(params, data, prop, data.pool_rows[va])
    test_pred = published_predictions(params, data, prop, data.test_rows)
    cal = calibrate(data.pool_targets[va], val_pred, source=f"validation split ({len(va)})")
    y = data.test_targets
    out: dict[str, Any] = {"property": prop, "unit": data.spec.unit, "n_calibration": len(va),
                           "n_test": len(y), "method": cal.method,
                           "test_mae": float(np.mean(np.abs(test_pred - y))),
                           "quantiles": dict(zip(map(str, cal.coverages), cal.q_absolute,
                                                 strict=True))}
    for nominal in NOMINAL:
        m = interval_metrics(y, test_pred, np.full(len(y), np.nan), cal, nominal)
        share = m["test_interval_coverage"]
        out[f"{nominal:g}"] = {"coverage": share,
                               "coverage_95ci": binomial_interval(share, len(y)),
                               "mean_width": m["test_interval_width"]}
    out["seconds"] = time.perf_counter() - t0
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| property (model unit) | calibration / test | test MAE | coverage at 0.68 "
             "| mean width at 0.68 | coverage at 0.9 | mean width at 0.9 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for nominal in NOMINAL:
            m = r[f"{nominal:g}"]
            lo, hi = m["coverage_95ci"]
            cells += [f"{100 * m['coverage']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]",
                      f"{m['mean_width']:.3g}"]
        lines.append(f"| {r['property']} ({r['unit']}) | {r['n_calibration']} / {r['n_test']} "
                     f"| {r['test_mae']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _halves(y: np.ndarray, mean: np.ndarray, std: np.ndarray, rng: np.random.Generator
            ) -> dict[str, Any]:
    """One random halving: the method chosen on the first half, and per method the coverage
    and mean width on the second, overall and on its quarter of largest spread."""
    perm = rng.permutation(len(y))
    cal_i, ev = perm[: len(y) // 2], perm[len(y) // 2:]
    cal = calibrate(y[cal_i], mean[cal_i], std[cal_i])
    top = ev[std[ev] > np.quantile(std[ev], 0.75)]
    out: dict[str, Any] = {"normalized_chosen": cal.method == METHOD_NORMALIZED}
    for method in (METHOD_ABSOLUTE, METHOD_NORMALIZED):
        one = Calibration(method, cal.coverages, cal.q_absolute, cal.q_normalized, cal.eps,
                          cal.n, "")
        m = interval_metrics(y[ev], mean[ev], std[ev], one, ENSEMBLE_NOMINAL)
        t = interval_metrics(y[top], mean[top], std[top], one, ENSEMBLE_NOMINAL)
        out[method] = (m["test_interval_coverage"], m["test_interval_width"],
                       t["test_interval_coverage"])
    return out


def ensembles(data: Path, props: list[str] | None) -> list[dict[str, Any]]:
    """Absolute vs normalized intervals of the quality benchmark's 3-seed ensembles."""
    rows = []
    for r, y in stored_ensembles(data, props):
        for preset in ("xie", "tuned"):
            preds = np.asarray(r["models"][preset]["test_pred_per_seed"], dtype=np.float64)
            rng = np.random.default_rng(0)
            runs = [_halves(y, preds.mean(0), preds.std(0), rng) for _ in range(REPEATS)]
            row = {"property": r["property"], "unit": r["unit"], "preset": preset,
                   "members": len(preds), "n_test": len(y),
                   "normalized_chosen": float(np.mean([h["normalized_chosen"] for h in runs]))}
            for method in (METHOD_ABSOLUTE, METHOD_NORMALIZED):
                cov, width, top = np.mean([h[method] for h in runs], axis=0)
                row[method] = {"coverage": cov, "mean_width": width, "top_spread_coverage": top}
            rows.append(row)
    return rows


def ensemble_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| property (model unit) | preset | normalized chosen | coverage abs / norm "
             "| mean width abs / norm | largest-spread quarter: coverage abs / norm |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        a, n = r[METHOD_ABSOLUTE], r[METHOD_NORMALIZED]
        lines.append(f"| {r['property']} ({r['unit']}) | {r['preset']} | "
                     f"{100 * r['normalized_chosen']:.0f}% | {100 * a['coverage']:.1f}% / "
                     f"{100 * n['coverage']:.1f}% | {a['mean_width']:.3g} / "
                     f"{n['mean_width']:.3g} | {100 * a['top_spread_coverage']:.1f}% / "
                     f"{100 * n['top_spread_coverage']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--property", dest="props", action="append", default=None,
                    choices=sorted(PRETRAINED_FILES))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="the shared snapshot (labels of the quality test sets)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    set_torch_threads(1)  # the other cores run training jobs
    params = load_params(args.work / "params.yaml")
    ws = open_workspace(params, in_memory=False)  # read only: nothing is written there
    rows = []
    for prop in args.props or [p for p in params.properties if p in PRETRAINED_FILES]:
        rows.append(measure(params, ws, prop))
        print(f"{prop}: done in {rows[-1]['seconds']:.0f} s", flush=True)
    ens = ensembles(args.data, args.props)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": "published xie-2018 checkpoints",
                                    "workspace": str(args.work.relative_to(REPO))
                                    if args.work.is_relative_to(REPO) else str(args.work),
                                    "nominal": list(NOMINAL), "properties": rows,
                                    "ensembles": {"nominal": ENSEMBLE_NOMINAL,
                                                  "repeats": REPEATS, "rows": ens}},
                                   indent=2) + "\n")
    print(table(rows))
    print(f"\nensembles of 3 (quality benchmark), nominal {ENSEMBLE_NOMINAL:g}, "
          f"{REPEATS} random halvings of the test set\n" + ensemble_table(ens))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
