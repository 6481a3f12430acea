"""The search space of `mpprop tune` and how trials sample it: `tune.search_space` checked,
one point suggested per trial and turned into a trial's hyperparameters and graph settings,
the per-trial reseeded sampler, the pruner, and the enqueued baseline trials.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import numpy as np
import optuna
from optuna.samplers import BaseSampler, GPSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from mpprop.config import Params
from mpprop.params_schema import FINETUNE_SEARCHABLE, GRAPH_SEARCHABLE, SearchRange
from mpprop.presets import tuning_parent
from mpprop.settings import ConfigError, GraphSettings, Hyperparams

# the hyperparameters a search space must cover (everything but epochs and the train.* ones)
SEARCHED = ("n_conv", "n_h", "atom_fea_len", "h_fea_len", "lr", "lr_decay_epoch", "optimizer")
# the searched keys a parent's trunk decides
TRUNK_KEYS = ("n_conv", "atom_fea_len")
# trial user attr of a trial queued by enqueue_baselines (its one writer; defined here, not in
# mpprop.study with the other trial attrs, because mpprop.study imports this module)
TRIAL_ENQUEUED = "enqueued_baseline"

# independent random streams derived from (sampler seed, trial number)
SAMPLER_STREAM = 0
SPLIT_STREAM = 1


# one searched key: a range (low, high[, step, log]) or a list of choices
SearchSpace = dict[str, SearchRange | list[Any]]


def search_space(params: Params) -> SearchSpace:
    """`tune.search_space` (with `extended_search_space` when asked), less the keys a
    fine-tuning parent decides; it must cover SEARCHED (each entry's form is checked at load)."""
    space = dict(params.tune.search_space)
    if params.tune.extend_search_space:
        space.update(params.tune.extended_search_space)
    if tuning_parent(params):
        # fine-tuned trials take n_conv and atom_fea_len from the parent's trunk
        for key in TRUNK_KEYS:
            space.pop(key, None)
    missing = [k for k in SEARCHED if k not in space
               and not (tuning_parent(params) and k in TRUNK_KEYS)]
    known = {f.name for f in fields(Hyperparams)} | set(GRAPH_SEARCHABLE) | set(FINETUNE_SEARCHABLE)
    unknown = [k for k in space if k not in known or k == "epochs"]
    if missing or unknown:
        raise ConfigError(
            f"tune.search_space must cover {', '.join(SEARCHED)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; not searchable: {', '.join(unknown)}" if unknown else "")
        )
    return space


def space_as_dict(space: SearchSpace) -> dict[str, Any]:
    """The space as written in params.yaml (what the study's run logs)."""
    return {k: v.model_dump() if isinstance(v, SearchRange) else v for k, v in space.items()}


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Sample one point of the search space (ints and floats by the type of low/high)."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            values[name] = trial.suggest_categorical(name, spec)
        elif isinstance(spec.low, int) and isinstance(spec.high, int) and isinstance(
            1 if spec.step is None else spec.step, int
        ):
            values[name] = trial.suggest_int(
                name, spec.low, spec.high, step=1 if spec.step is None else int(spec.step),
                log=spec.log,
            )
        else:
            values[name] = trial.suggest_float(
                name, float(spec.low), float(spec.high), step=spec.step, log=spec.log,
            )
    return values


def trial_hyperparams(params: Params, values: dict[str, Any], epochs: int) -> Hyperparams:
    """A trial's full configuration: searched values, tuning epochs, and train.* settings."""
    searched = {k: v for k, v in values.items()
                if k not in GRAPH_SEARCHABLE and k not in FINETUNE_SEARCHABLE}
    return Hyperparams(**{**params.train_defaults(), **searched, "epochs": int(epochs)})


def trial_graph(params: Params, values: dict[str, Any]) -> GraphSettings:
    """The graph settings of a trial: graph.* with the searched graph keys replaced."""
    return replace(params.graph_settings(),
                   **{k: values[k] for k in GRAPH_SEARCHABLE if k in values})


