"""Learning data of one property: targets, the fixed test split, train/val splits, batches.

Splits are stored by material id, so every model of a property is judged on the same test set.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpprop.graphs import GraphCache, build_graphs, cache_key, load_graph_cache, save_graph_cache
from mpprop.outputs import OutputBusyError
from mpprop.settings import GraphSettings, PropertySpec
from mpprop.snapshot import atomic_output, load_snapshot

# how long a process waits for another one that is building the same graph cache
CACHE_WAIT_SECONDS = 600


class SplitError(ValueError):
    """A split file that does not fit the snapshot it is used with."""


def transform_target(values: np.ndarray, spec: PropertySpec) -> np.ndarray:
    if spec.transform == "log10":
        return np.log10(values)
    if spec.transform == "none":
        return np.asarray(values, dtype=np.float64)
    raise ValueError(f"unknown target transform {spec.transform!r} for {spec.key}")


def inverse_transform(values: np.ndarray, spec: PropertySpec) -> np.ndarray:
    if spec.transform == "log10":
        return np.power(10.0, values)
    return np.asarray(values, dtype=np.float64)


def natural_unit(spec: PropertySpec) -> str:
    """Unit of the back-transformed value: log10(GPa) -> GPa."""
    unit = spec.unit
    if spec.transform == "log10" and unit.startswith("log10(") and unit.endswith(")"):
        return unit[len("log10("):-1]
    return unit


def make_test_split(
    material_ids: np.ndarray, labelled: np.ndarray, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Seeded split of a property's labelled records into a fixed test set and the rest."""
    rows = np.flatnonzero(labelled)
    rng = np.random.default_rng(seed)
    rows = rows[rng.permutation(len(rows))]
    n_test = int(round(test_fraction * len(rows)))
    return {
        "test": sorted(material_ids[rows[:n_test]].tolist()),
        "pool": sorted(material_ids[rows[n_test:]].tolist()),
    }


def write_split(path: Path, split: dict[str, Any]) -> None:
    # workers that make the same split at once each write their own temp file
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(split, indent=1) + "\n")


def _remake(path: Path) -> str:
    return f"rerun `mpprop split --property {path.stem} --overwrite`"


def _json_text(value: Any, limit: int = 40) -> str:
    """A JSON value as the file has it, cut short for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_split(path: Path, split: Any) -> dict[str, Any]:
    """`split` (the parsed JSON of `path`) if it is a usable split: an object whose `test` and
    `pool` are lists of material ids (strings), none twice, none in both (a test material in
    the pool would be trained on and then scored as unseen). Else a one-line SplitError
    naming the file and the problem."""
    if not isinstance(split, dict):
        raise SplitError(f"{path}: must be a JSON object with the lists `test` and `pool` "
                         f"(got {_json_text(split)}); {_remake(path)}")
    for key in ("test", "pool"):
        ids = split.get(key)
        if not isinstance(ids, list):
            got = "nothing" if key not in split else _json_text(ids)
            raise SplitError(f"{path}: `{key}` must be a list of material ids (got {got}); "
                             f"{_remake(path)}")
        bad = [i for i in ids if not isinstance(i, str)]
        if bad:
            raise SplitError(f"{path}: `{key}` must hold material ids as strings (got "
                             f"{_json_text(bad[0])}); {_remake(path)}")
        repeated = [i for i, n in Counter(ids).items() if n > 1]
        if repeated:
            raise SplitError(f"{path}: {len(repeated)} ids occur more than once in `{key}` "
                             f"(e.g. {repeated[0]}); {_remake(path)}")
    both = set(split["test"]).intersection(split["pool"])
    if both:
        raise SplitError(f"{path}: {len(both)} ids are in both test and pool (e.g. "
                         f"{min(both)}); {_remake(path)}")
    return split


def read_split(path: Path) -> dict[str, Any]:
    """The split file `mpprop split` wrote, checked (check_split); any problem, unreadable
    JSON included, is a one-line SplitError naming the file."""
    if not path.exists():
        raise SplitError(f"split file {path} not found; run `mpprop split`")
    try:
        split = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise SplitError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column "
                         f"{exc.colno}); {_remake(path)}") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise SplitError(f"{path}: cannot be read as JSON ({exc}); {_remake(path)}") from None
    return check_split(path, split)


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the pool) of a random train:val split."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@dataclass
class PropertyData:
    """Rows of the graph cache and transformed targets for one property's splits."""

    spec: PropertySpec
    cache: GraphCache
    pool_rows: np.ndarray
    pool_targets: np.ndarray
    test_rows: np.ndarray
    test_targets: np.ndarray

    @classmethod
    def build(
        cls, spec: PropertySpec, cache: GraphCache, raw_labels: np.ndarray, split: dict[str, Any]
    ) -> PropertyData:
        row_of = {mid: i for i, mid in enumerate(cache.material_id.tolist())}
        missing = [m for m in split["test"] + split["pool"] if m not in row_of]
        if missing:
            raise SplitError(
                f"{len(missing)} ids of the {spec.key} split are not in the graph cache "
                f"(e.g. {missing[0]}); the split was made from another snapshot: rerun `mpprop split`"
            )
        test_rows = np.array([row_of[m] for m in split["test"]], dtype=np.int64)
        pool_rows = np.array([row_of[m] for m in split["pool"]], dtype=np.int64)
        targets = transform_target(raw_labels, spec)
        return cls(
            spec=spec,
            cache=cache,
            pool_rows=pool_rows,
            pool_targets=targets[pool_rows],
            test_rows=test_rows,
            test_targets=targets[test_rows],
        )


