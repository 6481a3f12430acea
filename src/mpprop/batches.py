"""Batches of crystal graphs as tensors: made from the graph cache, moved to a device once.

numpy and torch only (no pymatgen, no MLflow), like the rest of the training core.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from mpprop.graph_cache import GraphCache

# edge features per distinct distance only when that saves enough to pay for the gather
DEDUP_MAX_FRACTION = 0.5


@dataclass
class Batch:
    """A batch of crystal graphs as tensors (atom indices global to the batch)."""

    atomic_numbers: torch.Tensor  # (N,) int64
    edge_src: torch.Tensor  # (E,) int64, centre atom
    edge_dst: torch.Tensor  # (E,) int64, neighbour atom
    edge_distance: torch.Tensor  # (E,) float32
    crystal_index: torch.Tensor  # (N,) int64, crystal of each atom
    n_crystals: int
    target: torch.Tensor | None = None  # (B,) standardised target, if known
    degree: int = 0  # k when every atom has exactly k edges (the usual case), else 0
    # distinct edge distances and, per edge, the index of its own: symmetric crystals repeat
    # a few distances (a batch of MP crystals holds 10-20% distinct values), so the edge
    # features are computed per distinct distance; None = one row per edge
    distance_values: torch.Tensor | None = None  # (U,) float32
    distance_index: torch.Tensor | None = None  # (E,) int64
    # edges of atom i are [atom_edge_offsets[i], atom_edge_offsets[i+1]) when edges are
    # grouped by centre (always, from the cache): what the fused kernel needs; else None
    atom_edge_offsets: torch.Tensor | None = None  # (N+1,) int64

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], target: np.ndarray | None = None) -> Batch:
        n_atoms, src = len(arrays["atomic_numbers"]), arrays["edge_src"]
        # edges are stored grouped by centre (CSR offsets per atom); when every atom has the
        # same number of edges, `degree` allows dense views
        offsets, degree = None, 0
        if len(src) == 0 or bool(np.all(src[1:] >= src[:-1])):
            counts = np.bincount(src, minlength=n_atoms)
            offsets = np.zeros(n_atoms + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            if n_atoms and len(counts) == n_atoms and counts[0] > 0 and np.all(counts == counts[0]):
                degree = int(counts[0])
        distance = np.ascontiguousarray(arrays["edge_distance"])
        values, index = np.unique(distance, return_inverse=True)
        dedup = len(values) <= DEDUP_MAX_FRACTION * len(distance)
        return cls(
            atomic_numbers=torch.from_numpy(arrays["atomic_numbers"]),
            edge_src=torch.from_numpy(arrays["edge_src"]),
            edge_dst=torch.from_numpy(arrays["edge_dst"]),
            edge_distance=torch.from_numpy(distance),
            distance_values=torch.from_numpy(values) if dedup else None,
            distance_index=torch.from_numpy(index.reshape(-1).astype(np.int64)) if dedup else None,
            crystal_index=torch.from_numpy(arrays["crystal_index"]),
            n_crystals=int(arrays["crystal_index"][-1]) + 1 if len(arrays["crystal_index"]) else 0,
            target=None if target is None else torch.as_tensor(target, dtype=torch.float32),
            degree=degree,
            atom_edge_offsets=None if offsets is None else torch.from_numpy(offsets),
        )

    def to(self, device: torch.device, pin_memory: bool = False) -> Batch:
        """This batch on `device` (itself when it is there already).

        One copy per tensor per batch; with pin_memory the host tensors are page-locked
        first so the copies to a CUDA device run asynchronously (non_blocking).
        """
        device = torch.device(device)
        if device.type == "cpu":
            return self
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                if pin_memory:
                    value = value.pin_memory()
                value = value.to(device, non_blocking=pin_memory)
            moved[f.name] = value
        return replace(self, **moved)


def iterate_batches(
    cache: GraphCache,
    rows: np.ndarray,
    batch_size: int,
    targets: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> Iterator[tuple[np.ndarray, Batch]]:
    """Batches over `rows` (shuffled when rng is given): (positions into rows, Batch)."""
    order = rng.permutation(len(rows)) if rng is not None else np.arange(len(rows))
    for lo in range(0, len(order), batch_size):
        pos = order[lo : lo + batch_size]
        batch = Batch.from_arrays(
            cache.gather(rows[pos]), None if targets is None else targets[pos]
        )
        yield pos, batch


def collect_in_row_order(positions: list[np.ndarray], chunks: list[torch.Tensor],
                         out: np.ndarray) -> np.ndarray:
    """Fill `out` (host array, one entry per row of a pass) with the per-batch outputs that
    iterate_batches' `positions` place: one copy from the device per pass, not one
    synchronising .numpy() per batch. Returns `out`."""
    if chunks:
        out[np.concatenate(positions)] = torch.cat(chunks).cpu().numpy()
    return out
