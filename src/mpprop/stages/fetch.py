"""`mpprop fetch`: build a dated MP snapshot from a file or from the MP API.

Sources (params `data.source`):
- `file`: a JSON Lines file (.jsonl / .jsonl.gz) with MP summary field names, or a
  CGCNN-style folder (`<id>.cif` files + `id_prop.csv`, one property).
- `mp-api`: the Materials Project REST API through the real `mp_api` client. The
  "final energy" target comes from thermo documents of one functional, never from the
  summary `energy_per_atom`, which mixes GGA/GGA+U and r2SCAN energies (DESIGN.md §4).

Every record is validated the same way whatever its source; a record or a label that is
left out is counted by reason and reported (metadata `excluded`), never dropped silently.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import math
import os
import re
import sys
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from pymatgen.core import Structure
from tqdm import tqdm

from mpprop.config import ConfigError, Params, PropertySpec
from mpprop.graph_cache import known_elements
from mpprop.snapshot import Snapshot, save_snapshot, sha256_file, structure_problem

log = logging.getLogger(__name__)

# record-level reasons (the whole record is left out), in report order
RECORD_REASONS = (
    "unreadable_line",  # not UTF-8 text: the example says file:line
    "unparsable_record",
    "missing_material_id",
    "duplicate_material_id",
    "missing_structure",
    "unparsable_structure",
    "no_sites",
    "disordered_sites",
    "unsupported_species",
    "unsupported_element",  # no CGCNN atom features (elements 101-118)
    "invalid_geometry",
    "lacks_required_property",  # data.require_property is set and the record has no value
)
# label-level reasons (only that property's label is set to NaN)
LABEL_REASONS = ("missing", "non_numeric", "non_finite", "non_positive_for_log10")
MAX_EXAMPLES = 10  # ids kept per record-exclusion reason, so a report can be checked by hand

ENERGY_FIELD = "energy_per_atom"
# Files whose energy functional is documented elsewhere; the content hash identifies them.
KNOWN_FILE_FUNCTIONALS = {
    "16175b6a7937583c120b26212fcac61b5c5a207303c92a96e23cd4d15bb0ad4b": (
        "GGA/GGA+U (as supplied by the file; not checkable here; its README, "
        "../shared/data/README.md, says GGA/GGA+U MP thermo energies of May 2024)"
    ),
}
# search() arguments that fetch sets itself; criteria must not override them
RESERVED_CRITERIA = {"fields", "all_fields", "num_chunks", "chunk_size"}
# HTTP answers worth retrying: the client's own list (429, 502, 504) plus 503, which MP's
# gateway gives while it is overloaded or restarting; urllib3 sleeps
# backoff * 2**(retry - 1) between tries (none before the first), or what Retry-After says
MP_API_RETRY_STATUSES = (429, 502, 503, 504)
MP_API_MAX_RETRIES = 4
MP_API_BACKOFF_FACTOR = 0.5  # seconds; tests make it small
# an `x-api-key` header as an error body may echo it (a proxy or a server that reflects the
# request): `x-api-key: VALUE`, `'x-api-key': 'VALUE'`, `"X-API-KEY":"VALUE"`
_API_KEY_HEADER = re.compile(r"""(x-api-key['"]?\s*[:=]\s*['"]?)[^'"\s,;}]+""", re.IGNORECASE)
MASK = "***"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class FetchError(RuntimeError):
    """A fetch that cannot produce a trustworthy snapshot."""


class _WrongShape:
    """A dotted field whose parent is not a mapping (e.g. bulk_modulus given as a number)."""

    def __repr__(self) -> str:
        return "<wrong shape>"


_WRONG_SHAPE = _WrongShape()


@dataclass
class _Candidate:
    """One source record before validation."""

    index: int  # position in source order
    material_id: Any
    structure: Any  # Structure.as_dict(), a CIF path, or None
    values: dict[str, Any]  # property key -> raw value as found (None = absent)
    unparsable: bool = False  # the record itself could not be read
    reason: str = "unparsable_record"  # why, for an unparsable record
    where: str | None = None  # "file:line" of a file record, for the examples


@dataclass
class _Source:
    """A re-iterable stream of candidates (iterated again when a subsample needs it)."""

    iterate: Callable[[], Iterator[_Candidate]]
    parse_structure: Callable[[Any], Structure]
    count: Callable[[], int]
    cheap_count: bool = False  # counting costs nothing (not a pass over a big file)


# a validated structure as (lattice (3,3), atomic numbers (n,), fractional coords (n,3)):
# kept as arrays, not Structure objects, which take several times the memory
_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class _Collected:
    material_ids: list[str]
    structures: list[_Arrays]
    raw_values: list[dict[str, Any]]
    excluded: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    n_examined: int = 0
    subsample: dict[str, Any] | None = None


# ---------------------------------------------------------------- value helpers
def _dotted(doc: dict[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        if node is None:
            return None
        if not isinstance(node, dict):
            return _WRONG_SHAPE
        node = node.get(part)
    return node


def _label(value: Any, spec: PropertySpec) -> tuple[float, str | None]:
    """A raw value as a float label, or NaN and the reason it is not usable."""
    if value is None:
        return math.nan, "missing"
    # bool is an int subclass; a True/False label is a data error, not 1/0
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan, "non_numeric"
    try:
        v = float(value)
    except OverflowError:  # an integer literal beyond float range (json gives an int)
        return math.nan, "non_finite"
    if not math.isfinite(v):
        return math.nan, "non_finite"
    if spec.transform == "log10" and v <= 0:
        return math.nan, "non_positive_for_log10"
    return v, None


def _check_structure(
    parse: Callable[[Any], Structure], raw: Any
) -> tuple[Structure | None, str | None]:
    if raw is None:
        return None, "missing_structure"
    # Structure.from_dict refuses empty site lists with a generic error; name the cause
    if isinstance(raw, dict) and isinstance(raw.get("sites"), list) and not raw["sites"]:
        return None, "no_sites"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen's CIF warnings would flood the CLI
            s = parse(raw)
    except Exception:  # any malformed input is a counted exclusion, not a crash
        return None, "unparsable_structure"
    problem = structure_problem(s)
    return (None, problem) if problem else (s, None)


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


def _jsonl_source(path: Path, specs: dict[str, PropertySpec]) -> _Source:
    def iterate() -> Iterator[_Candidate]:
        for index, (lineno, line) in enumerate(_read_lines(path)):
            where = f"{path.name}:{lineno}"
            if line is None:
                yield _Candidate(index, None, None, {}, unparsable=True,
                                 reason="unreadable_line", where=where)
                continue
            try:
                rec = json.loads(line)
            except ValueError:  # also an integer literal beyond int() digit limits
                rec = None
            if not isinstance(rec, dict):
                yield _Candidate(index, None, None, {}, unparsable=True, where=where)
            else:
                values = {k: _dotted(rec, s.field) for k, s in specs.items()}
                yield _Candidate(index, rec.get("material_id"), rec.get("structure"), values)

    def count() -> int:
        return sum(1 for _ in _read_lines(path))

    return _Source(iterate, Structure.from_dict, count)


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


def _cgcnn_source(folder: Path, prop: str, props: list[str]) -> _Source:
    def iterate() -> Iterator[_Candidate]:
        for index, row in enumerate(_read_id_prop(folder)):
            mid = row[0].strip()
            cif = folder / f"{mid}.cif"
            values: dict[str, Any] = {p: None for p in props}
            values[prop] = _csv_value(row[1] if len(row) > 1 else None)
            yield _Candidate(index, mid or None, cif if cif.is_file() else None, values)

    def parse(cif: Path) -> Structure:
        # primitive=False keeps the cell as written, as the original CGCNN reads it
        return Structure.from_str(cif.read_text(encoding="utf-8"), fmt="cif", primitive=False)

    return _Source(iterate, parse, lambda: len(_read_id_prop(folder)), cheap_count=True)


def _cgcnn_sha256(folder: Path) -> str:
    """SHA-256 over id_prop.csv and the CIFs it names (name and bytes, in its order)."""
    h = hashlib.sha256()
    h.update((folder / "id_prop.csv").read_bytes())
    for row in _read_id_prop(folder):
        cif = folder / f"{row[0].strip()}.cif"
        h.update(cif.name.encode() + b"\0")
        h.update(cif.read_bytes() if cif.is_file() else b"<missing>")
    return h.hexdigest()


# ---------------------------------------------------------------- collection
def _collect(
    source: _Source, max_records: int | None, seed: int, progress: bool,
    require: str | None = None,
) -> _Collected:
    """Validate candidates; with max_records, keep the first N valid ones of a seeded shuffle.

    With `require`, records without a value for that property are left out (and counted),
    e.g. an elastic-only snapshot instead of the whole database.

    Duplicates are judged over the whole source in its order (keep first), so the same
    record is kept whether or not a subsample is drawn. With a subsample only the candidates
    whose shuffled rank falls in the examined window are parsed; a window that yields too
    few valid records is followed by the next one.
    """
    rank: np.ndarray | None = None
    n_total: int | None = None
    if max_records is not None or source.cheap_count:
        n_total = source.count()
    if max_records is not None and n_total is not None and max_records < n_total:
        perm = np.random.default_rng(seed).permutation(n_total)
        rank = np.empty(n_total, dtype=np.int64)
        rank[perm] = np.arange(n_total)
    out = _Collected([], [], [])
    valid: list[tuple[int, int, str, _Arrays, dict[str, Any]]] = []
    known = np.zeros(256, dtype=bool)  # atomic numbers with CGCNN atom features
    known[known_elements()] = True
    lo, hi = 0, (max_records if rank is not None else None)

    def exclude(reason: str, example: str) -> None:
        out.excluded[reason] += 1
        ex = out.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(example)

    while True:
        seen: set[str] = set()
        bar = tqdm(
            source.iterate(), total=n_total, desc="fetch: records", unit="rec",
            disable=not progress, leave=False,
        )
        for cand in bar:
            r = int(rank[cand.index]) if rank is not None else cand.index
            in_window = hi is None or lo <= r < hi
            if cand.unparsable:
                if in_window:
                    out.n_examined += 1
                    exclude(cand.reason, cand.where or f"#{cand.index}")
                continue
            mid = None if cand.material_id is None else str(cand.material_id).strip() or None
            if mid is not None and mid not in seen:
                seen.add(mid)
                first = True
            else:
                first = False
            if not in_window:
                continue
            out.n_examined += 1
            if mid is None:
                exclude("missing_material_id", f"#{cand.index}")
                continue
            if not first:
                exclude("duplicate_material_id", mid)
                continue
            if require is not None and cand.values.get(require) is None:
                exclude("lacks_required_property", mid)
                continue
            structure, reason = _check_structure(source.parse_structure, cand.structure)
            if reason is not None:
                exclude(reason, mid)
                continue
            assert structure is not None
            z = np.array([sp.Z for sp in structure.species], dtype=np.int16)
            if not known[z].all():  # featurize could not make its graph
                exclude("unsupported_element", mid)
                continue
            arrays = (
                np.array(structure.lattice.matrix, dtype=np.float64),
                z,
                np.array(structure.frac_coords, dtype=np.float64),
            )
            valid.append((r, cand.index, mid, arrays, cand.values))
        bar.close()
        if rank is None or hi is None or n_total is None:
            break
        assert max_records is not None
        if len(valid) >= max_records or hi >= n_total:
            break
        # next window sized from the valid fraction so far, with a margin
        short = max_records - len(valid)
        frac = max(len(valid), 1) / max(hi, 1)
        lo, hi = hi, min(n_total, hi + int(math.ceil(short / frac * 1.2)) + 16)

    if rank is not None and max_records is not None:
        valid.sort(key=lambda t: t[0])
        valid = valid[:max_records]
    valid.sort(key=lambda t: t[1])  # the snapshot keeps source order
    for _, _, mid, s, values in valid:
        out.material_ids.append(mid)
        out.structures.append(s)
        out.raw_values.append(values)
    if max_records is not None:
        out.subsample = {
            "max_records": max_records,
            "seed": seed,
            "n_available": n_total,
            "n_examined": out.n_examined,
            "applied": rank is not None,
        }
    return out


def _labels(
    collected: _Collected, props: list[str], specs: dict[str, PropertySpec],
    in_source: list[str],
) -> tuple[np.ndarray, dict[str, int], dict[str, dict[str, int]]]:
    labels = np.full((len(collected.material_ids), len(props)), np.nan)
    per_prop: dict[str, Counter] = {p: Counter() for p in props}
    for i, values in enumerate(collected.raw_values):
        for j, p in enumerate(props):
            if p not in in_source:
                continue  # a CGCNN folder has one property; the others are not "excluded"
            labels[i, j], reason = _label(values.get(p), specs[p])
            if reason is not None:
                per_prop[p][reason] += 1
    counts = {p: int(np.isfinite(labels[:, j]).sum()) for j, p in enumerate(props)}
    excluded = {
        p: {r: c[r] for r in LABEL_REASONS if c[r]} for p, c in per_prop.items()
    }
    return labels, counts, excluded


# ---------------------------------------------------------------- MP API
def _mp_api_retry(connect: bool = True) -> Any:
    """urllib3 Retry as mp_api's own session has (MPRester._create_session), plus 503."""
    from urllib3.util.retry import Retry

    n = MP_API_MAX_RETRIES
    return Retry(
        total=n,
        connect=n if connect else 0,
        read=n if connect else 0,
        status=n,
        respect_retry_after_header=True,
        status_forcelist=MP_API_RETRY_STATUSES,
        backoff_factor=MP_API_BACKOFF_FACTOR,
    )


