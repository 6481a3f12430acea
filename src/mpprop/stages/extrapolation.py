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
import numpy as np

from mpprop import stats
from mpprop.bundle import LoadedModel
from mpprop.config import Hyperparams, Params
from mpprop.data import PropertyData, open_workspace, property_data, train_val_split
from mpprop.device import training_device
from mpprop.faults import process_tags
from mpprop.inference import predict_rows
from mpprop.losses import LossSettings
from mpprop.paths import extrapolation_path
from mpprop.presets import final_hyperparams
from mpprop.snapshot import atomic_output
from mpprop.tracking import (
    KIND_EXTRAPOLATION,
    TAG_KIND,
    TAG_PRESET,
    TAG_PROPERTY,
    TAG_SNAPSHOT,
    setup_mlflow,
)
from mpprop.training import fit_on_pool, set_torch_threads


def held_out_top(y: np.ndarray, top_percent: float, better: str) -> np.ndarray:
    """Boolean mask of the top `top_percent` of y (by `better`), at least one material."""
    k = stats.n_top(len(y), top_percent)
    order = np.argsort(-y if better == "higher" else y, kind="stable")
    mask = np.zeros(len(y), bool)
    mask[order[:k]] = True
    return mask


def recall_at_top(is_top: np.ndarray, pred: np.ndarray, better: str) -> float:
    """Share of the true top found in the model's top-|top| of the pool."""
    k = int(is_top.sum())
    if k == 0:
        return float("nan")
    order = np.argsort(-pred if better == "higher" else pred, kind="stable")
    return float(is_top[order[:k]].sum() / k)


def extrapolation_split(data: PropertyData, top_percent: float, better: str) -> dict[str, np.ndarray]:
    """Rows of the cache: train pool without the top, and the candidate pool with it."""
    rows = np.concatenate([data.pool_rows, data.test_rows])
    y = np.concatenate([data.pool_targets, data.test_targets])
    top = held_out_top(y, top_percent, better)
    in_pool = np.arange(len(rows)) < len(data.pool_rows)
    return {
        "train_rows": rows[in_pool & ~top], "train_y": y[in_pool & ~top],
        "cand_rows": rows[~in_pool | top], "cand_y": y[~in_pool | top],
        "cand_top": top[~in_pool | top],
    }


def _train_val(params: Params, sp: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return train_val_split(len(sp["train_rows"]), params.split["val_fraction"],
                           int(params.train["seed"]))


def rank_candidates(params: Params, data: PropertyData, sp: dict[str, np.ndarray],
                    hp: Hyperparams, seed: int | None = None) -> tuple[np.ndarray, float]:
    """Train one model without the held-out top (model seed `seed`, default train.seed; the
    train/val split is always train.seed's); its predictions for the candidate pool, and
    its best validation MAE."""
    tr, va = _train_val(params, sp)
    sub = PropertyData(data.spec, data.cache, sp["train_rows"], sp["train_y"],
                       sp["cand_rows"], sp["cand_y"])
    device, precision = training_device(params.train)
    model_seed = int(params.train["seed"]) if seed is None else seed
    result = fit_on_pool(hp, params.graph_settings(), sub, tr, va, model_seed,
                         None, params.predict["batch_size"], LossSettings.from_train(params.train),
                         device, precision)
    loaded = LoadedModel("extrapolation", result.model, result.normalizer, data.spec, {})
    pred, _ = predict_rows(loaded, data.cache, sp["cand_rows"], params.predict["batch_size"])
    return pred, result.best_val_mae


def evaluate_extrapolation(params: Params, prop: str, presets: list[str]) -> dict[str, Any]:
    spec = params.property_spec(prop)
    if spec.better is None:
        raise ValueError(f"{prop} has no screening direction: no extrapolation test")
    set_torch_threads(params.train.get("torch_threads"))
    top_percent = float(params.raw["evaluate"]["extrapolation_top_percent"])
    ws = open_workspace(params)
    data = property_data(params, ws, prop)
    sp = extrapolation_split(data, top_percent, spec.better)
    n_train, n_val = (len(x) for x in _train_val(params, sp))
    n_pool, n_top = len(sp["cand_rows"]), int(sp["cand_top"].sum())
    base_rate = n_top / n_pool
    ev = params.raw["evaluate"]
    resamples = stats.bootstrap_resamples(n_pool, int(ev["bootstrap_resamples"]),
                                          int(ev["bootstrap_seed"]))
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


def recall_metric(better: str) -> stats.Metric:
    """recall_at_top as a metric of (is_top, pred), for the seed-averaged bootstraps of stats."""

    def metric(is_top: np.ndarray, pred: np.ndarray) -> float:
        return recall_at_top(is_top, pred, better)

    return metric


def seed_mean_recall(is_top: np.ndarray, preds: np.ndarray, better: str) -> float:
    """recall_at_top averaged over the rows of (S, n) predictions (one row per seed; a 1-d
    array is one seed)."""
    return stats.seed_mean(recall_metric(better), is_top, preds)


def bootstrap_recall(is_top: np.ndarray, pred: np.ndarray, better: str,
                     resamples: np.ndarray) -> stats.Interval:
    """Seed-averaged recall of (n,) or (S, n) predictions with its bootstrap interval."""
    return stats.bootstrap_metric(is_top, pred, recall_metric(better), resamples)


def bootstrap_recall_diff(is_top: np.ndarray, a: np.ndarray, b: np.ndarray, better: str,
                          resamples: np.ndarray) -> stats.Interval:
    """recall(a) - recall(b) on the same resampled pool (each seed-averaged)."""
    return stats.bootstrap_paired_difference(is_top, a, b, recall_metric(better), resamples)
