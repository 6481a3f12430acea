"""CGCNN crystal graphs and their on-disk cache.

Graph (DESIGN.md §2): each atom links to its up to `max_neighbors` nearest neighbours within
`radius` (periodic images included), sorted by distance.

Documented choice for atoms with fewer than `max_neighbors` neighbours within the radius:
they keep only their real neighbours (variable degree). The original CGCNN padded such atoms
with fake neighbours (atom 0 at radius + 1 Å), which adds a spurious message; the two agree
wherever every atom has a full neighbour shell (all but a handful of MP structures).

Built graphs are saved as the keyed graph cache (layout and key: mpprop.graph_cache, numpy
only, so the training core reads it without pymatgen).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure
from pymatgen.optimization.neighbors import find_points_in_spheres
from tqdm import tqdm

from mpprop.graph_cache import (
    CACHE_ARRAYS,
    CACHE_META,
    GraphCache,
    cache_key,
    known_elements,
)
from mpprop.outputs import output_dir, readable_dir
from mpprop.settings import GraphSettings
from mpprop.snapshot import Snapshot
from mpprop.write_errors import writing


class GraphError(ValueError):
    """A structure that cannot become a CGCNN graph."""


# pymatgen's defaults in Structure.get_neighbor_list
_NUMERICAL_TOL = 1e-8
_PBC = np.ones(3, dtype=np.int64)


def _neighbor_list(
    cart: np.ndarray,
    lattice: np.ndarray,
    r: float,
    pbc: np.ndarray,
    centres: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, neighbour, distance) within r: Structure.get_neighbor_list without a Structure.

    The same pymatgen kernel with the same arguments, so the same pairs and distances; no
    Structure (one Python object per site) is built, which was ~40% of featurization time.
    Centre indices are global also for a subset of centres, so the self pair is dropped
    exactly (get_neighbor_list(sites=...) compares subset-local centre indices with global
    neighbour indices, and so kept an atom as its own neighbour at 0 Å).
    """
    c, p, _, d = find_points_in_spheres(
        cart,
        cart if centres is None else np.ascontiguousarray(cart[centres]),
        r=r,
        pbc=pbc,
        lattice=lattice,
        tol=_NUMERICAL_TOL,
    )
    if centres is not None:
        c = centres[c]
    keep = (c != p) | (d > _NUMERICAL_TOL)
    return c[keep], p[keep], d[keep]


def nearest_neighbors(
    structure: Structure, settings: GraphSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, distance) of each atom's up to max_neighbors nearest neighbours, sorted.

    Searches `first_search_radius` first and the full radius only for atoms that have fewer
    than max_neighbors within it: the 12 nearest are almost always within 5 Å, while an
    8 Å sphere holds ~126 atoms (DESIGN.md §5).
    """
    return _nearest_neighbors(
        np.ascontiguousarray(structure.lattice.matrix, dtype=float),
        np.ascontiguousarray(structure.cart_coords, dtype=float),
        settings,
        np.ascontiguousarray(structure.pbc, dtype=np.int64),
    )


def _nearest_neighbors(
    lattice: np.ndarray, cart: np.ndarray, settings: GraphSettings, pbc: np.ndarray = _PBC
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nearest_neighbors from the lattice matrix and Cartesian coordinates (float64, C order)."""
    k = settings.max_neighbors
    n_sites = len(cart)
    first_r = min(settings.first_search_radius, settings.radius)
    src, dst, dist = _neighbor_list(cart, lattice, first_r, pbc)
    counts = np.bincount(src, minlength=n_sites)
    short = np.flatnonzero(counts < k)
    if len(short) and first_r < settings.radius:
        keep = counts[src] >= k
        s2, d2, r2 = _neighbor_list(cart, lattice, settings.radius, pbc, centres=short)
        src = np.concatenate([src[keep], s2])
        dst = np.concatenate([dst[keep], d2])
        dist = np.concatenate([dist[keep], r2])
    order = np.lexsort((dist, src))
    src, dst, dist = src[order], dst[order], dist[order]
    # rank of each edge within its centre's sorted list; keep the first k
    starts = np.searchsorted(src, np.arange(n_sites))
    rank = np.arange(len(src)) - starts[src]
    sel = rank < k
    return src[sel].astype(np.int32), dst[sel].astype(np.int32), dist[sel]