def _retry_busy_answers(session: Any) -> None:
    """Make a requests session retry MP_API_RETRY_STATUSES, with backoff.

    mp_api's session retries 429/502/504 only, so one 503 from a busy gateway ended a fetch.
    """
    from requests.adapters import HTTPAdapter

    adapter = HTTPAdapter(max_retries=_mp_api_retry())
    session.mount("http://", adapter)
    session.mount("https://", adapter)


def _probe_heartbeat(endpoint: str | None) -> None:
    """GET <endpoint>/heartbeat until it is not a busy answer (MP_API_RETRY_STATUSES).

    MPRester's constructor reads the heartbeat with a plain requests.get, without retries, and
    a 503 there ends in a KeyError; once this probe has had an answer, that read is likely
    to get one too. Connection errors are not retried here (they are not a busy server).
    """
    import requests
    from mp_api.client.core.utils import validate_endpoint
    from requests.adapters import HTTPAdapter

    with requests.Session() as session:
        adapter = HTTPAdapter(max_retries=_mp_api_retry(connect=False))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.get(validate_endpoint(endpoint) + "heartbeat", timeout=60).close()


def mask_api_key(text: str, api_key: str | None) -> str:
    """`text` with the MP API key, and any `x-api-key` header value, replaced by ***: what
    fetch prints or raises never shows the key (an MP error body is quoted verbatim)."""
    if api_key:
        text = text.replace(api_key, MASK)
    return _API_KEY_HEADER.sub(lambda m: m.group(1) + MASK, text)


