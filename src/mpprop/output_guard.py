"""Where the outputs of `mpprop predict` and `mpprop embed` may go.

The output never destroys data (checked before any model is loaded): not an input, a file an
input list names, a path inside an input folder or the project's folders; an existing file
only if it is empty or an earlier prediction CSV (or embedding), or with --overwrite.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mpprop.config import Params
from mpprop.predict_inputs import LIST_SUFFIXES, PredictError, list_entries, listed_path
from mpprop.prediction_csv import is_prediction_csv


class OutputRefused(PredictError):
    """An --output that could destroy data (an input, a project folder, another file)."""


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
                entries = list_entries(src)
            except (OSError, UnicodeDecodeError):
                entries = []
            for entry in entries:
                listed = listed_path(src, entry).resolve()
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

