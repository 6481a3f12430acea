"""Batch prediction with registered models (`mpprop predict`).

Inputs, any mix of:
- a folder of structure files (CIF, POSCAR/CONTCAR/*.vasp, pymatgen-JSON), searched
  recursively; hidden files are skipped, every other file becomes a row (unsupported types
  with an error);
- a list file (.txt, one path per line; `#` comments and blank lines skipped);
- a single structure file;
- a snapshot: a folder written by `mpprop fetch` (snapshot.json + snapshot.npz), or JSON Lines
  (.jsonl / .jsonl.gz) of MP records with `material_id` and `structure`.

Every input row gives one output row per model: rows in = rows out. A row that cannot be
read or predicted carries its error and an empty prediction; it never stops the batch.
Each structure is parsed and checked once and featurized once per graph setting, then every
requested model runs on the same graphs (mpprop.inference); models are read from their
bundle files only (no MLflow model loading, no unpickling). Structures outside
predict.max_atoms / min_volume_per_atom / min_distance fail their row before any neighbour
search (inference.StructureLimits).

The output never destroys data (check_prediction_output, before any model is loaded): not an
input, a file an input list names, a path inside an input folder or the project's folders;
an existing file only if it is empty or an earlier prediction CSV, or with --overwrite.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from mpprop.bundle import BundleError, LoadedModel, load_model
from mpprop.config import Params, PropertySpec
from mpprop.data import inverse_transform, natural_unit
from mpprop.device import training_device
from mpprop.inference import (
    DEFAULT_LIMITS,
    Predictions,
    StructureLimits,
    embed,
    graph_inputs,
    parse_cif,
    predict_structures,
)
from mpprop.intervals import DEFAULT_COVERAGE
from mpprop.model import DOMAIN_NON_METALS
from mpprop.snapshot import atomic_output

# prediction, std (the spread of an ensemble's members, not an interval) and the calibrated
# interval lo..hi in model units (e.g. log10 GPa); value, value_lo..value_hi in natural units
# (GPa); interval_coverage: the coverage of lo..hi; interval_note: why a row has none
OUTPUT_COLUMNS = ("id", "property", "prediction", "model_unit", "std", "n_members", "lo", "hi",
                  "value", "value_lo", "value_hi", "value_unit", "interval_coverage",
                  "interval_note", "ood_score", "ood_threshold", "ood_flag", "ood_note",
                  "model", "error", "warning")
# columns of CSVs written by earlier versions (still recognised as prediction CSVs)
LEGACY_COLUMNS = ("unit",)
SIGNIFICANT_DIGITS = 4  # numbers in the CSV: model errors are far above the 4th digit
NO_OOD_REFERENCE = ("no OOD reference: the model's training materials are not known "
                    "(published checkpoints); ood_score cannot be computed")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
LIST_SUFFIXES = (".txt",)
CIF_SUFFIXES = (".cif",)
POSCAR_SUFFIXES = (".vasp", ".poscar")
POSCAR_PREFIXES = ("poscar", "contcar")
JSON_SUFFIXES = (".json",)


class PredictError(RuntimeError):
    """Prediction that cannot start (no model, no input)."""


class OutputRefused(PredictError):
    """An --output that could destroy data (an input, a project folder, another file)."""


@dataclass
class InputRow:
    id: str
    structure: Any = None  # pymatgen Structure, parsed once for every model
    error: str = ""


@dataclass
class Source:
    """One --input argument: how many rows it has (None: unknown) and its rows."""

    path: Path
    kind: str
    count: int | None
    rows: Iterable[InputRow] = field(repr=False, default=())


# ---------------------------------------------------------------- reading inputs


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def structure_file_kind(path: Path) -> str | None:
    """cif | poscar | json by file name; None for anything else."""
    name = path.name.lower()
    if name.endswith(CIF_SUFFIXES):
        return "cif"
    if name.endswith(POSCAR_SUFFIXES) or name.startswith(POSCAR_PREFIXES):
        return "poscar"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    return None


def read_structure_file(path: Path, row_id: str) -> list[InputRow]:
    """The rows of one structure file (one per data block of a CIF); any problem goes into
    a row's error."""
    from pymatgen.core import Structure

    kind = structure_file_kind(path)
    try:
        if kind is None:
            raise ValueError(
                f"unsupported file type {path.name!r} (expected CIF, POSCAR/CONTCAR/*.vasp "
                "or pymatgen JSON)"
            )
        text = path.read_text()
        if kind == "json":
            data = json.loads(text)
            # an MP record holds its structure under "structure"
            if isinstance(data, dict) and isinstance(data.get("structure"), dict):
                data = data["structure"]
            return [InputRow(row_id, Structure.from_dict(data))]
        if kind == "cif":
            return _cif_rows(text, row_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [InputRow(row_id, Structure.from_str(text, fmt=kind))]
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return [InputRow(row_id, error=_error_text(exc))]


def _cif_rows(text: str, row_id: str) -> list[InputRow]:
    """One row per data block (`file.cif#block` where there are several), each parsed on
    its own so one bad block does not hide the others."""
    from pymatgen.io.cif import CifFile

    blocks = CifFile.from_str(text).data
    rows = []
    for name, block in blocks.items():
        block_id = row_id if len(blocks) == 1 else f"{row_id}#{name}"
        try:
            # pymatgen's reason joins "no structures" (parse_cif)
            rows.append(InputRow(block_id, parse_cif(str(block))[0]))
        except Exception as exc:  # noqa: BLE001 - reported in the row
            rows.append(InputRow(block_id, error=_error_text(exc)))
    return rows or [InputRow(row_id, error="no CIF data block")]


def _folder_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _list_entries(list_file: Path) -> list[str]:
    lines = (line.strip() for line in list_file.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _listed_path(list_file: Path, entry: str) -> Path:
    """The file a list entry names: relative entries are relative to the list's folder."""
    p = Path(entry)
    return p if p.is_absolute() else list_file.parent / p


def _open_text(path: Path) -> Any:
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)


def _jsonl_rows(path: Path) -> Iterator[InputRow]:
    """One row per line; a file that cannot be read on (truncated or corrupt gzip, bytes
    that are not UTF-8) ends with one error row naming the file and line, and the batch
    goes on with the next input."""
    from pymatgen.core import Structure

    lineno = 0
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                row_id = f"{path.name}:{lineno}"
                try:
                    record = json.loads(line)
                    row_id = str(record.get("material_id") or row_id)
                    structure = record["structure"]
                    if not isinstance(structure, dict):
                        raise ValueError("`structure` is not a pymatgen Structure dict")
                    yield InputRow(row_id, Structure.from_dict(structure))
                except Exception as exc:  # noqa: BLE001 - reported in the row
                    yield InputRow(row_id, error=_error_text(exc))
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        yield InputRow(f"{path.name}:{lineno + 1}",
                       error=f"cannot read {path} after line {lineno}: {_error_text(exc)}")


def _snapshot_rows(folder: Path) -> tuple[int, Iterator[InputRow]]:
    from mpprop.snapshot import SnapshotError, load_snapshot

    try:
        snap, _ = load_snapshot(folder)  # checked against its SHA-256
    except SnapshotError as exc:
        raise PredictError(f"input {folder}: {exc}") from exc

    def rows() -> Iterator[InputRow]:
        for i, mid in enumerate(snap.material_id.tolist()):
            try:
                yield InputRow(str(mid), snap.structure(i))
            except Exception as exc:  # noqa: BLE001 - reported in the row
                yield InputRow(str(mid), error=_error_text(exc))

    return len(snap), rows()


def open_source(path: Path) -> Source:
    """Classify one --input path and prepare its rows."""
    from mpprop.snapshot import SNAPSHOT_META

    name = path.name.lower()
    if path.is_dir():
        if (path / SNAPSHOT_META).exists():
            n, rows = _snapshot_rows(path)
            return Source(path, "snapshot", n, rows)
        files = _folder_files(path)
        return Source(
            path, "folder", len(files),
            (r for f in files for r in read_structure_file(f, str(f.relative_to(path)))),
        )
    if not path.exists():
        raise PredictError(f"input not found: {path}" + (" (a dangling symlink)"
                                                         if path.is_symlink() else ""))
    if name.endswith(JSONL_SUFFIXES):
        return Source(path, "jsonl", None, _jsonl_rows(path))
    if name.endswith(LIST_SUFFIXES):
        entries = _list_entries(path)

        def listed() -> Iterator[InputRow]:
            for entry in entries:
                p = _listed_path(path, entry)
                if not p.is_file():
                    yield InputRow(entry, error=f"file not found: {p}")
                else:
                    yield from read_structure_file(p, entry)

        return Source(path, "list", len(entries), listed())
    return Source(path, "file", 1, read_structure_file(path, path.name))


# ---------------------------------------------------------------- where outputs may go


def is_prediction_csv(path: Path) -> bool:
    """Whether `path` starts with the header row of an mpprop prediction CSV: `id, property,
    prediction` first, then only prediction columns (this version's or an earlier one's,
    which had fewer)."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline(4096)
    except OSError:
        return False
    fields = first.decode("utf-8", "replace").strip().split(",")
    return (fields[:3] == ["id", "property", "prediction"]
            and set(fields) <= set(OUTPUT_COLUMNS) | set(LEGACY_COLUMNS))


def embedding_files(output: Path) -> list[Path]:
    """The files `run_embedding` writes for --output: X.parquet, or X.npy and X.ids.txt."""
    if output.name.endswith(".parquet"):
        return [output]
    return [output, output.with_name(output.name.removesuffix(".npy") + ".ids.txt")]


def is_embedding_file(path: Path) -> bool:
    """Whether `path` is what `mpprop embed` writes: a 2-D float32 .npy (and its .ids.txt
    beside it), or a parquet of `id, f0, f1, ...`."""
    name = path.name
    if name.endswith(".ids.txt"):
        # the ids of an embedding: replaceable together with the .npy they belong to
        return is_embedding_file(path.with_name(name.removesuffix(".ids.txt") + ".npy"))
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq  # what pandas writes parquet with

            names = pq.read_schema(path).names
            return names[:1] == ["id"] and names[1:] == [f"f{i}" for i in range(len(names) - 1)]
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(fh)
        return len(shape) == 2 and dtype == np.float32
    except Exception:  # noqa: BLE001 - anything unreadable is not an earlier embedding
        return False


def _local_store_path(params: Params, uri: str) -> Path | None:
    """The local file (sqlite) or folder (file: or a plain path) of an MLflow / Optuna store
    URI; None for a server or a remote store."""
    if uri.startswith("sqlite:///"):
        return params.path(uri[len("sqlite:///"):])
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return params.path(uri) if "://" not in uri and not uri.startswith("sqlite:") else None


def protected_paths(params: Params) -> list[tuple[str, Path]]:
    """(what, path) of the project's folders and stores that no --output may write into,
    even with --overwrite: what `mpprop` and DVC own (data, models, tracking, .dvc)."""
    root = params.root.resolve()
    out = [
        ("the project's snapshot folder (data.snapshot_dir)", params.snapshot_dir()),
        ("the project's graph cache (graph.cache_dir)", params.graph_cache_dir()),
        ("the project's split folder (split.dir)", params.split_dir()),
        ("the project's models folder (train.models_dir)", params.models_dir()),
        ("the project's DVC folder", params.root / ".dvc"),
    ]
    for _, folder in out[:3]:
        # the data folder that holds them (data/), where it is one inside the project
        parent = folder.resolve().parent
        if parent != root and parent.is_relative_to(root) and parent not in (p for _, p in out):
            out.append(("the project's data folder", parent))
    stores = [("the MLflow tracking store (mlflow.tracking_uri)", params.tracking_uri()),
              ("the MLflow artifact store (mlflow.artifact_location)",
               params.mlflow.artifact_location),
              ("the Optuna study store (tune.storage)", params.tune.storage)]
    for what, uri in stores:
        path = _local_store_path(params, uri)
        if path is None or "{" in str(path.parent):
            continue
        out.append((what, path))
        # a database file's own folder (mlruns/), where it is one inside the project
        parent = path.resolve().parent
        if uri.startswith("sqlite:") and parent != root and parent.is_relative_to(root):
            out.append((f"{what}'s folder", parent))
    return out


def _empty_file(path: Path) -> bool:
    # an empty file (mktemp's) holds nothing to lose
    return path.is_file() and not path.is_symlink() and path.stat().st_size == 0


def _same_file(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def _refuse_reason(params: Params, inputs: Sequence[Path], target: Path) -> str | None:
    """Why writing `target` would destroy an input or project data (None: it would not)."""
    # the file os.replace swaps out (a symlink itself) and the one the path leads to
    where = {target.parent.resolve() / target.name, target.resolve()}
    for src in inputs:
        resolved = src.resolve()
        if any(_same_file(w, resolved) for w in where):
            return f"is the input {src}"
        if src.is_dir() and any(w.is_relative_to(resolved) for w in where):
            return f"is inside the input folder {src}"
        if src.is_file() and src.name.lower().endswith(LIST_SUFFIXES):
            try:
                entries = _list_entries(src)
            except (OSError, UnicodeDecodeError):
                entries = []
            for entry in entries:
                listed = _listed_path(src, entry).resolve()
                if any(_same_file(w, listed) for w in where):
                    return f"is listed in the input list {src}"
    for what, path in protected_paths(params):
        resolved = path.resolve()
        if any(w == resolved or w.is_relative_to(resolved) for w in where):
            return f"is inside {what}, {path}"
    return None


def _check_outputs(params: Params, inputs: Sequence[Path], output: Path,
                   files: Sequence[Path], overwrite: bool,
                   is_previous: Callable[[Path], bool], previous: str) -> None:
    """OutputRefused where writing `files` (the files --output `output` stands for) could
    destroy data; see check_prediction_output."""
    for target in files:
        # a second file (embed's X.ids.txt) is named with the --output it comes from
        name = f"--output {output}" + ("" if target == output else f" would write {target},"
                                        " which")
        reason = _refuse_reason(params, inputs, target)
        if reason:
            raise OutputRefused(f"{name} {reason}: refused (even with --overwrite); write "
                                "elsewhere, e.g. predictions/")
        if os.path.lexists(target) and not (overwrite or _empty_file(target)
                                             or is_previous(target)):
            raise OutputRefused(f"{name} exists and is not {previous}; give --overwrite to "
                                "replace it, or another path")


def check_prediction_output(params: Params, inputs: Sequence[Path], output: Path,
                            overwrite: bool = False) -> None:
    """OutputRefused unless writing the prediction CSV `output` is safe: never an input, a
    file an input list names, a path inside an input folder or the project's folders
    (protected_paths); an existing file only if it is empty, an earlier prediction CSV (its
    header) or with `overwrite`. Called before any model is loaded: a refusal writes nothing."""
    _check_outputs(params, inputs, output, [output], overwrite, is_prediction_csv,
                   "an mpprop prediction CSV (header id,property,prediction,...)")


def check_embedding_output(params: Params, inputs: Sequence[Path], output: Path,
                           overwrite: bool = False) -> None:
    """check_prediction_output for `mpprop embed`: every file it writes (embedding_files),
    an existing one only if `mpprop embed` wrote it (is_embedding_file) or with `overwrite`."""
    _check_outputs(params, inputs, output, embedding_files(output), overwrite,
                   is_embedding_file,
                   "an mpprop embedding (.npy of float32 rows and its .ids.txt, or .parquet)")


# ---------------------------------------------------------------- models


@dataclass
class RegisteredModel:
    prop: str
    uri: str
    loaded: LoadedModel  # label, weights, normalizer, spec: read with load_bundle only

    @property
    def label(self) -> str:
        return self.loaded.label

    @property
    def spec(self) -> PropertySpec:
        return self.loaded.spec


def resolve_models(
    params: Params, prop: str, alias: str | None = None, version: int | None = None
) -> list[RegisteredModel]:
    """Load `<prefix><prop>@alias` (or version N); prop 'all' = every property with the alias.

    Only the bundle file of each version is downloaded and read (torch weights_only): no
    code or pickle from the model store runs. The models are put on `train.device`.
    """
    from mlflow.exceptions import MlflowException

    from mpprop.registry import get_version_by_alias, registered_name
    from mpprop.tracking import download_bundle, open_store

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
        # by version number, so the alias moving during the run cannot mix two models
        uri = f"models:/{name}/{mv.version}"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                loaded = load_model(download_bundle(uri, tmp), label).to(device)
            except BundleError as exc:
                # the model's URI, not the temp folder it was downloaded to
                raise PredictError(f"{label}: {str(exc).replace(tmp, uri)}") from exc
        # the published band-gap model knows non-metals only: its classifier decides metals
        if params.predict.xie_band_gap_metal_gate and loaded.domain == DOMAIN_NON_METALS:
            loaded = _with_metal_gate(params, client, loaded)
        models.append(RegisteredModel(p, uri, loaded))
    if not models:
        raise PredictError(f"no registered model has the alias {alias!r}")
    return models


def _with_metal_gate(params: Params, client: Any, model: LoadedModel) -> LoadedModel:
    """`model` behind the published metal classifier (registry.with_metal_gate)."""
    from mpprop.registry import RegistryError, with_metal_gate

    try:
        return with_metal_gate(params, client, model)
    except RegistryError as exc:
        raise PredictError(str(exc)) from exc


def _finite_or_none(x: float) -> float | None:
    """A finite number to SIGNIFICANT_DIGITS significant digits, else None (empty cell)."""
    return float(f"{float(x):.{SIGNIFICANT_DIGITS}g}") if np.isfinite(x) else None


def _ood_columns(model: RegisteredModel, score: float, flag: bool, ok: bool) -> dict[str, Any]:
    """The OOD score with the threshold it is compared with, and why there is none."""
    ood = model.loaded.ood
    if ood is None:
        return {"ood_score": None, "ood_threshold": None, "ood_flag": None,
                "ood_note": NO_OOD_REFERENCE if ok else ""}
    return {"ood_score": _finite_or_none(score) if ok else None,
            "ood_threshold": _finite_or_none(ood.threshold),
            "ood_flag": bool(flag) if ok and np.isfinite(score) else None, "ood_note": ""}


def _row_warning(structure_warning: str, ood: dict[str, Any]) -> str:
    """The structure's warning, and a word whenever the OOD flag is up."""
    parts = [structure_warning] if structure_warning else []
    if ood["ood_flag"]:
        parts.append(f"out of distribution: OOD score {ood['ood_score']} above "
                     f"{ood['ood_threshold']} (the 99th percentile of validation materials)")
    return "; ".join(parts)


def _interval_columns(out: Predictions, k: int, i: int, spec: PropertySpec, ok: bool
                      ) -> dict[str, Any]:
    """The interval columns of model k's row for structure i (empty on a failed row)."""
    lo, hi = out.lo[k][i], out.hi[k][i]
    has = ok and bool(np.isfinite(lo) and np.isfinite(hi))
    value_lo, value_hi = inverse_transform(np.array([lo, hi]), spec) if has else (None, None)
    return {"lo": _finite_or_none(lo) if has else None,
            "hi": _finite_or_none(hi) if has else None,
            "value_lo": _finite_or_none(value_lo) if has else None,
            "value_hi": _finite_or_none(value_hi) if has else None,
            "interval_coverage": out.interval_coverage[k] if has else None,
            "interval_note": out.interval_notes[k] if ok else ""}


def predict_rows(
    models: list[RegisteredModel], rows: list[InputRow],
    limits: StructureLimits = DEFAULT_LIMITS, coverage: float = DEFAULT_COVERAGE,
) -> list[dict[str, Any]]:
    """Output rows (one per input row and model, input order) for one batch: structures are
    checked (within `limits`) and featurized once per graph setting, whatever the number of
    models; calibrated intervals at `coverage` where a model has a calibration."""
    out = predict_structures([m.loaded for m in models], [r.structure for r in rows],
                             [r.error for r in rows], limits=limits, coverage=coverage)
    per_input: list[list[dict[str, Any]]] = [[] for _ in rows]
    for k, (model, preds) in enumerate(zip(models, out.values, strict=True)):
        values = inverse_transform(preds, model.spec)
        stds, scores, flags = out.stds[k], out.ood_scores[k], out.ood_flags[k]
        for i, r in enumerate(rows):
            error = out.errors[i]
            ok = not error and np.isfinite(preds[i])
            if not error and not ok:
                error = "model returned a non-finite prediction"
            ood = _ood_columns(model, scores[i], flags[i], ok)
            per_input[i].append(
                {
                    "id": r.id,
                    "property": model.prop,
                    "prediction": _finite_or_none(preds[i]) if ok else None,
                    "model_unit": model.spec.unit,
                    # the spread of an ensemble's members (not an interval: see lo/hi)
                    "std": _finite_or_none(stds[i]) if ok else None,
                    "n_members": model.loaded.n_members,
                    "value": _finite_or_none(values[i]) if ok else None,
                    "value_unit": natural_unit(model.spec),
                    **_interval_columns(out, k, i, model.spec, ok),
                    **ood,
                    "model": model.label,
                    "error": error,
                    "warning": _row_warning(out.warnings[i], ood) if ok else "",
                }
            )
    return [row for rows_of_input in per_input for row in rows_of_input]


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