def warn_if_insecure(endpoint: str | None) -> None:
    """One line on stderr where MP_API_ENDPOINT is not https and not this machine: the key
    travels in a request header, readable on the way."""
    if not endpoint:
        return
    url = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    if url.scheme != "https" and (url.hostname or "") not in LOCAL_HOSTS:
        print(f"warning: MP_API_ENDPOINT {mask_api_key(endpoint, None)} is not https: the "
              "MP API key is sent unencrypted", file=sys.stderr)


def _query_mp_api(
    api_key: str,
    endpoint: str | None,
    criteria: dict[str, Any],
    fields: list[str],
    chunk: int,
    thermo_type: str | None,
    progress: bool,
) -> tuple[str | None, str, list[dict[str, Any]], dict[str, Any], int]:
    """Summary docs, and energies of one thermo type (if asked), via the real MPRester."""
    from mp_api.client import MPRester

    # a finite num_chunks keeps the client on the REST path even if the criteria reduce to
    # no query parameter (it would otherwise switch to S3); the limit is never reached
    no_s3 = 10**9
    energies: dict[str, Any] = {}
    n_thermo = 0
    _probe_heartbeat(endpoint)
    try:
        mpr = MPRester(
            api_key=api_key,
            endpoint=endpoint,
            use_document_model=False,  # raw dicts: validation and counting are ours
            mute_progress_bars=not progress,
        )
    except KeyError as err:  # a heartbeat answer without version / db_version
        raise FetchError(f"unexpected MP API heartbeat answer: no {err} in it") from err
    _retry_busy_answers(mpr.session)  # shared by all its sub-resters
    with mpr:
        # db_version comes from GET <endpoint>/heartbeat on construction
        # (get_database_version() is a deprecated alias of this attribute)
        db_version = mpr.db_version or None
        used_endpoint = mpr.endpoint
        docs = mpr.materials.summary.search(
            **criteria, fields=fields, chunk_size=chunk, num_chunks=no_s3
        )
        ids = list(dict.fromkeys(str(d["material_id"]) for d in docs if d.get("material_id")))
        for start in range(0, len(ids), chunk) if thermo_type else ():
            tdocs = mpr.materials.thermo.search(
                material_ids=ids[start : start + chunk],
                thermo_types=[thermo_type],
                fields=["material_id", "energy_per_atom", "thermo_type"],
                chunk_size=chunk,
                num_chunks=no_s3,
            )
            for t in tdocs:
                n_thermo += 1
                ttype = str(getattr(t.get("thermo_type"), "value", t.get("thermo_type")))
                if ttype != thermo_type:
                    raise FetchError(
                        f"the API returned a {ttype} thermo document for {t.get('material_id')}"
                        f" although {thermo_type} was requested; refusing to mix functionals"
                    )
                mid = str(t["material_id"])
                if mid in energies and energies[mid] != t.get("energy_per_atom"):
                    raise FetchError(f"two different {thermo_type} energies for {mid}")
                energies[mid] = t.get("energy_per_atom")
    return db_version, used_endpoint, docs, energies, n_thermo


