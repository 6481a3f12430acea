"""Can a prediction's error bar and OOD flag be trusted? Two measurements, no training.

    python benchmarks/trust.py [--ood-property bulk_modulus] [--quick]

1. Ensemble calibration, from the quality benchmark's stored test predictions
   (benchmarks/results/quality/<P>.json, `test_pred_per_seed`): the K seeds of a preset are
   an ensemble of K; on the fixed test set, the share of |error of the mean| within 1 and 2
   standard deviations over the members (a Gaussian would give 68% and 95%) and the
   Spearman correlation of |error| with the std (mpprop.experiment.calibration, as `mpprop train
   --ensemble K` logs it). Test targets are read from the shared snapshot by material id.
2. Out-of-distribution score (mpprop.ood, the settings of params `predict:`): the published
   checkpoint of --ood-property embeds its property's records (a workspace built through the
   real CLI); the reference is the train part of the pool, the flag threshold the validation
   part's quantile, as `mpprop train` stores them. Scored: the fixed test materials (ordinary
   MP crystals) and structures unlike MP's: graphene in a 20 Å vacuum, an isolated atom, the
   test crystals compressed to 0.5x in each direction (1/8 of the volume); beside the score,
   the share that `mpprop predict` warns about (inference.structure_warning: vacuum;
   inference.graph_warnings: overlapping atoms, short bonds, atoms without neighbours).

Writes benchmarks/results/trust.json and prints two tables.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Lattice, Structure
from workspace import DEFAULT_DATA, REPO, build_workspace

from mpprop.config import load_params
from mpprop.data import open_workspace, property_data, train_val_split, transform_target
from mpprop.experiment import calibration
from mpprop.graphs import graphs_from_structures
from mpprop.inference import embed, graph_warnings, structure_warning
from mpprop.model import load_checkpoint, pretrained_path
from mpprop.ood import OODReference
from mpprop.snapshot import load_snapshot

QUALITY = REPO / "benchmarks" / "results" / "quality"
OUT = REPO / "benchmarks" / "results" / "trust.json"
VACUUM = 20.0  # Å of vacuum around graphene and the isolated atom
COMPRESSION = 0.5  # lattice scale of the compressed cells
N_COMPRESSED = 50  # test crystals compressed
QUICK_RECORDS = 400


def _field(record: dict, dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def snapshot_labels(data: Path, ids: set[str], fields: set[str]) -> dict[str, dict[str, Any]]:
    """material_id -> {field: value} for the wanted ids (one pass over the shared file)."""
    out: dict[str, dict[str, Any]] = {}
    with gzip.open(data, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("material_id") in ids:
                out[rec["material_id"]] = {f: _field(rec, f) for f in fields}
    return out


def stored_ensembles(data: Path, props: list[str] | None = None
                     ) -> list[tuple[dict[str, Any], np.ndarray]]:
    """The quality benchmark's stored full results (seeds = ensemble members), each with its
    test targets (model units) read from the shared snapshot."""
    params = load_params(REPO / "params.yaml")
    results = [json.loads(p.read_text()) for p in sorted(QUALITY.glob("*.json"))]
    results = [r for r in results if not r.get("quick") and (not props or r["property"] in props)]
    ids = {m for r in results for m in r["test_material_ids"]}
    specs = {r["property"]: params.property_spec(r["property"]) for r in results}
    labels = snapshot_labels(data, ids, {s.field for s in specs.values()})
    out = []
    for r in results:
        spec = specs[r["property"]]
        raw = np.array([float(labels[m][spec.field]) for m in r["test_material_ids"]])
        out.append((r, transform_target(raw, spec)))
    return out


def ensemble_calibration(data: Path) -> list[dict[str, Any]]:
    rows = []
    for r, y in stored_ensembles(data):
        for preset in ("xie", "tuned"):
            preds = np.asarray(r["models"][preset]["test_pred_per_seed"], dtype=np.float64)
            mean, std = preds.mean(axis=0), preds.std(axis=0)
            cal = calibration(y, mean, std)
            rows.append({"property": r["property"], "unit": r["unit"], "preset": preset,
                         "members": len(preds), "n_test": len(y),
                         "mae_of_mean": float(np.mean(np.abs(mean - y))),
                         "median_std": float(np.median(std)), **cal})
    return rows


def odd_structures(test: list[Structure]) -> dict[str, list[Structure]]:
    graphene = Structure(Lattice.hexagonal(2.46, VACUUM), ["C", "C"],
                         [[1 / 3, 2 / 3, 0.5], [2 / 3, 1 / 3, 0.5]])
    isolated = Structure(Lattice.cubic(VACUUM), ["Na"], [[0, 0, 0]])
    compressed = []
    for s in test[:N_COMPRESSED]:
        c = s.copy()
        c.scale_lattice(s.volume * COMPRESSION**3)
        compressed.append(c)
    return {"graphene in vacuum": [graphene], "isolated atom": [isolated],
            f"test crystals at {COMPRESSION}x": compressed}


def ood_scores(data: Path, prop: str, workdir: Path, max_records: int | None) -> dict[str, Any]:
    root = workdir / f"{prop}-{max_records or 'all'}"  # a quick run never reuses a full one
    build_workspace(root, data, prop, max_records, workers=2)
    params = load_params(root / "params.yaml")
    ws = open_workspace(params)
    pdata = property_data(params, ws, prop)
    model, _, _ = load_checkpoint(pretrained_path(prop), params.graph_settings())
    bs = params.predict.batch_size
    tr, va = train_val_split(len(pdata.pool_rows), params.split.val_fraction,
                             int(params.train.seed))
    pred = params.predict
    ood = OODReference.fit(embed(model, ws.cache, pdata.pool_rows[tr], bs),
                           embed(model, ws.cache, pdata.pool_rows[va], bs),
                           k=int(pred.ood_k), quantile=float(pred.ood_quantile),
                           max_reference=int(pred.ood_max_reference),
                           seed=int(params.train.seed))
    snap, _ = load_snapshot(params.snapshot_dir())
    test_structures = [snap.structure(int(i)) for i in pdata.test_rows]
    groups = {"MP test crystals": test_structures, **odd_structures(test_structures)}
    rows = []
    for name, structures in groups.items():
        graphs = graphs_from_structures(structures, params.graph_settings())
        scores = ood.scores(embed(model, graphs, batch_size=bs))
        vacuum = ["vacuum" in structure_warning(s) for s in structures]
        warned = [v or bool(w) for v, w in zip(vacuum, graph_warnings(graphs), strict=True)]
        rows.append({"group": name, "n": len(scores), "median_score": float(np.median(scores)),
                     "p95_score": float(np.quantile(scores, 0.95)),
                     "flagged_fraction": float(np.mean(scores > ood.threshold)),
                     "vacuum_warning_fraction": float(np.mean(vacuum)),
                     "warning_fraction": float(np.mean(warned))})
    return {"property": prop, "model": "xie-2018 published checkpoint",
            "n_reference": len(ood.embeddings), "k": ood.k, "threshold": ood.threshold,
            "threshold_quantile": float(pred.ood_quantile), "groups": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--ood-property", default="bulk_modulus")
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / "work" / "trust")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_RECORDS} records for the OOD part")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    result = {"calibration": ensemble_calibration(args.data),
              "ood": ood_scores(args.data, args.ood_property, args.workdir,
                                QUICK_RECORDS if args.quick else None)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| property | preset | members | |err| <= 1 std | <= 2 std | Spearman(|err|, std) "
          "| median std | MAE |\n|---|---|---|---|---|---|---|---|")
    for r in result["calibration"]:
        print(f"| {r['property']} ({r['unit']}) | {r['preset']} | {r['members']} | "
              f"{100 * r.get('test_within_1std', float('nan')):.0f}% | "
              f"{100 * r.get('test_within_2std', float('nan')):.0f}% | "
              f"{r.get('test_spearman_error_std', float('nan')):.2f} | {r['median_std']:.3g} | "
              f"{r['mae_of_mean']:.3g} |")
    o = result["ood"]
    print(f"\nOOD score ({o['model']} {o['property']}; threshold {o['threshold']:.2f} = "
          f"{o['threshold_quantile']:g} quantile of validation)\n"
          "| structures | n | median score | 95th pct | OOD flagged | vacuum warning "
          "| any predict warning |\n|---|---|---|---|---|---|---|")
    for g in o["groups"]:
        print(f"| {g['group']} | {g['n']} | {g['median_score']:.2f} | {g['p95_score']:.2f} | "
              f"{100 * g['flagged_fraction']:.0f}% | {100 * g['vacuum_warning_fraction']:.0f}% | "
              f"{100 * g['warning_fraction']:.0f}% |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
