"""`mpprop promote`: register each property's best model and point the champion alias at it.

Registered models are named `<registry_prefix><property>` (e.g. `mpprop-band_gap`). Aliases,
not the deprecated stages, mark what serves: `champion` (the promoted model) and `xie-2018`
(the published CGCNN checkpoint). Earlier versions are never deleted.

Promotion picks by VALIDATION MAE only; the test set is for reporting and never chooses:
- training runs (`mpprop.kind=train`): the `best_val_mae` metric, the val MAE of the epoch whose
  weights were saved and logged;
- tuning trials (`mpprop.kind=tune-trial`): `best_val_mae` if the trial logs it, else the
  lowest value in its `val_mae` history (the tuner logs the best epoch's model).
Each trial draws its own train:val split of the same non-test pool, so the val MAEs are
estimates on different draws of the same distribution; with many trials the minimum is
optimistic (winner's curse), which is why the test MAE is reported beside it on the version.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow.entities import LoggedModelStatus, RunStatus, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from mpprop.bundle import TASK_REGRESSION, BundleError, load_bundle
from mpprop.config import Params
from mpprop.faults import pause_point
from mpprop.intervals import interval_tags
from mpprop.registry import (
    PARENT_TAGS,
    TAG_PARENT_NAME,
    RegistryError,
    describe_registered_model,
    get_version_by_alias,
    model_versions,
    registered_name,
    tag_value,
)
from mpprop.snapshot import SnapshotError, load_metadata
from mpprop.tracking import (
    KIND_TRAIN,
    KIND_TRIAL,
    TAG_KIND,
    TAG_PRESET,
    TAG_PROPERTY,
    TAG_STUDY,
    TAG_TRIAL_NUMBER,
    TEST_MAE_HIGH,
    TEST_MAE_LOW,
    VAL_SCREENING_METRIC,
    download_bundle,
    registry_lock,
    setup_mlflow,
)

CANDIDATE_KINDS = (KIND_TRAIN, KIND_TRIAL)


def current_snapshot_sha256(params: Params) -> str | None:
    """SHA-256 of the snapshot in data.snapshot_dir, or None where there is none here."""

    try:
        return str(load_metadata(params.snapshot_dir())["sha256"])
    except (SnapshotError, KeyError):
        return None


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def version_model_id(v: ModelVersion) -> str | None:
    """The logged model (m-...) behind a version.

    The SQL registry does not store ModelVersion.model_id (it comes back None); the version's
    `source` keeps the `models:/m-...` URI it was registered from.
    """
    if v.model_id:
        return v.model_id
    prefix = "models:/"
    if v.source and v.source.startswith(prefix) and "/" not in v.source[len(prefix):]:
        return v.source[len(prefix):]
    return v.tags.get("model_id")




# ---------------------------------------------------------------- promotion


@dataclass
class Candidate:
    """A run of one property with a logged model, scored by its validation MAE."""

    run_id: str
    kind: str
    preset: str
    model_id: str
    model_uri: str
    val_mae: float
    val_metric: str  # which metric gave val_mae (best_val_mae | min(val_mae))
    test_mae: float | None
    test_screening_precision: float | None
    snapshot_sha256: str | None
    graph_cache_key: str | None
    start_time: int
    val_screening: float | None = None  # smoothed val top-N% precision (best_val_screening)
    test_mae_low: float | None = None  # its 95% bootstrap interval (logged by evaluate)
    test_mae_high: float | None = None
    lineage: dict[str, str] = field(default_factory=dict)  # parent tags of a fine-tuned run

    def sort_key(self, select_by: str = "val_mae") -> tuple[float, float, int, str]:
        # ties go to the earlier run, so repeated promotions choose the same model
        if select_by == "val_screening":
            return (-(self.val_screening or -math.inf), self.val_mae, self.start_time, self.run_id)
        return (self.val_mae, 0.0, self.start_time, self.run_id)


def _validation_mae(client: MlflowClient, run: Any) -> tuple[float, str] | None:
    metrics = run.data.metrics
    if _finite(metrics.get("best_val_mae")):
        return float(metrics["best_val_mae"]), "best_val_mae"
    history = [
        m.value for m in client.get_metric_history(run.info.run_id, "val_mae")
        if math.isfinite(m.value)
    ]
    return (min(history), "min(val_mae)") if history else None


def _trial_label(tags: dict[str, str]) -> str:
    """What stands in for a preset on a tuning trial: its study and trial number."""
    study, number = tags.get(TAG_STUDY), tags.get(TAG_TRIAL_NUMBER)
    if study and number:
        return f"{study} trial {number}"
    return tags[TAG_KIND]


def find_candidates(
    client: MlflowClient, prop: str, snapshot_sha256: str | None
) -> list[Candidate]:
    """Finished train runs and tuning trials of `prop` that have a ready logged model.

    With a snapshot hash, only runs tagged with that `snapshot_sha256` count: a model of
    another snapshot was validated on other data.
    """
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiments:
        return []
    filt = f"tags.`{TAG_PROPERTY}` = '{prop}'"
    if snapshot_sha256:
        filt += f" AND tags.snapshot_sha256 = '{snapshot_sha256}'"
    runs = mlflow.search_runs(
        experiment_ids=experiments, filter_string=filt, output_format="list",
        run_view_type=ViewType.ACTIVE_ONLY,
    )
    finished = RunStatus.to_string(RunStatus.FINISHED)
    runs = [
        r for r in runs
        if r.data.tags.get(TAG_KIND) in CANDIDATE_KINDS and r.info.status == finished
    ]
    if not runs:
        return []
    # one query for the logged models of all these runs' experiments, grouped by source run
    run_ids = {r.info.run_id for r in runs}
    models_of: dict[str, list[Any]] = {}
    for m in mlflow.search_logged_models(
        experiment_ids=sorted({r.info.experiment_id for r in runs}), output_format="list"
    ):
        if m.source_run_id in run_ids and m.status == LoggedModelStatus.READY:
            models_of.setdefault(m.source_run_id, []).append(m)
    out = []
    for r in runs:
        models = models_of.get(r.info.run_id)
        val = _validation_mae(client, r) if models else None
        if not models or val is None:
            continue
        # a run that logged several models: its last one is its final (best-epoch) model
        model = max(models, key=lambda m: m.creation_timestamp)
        metrics, tags = r.data.metrics, r.data.tags
        out.append(
            Candidate(
                run_id=r.info.run_id,
                kind=tags[TAG_KIND],
                preset=tags.get(TAG_PRESET) or _trial_label(tags),
                model_id=model.model_id,
                model_uri=f"models:/{model.model_id}",
                val_mae=val[0],
                val_metric=val[1],
                test_mae=metrics.get("test_mae"),
                test_screening_precision=metrics.get("test_screening_precision"),
                snapshot_sha256=tags.get("snapshot_sha256"),
                graph_cache_key=tags.get("graph_cache_key"),
                start_time=int(r.info.start_time or 0),
                val_screening=metrics.get(VAL_SCREENING_METRIC),
                test_mae_low=metrics.get(TEST_MAE_LOW),
                test_mae_high=metrics.get(TEST_MAE_HIGH),
                lineage={k: tags[k] for k in PARENT_TAGS if tags.get(k)},
            )
        )
    return out


def select_champion(candidates: list[Candidate], select_by: str = "val_mae") -> Candidate:
    """Lowest validation MAE (promote.select_by: val_mae), or highest validation screening
    signal (val_screening; candidates without one rank last, ties by MAE)."""
    return min(candidates, key=lambda c: c.sort_key(select_by))


@dataclass
class Promotion:
    name: str
    alias: str
    version: str
    created: bool  # False: the model already had a version (re-promotion)
    previous_version: str | None  # what the alias pointed at before
    candidate: Candidate
    n_candidates: int

    def summary(self) -> str:
        """One line for the command's output: the alias move and why this model."""
        c = self.candidate
        test = f", test MAE {c.test_mae:.4g}" if c.test_mae is not None else ""
        what = "new version" if self.created else "existing version"
        was = f"v{self.previous_version}" if self.previous_version else "unset"
        return (f"{self.name}@{self.alias} -> v{self.version} ({what}; was {was}): {c.kind} "
                f"{c.preset} run {c.run_id}, val MAE {c.val_mae:.4g}{test}; "
                f"{self.n_candidates} candidates")

    def record(self) -> dict[str, Any]:
        """Its entry in `promote --record`'s JSON (reports/promoted.json, read by report)."""
        c = self.candidate
        return {"name": self.name, "alias": self.alias, "version": str(self.version),
                "run_id": c.run_id, "val_mae": c.val_mae, "test_mae": c.test_mae,
                "preset": c.preset, "kind": c.kind}


