"""The study contract of `mpprop tune`: what an Optuna study and its trials record (user attr
and metric names), how a study is read (counts, epochs run, the best trial), the one writer
of tuned/<property>.yaml, and how trials and the study show in MLflow and on the terminal.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState
from optuna_integration.mlflow.mlflow import RUN_ID_ATTRIBUTE_KEY

from mpprop.config import Params
from mpprop.params_schema import FINETUNE_SEARCHABLE, GRAPH_SEARCHABLE
from mpprop.search import (
    SAMPLER_LABELS,
    SEARCHED,
    TRIAL_ENQUEUED,
    pruner_label,
    search_space,
    space_as_dict,
    trial_hyperparams,
)
from mpprop.snapshot import atomic_output
from mpprop.study_storage import TuneError, redact
from mpprop.tracking import KIND_STUDY, TAG_DESCRIPTION, TAG_KIND, TAG_PROPERTY

# study user attrs: what the study was made from, and where its trials are tracked
ATTR_PROPERTY = TAG_PROPERTY  # the study carries the same key as its runs
ATTR_SNAPSHOT = "mpprop.snapshot_sha256"
ATTR_GRAPH_KEY = "mpprop.graph_cache_key"
ATTR_EPOCHS = "mpprop.epochs"
ATTR_PARENT_RUN = "mpprop.mlflow_parent_run_id"
ATTR_EXPERIMENT = "mpprop.mlflow_experiment_id"
# trial user attrs (tagged on the trial's MLflow run by MLflowCallback)
TRIAL_SPLIT_SEED = "split_seed"
TRIAL_EPOCHS = "epochs"
# a fine-tuned trial: its parent and fine-tuning settings (write_best_params reads it)
TRIAL_FINE_TUNING = "mpprop.fine_tuning"
TRIAL_MODEL_URI = "model_uri"
# the trial's MLflow run (optuna-dashboard shows user attrs: from a trial to its run)
TRIAL_MLFLOW_RUN = "mlflow_run_id"
TRIAL_ERROR = "error"
# what the study optimises (shown by optuna-dashboard and in `study.metric_names`)
OBJECTIVE_NAME = "best_val_mae"
SCREENING_NAME = "val_screening"
# tune.objective -> (metric names, directions)
OBJECTIVES = {
    "mae": ([OBJECTIVE_NAME], ["minimize"]),
    "screening": ([SCREENING_NAME], ["maximize"]),
    "pareto": ([OBJECTIVE_NAME, SCREENING_NAME], ["minimize", "maximize"]),
}


def study_metric_names(objective: str, unit: str) -> list[str]:
    """The study's objective names with their units, as optuna-dashboard labels its axes
    (e.g. `best_val_mae (eV)`, `val_screening (%)`)."""
    units = {OBJECTIVE_NAME: unit, SCREENING_NAME: "%"}
    return [f"{name} ({units[name]})" for name in OBJECTIVES[objective][0]]


def study_note(prop: str, unit: str, objective: str, epochs: int, pruning: str,
               searched: list[str], fixed: list[str]) -> str:
    """The study's note on optuna-dashboard's page (markdown): what is optimised, in which
    unit, and how far to trust its importance and pruning panels."""
    goal = {"mae": f"lowest validation MAE of {prop} ({unit})",
            "screening": "highest validation top-N% precision (%, averaged over N)",
            "pareto": f"the Pareto front of validation MAE ({unit}) and top-N% precision (%)"}
    lines = [
        f"## {prop}: mpprop tune",
        f"- Objective: {goal[objective]}. Each trial trains {epochs} epochs on its own "
        "train/validation split of the pool; the fixed test set is never used.",
        f"- Searched: {', '.join(searched) or 'nothing'}."
        + (f" Fixed (one choice, no importance to read): {', '.join(fixed)}." if fixed else ""),
        "- Hyperparameter importance is fitted on the finished trials: below about 30 trials "
        "it is noise; read it as a hint, not a ranking.",
        f"- Pruning: {pruning}.",
        f"- A trial's MLflow run: its user attribute `{TRIAL_MLFLOW_RUN}` "
        "(`mpprop ui-url` opens MLflow on the training runs).",
    ]
    return "\n".join(lines) + "\n"
ATTR_OBJECTIVE = "mpprop.objective"
TRIAL_VAL_MAE = "val_mae"
TRIAL_VAL_SCREENING = "val_screening"
TRIAL_EPOCHS_RUN = "epochs_run"
# MLflow tag with the trial state; the key MLflowCallback uses, so both writers agree
STATE_TAG = "state"

DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)

Echo = Callable[[str], None]


# --------------------------------------------------------------------------- study readers


def state_counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = dict.fromkeys(TrialState, 0)
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def epochs_run(trial: FrozenTrial) -> int:
    # multi-objective trials report no intermediate values: their count is a user attr
    return len(trial.intermediate_values) or int(trial.user_attrs.get(TRIAL_EPOCHS_RUN, 0))


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Counts by state, the best trial, and the epochs spent (complete + pruned trials)."""
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(study)
    done = [t for t in trials if t.state in DONE_STATES]
    best = _best_trial(study, study.user_attrs.get("mpprop.pareto_mae_tolerance"))
    return {
        "study_name": study.study_name,
        "n_trials_complete": counts[TrialState.COMPLETE],
        "n_trials_pruned": counts[TrialState.PRUNED],
        "n_trials_failed": counts[TrialState.FAIL],
        "n_trials_running": counts[TrialState.RUNNING],
        "n_trials_waiting": counts[TrialState.WAITING],
        "best_trial": best.number if best else None,
        "best_val_mae": trial_val_mae(best) if best else None,
        "best_values": list(best.values) if best else None,
        "epochs_run": int(sum(epochs_run(t) for t in done)),
    }