def _query_masked(api_key: str, endpoint: str | None, *args: Any
                  ) -> tuple[str | None, str, list[dict[str, Any]], dict[str, Any], int]:
    """_query_mp_api, any of its errors a FetchError in one line with the key masked."""
    # imported here: the client takes seconds to import and only this path needs it
    from mp_api.client.core.exceptions import MPRestError
    from requests.exceptions import RequestException

    try:
        return _query_mp_api(api_key, endpoint, *args)
    except Exception as err:  # noqa: BLE001 - any error of the client: one masked message
        where = endpoint or "the default MP endpoint"
        text = (str(err) if isinstance(err, FetchError) else
                f"MP API query failed ({where}): {err}" if isinstance(
                    err, MPRestError | RequestException) else
                f"MP API query failed ({where}): {type(err).__name__}: {err}")
        # one line (mp_api puts the server's answer on a line of its own); `from None`: a
        # traceback of the cause would show the unmasked text again
        raise FetchError(mask_api_key(" ".join(text.split()), api_key)) from None


def _mp_api_candidates(
    params: Params, specs: dict[str, PropertySpec], props: list[str], progress: bool
) -> tuple[list[_Candidate], dict[str, Any]]:
    mp = params.data.mp_api
    criteria = dict(mp.criteria)
    if not any(not str(k).startswith("_") and v is not None for k, v in criteria.items()):
        raise FetchError(
            "data.mp_api.criteria is empty. Without search criteria the mp_api client does "
            "not query the REST API but downloads the whole collection from MP's S3 object "
            "store (delta tables), which this machine cannot reach and which bypasses the "
            "query recorded in the snapshot metadata. Give criteria accepted by "
            "MPRester().materials.summary.search, e.g. "
            "criteria: {material_ids: [mp-149, mp-13]} or {elements: [Si], num_elements: [1, 2]}."
        )
    if bad := RESERVED_CRITERIA & set(criteria):
        raise FetchError(f"data.mp_api.criteria must not set {sorted(bad)}: fetch sets them")
    api_key = os.environ.get("MP_API_KEY")
    if not api_key:
        raise FetchError("source mp-api needs an API key in the environment variable MP_API_KEY")
    # mp_api reads MP_API_ENDPOINT once, when its settings module is first imported; passing
    # it explicitly makes a value set later (tests, notebooks) count as well
    endpoint = os.environ.get("MP_API_ENDPOINT") or None
    warn_if_insecure(endpoint)
    chunk = mp.chunk_size
    thermo_type = mp.energy_thermo_type
    energy_props = [p for p in props if specs[p].field == ENERGY_FIELD]
    # summary fields: top-level names; energy_per_atom is not asked for (see module doc)
    fields = ["material_id", "structure"]
    for p in props:
        top = specs[p].field.split(".", 1)[0]
        if specs[p].field != ENERGY_FIELD and top not in fields:
            fields.append(top)
    db_version, used_endpoint, docs, energies, n_thermo = _query_masked(
        api_key, endpoint, criteria, fields, chunk, thermo_type if energy_props else None,
        progress,
    )
    cands = []
    for i, d in enumerate(docs):
        values = {p: _dotted(d, specs[p].field) for p in props if p not in energy_props}
        mid = d.get("material_id")
        for p in energy_props:
            values[p] = energies.get(str(mid)) if mid is not None else None
        cands.append(_Candidate(i, mid, d.get("structure"), values))
    info = {
        "endpoint": used_endpoint,
        "database_version": db_version,
        "query": {
            "criteria": criteria,
            "summary_fields": fields,
            "energy_thermo_types": [thermo_type] if energy_props else [],
        },
        "energy_per_atom_functional": (
            f"{thermo_type} (MP materials/thermo documents of this type; the summary "
            "energy_per_atom, which mixes functionals, is not used)"
            if energy_props
            else None
        ),
        "mp_api": {
            "n_summary_docs": len(docs),
            "n_thermo_docs": n_thermo,
            "n_with_thermo_energy": sum(1 for v in energies.values() if v is not None),
            "chunk_size": chunk,
        },
    }
    return cands, info