def _bundle_of(model_uri: str) -> dict[str, Any]:
    """The bundle (hyperparams, graph settings, property) of a logged model, read from its
    bundle file alone with torch weights_only (no model code or pickle from the store runs).

    Loading it also proves the weights load before the model is promoted.
    """
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return load_bundle(download_bundle(model_uri, tmp))[3]
        except BundleError as exc:
            raise RegistryError(f"candidate {model_uri} cannot be promoted: {exc}") from exc


def promote(params: Params, prop: str, client: MlflowClient | None = None) -> Promotion:
    """Register `prop`'s best model by validation MAE and point the champion alias at it.

    Finding the candidates, registering and moving the alias happen under the registry lock
    (tracking.registry_lock): two promotions at once would otherwise both find no version of
    the best model and register it twice; the second one now waits and finds the first's."""
    setup_mlflow(params)
    client = client or MlflowClient()
    with registry_lock(params):
        return _promote_locked(params, prop, client)


def _promote_locked(params: Params, prop: str, client: MlflowClient) -> Promotion:
    snapshot = current_snapshot_sha256(params)
    candidates = find_candidates(client, prop, snapshot)
    if not candidates:
        scope = f" for snapshot {snapshot[:12]}" if snapshot else ""
        raise RegistryError(
            f"no candidate model for {prop}{scope}: no finished run tagged "
            f"{TAG_PROPERTY}={prop} and {TAG_KIND} in ({', '.join(CANDIDATE_KINDS)}) has a "
            f"logged model; run `mpprop train --property {prop}` or `mpprop tune` first"
        )
    select_by = params.promote.select_by
    if select_by == "val_screening" and not any(c.val_screening is not None for c in candidates):
        raise RegistryError(f"promote.select_by val_screening: no candidate of {prop} logged "
                            f"{VAL_SCREENING_METRIC} (a property without a screening direction?)")
    best = select_champion(candidates, select_by)
    name = registered_name(params, prop)
    alias = params.mlflow.champion_alias
    previous = get_version_by_alias(client, name, alias)
    existing = [v for v in model_versions(client, name) if version_model_id(v) == best.model_id]
    pause_point("promote.before_register")  # inside the lock: where race tests hold one
    if existing:
        # idempotent: the same logged model never gets a second version
        version, created = str(existing[0].version), False
    else:
        version, created = _register(best, name, prop, select_by, len(candidates)), True
        unit = params.property_spec(prop).unit
        client.update_model_version(name, version, description=version_description(
            best, prop, unit, select_by, len(candidates)))
        describe_registered_model(client, params, prop, unit)
    client.set_registered_model_alias(name, alias, version)
    return Promotion(
        name=name, alias=alias, version=str(version), created=created,
        previous_version=str(previous.version) if previous else None,
        candidate=best, n_candidates=len(candidates),
    )


