"""`mpprop pretrain`: the trunk the tuned models fine-tune (params `pretrain`).

One CGCNN on pretrain.property (the largest labelled set) with pretrain.preset, trained on
that property's records outside EVERY configured property's fixed test set, so no property's
test material reaches a model fine-tuned from it. Writes <pretrain.dir>/{model.pt,
metrics.json, materials.json} as one unit (materials.json: the ids it trained and validated
on), logs an MLflow run (kind pretrain) and registers the model as <prefix>trunk at the
champion alias. Disabled (the paper's protocol), it writes only metrics.json saying so.
Checkpoints every epoch beside the folder: a rerun after a kill resumes.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
from tqdm import tqdm

from mpprop.config import Params
from mpprop.data import open_workspace, property_data, train_val_split
from mpprop.experiment import all_test_ids, usable_rows
from mpprop.faults import process_tags, sigterm_as_exception
from mpprop.outputs import output_dir
from mpprop.paths import MODEL_FILE, TRAIN_METRICS_FILE
from mpprop.presets import hyperparams
from mpprop.registry import registered_name
from mpprop.tracking import (
    KIND_PRETRAIN,
    TAG_GRAPH_KEY,
    TAG_KIND,
    TAG_PRESET,
    TAG_PROPERTY,
    TAG_SNAPSHOT,
    end_orphaned_runs,
    killed_on_interrupt,
    log_model,
    save_bundle,
    setup_mlflow,
)
from mpprop.training import EpochStats, fit, predict, set_torch_threads

TRUNK = "trunk"  # registered as <registry_prefix>trunk
MATERIALS_FILE = "materials.json"


def pretrain(params: Params, progress: bool = True) -> dict[str, Any]:
    """Train, save and register the trunk (or record that pretraining is off)."""
    cfg = params.pretrain
    out = params.trunk_dir()
    if not cfg.enabled:
        with output_dir(out, "pretrain") as unit:
            (unit / TRAIN_METRICS_FILE).write_text(json.dumps(
                {"enabled": False, "note": "pretrain.enabled is false: the tuned models "
                 "train from scratch (the paper's protocol)"}, indent=2) + "\n")
        return {"enabled": False}
    set_torch_threads(params.train.torch_threads)
    prop = cfg.property
    hp = hyperparams(params, cfg.preset, prop, epochs=cfg.epochs)
    ws = open_workspace(params)
    data = property_data(params, ws, prop)
    excluded = all_test_ids(params, ws)
    rows, targets = usable_rows(data, ws.cache.material_id, excluded)
    seed = int(params.train.seed)
    tr, va = train_val_split(len(rows), float(cfg.val_fraction), seed)
    experiment_id = setup_mlflow(params)
    end_orphaned_runs(experiment_id, KIND_PRETRAIN)
    checkpoint = out.parent / f".{out.name}-checkpoint.pt"
    bar = tqdm(total=hp.epochs, desc=f"pretrain {prop}", unit="epoch", disable=not progress)

    def on_epoch(s: EpochStats) -> None:
        mlflow.log_metrics({"train_mae": s.train_mae, "val_mae": s.val_mae,
                            "epoch_seconds": s.seconds}, step=s.epoch)
        bar.set_postfix(val_mae=f"{s.val_mae:.4f}")
        bar.update(1)

    with (
        sigterm_as_exception(),
        output_dir(out, "pretrain") as unit,
        mlflow.start_run(run_name=f"trunk ({prop}, {cfg.preset})") as run,
        killed_on_interrupt(),
    ):
        mlflow.set_tags({TAG_PROPERTY: prop, TAG_KIND: KIND_PRETRAIN, TAG_PRESET: cfg.preset,
                         TAG_SNAPSHOT: ws.snapshot_sha256, TAG_GRAPH_KEY: ws.cache.key,
                         **process_tags()})
        mlflow.log_params({**hp.as_dict(), "property": prop, "preset": cfg.preset,
                           "n_train": len(tr), "n_val": len(va),
                           "n_excluded_test_materials": len(data.pool_rows) - len(rows)})
        result = fit(hp, params.graph_settings(), ws.cache, rows[tr], targets[tr], rows[va],
                     targets[va], seed=seed, on_epoch=on_epoch,
                     eval_batch_size=params.predict.batch_size,
                     loss_settings=params.loss_settings(),
                     better=data.spec.better, checkpoint=checkpoint,
                     checkpoint_every=max(1, int(params.train.checkpoint_every)))
        bar.close()
        test_pred = predict(result.model, result.normalizer, ws.cache, data.test_rows,
                            params.predict.batch_size)
        metrics = {
            "enabled": True, "property": prop, "preset": cfg.preset,
            "best_val_mae": result.best_val_mae, "best_epoch": result.best_epoch,
            "epochs": hp.epochs, "n_train": len(tr), "n_val": len(va),
            "n_excluded_test_materials": int(len(data.pool_rows) - len(rows)),
            # the trunk never saw its own property's test set either: an honest number
            "test_mae": float(abs(test_pred - data.test_targets).mean()),
        }
        mlflow.log_metrics({k: metrics[k] for k in ("best_val_mae", "test_mae")})
        ids = ws.cache.material_id
        (unit / MATERIALS_FILE).write_text(json.dumps(
            {"train": sorted(ids[rows[tr]].tolist()), "val": sorted(ids[rows[va]].tolist())}))
        bundle = save_bundle(unit / MODEL_FILE, result.model, result.normalizer, data.spec,
                             extra={"snapshot_sha256": ws.snapshot_sha256,
                                    "graph_cache_key": ws.cache.key, "role": TRUNK})
        model_uri = log_model(bundle, name=f"{TRUNK}-{prop}")
        name = registered_name(params, TRUNK)
        mv = mlflow.register_model(model_uri, name, tags={
            "role": "trunk for fine-tuning (train.init_from)", "property": prop,
            "preset": cfg.preset, "source_run_id": run.info.run_id,
            "test_sets_excluded": "every configured property's"})
        alias = params.mlflow.champion_alias
        mlflow.tracking.MlflowClient().set_registered_model_alias(name, alias, mv.version)
        metrics.update(run_id=run.info.run_id, registered=f"{name} v{mv.version}")
        (unit / TRAIN_METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    checkpoint.unlink(missing_ok=True)
    return metrics

