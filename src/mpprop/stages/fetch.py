"""`mpprop fetch`: build a dated MP snapshot from a file or from the MP API.

Sources (params `data.source`): `file` (a JSON Lines file or a CGCNN-style folder,
`mpprop.sources`) and `mp-api` (the Materials Project REST API, `mpprop.mp_source`).

Every record is validated the same way whatever its source; a record or a label that is
left out is counted by reason and reported (metadata `excluded`), never dropped silently.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure
from tqdm import tqdm

from mpprop.config import Params
from mpprop.graph_cache import known_elements
from mpprop.mp_source import mp_api_candidates
from mpprop.settings import PropertySpec
from mpprop.snapshot import Snapshot, save_snapshot, structure_problem
from mpprop.sources import Candidate, FetchError, Source, file_source, list_source

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


# ---------------------------------------------------------------- collection
def _collect(
    source: Source, max_records: int | None, seed: int, progress: bool,
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
    rank, n_total = _subsample_ranks(source, max_records, seed)
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
            arrays, reason = _validate(cand, source.parse_structure, known, require)
            if reason is not None:
                exclude(reason, mid)
                continue
            assert arrays is not None
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

    _keep(out, valid, max_records if rank is not None else None)
    if max_records is not None:
        out.subsample = {
            "max_records": max_records,
            "seed": seed,
            "n_available": n_total,
            "n_examined": out.n_examined,
            "applied": rank is not None,
        }
    return out


def _subsample_ranks(
    source: Source, max_records: int | None, seed: int
) -> tuple[np.ndarray | None, int | None]:
    """Each candidate's rank in a seeded shuffle (None: no subsample, all are examined in
    source order) and the number of candidates (None where counting would cost a pass)."""
    rank: np.ndarray | None = None
    n_total: int | None = None
    if max_records is not None or source.cheap_count:
        n_total = source.count()
    if max_records is not None and n_total is not None and max_records < n_total:
        perm = np.random.default_rng(seed).permutation(n_total)
        rank = np.empty(n_total, dtype=np.int64)
        rank[perm] = np.arange(n_total)
    return rank, n_total


def _validate(
    cand: Candidate, parse: Callable[[Any], Structure], known: np.ndarray, require: str | None
) -> tuple[_Arrays | None, str | None]:
    """A candidate's structure as arrays, or the reason the record is left out."""
    if require is not None and cand.values.get(require) is None:
        return None, "lacks_required_property"
    structure, reason = _check_structure(parse, cand.structure)
    if reason is not None:
        return None, reason
    assert structure is not None
    z = np.array([sp.Z for sp in structure.species], dtype=np.int16)
    if not known[z].all():  # featurize could not make its graph
        return None, "unsupported_element"
    arrays = (
        np.array(structure.lattice.matrix, dtype=np.float64),
        z,
        np.array(structure.frac_coords, dtype=np.float64),
    )
    return arrays, None


def _keep(
    out: _Collected, valid: list[tuple[int, int, str, _Arrays, dict[str, Any]]],
    max_records: int | None,
) -> None:
    """The valid records into `out`, in source order: with a subsample (max_records), the
    first max_records of the shuffle."""
    if max_records is not None:
        valid.sort(key=lambda t: t[0])
        valid = valid[:max_records]
    valid.sort(key=lambda t: t[1])  # the snapshot keeps source order
    for _, _, mid, s, values in valid:
        out.material_ids.append(mid)
        out.structures.append(s)
        out.raw_values.append(values)


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
    if source_kind == "file":
        source, in_source, file_meta = file_source(params, specs)
        meta |= file_meta
    else:  # mp-api
        cands, info = mp_api_candidates(params, specs, props, progress)
        source = list_source(cands)
        in_source = list(props)
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