def _best_trial(study: optuna.Study, mae_tolerance: float | None = None) -> FrozenTrial | None:
    """The study's pick: lowest val MAE (objective mae), highest screening signal
    (screening), or on the Pareto front the best signal among the trials whose MAE is within
    `mae_tolerance` (tune.pareto_mae_tolerance) of the front's best MAE (pareto)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    if len(study.directions) == 1:
        pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
        return pick(complete, key=lambda t: t.value)
    front = study.best_trials
    best_mae = min(t.values[0] for t in front)
    tol = 0.0 if mae_tolerance is None else mae_tolerance
    near = [t for t in front if t.values[0] <= best_mae * (1 + tol)]
    return max(near, key=lambda t: (t.values[1], -t.values[0]))


def trial_val_mae(t: FrozenTrial) -> float | None:
    if TRIAL_VAL_MAE in t.user_attrs:
        return float(t.user_attrs[TRIAL_VAL_MAE])
    return float(t.value) if t.values and len(t.values) == 1 else None


def write_best_params(params: Params, prop: str, study: optuna.Study) -> Path | None:
    """tuned/<prop>.yaml: the best trial's hyperparameters, read by `train --preset tuned`."""
    best = _best_trial(study, params.tune.pareto_mae_tolerance)
    if best is None:
        return None
    epochs = int(best.user_attrs.get(TRIAL_EPOCHS, study.user_attrs[ATTR_EPOCHS]))
    fine_tuning = best.user_attrs.get(TRIAL_FINE_TUNING)
    # with a parent, its trunk fixed n_conv and atom_fea_len (not searched)
    trunk = {k: fine_tuning[k] for k in ("n_conv", "atom_fea_len")} if fine_tuning else {}
    hp = trial_hyperparams(params, {**best.params, **trunk}, epochs)
    summary = study_summary(study)
    payload = {
        "hyperparams": {k: v for k, v in hp.as_dict().items()
                        if k in best.params or k in (*SEARCHED, "epochs")
                        and k not in FINETUNE_SEARCHABLE},
        # searched graph settings (train --preset tuned builds that graph cache if absent)
        "graph": {k: best.params[k] for k in GRAPH_SEARCHABLE if k in best.params},
        # a study of fine-tuned trials: `train --preset tuned` starts from the same parent
        "fine_tuning": ({k: fine_tuning[k] for k in
                         ("init_from", "freeze_trunk_epochs", "trunk_lr_scale")}
                        if fine_tuning else None),
        "best_val_mae": trial_val_mae(best),
        "best_val_screening": best.user_attrs.get(TRIAL_VAL_SCREENING),
        "objective": study.user_attrs.get(ATTR_OBJECTIVE, "mae"),
        "best_trial": best.number,
        "study_name": study.study_name,
        "n_trials_complete": summary["n_trials_complete"],
        "n_trials_pruned": summary["n_trials_pruned"],
        "property": prop,
        "snapshot_sha256": study.user_attrs.get(ATTR_SNAPSHOT),
        "model_uri": best.user_attrs.get(TRIAL_MODEL_URI),
    }
    path = params.best_params_path(prop)

    # several workers may write it at the end of a study
    with atomic_output(path) as tmp, open(tmp, "w") as fh:
        yaml.safe_dump(payload, fh, sort_keys=False)
    return path


