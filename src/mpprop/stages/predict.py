"""Batch prediction with registered models (`mpprop predict`, `mpprop embed`).

Inputs are read by mpprop.predict_inputs, the CSV rows made by mpprop.prediction_csv, and
where the output may go is checked by mpprop.output_guard (before any model is loaded).
Each structure is parsed and checked once and featurized once per graph setting, then every
requested model runs on the same graphs (mpprop.inference); models are read from their
bundle files only (no MLflow model loading, no unpickling). Structures outside
predict.max_atoms / min_volume_per_atom / min_distance fail their row before any neighbour
search (inference.StructureLimits).
"""

from __future__ import annotations

import csv
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from mpprop.bundle import BundleError, LoadedModel, load_model
from mpprop.config import Params
from mpprop.device import training_device
from mpprop.inference import DEFAULT_LIMITS, StructureLimits, embed, graph_inputs
from mpprop.intervals import DEFAULT_COVERAGE
from mpprop.model import DOMAIN_NON_METALS
from mpprop.output_guard import embedding_files
from mpprop.predict_inputs import InputRow, PredictError, open_source
from mpprop.prediction_csv import OUTPUT_COLUMNS, RegisteredModel, predict_rows
from mpprop.snapshot import atomic_output


def resolve_models(
    params: Params, prop: str, alias: str | None = None, version: int | None = None
) -> list[RegisteredModel]:
    """Load `<prefix><prop>@alias` (or version N); prop 'all' = every property with the alias.

    Only the bundle file of each version is downloaded and read (torch weights_only): no
    code or pickle from the model store runs. The models are put on `train.device`.
    """
    # MLflow imported here: it takes seconds and `mpprop predict --help` needs none of it
    from mlflow.exceptions import MlflowException

    from mpprop.registry import get_version_by_alias, registered_name
    from mpprop.tracking import open_store

    device, _ = training_device(params.train.device, params.train.precision)

    client = open_store(params)  # checked: an empty or corrupt database is one line
    if prop == "all" and version is not None:
        raise PredictError("--version needs one --property: versions differ between models")
    alias = alias or params.mlflow.champion_alias
    props = params.properties if prop == "all" else [prop]
    models = []
    for p in props:
        name = registered_name(params, p)
        if version is not None:
            try:
                mv = client.get_model_version(name, str(version))
            except MlflowException as exc:
                raise PredictError(f"{name} has no version {version}: {exc.message}") from exc
            label = f"{name} v{mv.version}"
        else:
            mv = get_version_by_alias(client, name, alias)
            if mv is None:
                if prop == "all":
                    continue
                raise PredictError(
                    f"{name} has no version with alias {alias!r}: run `mpprop promote "
                    f"--property {p}` (alias {params.mlflow.champion_alias!r}) or "
                    f"`mpprop import-pretrained` (alias {params.mlflow.pretrained_alias!r})"
                )
            label = f"{name}@{alias} v{mv.version}"
        models.append(_load_version(params, client, p, f"models:/{name}/{mv.version}", label,
                                    device))
    if not models:
        raise PredictError(f"no registered model has the alias {alias!r}")
    return models


def _load_version(params: Params, client: Any, prop: str, uri: str, label: str,
                  device: Any) -> RegisteredModel:
    """The bundle of the version at `uri` on `device` (behind the metal gate where its domain
    needs it). `uri` names the version by number, so the alias moving during the run cannot
    mix two models."""
    from mpprop.tracking import download_bundle  # imports MLflow: see resolve_models

    with tempfile.TemporaryDirectory() as tmp:
        try:
            loaded = load_model(download_bundle(uri, tmp), label).to(device)
        except BundleError as exc:
            # the model's URI, not the temp folder it was downloaded to
            raise PredictError(f"{label}: {str(exc).replace(tmp, uri)}") from exc
    # the published band-gap model knows non-metals only: its classifier decides metals
    if params.predict.xie_band_gap_metal_gate and loaded.domain == DOMAIN_NON_METALS:
        loaded = _with_metal_gate(params, client, loaded)
    return RegisteredModel(prop, uri, loaded)


def _with_metal_gate(params: Params, client: Any, model: LoadedModel) -> LoadedModel:
    """`model` behind the published metal classifier (registry.with_metal_gate)."""
    from mpprop.registry import RegistryError, with_metal_gate

    try:
        return with_metal_gate(params, client, model)
    except RegistryError as exc:
        raise PredictError(str(exc)) from exc