def _selection(best: Candidate, select_by: str, n_candidates: int) -> str:
    return ((f"lowest validation MAE ({best.val_metric})" if select_by == "val_mae"
             else f"highest {VAL_SCREENING_METRIC}")
            + f" of {n_candidates} candidate runs; the test set is not used to choose")


def version_description(best: Candidate, prop: str, unit: str, select_by: str,
                        n_candidates: int) -> str:
    """A promoted version's description: preset, errors with the unit, how it was chosen."""
    made = f"{best.preset} ({best.kind} run {best.run_id[:8]})"
    parent = best.lineage.get(TAG_PARENT_NAME)
    if parent:
        made += f", fine-tuned from {parent}"
    text = f"{prop} ({unit}), {made}. Validation MAE {best.val_mae:.4g} {unit}."
    if _finite(best.test_mae):
        interval = (f" (95% interval {best.test_mae_low:.4g} to {best.test_mae_high:.4g})"
                    if _finite(best.test_mae_low) and _finite(best.test_mae_high) else "")
        text += f" Test MAE {best.test_mae:.4g} {unit}{interval}."
    return text + f" Chosen as the {_selection(best, select_by, n_candidates)}."


def _register(best: Candidate, name: str, prop: str, select_by: str, n_candidates: int) -> str:
    """Register `best` as a new version of `name`, tagged with where it came from; its
    version number."""
    bundle = _bundle_of(best.model_uri)
    tags = {
        "property": prop,
        TAG_KIND: best.kind,
        "preset": best.preset,
        "source_run_id": best.run_id,
        "model_id": best.model_id,
        "snapshot_sha256": best.snapshot_sha256 or "",
        "graph_cache_key": best.graph_cache_key or "",
        "graph_settings": bundle["graph_settings"],
        "hyperparams": bundle["hyperparams"],
        "target_unit": bundle["property"]["unit"],
        "target_transform": bundle["property"]["transform"],
        "val_mae": best.val_mae,
        "selection": _selection(best, select_by, n_candidates),
    }
    tags.update(best.lineage)  # a fine-tuned model's version names its parent
    if bundle.get("task", TASK_REGRESSION) == TASK_REGRESSION:
        tags.update(interval_tags(bundle.get("calibration")))
    if _finite(best.test_mae):
        tags["test_mae"] = best.test_mae
    if _finite(best.test_screening_precision):
        tags["test_screening_precision"] = best.test_screening_precision
    mv = mlflow.register_model(
        best.model_uri, name, tags={k: tag_value(v) for k, v in tags.items()}
    )
    return str(mv.version)