@dataclass
class _Chunk:
    atom_counts: np.ndarray
    edge_counts: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    dist: np.ndarray


def _featurize_chunk(
    lattices: np.ndarray,
    site_offsets: np.ndarray,
    numbers: np.ndarray,
    frac: np.ndarray,
    ids: np.ndarray,
    settings: GraphSettings,
) -> _Chunk:
    known = np.zeros(256, dtype=bool)
    known[known_elements()] = True
    srcs, dsts, dists, edge_counts = [], [], [], []
    for i in range(len(lattices)):
        lo, hi = site_offsets[i], site_offsets[i + 1]
        z = numbers[lo:hi]
        bad = z[~known[z]]
        if len(bad):
            from pymatgen.core import Element

            names = ", ".join(sorted({Element.from_Z(int(b)).symbol for b in bad}))
            raise GraphError(
                f"{ids[i]}: element(s) {names} are outside the CGCNN atom feature table "
                "(elements 1-100 of the original atom_init.json)"
            )
        # Cartesian coordinates as pymatgen computes them (frac @ matrix), bit for bit
        lattice = np.ascontiguousarray(lattices[i], dtype=float)
        cart = np.ascontiguousarray(frac[lo:hi] @ lattice, dtype=float)
        s, d, r = _nearest_neighbors(lattice, cart, settings)
        srcs.append(s)
        dsts.append(d)
        dists.append(r.astype(np.float32))
        edge_counts.append(len(s))
    return _Chunk(
        atom_counts=np.diff(site_offsets).astype(np.int64),
        edge_counts=np.asarray(edge_counts, dtype=np.int64),
        src=np.concatenate(srcs) if srcs else np.zeros(0, np.int32),
        dst=np.concatenate(dsts) if dsts else np.zeros(0, np.int32),
        dist=np.concatenate(dists) if dists else np.zeros(0, np.float32),
    )


def check_elements(snapshot: Snapshot, max_named: int = 5) -> None:
    """A GraphError naming the structures with elements that have no CGCNN atom features."""
    z = np.asarray(snapshot.atomic_numbers, dtype=np.int64)
    known = np.zeros(max(int(z.max(initial=0)) + 1, 256), dtype=bool)
    known[known_elements()] = True
    bad_sites = np.flatnonzero(~known[np.clip(z, 0, None)])
    if not len(bad_sites):
        return
    from pymatgen.core import Element

    def symbol(number: int) -> str:
        try:
            return Element.from_Z(number).symbol
        except ValueError:
            return f"Z={number}"

    rows = np.unique(np.searchsorted(snapshot.site_offsets, bad_sites, side="right") - 1)
    named = []
    for i in rows[:max_named]:
        lo, hi = snapshot.site_offsets[i], snapshot.site_offsets[i + 1]
        zi = z[lo:hi]
        names = ", ".join(sorted({symbol(int(b)) for b in zi[~known[np.clip(zi, 0, None)]]}))
        named.append(f"{snapshot.material_id[i]} ({names})")
    more = f" and {len(rows) - max_named} more" if len(rows) > max_named else ""
    raise GraphError(
        f"{len(rows)} structure(s) have elements outside the CGCNN atom feature table "
        f"(elements 1-100 of the original atom_init.json): {', '.join(named)}{more} "
        "(a snapshot from `mpprop fetch` leaves such records out as unsupported_element)"
    )