@dataclass
class Workspace:
    """The snapshot, graph cache and splits that training of one property reads."""

    snapshot_meta: dict[str, Any]
    labels: np.ndarray  # (N, P) raw labels, rows aligned with the graph cache
    property_names: list[str]
    cache: GraphCache

    @property
    def snapshot_sha256(self) -> str:
        return self.snapshot_meta["sha256"]

    def raw_labels(self, prop: str) -> np.ndarray:
        if prop not in self.property_names:
            raise SplitError(f"property {prop!r} is not in the snapshot")
        return self.labels[:, self.property_names.index(prop)]


def open_workspace(params: Any, in_memory: bool = True, graph: GraphSettings | None = None,
                   build: bool = False) -> Workspace:
    """Load snapshot labels and the graph cache that belongs to this snapshot and the graph
    settings (default: params `graph`); with build=True a cache that is absent is built and
    saved first (a study that searches graph settings: one cache per setting, by key)."""
    snap, meta = load_snapshot(params.snapshot_dir())
    settings = graph or params.graph_settings()
    root = params.graph_cache_dir()
    try:
        cache = load_graph_cache(root, meta["sha256"], settings)
    except FileNotFoundError:
        if not build:
            raise
        cache = _build_cache(snap, meta["sha256"], settings, root)
    if in_memory:
        cache = cache.in_memory()
    return Workspace(meta, snap.labels, snap.property_names, cache)


def _build_cache(snap: Any, sha256: str, settings: GraphSettings, root: Path) -> GraphCache:
    """Build and save the cache of `settings`; if another process is writing it, wait for it."""
    cache = build_graphs(snap, settings, workers=1, progress=False)
    cache.key = cache_key(sha256, settings)
    try:
        save_graph_cache(cache, root, {"snapshot_sha256": sha256, "built_by": "on demand"})
    except OutputBusyError:
        deadline = time.monotonic() + CACHE_WAIT_SECONDS
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                return load_graph_cache(root, sha256, settings)
            except FileNotFoundError:
                continue
        raise
    return load_graph_cache(root, sha256, settings)


def split_path(params: Any, prop: str) -> Path:
    return params.split_dir() / f"{prop}.json"


def load_split(params: Any, ws: Workspace, prop: str) -> dict[str, Any]:
    """The fixed test split `mpprop split` wrote for `prop` (never made here: the split
    stage owns it), checked against the current snapshot."""
    path = split_path(params, prop)
    split = read_split(path)
    made_from = split.get("snapshot_sha256")
    if made_from != ws.snapshot_sha256:
        raise SplitError(
            f"{path} was made from snapshot {str(made_from or '?')[:12]}, not the "
            f"current {ws.snapshot_sha256[:12]}; rerun `mpprop split`"
        )
    known = set(ws.cache.material_id.tolist())
    missing = [m for m in split["test"] + split["pool"] if m not in known]
    if missing:
        raise SplitError(f"{path}: {len(missing)} ids are not in the snapshot's graph cache "
                         f"(e.g. {missing[0]}); {_remake(path)}")
    return split


def property_data(params: Any, ws: Workspace, prop: str) -> PropertyData:
    split = load_split(params, ws, prop)
    return PropertyData.build(params.property_spec(prop), ws.cache, ws.raw_labels(prop), split)