# --------------------------------------------------------------------------- callbacks


def format_trial_line(study: optuna.Study, trial: FrozenTrial, target_epochs: int) -> str:
    """One line per finished trial: number, state, objective value(s), best so far, epochs
    run, time."""
    metric = "/".join(study.metric_names or [OBJECTIVE_NAME]).replace(OBJECTIVE_NAME, "val_mae")
    if trial.state == TrialState.COMPLETE:
        mae = "/".join(f"{v:.4g}" for v in trial.values)
    elif trial.intermediate_values:
        mae = f"{trial.intermediate_values[max(trial.intermediate_values)]:.4g}"
    else:
        mae = "-"
    best = _best_trial(study, study.user_attrs.get("mpprop.pareto_mae_tolerance"))
    best_s = ("/".join(f"{v:.4g}" for v in best.values) + f" (trial {best.number})") if best else "-"
    secs = (
        (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.datetime_complete and trial.datetime_start else float("nan")
    )
    line = (
        f"trial {trial.number:>4} {trial.state.name:<8} {metric} {mae:<9} best {best_s:<22} "
        f"epochs {epochs_run(trial)}/{target_epochs}  {secs:.0f} s"
    )
    if trial.state == TrialState.FAIL and TRIAL_ERROR in trial.user_attrs:
        line += f"  ({trial.user_attrs[TRIAL_ERROR]})"
    return line


class MarkStaleAndRetry:
    """Heartbeat-stale trials (worker died): re-queue with the same hyperparameters, and
    mark the dead trial's MLflow run FAILED with state tag FAIL (MLflowCallback never saw it).
    """

    def __init__(self, max_retry: int, echo: Echo) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self._echo = echo

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._retry(study, trial)
        run_id = trial.system_attrs.get(RUN_ID_ATTRIBUTE_KEY)
        if run_id:
            client = mlflow.MlflowClient()
            client.set_tag(run_id, STATE_TAG, TrialState.FAIL.name)
            client.set_tag(run_id, TRIAL_ERROR, "worker lost (no heartbeat)")
            client.set_terminated(run_id, status="FAILED")
        history = trial.system_attrs.get("retry_history", [])
        self._echo(
            f"trial {trial.number:>4} FAIL     worker lost (no heartbeat); "
            f"re-queued (retry {len(history) + 1})"
        )


# --------------------------------------------------------------------------- MLflow


def parent_run(study: optuna.Study, params: Params, prop: str, exp_id: str,
               tags: dict[str, str], storage_url: str, prune: bool) -> str:
    """The study's MLflow parent run: made by the first worker, found by the others."""

    client = mlflow.MlflowClient()
    run_id = study.user_attrs.get(ATTR_PARENT_RUN)
    if run_id:
        try:
            client.get_run(run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise TuneError(
                f"study {study.study_name!r} tracks its trials in MLflow run {run_id}, which "
                f"{redact(mlflow.get_tracking_uri())} does not have: every worker must use the "
                "same MLflow tracking server (mlflow.tracking_uri)"
            ) from exc
        return run_id
    run = client.create_run(
        exp_id, run_name=study.study_name, tags={**tags, TAG_KIND: KIND_STUDY}
    )
    tune = params.tune
    client.log_batch(run.info.run_id, params=[
        mlflow.entities.Param(k, str(v)) for k, v in {
            "property": prop,
            "study_name": study.study_name,
            "epochs": study.user_attrs[ATTR_EPOCHS],
            "sampler": SAMPLER_LABELS[tune.sampler],
            "sampler_seed": tune.sampler_seed,
            "pruner": pruner_label(params) if prune else "none",
            "search_space": yaml.safe_dump(space_as_dict(search_space(params)),
                                           default_flow_style=True).strip(),
            "optuna_storage": redact(storage_url),
        }.items()
    ])
    study.set_user_attr(ATTR_PARENT_RUN, run.info.run_id)
    study.set_user_attr(ATTR_EXPERIMENT, exp_id)
    return run.info.run_id


def trial_run_name(prop: str, trial: FrozenTrial) -> str:
    """`<property> trial <n> (searched values)`: readable in the MLflow run list."""
    p = trial.params
    if not p:
        return f"{prop} trial {trial.number}"
    arch = "/".join(str(p.get(k, "?")) for k in ("atom_fea_len", "h_fea_len"))
    return (f"{prop} trial {trial.number} (conv {p.get('n_conv', '?')}, h {p.get('n_h', '?')}, "
            f"{arch}, {p.get('optimizer', '?')} lr {p.get('lr', '?')}, decay "
            f"{p.get('lr_decay_epoch', '?')})")


def name_trial_run(trial: FrozenTrial, prop: str) -> None:
    """Name the trial's MLflow run and describe it (MLflowCallback names it by number only)."""

    run_id = trial.system_attrs.get(RUN_ID_ATTRIBUTE_KEY)
    if not run_id:
        return
    client = mlflow.MlflowClient()
    client.update_run(run_id, name=trial_run_name(prop, trial))
    described = ", ".join(f"{k}={v}" for k, v in sorted(trial.params.items()))
    baseline = " Enqueued baseline (tune.enqueue)." if trial.user_attrs.get(TRIAL_ENQUEUED) else ""
    client.set_tag(run_id, TAG_DESCRIPTION,
                   f"Optuna trial {trial.number}, {trial.state.name}: {described}.{baseline}")


def log_study_summary(study: optuna.Study) -> None:
    """The study's parent run (active): best value and trial counts so far."""

    summary = study_summary(study)
    metrics = {k: float(summary[k]) for k in (
        "n_trials_complete", "n_trials_pruned", "n_trials_failed", "epochs_run")}
    if summary["best_val_mae"] is not None:
        metrics["best_val_mae"] = float(summary["best_val_mae"])
        mlflow.set_tag("best_trial", str(summary["best_trial"]))
    mlflow.log_metrics(metrics)
    if len(study.directions) > 1:
        log_pareto_front(study)


def log_pareto_front(study: optuna.Study) -> None:
    """The study's Pareto front (val MAE vs val screening) as a table and a plot in the
    active (parent) run."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials}
    rows = [{"trial": t.number, OBJECTIVE_NAME: t.values[0], SCREENING_NAME: t.values[1],
             "pareto_front": t.number in front, **t.params} for t in done]
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "pareto_front.csv"
        pd.DataFrame(rows).to_csv(table, index=False)
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter([r[OBJECTIVE_NAME] for r in rows], [r[SCREENING_NAME] for r in rows],
                   c=["C3" if r["pareto_front"] else "C0" for r in rows], s=12)
        ax.set_xlabel("best validation MAE (target units)")
        ax.set_ylabel("validation top-N% precision (%)")
        ax.set_title(f"{study.study_name}: Pareto front (red)")
        fig.tight_layout()
        fig.savefig(Path(tmp) / "pareto_front.png")
        plt.close(fig)
        mlflow.log_artifact(str(table))
        mlflow.log_artifact(str(Path(tmp) / "pareto_front.png"))