def build_graphs(
    snapshot: Snapshot,
    settings: GraphSettings,
    workers: int | None = None,
    chunk_size: int = 256,
    progress: bool = True,
) -> GraphCache:
    """Build the graphs of every structure in a snapshot, in parallel chunks.

    Structures with elements outside the atom feature table are a GraphError naming them
    all, found before any graph is built (`mpprop fetch` leaves them out, as
    unsupported_element; a snapshot from elsewhere may still have them).
    """
    check_elements(snapshot)
    n = len(snapshot)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    bounds = [(lo, min(lo + chunk_size, n)) for lo in range(0, n, chunk_size)]

    def chunk_args(lo: int, hi: int) -> tuple[Any, ...]:
        off = snapshot.site_offsets[lo : hi + 1]
        return (
            snapshot.lattice[lo:hi],
            off - off[0],
            snapshot.atomic_numbers[off[0] : off[-1]],
            snapshot.frac_coords[off[0] : off[-1]],
            snapshot.material_id[lo:hi],
            settings,
        )

    bar = tqdm(total=n, desc="featurize", unit="struct", disable=not progress)
    chunks: list[_Chunk] = []
    if workers <= 1 or len(bounds) <= 1:
        for lo, hi in bounds:
            chunks.append(_featurize_chunk(*chunk_args(lo, hi)))
            bar.update(hi - lo)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_featurize_chunk, *chunk_args(lo, hi)) for lo, hi in bounds]
            for (lo, hi), fut in zip(bounds, futures, strict=True):
                chunks.append(fut.result())
                bar.update(hi - lo)
    bar.close()

    atom_counts = np.concatenate([c.atom_counts for c in chunks]) if chunks else np.zeros(0, int)
    edge_counts = np.concatenate([c.edge_counts for c in chunks]) if chunks else np.zeros(0, int)
    atom_offsets = np.zeros(n + 1, dtype=np.int64)
    edge_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(atom_counts, out=atom_offsets[1:])
    np.cumsum(edge_counts, out=edge_offsets[1:])
    return GraphCache(
        material_id=snapshot.material_id.copy(),
        atom_offsets=atom_offsets,
        atomic_numbers=snapshot.atomic_numbers.astype(np.int16),
        edge_offsets=edge_offsets,
        edge_src=np.concatenate([c.src for c in chunks]) if chunks else np.zeros(0, np.int32),
        edge_dst=np.concatenate([c.dst for c in chunks]) if chunks else np.zeros(0, np.int32),
        edge_distance=(
            np.concatenate([c.dist for c in chunks]) if chunks else np.zeros(0, np.float32)
        ),
        settings=settings,
    )


def graphs_from_structures(
    structures: list[Structure], settings: GraphSettings, ids: list[str] | None = None
) -> GraphCache:
    """Graphs of in-memory structures (prediction input), single process."""
    ids = ids if ids is not None else [str(i) for i in range(len(structures))]
    snap = Snapshot.from_structures(ids, structures, np.zeros((len(structures), 0)), [])
    return build_graphs(snap, settings, workers=1, progress=False)


def save_graph_cache(cache: GraphCache, root: str | Path, meta: dict[str, Any]) -> Path:
    """Write the cache to root/<key>/ as one unit (outputs.output_dir: temp folder swapped in
    whole; killed writers' temp folders are removed by the next one)."""
    final = Path(root) / cache.key
    with output_dir(final, "featurize") as tmp:
        for name in CACHE_ARRAYS:
            # a full disk names the file as it will be, not the temp folder
            with writing(final / f"{name}.npy"):
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


def load_graph_cache(
    root: str | Path, snapshot_sha256: str, settings: GraphSettings, mmap: bool = True
) -> GraphCache:
    """Load the cache for this snapshot and these settings; a clear error if it is absent."""
    key = cache_key(snapshot_sha256, settings)
    folder = readable_dir(Path(root) / key)
    meta_path = folder / CACHE_META
    if not meta_path.exists():
        raise FileNotFoundError(
            f"no graph cache for snapshot {snapshot_sha256[:12]} with these graph settings "
            f"(expected {folder}); run `mpprop featurize`"
        )
    arrays = {
        name: np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None)
        for name in CACHE_ARRAYS
    }
    return GraphCache(**arrays, settings=settings, key=key)
