"""The model registry contract: registered names, aliases, version lookups, lineage tags, and
resolving a model reference (`mpprop-P@alias`, `models:/...`, a bundle file, a published
checkpoint) to the weights of a parent model.

Owned here, read by the stages (promote, predict, train): no stage resolves a registry
reference on its own. Only bundle files are read, with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mpprop.bundle import BundleError, LoadedModel, attach_metal_gate, load_bundle, load_model
from mpprop.config import Params
from mpprop.model import (
    DOMAIN_NON_METALS,
    METAL_CLASSIFIER,
    PRETRAINED_FILES,
    load_checkpoint,
    pretrained_path,
    trunk_state,
)
from mpprop.settings import GraphSettings
from mpprop.tracking import download_bundle, open_store

# lineage of a fine-tuned model: on its training run and on its registry version
TAG_PARENT_NAME = "mpprop.parent.name"
TAG_PARENT_VERSION = "mpprop.parent.version"
TAG_PARENT_RUN_ID = "mpprop.parent.run_id"
TAG_PARENT_SOURCE = "mpprop.parent.source"
PARENT_TAGS = (TAG_PARENT_NAME, TAG_PARENT_VERSION, TAG_PARENT_RUN_ID, TAG_PARENT_SOURCE)
# `published:<property>`: the CGCNN checkpoint of Xie & Grossman 2018 for that property
PUBLISHED_PREFIX = "published:"
MODELS_PREFIX = "models:/"
# appended to the label (the CSV's `model` column) of a model whose predictions the metal
# classifier gates
GATE_LABEL = "+metal-classifier"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (no candidate, no such alias, ...)."""


def registered_name(params: Params, prop: str) -> str:
    return f"{params.mlflow.registry_prefix}{prop}"


def model_description(params: Params, prop: str, unit: str) -> str:
    """A registered model's description: what it predicts and what each alias means."""
    m = params.mlflow
    return (
        f"CGCNN models of {prop} ({unit}). Aliases: `{m.champion_alias}`, the project's best "
        f"model by validation MAE among its training runs and tuning trials (`mpprop "
        f"promote`; the test set is not used to choose); `{m.pretrained_alias}`, the "
        f"published CGCNN checkpoint (Xie & Grossman, PRL 120, 145301, 2018); "
        f"`{m.shipped_alias}`, mpprop's own pretrained model where one is shipped "
        f"(`mpprop import-pretrained`). Each version's description gives its preset, test "
        f"MAE and how it was chosen."
    )


def describe_registered_model(client: MlflowClient, params: Params, prop: str,
                              unit: str) -> None:
    """Set the registered model's description (the registry's model page shows it)."""
    name = registered_name(params, prop)
    text = model_description(params, prop, unit)
    if client.get_registered_model(name).description != text:
        client.update_registered_model(name, description=text)


