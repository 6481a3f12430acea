"""What `mpprop predict` and `mpprop embed` read: structures from any mix of inputs.

- a folder of structure files (CIF, POSCAR/CONTCAR/*.vasp, pymatgen-JSON), searched
  recursively; hidden files are skipped, every other file becomes a row (unsupported types
  with an error);
- a list file (.txt, one path per line; `#` comments and blank lines skipped);
- a single structure file;
- a snapshot: a folder written by `mpprop fetch` (snapshot.json + snapshot.npz), or JSON Lines
  (.jsonl / .jsonl.gz) of MP records with `material_id` and `structure`.

A row that cannot be read carries its error; it never stops the batch.
"""

from __future__ import annotations

import gzip
import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpprop.inference import parse_cif

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
LIST_SUFFIXES = (".txt",)
CIF_SUFFIXES = (".cif",)
POSCAR_SUFFIXES = (".vasp", ".poscar")
POSCAR_PREFIXES = ("poscar", "contcar")
JSON_SUFFIXES = (".json",)


class PredictError(RuntimeError):
    """Prediction that cannot start (no model, no input)."""


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


def list_entries(list_file: Path) -> list[str]:
    lines = (line.strip() for line in list_file.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def listed_path(list_file: Path, entry: str) -> Path:
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
        entries = list_entries(path)

        def listed() -> Iterator[InputRow]:
            for entry in entries:
                p = listed_path(path, entry)
                if not p.is_file():
                    yield InputRow(entry, error=f"file not found: {p}")
                else:
                    yield from read_structure_file(p, entry)

        return Source(path, "list", len(entries), listed())
    return Source(path, "file", 1, read_structure_file(path, path.name))

