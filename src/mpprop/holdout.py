"""The extrapolation test's data and model: a property's top held out of training, one model
trained on the rest ranks the candidate pool (the held-out top among the fixed test set).

Shared by `mpprop evaluate --extrapolation` (stages/extrapolation.py) and the benchmarks
(mpprop.experiment_runs), so both train and rank the same way; the recall statistics are in
mpprop.stats.
"""

from __future__ import annotations

import numpy as np

from mpprop.bundle import LoadedModel
from mpprop.config import Params
from mpprop.data import PropertyData, train_val_split
from mpprop.device import training_device
from mpprop.inference import predict_rows
from mpprop.settings import Hyperparams
from mpprop.stats import held_out_top
from mpprop.training import fit_on_pool


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


def train_val(params: Params, sp: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The train:val split of the training part, by train.seed as `mpprop train` splits."""
    return train_val_split(len(sp["train_rows"]), params.split.val_fraction,
                           int(params.train.seed))


def rank_candidates(params: Params, data: PropertyData, sp: dict[str, np.ndarray],
                    hp: Hyperparams, seed: int | None = None) -> tuple[np.ndarray, float]:
    """Train one model without the held-out top (model seed `seed`, default train.seed; the
    train/val split is always train.seed's); its predictions for the candidate pool, and
    its best validation MAE."""
    tr, va = train_val(params, sp)
    sub = PropertyData(data.spec, data.cache, sp["train_rows"], sp["train_y"],
                       sp["cand_rows"], sp["cand_y"])
    device, precision = training_device(params.train.device, params.train.precision)
    model_seed = int(params.train.seed) if seed is None else seed
    result = fit_on_pool(hp, params.graph_settings(), sub, tr, va, model_seed,
                         None, params.predict.batch_size, params.loss_settings(),
                         device, precision)
    loaded = LoadedModel("extrapolation", result.model, result.normalizer, data.spec, {})
    pred, _ = predict_rows(loaded, data.cache, sp["cand_rows"], params.predict.batch_size)
    return pred, result.best_val_mae