def is_not_found(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def get_version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    # via the registered model's alias map: a missing alias on an existing model raises
    # INVALID_PARAMETER_VALUE from get_model_version_by_alias, not a "not found" code
    try:
        version = client.get_registered_model(name).aliases.get(alias)
    except MlflowException as exc:
        if is_not_found(exc):
            return None
        raise
    return None if version is None else client.get_model_version(name, str(version))


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


def tag_value(value: Any) -> str:
    """A registry or run tag's text: dicts and lists as sorted JSON."""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


@dataclass(frozen=True)
class ParentModel:
    """The trunk of a model to fine-tune from, and where it came from."""

    trunk: dict[str, torch.Tensor]
    graph_settings: GraphSettings
    source: str  # the reference as given
    name: str = ""  # registered model name, where it is one
    version: str = ""
    run_id: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.name else self.source

    def tags(self) -> dict[str, str]:
        return {TAG_PARENT_NAME: self.name, TAG_PARENT_VERSION: self.version,
                TAG_PARENT_RUN_ID: self.run_id, TAG_PARENT_SOURCE: self.source}


def resolve_parent(params: Params, ref: str) -> ParentModel:
    """The parent a `--init-from REF` names: a registered model (`mpprop-P@alias`,
    `name/version`, `models:/name@alias`, `models:/name/N`), a bundle file, or a published
    checkpoint (`published:<property>` or a `*.pth.tar` path). Its graph settings must be
    params' (the trunk's filters read those Gaussians): else a RegistryError naming them."""
    path = Path(ref).expanduser()
    if ref.startswith(PUBLISHED_PREFIX) or ref.endswith(".pth.tar") or path.is_file():
        parent = _parent_from_file(params, ref, path)
    else:
        parent = _parent_from_registry(params, ref)
    wanted = params.graph_settings()
    if parent.graph_settings != wanted:
        diff = {k: (v, asdict(wanted)[k]) for k, v in asdict(parent.graph_settings).items()
                if asdict(wanted)[k] != v}
        raise RegistryError(
            f"{parent.label} was trained on other graphs than params' `graph`: "
            + ", ".join(f"{k} {a} (parent) vs {b}" for k, (a, b) in diff.items()))
    return parent


def _parent_from_file(params: Params, ref: str, path: Path) -> ParentModel:
    graph = params.graph_settings()
    if ref.startswith(PUBLISHED_PREFIX):
        prop = ref[len(PUBLISHED_PREFIX):]
        if prop not in PRETRAINED_FILES:
            raise RegistryError(f"no published checkpoint for {prop!r}; known: "
                                + ", ".join(PRETRAINED_FILES))
        path = pretrained_path(prop)
    if not path.is_file():
        raise RegistryError(f"{ref}: no such file")
    try:
        if path.name.endswith(".pth.tar"):
            # the original format stores no graph settings: it was made with the defaults
            model, _, _ = load_checkpoint(path, graph)
            return ParentModel(trunk_state(model.state_dict()), GraphSettings(), ref)
        model, _, _, _ = load_bundle(path)
    except (BundleError, ValueError, RuntimeError, KeyError) as exc:
        raise RegistryError(f"{ref}: not a loadable model: {exc}") from exc
    return ParentModel(trunk_state(model.state_dict()), model.graph_settings, ref)


def _parent_from_registry(params: Params, ref: str) -> ParentModel:
    client = open_store(params)
    spec = ref[len(MODELS_PREFIX):] if ref.startswith(MODELS_PREFIX) else ref
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            mv = get_version_by_alias(client, name, alias)
            if mv is None:
                raise RegistryError(f"{ref}: {name} has no version with alias {alias!r}")
        elif "/" in spec:
            name, version = spec.split("/", 1)
            mv = client.get_model_version(name, version)
        else:
            raise RegistryError(f"{ref}: not a file, and not a registered model as "
                                "NAME@ALIAS, NAME/VERSION or models:/...")
    except MlflowException as exc:
        raise RegistryError(f"{ref}: {exc.message.splitlines()[0]}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model, _, _, _ = load_bundle(download_bundle(f"models:/{mv.name}/{mv.version}", tmp))
        except (BundleError, MlflowException, OSError) as exc:
            raise RegistryError(f"{mv.name} v{mv.version}: its model cannot be read: "
                                f"{str(exc).splitlines()[0]}") from exc
    return ParentModel(trunk_state(model.state_dict()), model.graph_settings, ref,
                       mv.name, str(mv.version), mv.run_id or "")


def load_version(name: str, version: str, label: str) -> LoadedModel:
    """Version `version` of registered model `name` as a LoadedModel: only its bundle file is
    downloaded and read (load_model, torch weights_only); no code or pickle of the store runs."""
    uri = f"{MODELS_PREFIX}{name}/{version}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return load_model(download_bundle(uri, tmp), label)
        except BundleError as exc:
            # the model's URI, not the temp folder it was downloaded to
            raise RegistryError(f"{label}: {str(exc).replace(tmp, uri)}") from exc


def with_metal_gate(params: Params, client: MlflowClient, model: LoadedModel) -> LoadedModel:
    """`model` gated by the published metal classifier (`<prefix>is_metal` at the pretrained
    alias, on the same graphs): 0 where it says metal; the label names it."""
    name = registered_name(params, METAL_CLASSIFIER)
    alias = params.mlflow.pretrained_alias
    mv = get_version_by_alias(client, name, alias)
    if mv is None:
        raise RegistryError(
            f"{model.label} was trained on {DOMAIN_NON_METALS} only and is gated by the metal "
            f"classifier, but {name} has no version with alias {alias!r}: run `mpprop "
            "import-pretrained`, or set predict.xie_band_gap_metal_gate: false"
        )
    label = f"{name}@{alias} v{mv.version}"
    gate = load_version(name, str(mv.version), label)
    try:
        attach_metal_gate(model, gate)
    except BundleError as exc:
        raise RegistryError(f"{label}: {exc}") from exc
    model.label = f"{model.label}{GATE_LABEL} v{mv.version}"
    # where the model already is (the device of its parameters)
    return model.to(next(model.model.parameters()).device)
