"""What `mpprop fetch` reads: a source record before validation, and the file sources.

A source is a re-iterable stream of candidate records (material id, structure, raw property
values); the fetch stage validates and counts them the same way whatever their source. The
file sources are a JSON Lines file (.jsonl / .jsonl.gz) with MP summary field names and a
CGCNN-style folder (`<id>.cif` files + `id_prop.csv`, one property); the MP API source is in
`mp_source`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

from mpprop.config import Params
from mpprop.settings import ConfigError, PropertySpec
from mpprop.snapshot import sha256_file

ENERGY_FIELD = "energy_per_atom"
# Files whose energy functional is documented elsewhere; the content hash identifies them.
KNOWN_FILE_FUNCTIONALS = {
    "16175b6a7937583c120b26212fcac61b5c5a207303c92a96e23cd4d15bb0ad4b": (
        "GGA/GGA+U (as supplied by the file; not checkable here; its README, "
        "../shared/data/README.md, says GGA/GGA+U MP thermo energies of May 2024)"
    ),
}


class FetchError(RuntimeError):
    """A fetch that cannot produce a trustworthy snapshot."""


class _WrongShape:
    """A dotted field whose parent is not a mapping (e.g. bulk_modulus given as a number)."""

    def __repr__(self) -> str:
        return "<wrong shape>"


_WRONG_SHAPE = _WrongShape()


@dataclass
class Candidate:
    """One source record before validation."""

    index: int  # position in source order
    material_id: Any
    structure: Any  # Structure.as_dict(), a CIF path, or None
    values: dict[str, Any]  # property key -> raw value as found (None = absent)
    unparsable: bool = False  # the record itself could not be read
    reason: str = "unparsable_record"  # why, for an unparsable record
    where: str | None = None  # "file:line" of a file record, for the examples


@dataclass
class Source:
    """A re-iterable stream of candidates (iterated again when a subsample needs it)."""

    iterate: Callable[[], Iterator[Candidate]]
    parse_structure: Callable[[Any], Structure]
    count: Callable[[], int]
    cheap_count: bool = False  # counting costs nothing (not a pass over a big file)


def dotted(doc: dict[str, Any], path: str) -> Any:
    """The value at a dotted field (`bulk_modulus.vrh`) of a record; None where absent."""
    node: Any = doc
    for part in path.split("."):
        if node is None:
            return None
        if not isinstance(node, dict):
            return _WRONG_SHAPE
        node = node.get(part)
    return node



# ---------------------------------------------------------------- file sources
def _open_text(path: Path) -> Any:
    # surrogateescape: a byte that is not UTF-8 becomes a lone surrogate in its line instead
    # of ending the whole read, so that line alone is counted (see _read_lines)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape")
    return open(path, encoding="utf-8", errors="surrogateescape")


def _read_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of the non-blank lines; text None for a line that is not UTF-8.

    A file that cannot be read to its end (not gzip although named .gz, a gzip stream cut
    short, corrupt compressed data, an I/O error) is a FetchError naming the file and how far
    it got: a snapshot of part of a file would look complete.
    """
    n_records, lineno = 0, 0
    try:
        with _open_text(path) as fh:  # streamed: one line in memory at a time
            for lineno, line in enumerate(fh, 1):  # noqa: B007 - lineno is used below
                if not line.strip():
                    continue
                n_records += 1
                try:
                    line.encode("utf-8")  # lone surrogates (escaped bad bytes) refuse this
                except UnicodeEncodeError:
                    yield lineno, None
                    continue
                yield lineno, line
    except EOFError as err:
        raise FetchError(
            f"{path}: the gzip stream ends early (truncated file?): {n_records} records read "
            f"before the end{_at_line(n_records, lineno)}; nothing written"
        ) from err
    except (OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        if isinstance(err, gzip.BadGzipFile) and lineno == 0:
            raise FetchError(f"{path}: not a gzip file ({err}); nothing written") from err
        what = "corrupt gzip data" if isinstance(err, gzip.BadGzipFile | zlib.error) else (
            "read error")
        raise FetchError(
            f"{path}: {what} ({err}) after {n_records} records"
            f"{_at_line(n_records, lineno)}; nothing written"
        ) from err


def _at_line(n_records: int, lineno: int) -> str:
    return f" (line {lineno})" if lineno != n_records else ""


def _jsonl_source(path: Path, specs: dict[str, PropertySpec]) -> Source:
    def iterate() -> Iterator[Candidate]:
        for index, (lineno, line) in enumerate(_read_lines(path)):
            where = f"{path.name}:{lineno}"
            if line is None:
                yield Candidate(index, None, None, {}, unparsable=True,
                                 reason="unreadable_line", where=where)
                continue
            try:
                rec = json.loads(line)
            except ValueError:  # also an integer literal beyond int() digit limits
                rec = None
            if not isinstance(rec, dict):
                yield Candidate(index, None, None, {}, unparsable=True, where=where)
            else:
                values = {k: dotted(rec, s.field) for k, s in specs.items()}
                yield Candidate(index, rec.get("material_id"), rec.get("structure"), values)

    def count() -> int:
        return sum(1 for _ in _read_lines(path))

    return Source(iterate, Structure.from_dict, count)


def _read_id_prop(folder: Path) -> list[list[str]]:
    path = folder / "id_prop.csv"
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [row for row in csv.reader(fh) if row and any(c.strip() for c in row)]
    except UnicodeDecodeError as err:
        raise FetchError(f"{path}: not UTF-8 text ({err}); nothing written") from err


def _csv_value(text: str | None) -> Any:
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        return text  # kept as text: counted as non_numeric


def _cgcnn_source(folder: Path, prop: str, props: list[str]) -> Source:
    def iterate() -> Iterator[Candidate]:
        for index, row in enumerate(_read_id_prop(folder)):
            mid = row[0].strip()
            cif = folder / f"{mid}.cif"
            values: dict[str, Any] = {p: None for p in props}
            values[prop] = _csv_value(row[1] if len(row) > 1 else None)
            yield Candidate(index, mid or None, cif if cif.is_file() else None, values)

    def parse(cif: Path) -> Structure:
        # primitive=False keeps the cell as written, as the original CGCNN reads it
        return Structure.from_str(cif.read_text(encoding="utf-8"), fmt="cif", primitive=False)

    return Source(iterate, parse, lambda: len(_read_id_prop(folder)), cheap_count=True)


def _cgcnn_sha256(folder: Path) -> str:
    """SHA-256 over id_prop.csv and the CIFs it names (name and bytes, in its order)."""
    h = hashlib.sha256()
    h.update((folder / "id_prop.csv").read_bytes())
    for row in _read_id_prop(folder):
        cif = folder / f"{row[0].strip()}.cif"
        h.update(cif.name.encode() + b"\0")
        h.update(cif.read_bytes() if cif.is_file() else b"<missing>")
    return h.hexdigest()


def list_source(cands: list[Candidate]) -> Source:
    """Candidates already in memory (the MP API's answer) as a source."""
    return Source(lambda: iter(cands), Structure.from_dict, lambda: len(cands), True)


def file_source(
    params: Params, specs: dict[str, PropertySpec]
) -> tuple[Source, list[str], dict[str, Any]]:
    """The source at params `data.path`, the properties it holds (a CGCNN folder has one) and
    its metadata (format, SHA-256, path, query, energy functional)."""
    data = params.data
    props = params.properties
    meta: dict[str, Any] = {}
    in_source = list(props)
    path = params.path(data.path).resolve()
    if path.is_dir():
        prop = data.cgcnn_property
        if prop not in props:
            raise ConfigError(
                f"data.cgcnn_property must be one of the properties ({', '.join(props)}), "
                f"not {prop!r}"
            )
        if not (path / "id_prop.csv").is_file():
            raise FetchError(f"{path} is a folder but has no id_prop.csv (CGCNN layout)")
        source = _cgcnn_source(path, prop, props)
        in_source = [prop]
        meta |= {"source_format": "cgcnn", "cgcnn_property": prop}
        meta["source_sha256"] = _cgcnn_sha256(path)
    elif path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz")):
        source = _jsonl_source(path, specs)
        meta["source_format"] = "jsonl"
        meta["source_sha256"] = sha256_file(path)
    elif not path.exists():
        raise FetchError(f"data.path does not exist: {path}")
    else:
        raise FetchError(
            f"data.path must be a .jsonl / .jsonl.gz file or a CGCNN folder, not {path}"
        )
    meta["source_path"] = str(path)
    meta["query"] = {"path": data.path}
    if ENERGY_FIELD in [specs[p].field for p in in_source]:
        meta["energy_per_atom_functional"] = KNOWN_FILE_FUNCTIONALS.get(
            meta["source_sha256"],
            f"as supplied by the file {path.name} (not checkable for a file source)",
        )
    else:
        meta["energy_per_atom_functional"] = None
    return source, in_source, meta
