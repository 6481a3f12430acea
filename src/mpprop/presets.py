"""Presets: which hyperparameters a named configuration trains with (params `presets`, the
tuned file of `mpprop tune`), the final-training rule, and the presets evaluate compares.
One owner: train, evaluate, extrapolation, report and the benchmarks resolve presets here;
the tuned file is read here only (`study.write_best_params` writes it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import yaml

from mpprop.config import Params
from mpprop.paths import trunk_model_path
from mpprop.settings import ConfigError, Hyperparams

# metrics/<prop>.json keys of the paired differences between presets (evaluate writes them,
# report reads them)
PAIRED_PREFIX = "paired:"


def tuning_parent(params: Params) -> str | None:
    """The model tuning trials fine-tune (and so the tuned preset): train.init_from, else
    the pipeline's trunk (pretrain.enabled), else none (the paper)."""
    if params.train.init_from:
        return params.train.init_from
    if params.pretrain.enabled:
        return str(trunk_model_path(params))
    return None


def tuned_fine_tuning(params: Params, prop: str) -> dict[str, Any] | None:
    """The parent and fine-tuning settings a study of fine-tuned trials wrote into the tuned
    file (study.write_best_params), or None (no tuned file, or trials from scratch)."""
    path = params.best_params_path(prop)
    if not path.exists():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("fine_tuning")


def hyperparams(params: Params, preset: str, prop: str, **overrides: Any) -> Hyperparams:
    """Hyperparameters of a preset ("tuned": the tuned file of `prop`; else params
    `presets`) over the `train:` defaults, with command-line overrides (None: not given)."""
    base: dict[str, Any] = params.train_defaults()
    if preset == "tuned":
        path = params.best_params_path(prop)
        if not path.exists():
            raise ConfigError(
                f"no tuned hyperparameters for {prop}: {path} is missing; "
                f"run `mpprop tune --property {prop}` first"
            )
        base.update(yaml.safe_load(path.read_text())["hyperparams"])
    elif preset in params.presets:
        # its unset keys left out; ensemble is train's business, not a hyperparameter
        base.update(params.presets[preset].model_dump(exclude={"ensemble"}))
    else:
        raise ConfigError(
            f"unknown preset {preset!r}; known: tuned, {', '.join(params.presets)}"
        )
    base.update({k: v for k, v in overrides.items() if v is not None})
    return Hyperparams(**base)


def default_presets(params: Params) -> list[str]:
    """The presets the pipeline trains and compares (evaluate.presets; Table 2's columns)."""
    return list(params.evaluate.presets)


def final_hyperparams(params: Params, prop: str, preset: str,
                      overrides: dict[str, Any] | None = None) -> Hyperparams:
    """The hyperparameters `mpprop train` uses for a preset.

    The tuned preset trains for `tune.final_epochs` (null: the Xie preset's epochs), so both
    columns of Table 2 have the same final-training budget; its LR decay epoch, found for the
    study's epochs per trial, moves in proportion. Explicit overrides win.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    hp = hyperparams(params, preset, prop, **overrides)
    if preset != "tuned" or "epochs" in overrides:
        return hp
    final = params.tune.final_epochs or params.presets["xie"].epochs
    decay = hp.lr_decay_epoch
    if "lr_decay_epoch" not in overrides:
        decay = max(1, round(hp.lr_decay_epoch * final / hp.epochs))
    return replace(hp, epochs=int(final), lr_decay_epoch=int(decay))


# how plots and legends name a preset's model
PRESET_LABELS = {"xie": "Xie preset", "tuned": "tuned preset"}


def preset_label(preset: str, parent: str | None = None) -> str:
    """The name a preset's model has in plots ("tuned preset, fine-tuned" where it was
    fine-tuned from a parent model)."""
    label = PRESET_LABELS.get(preset, preset)
    return f"{label}, fine-tuned" if parent else label