def _batches(rows: Iterable[InputRow], size: int) -> Iterator[list[InputRow]]:
    batch: list[InputRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class PredictSummary:
    n_inputs: int
    n_rows: int
    ok: dict[str, int]
    failed: dict[str, int]
    seconds: float
    output: Path

    def format(self) -> str:
        rate = self.n_inputs / max(self.seconds, 1e-9)
        parts = [f"{p}: {self.ok[p]} ok, {self.failed[p]} failed" for p in self.ok]
        return (
            f"{self.n_inputs} structures x {len(self.ok)} model(s) -> {self.n_rows} rows in "
            f"{self.seconds:.1f} s ({rate:.1f} structures/s); " + "; ".join(parts)
            + f" -> {self.output}"
        )


def run_prediction(
    models: list[RegisteredModel],
    inputs: list[Path],
    output: Path,
    batch_size: int,
    progress: bool = True,
    limits: StructureLimits = DEFAULT_LIMITS,
    coverage: float = DEFAULT_COVERAGE,
) -> PredictSummary:
    """Predict every input row with every model; write the CSV atomically (a temp file beside
    it, renamed over it at the end). Where the CSV may go: check_prediction_output.
    Intervals at `coverage` (predict.interval_coverage)."""
    sources = [open_source(p) for p in inputs]
    total = (
        sum(s.count for s in sources) if all(s.count is not None for s in sources) else None
    )
    rows: Iterator[InputRow] = (r for s in sources for r in s.rows)
    ok = {m.prop: 0 for m in models}
    failed = {m.prop: 0 for m in models}
    n_inputs = n_rows = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="predict", unit="struct", disable=not progress)
    try:
        with atomic_output(output) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=OUTPUT_COLUMNS)
            writer.writeheader()
            for batch in _batches(rows, batch_size):
                for row in predict_rows(models, batch, limits, coverage):
                    writer.writerow(row)
                    n_rows += 1
                    if row["error"]:
                        failed[row["property"]] += 1
                    else:
                        ok[row["property"]] += 1
                n_inputs += len(batch)
                bar.update(len(batch))
            if n_inputs == 0:
                # raised inside the block: no CSV is written
                raise PredictError("no structures in the input(s): " + ", ".join(map(str, inputs)))
    finally:
        bar.close()
    return PredictSummary(n_inputs, n_rows, ok, failed, time.perf_counter() - t0, output)


@dataclass
class EmbedSummary:
    n_inputs: int
    n_embedded: int
    dim: int
    output: Path
    ids_file: Path | None

    def format(self) -> str:
        where = f"{self.output}" + (f" (+ ids {self.ids_file})" if self.ids_file else "")
        return (f"{self.n_embedded} of {self.n_inputs} structures embedded "
                f"({self.dim} features, model.embed) -> {where}")


def run_embedding(model: RegisteredModel, inputs: list[Path], output: Path, batch_size: int,
                  progress: bool = True, limits: StructureLimits = DEFAULT_LIMITS,
                  ) -> EmbedSummary:
    """The crystal feature vectors of every readable input structure (the vector the
    output layer reads), as .npy (+ `<name>.ids.txt`, one id per row) or .parquet (id +
    one column per feature), each file written atomically. Structures that cannot be
    embedded (unreadable, outside `limits`) are left out and counted."""
    rows = [r for s in (open_source(p) for p in inputs) for r in s.rows]
    if not rows:
        raise PredictError("no structures in the input(s): " + ", ".join(map(str, inputs)))
    ids, chunks = [], []
    for batch in tqdm(list(_batches(rows, batch_size)), desc="embed", disable=not progress):
        cache, kept = graph_inputs([r.structure for r in batch], [r.error for r in batch],
                                   model.loaded.graph_settings, limits)
        if cache is not None:
            chunks.append(embed(model.loaded.model, cache, batch_size=batch_size))
            ids += [batch[i].id for i in kept]
    dim = model.loaded.model.hyperparams.h_fea_len
    matrix = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    ids_file = None
    if output.name.endswith(".parquet"):
        frame = pd.DataFrame(matrix, columns=[f"f{i}" for i in range(dim)])
        frame.insert(0, "id", ids)
        with atomic_output(output) as tmp:
            frame.to_parquet(tmp, index=False)
    else:
        ids_file = embedding_files(output)[1]
        with atomic_output(ids_file) as tmp:
            Path(tmp).write_text("".join(f"{i}\n" for i in ids))
        with atomic_output(output) as tmp, open(tmp, "wb") as fh:
            np.save(fh, matrix)
    return EmbedSummary(len(rows), len(ids), dim, output, ids_file)