def derive_seed(base_seed: int, trial_number: int, stream: int) -> int:
    """A 32-bit seed that is a pure function of (base seed, trial number, stream)."""
    seq = np.random.SeedSequence([int(base_seed), int(trial_number), int(stream)])
    return int(seq.generate_state(1)[0])


SAMPLER_LABELS = {"tpe": "TPE(constant_liar, reseeded per trial)",
                  "gp": "GPSampler(reseeded per trial)"}


class TrialSeededSampler(BaseSampler):
    """TPE (or the Gaussian-process sampler, `tune.sampler: gp`) whose random state is
    reseeded from (seed, trial number) before every trial.

    Why: workers that all seed TPE with the same `tune.sampler_seed` would otherwise draw
    the same "random" start-up configurations, in lockstep. Reseeding by trial number keeps
    a single-worker study reproducible and gives every trial of a parallel study its own
    draw. `constant_liar` makes TPE treat other workers' running trials as bad, so they do
    not all crowd around the same point. Optuna's guide places TPE at 100+ trials and the GP
    sampler below that; the GP sampler has no constant liar.
    """

    def __init__(self, seed: int, constant_liar: bool = True, kind: str = "tpe") -> None:
        self._seed = int(seed)
        self._constant_liar = constant_liar
        self._kind = kind
        self._tpe = self._make(self._seed)

    def _make(self, seed: int) -> BaseSampler:
        if self._kind == "gp":
            return GPSampler(seed=seed)
        return TPESampler(seed=seed, constant_liar=self._constant_liar)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._tpe = self._make(derive_seed(self._seed, trial.number, SAMPLER_STREAM))
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any
    ) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()


def pruner_label(params: Params) -> str:
    tune = params.tune
    if tune.pruner == "hyperband":
        return (f"Hyperband(min {tune.pruner_warmup_steps}, "
                f"factor {tune.hyperband_reduction_factor})")
    return f"Percentile({tune.pruner_percentile}, warmup={tune.pruner_warmup_steps})"


def make_pruner(params: Params, epochs: int, prune: bool = True) -> optuna.pruners.BasePruner:
    """The paper's PercentilePruner (compares with completed trials at the same epoch), or
    Hyperband (`tune.pruner: hyperband`) for a budget-aware search."""
    if not prune:
        return optuna.pruners.NopPruner()
    tune = params.tune
    if tune.pruner == "hyperband":
        # successive halving in brackets: rungs from the warm-up epochs to the trial's epochs
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, tune.pruner_warmup_steps),
            max_resource=int(epochs),
            reduction_factor=tune.hyperband_reduction_factor,
        )
    return optuna.pruners.PercentilePruner(
        float(tune.pruner_percentile),
        n_startup_trials=tune.pruner_startup_trials,
        n_warmup_steps=tune.pruner_warmup_steps,
    )


def enqueue_baselines(study: optuna.Study, params: Params, space: SearchSpace) -> int:
    """Queue `tune.enqueue` (baseline points, e.g. the Xie architecture) as a new study's
    first trials, so the study's best is never worse on validation than those baselines.

    Each entry fixes some searched hyperparameters; the sampler draws the rest. Called once,
    under the init lock, for a study without trials. Returns the number queued.
    """
    entries = params.tune.enqueue
    if tuning_parent(params):  # the parent's trunk decides these
        entries = [{k: v for k, v in e.items() if k not in TRUNK_KEYS} for e in entries]
    for i, entry in enumerate(entries):
        unknown = sorted(set(entry) - set(space))
        if unknown:
            raise ConfigError(f"tune.enqueue[{i}]: {', '.join(unknown)} not in tune.search_space")
        for name, value in entry.items():
            spec = space[name]
            inside = (value in spec) if isinstance(spec, list) else spec.low <= value <= spec.high
            if not inside:
                shown = spec.model_dump() if isinstance(spec, SearchRange) else spec
                raise ConfigError(
                    f"tune.enqueue[{i}].{name}={value!r} is outside tune.search_space.{name} ({shown})"
                )
    if study.get_trials(deepcopy=False):
        return 0
    for entry in entries:
        study.enqueue_trial(dict(entry), user_attrs={TRIAL_ENQUEUED: True})
    return len(entries)
