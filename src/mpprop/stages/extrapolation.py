"""`mpprop evaluate --extrapolation`: can a model find materials better than any it has seen?

The test the paper's conclusion asks for (forward-looking screening, cf. Kauwe et al.,
Comput. Mater. Sci. 174:109498 (2020)). Of one property's labelled records:
- held-out top: the materials whose true value is in the top `evaluate.extrapolation_top_percent`
  by the property's better direction;
- candidate pool: the held-out top plus the property's fixed random test set (less the top);
- training data: everything else (the fixed split's pool less the top), split train:val by
  train.seed as `mpprop train` does.
A model of each preset is trained on that, then ranks the candidate pool. Reported, with 95%
bootstrap intervals over the pool: recall (share of the held-out top in the model's top
|top| of the pool), and enrichment over random picking (recall / (|top| / |pool|)).
Writes metrics/<prop>.extrapolation.json; Table 2 shows it where present.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from mpprop import stats
from mpprop.config import Params
from mpprop.data import open_workspace, property_data
from mpprop.faults import process_tags
from mpprop.holdout import extrapolation_split, rank_candidates, train_val
from mpprop.paths import extrapolation_path
from mpprop.presets import final_hyperparams
from mpprop.snapshot import atomic_output
from mpprop.stats import bootstrap_recall, bootstrap_recall_diff
from mpprop.tracking import (
    KIND_EXTRAPOLATION,
    TAG_KIND,
    TAG_PRESET,
    TAG_PROPERTY,
    TAG_SNAPSHOT,
    setup_mlflow,
)
from mpprop.training import set_torch_threads


def evaluate_extrapolation(params: Params, prop: str, presets: list[str]) -> dict[str, Any]:
    spec = params.property_spec(prop)
    if spec.better is None:
        raise ValueError(f"{prop} has no screening direction: no extrapolation test")
    set_torch_threads(params.train.torch_threads)
    top_percent = float(params.evaluate.extrapolation_top_percent)
    ws = open_workspace(params)
    data = property_data(params, ws, prop)
    sp = extrapolation_split(data, top_percent, spec.better)
    n_train, n_val = (len(x) for x in train_val(params, sp))
    n_pool, n_top = len(sp["cand_rows"]), int(sp["cand_top"].sum())
    base_rate = n_top / n_pool
    ev = params.evaluate
    resamples = stats.bootstrap_resamples(n_pool, int(ev.bootstrap_resamples),
                                          int(ev.bootstrap_seed))
    setup_mlflow(params)
    out: dict[str, Any] = {"top_percent": top_percent, "n_top": n_top, "n_pool": n_pool,
                           "n_train": n_train, "n_val": n_val, "random_recall": base_rate}
    preds = {}
    for preset in presets:
        hp = final_hyperparams(params, prop, preset)
        with mlflow.start_run(run_name=f"{prop}-{preset} extrapolation"):
            mlflow.set_tags({TAG_PROPERTY: prop, TAG_PRESET: preset, TAG_KIND: KIND_EXTRAPOLATION,
                             TAG_SNAPSHOT: ws.snapshot_sha256,
                             **process_tags()})
            mlflow.log_params({**hp.as_dict(), "top_percent": top_percent, "n_top": n_top,
                               "n_pool": n_pool})
            pred, best_val_mae = rank_candidates(params, data, sp, hp)
            preds[preset] = pred
            ci = bootstrap_recall(sp["cand_top"], pred, spec.better, resamples)
            out[preset] = {"recall": ci.value, "recall_low": ci.low, "recall_high": ci.high,
                           "enrichment": ci.value / base_rate, "epochs": hp.epochs,
                           "best_val_mae": best_val_mae}
            mlflow.log_metrics({"extrapolation_recall": ci.value,
                                "extrapolation_enrichment": ci.value / base_rate})
    names = list(presets)
    for name in names[1:]:
        d = bootstrap_recall_diff(sp["cand_top"], preds[name], preds[names[0]], spec.better,
                                   resamples)
        out[f"paired:{name}-{names[0]}"] = {"recall_diff": d.value, "recall_diff_low": d.low,
                                            "recall_diff_high": d.high}
    path = extrapolation_path(params, prop)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
    return out
