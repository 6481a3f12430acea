"""`mpprop featurize`: the crystal-graph cache of the snapshot, data/graphs/<key>/ (key =
snapshot hash + graph settings), written as one unit, and data/graphs/current.json naming
the cache of the current snapshot (a stable pointer for DVC and for people)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from mpprop.config import Params
from mpprop.graphs import build_graphs, cache_key, save_graph_cache
from mpprop.snapshot import atomic_output, load_snapshot

CURRENT_FILE = "current.json"


@dataclass
class FeaturizeSummary:
    n_graphs: int
    n_edges: int
    seconds: float
    bytes_per_structure: float
    folder: Path

    def format(self) -> str:
        return (f"{self.n_graphs} graphs, {self.n_edges} edges in {self.seconds:.1f} s "
                f"({self.n_graphs / max(self.seconds, 1e-9):.0f} structures/s); "
                f"{self.bytes_per_structure:.0f} bytes/structure -> {self.folder}")


def featurize(params: Params, workers: int | None = None) -> FeaturizeSummary:
    snap, meta = load_snapshot(params.snapshot_dir(), verify=True)
    settings = params.graph_settings()
    key = cache_key(meta["sha256"], settings)
    t0 = time.perf_counter()
    cache = build_graphs(snap, settings, workers=workers)
    seconds = time.perf_counter() - t0
    cache.key = key
    folder = save_graph_cache(
        cache, params.graph_cache_dir(), {"snapshot_sha256": meta["sha256"], "seconds": seconds}
    )
    with atomic_output(params.graph_cache_dir() / CURRENT_FILE) as tmp:
        Path(tmp).write_text(
            json.dumps({"key": key, "snapshot_sha256": meta["sha256"]}, indent=2) + "\n"
        )
    return FeaturizeSummary(len(cache), int(cache.edge_offsets[-1]), seconds,
                            cache.nbytes() / max(len(cache), 1), folder)