def _list_source(cands: list[_Candidate]) -> _Source:
    return _Source(lambda: iter(cands), Structure.from_dict, lambda: len(cands), True)


def _build_snapshot(collected: _Collected, labels: np.ndarray, props: list[str]) -> Snapshot:
    """The same arrays as Snapshot.from_structures, from arrays instead of Structures."""
    lat, z, frac = zip(*collected.structures, strict=True)
    offsets = np.zeros(len(z) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in z], out=offsets[1:])
    return Snapshot(
        material_id=np.asarray(collected.material_ids, dtype=str),
        lattice=np.stack(lat),
        site_offsets=offsets,
        atomic_numbers=np.concatenate(z).astype(np.int16),
        frac_coords=np.concatenate(frac).astype(np.float64),
        labels=labels,
        property_names=list(props),
    )


# ---------------------------------------------------------------- public API
def fetch_snapshot(params: Params, out_dir: Path | None = None, progress: bool = True) -> dict:
    """Build the snapshot named by params `data` and write it; returns the metadata written."""
    data = params.data
    props = params.properties
    specs = {p: params.property_spec(p) for p in props}
    source_kind = data.source  # max_records, source, require_property: checked at load
    max_records = data.max_records
    seed = data.subsample_seed
    now = datetime.now(UTC)
    meta: dict[str, Any] = {
        "snapshot_date": now.date().isoformat(),
        "created_at": now.isoformat(timespec="seconds"),
        "source": source_kind,
        "properties": props,
        "property_fields": {p: specs[p].field for p in props},
        "database_version": None,
        # the data's own date (the day it was read is snapshot_date): from params for a file
        "data_vintage": data.vintage,
    }
    in_source = list(props)

    if source_kind == "file":
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
    else:  # mp-api
        cands, info = _mp_api_candidates(params, specs, props, progress)
        source = _list_source(cands)
        meta |= info

    require = data.require_property
    collected = _collect(source, max_records, seed, progress, require)
    labels, counts, label_excl = _labels(collected, props, specs, in_source)
    meta["counts"] = counts
    meta["excluded"] = {
        "records": {r: collected.excluded[r] for r in RECORD_REASONS if collected.excluded[r]},
        "per_property": label_excl,
    }
    meta["excluded_examples"] = collected.examples
    meta["n_examined"] = collected.n_examined
    meta["subsample"] = collected.subsample
    meta["require_property"] = require
    if not collected.material_ids:
        raise FetchError("no valid records; nothing written\n" + format_fetch_summary(meta))
    snapshot = _build_snapshot(collected, labels, props)
    written = save_snapshot(snapshot, out_dir or params.snapshot_dir(), meta)
    log.info("snapshot written: %d records", written["n_records"])
    return written


