"""Poisson's ratio from predicted moduli: does nu = (3K - 2G) / (6K + 2G), with K and G from
mpprop's bulk and shear models, or its blend with the direct Poisson model, do better than
the direct model on validation?

Every Poisson label in the snapshot is that function of the K and G labels (to the
rounding of the 2021 source), and the three elastic properties share one split per seed,
so the moduli models validate on the same materials as the Poisson model. Validation only:
the test set chooses nothing, and it was not needed (the answer was no).

    python benchmarks/fulldata.py run ft2-bulk-s0 ft2-shear-s0 ens8t7-poisson-s0
    python benchmarks/poisson_from_moduli.py [--seed 0] [--bulk ..] [--shear ..] [--poisson ..]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from fulldata import JOBS, RESULTS, WORK, _finished_folder, _interval, _val_predictions

from mpprop.bundle import BUNDLE_FILE, load_model
from mpprop.config import load_params
from mpprop.data import open_workspace
from mpprop.experiment import all_test_ids, paired
from mpprop.stats import bootstrap_resamples

BLEND_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # of the direct model; 0: moduli only


def poisson_from_moduli(log10_bulk: np.ndarray, log10_shear: np.ndarray) -> np.ndarray:
    """The isotropic Poisson's ratio of moduli given as log10(GPa), as MP computes it."""
    k, g = 10.0 ** log10_bulk, 10.0 ** log10_shear
    return (3 * k - 2 * g) / (6 * k + 2 * g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bulk", default="ft2-bulk-s{seed}")
    ap.add_argument("--shear", default="ft2-shear-s{seed}")
    ap.add_argument("--poisson", default="ens8t7-poisson-s{seed}")
    args = ap.parse_args()
    names = {key: getattr(args, key).format(seed=args.seed)
             for key in ("bulk", "shear", "poisson")}
    params = load_params(WORK / "params.yaml")
    ws = open_workspace(params)
    excluded = all_test_ids(params, ws)
    pred, target = {}, {}
    for key, name in names.items():
        folder = _finished_folder(WORK, name)
        if folder is None:
            raise SystemExit(f"{name}: no bundle in {WORK / 'jobs'} (fulldata.py run {name})")
        # each property's own seed-`seed` job rebuilds the split (an ensemble has no job)
        job = JOBS[f"ft2-{key}-s{args.seed}"]
        pred[key], target[key] = _val_predictions(params, ws, job, excluded,
                                                  load_model(folder / BUNDLE_FILE, name))
    # the same materials: the Poisson labels are the moduli labels' function (to rounding)
    label_gap = np.abs(poisson_from_moduli(target["bulk"], target["shear"]) - target["poisson"])
    if len({len(t) for t in target.values()}) != 1 or np.median(label_gap) > 1e-3:
        raise SystemExit("the three models validate on other materials")
    y, direct = target["poisson"], pred["poisson"]
    moduli = poisson_from_moduli(pred["bulk"], pred["shear"])
    resamples = bootstrap_resamples(len(y), 1000, 0)
    rows = []
    for w in BLEND_WEIGHTS:
        blend = w * direct + (1 - w) * moduli
        d = paired(y, blend, direct, resamples, 0.0, None)["mae_diff"]
        rows.append({"direct_weight": w, "val_mae": float(np.mean(np.abs(blend - y))),
                     "minus_direct": d})
    out = {"models": names, "n_val": len(y),
           "val_mae": {k: float(np.mean(np.abs(pred[k] - target[k]))) for k in pred},
           "error_correlation": float(np.corrcoef(moduli - y, direct - y)[0, 1]),
           "blends": rows}
    print(f"seed {args.seed}, {len(y)} validation materials; validation MAE: bulk "
          f"{out['val_mae']['bulk']:.4f}, shear {out['val_mae']['shear']:.4f}, Poisson "
          f"{out['val_mae']['poisson']:.4f}; error correlation (moduli vs direct) "
          f"{out['error_correlation']:.2f}")
    print("| weight of the direct model | validation MAE | minus direct [95%] |\n|---|---|---|")
    for r in rows:
        print(f"| {r['direct_weight']:.2f} | {r['val_mae']:.4f} | "
              f"{_interval(r['minus_direct'], signed=True)} |")
    (RESULTS / f"poisson_from_moduli-s{args.seed}.json").write_text(json.dumps(out, indent=1)
                                                                   + "\n")


if __name__ == "__main__":
    main()