def format_fetch_summary(meta: dict) -> str:
    """Human-readable report of a fetch: labels per property and exclusions by reason."""
    src = meta.get("source")
    where = meta.get("source_path") or meta.get("endpoint") or "?"
    n = meta.get("n_records")
    lines = [
        f"snapshot {meta.get('snapshot_date', '?')}: "
        f"{n if n is not None else '?'} records from {src} {where}",
    ]
    if meta.get("database_version"):
        lines.append(f"MP database version: {meta['database_version']}")
    if meta.get("source_sha256"):
        lines.append(f"source sha256: {meta['source_sha256']}")
    if meta.get("energy_per_atom_functional"):
        lines.append(f"energy_per_atom functional: {meta['energy_per_atom_functional']}")
    sub = meta.get("subsample")
    if sub and sub.get("applied"):
        lines.append(
            f"subsample: {sub['max_records']} of {sub['n_available']} records "
            f"(seed {sub['seed']}, {sub['n_examined']} examined)"
        )
    excluded = meta.get("excluded") or {}
    per_prop = excluded.get("per_property") or {}
    counts = meta.get("counts") or {}
    width = max([len(p) for p in counts] + [8])
    lines.append("labels per property:")
    for p, c in counts.items():
        why = per_prop.get(p) or {}
        detail = ", ".join(f"{r} {k:,}" for r, k in why.items())
        lines.append(f"  {p:<{width}}  {c:>8,}" + (f"   excluded: {detail}" if detail else ""))
    records = excluded.get("records") or {}
    total = sum(records.values())
    if total:
        lines.append(f"records excluded: {total:,}")
        examples = meta.get("excluded_examples") or {}
        for r, k in records.items():
            ex = examples.get(r) or []
            shown = f"  (e.g. {', '.join(ex[:3])})" if ex else ""
            lines.append(f"  {r:<{width}}  {k:>8,}{shown}")
    else:
        lines.append("records excluded: none")
    return "\n".join(lines)
