"""A benchmark workspace built through the real CLI: snapshot, graph cache, fixed test split.

Shared by the benchmarks that train (tune_pruning.py, quality.py). The workspace is a
rebuildable cache: `workspace.json` marks it complete, so a rerun skips the build.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from click.testing import CliRunner

from mpprop.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mp_snapshot.jsonl.gz"
INFO_FILE = "workspace.json"


def workspace_overrides(data: Path, prop: str, n_records: int | None) -> list[str]:
    """The params overrides that select a property's records (seeded subsample if asked)."""
    sets = [f"data.path={data}", f"data.require_property={prop}"]
    if n_records:
        sets.append(f"data.max_records={n_records}")
    return sets


def build_workspace(root: Path, data: Path, prop: str, n_records: int | None,
                    workers: int) -> dict:
    """Snapshot + graph cache + test split of (a seeded subsample of) `prop`'s records."""
    info_path = root / INFO_FILE
    if info_path.exists():
        return json.loads(info_path.read_text())
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    sets = ["--params", str(root / "params.yaml")]
    for item in workspace_overrides(data, prop, n_records):
        sets += ["-S", item]
    seconds = {}
    for name, command in (("read", ["fetch"]), ("graph", ["featurize", "--workers", str(workers)]),
                          ("split", ["split", "--property", prop])):
        t0 = time.perf_counter()
        result = CliRunner().invoke(cli, [*sets, *command], catch_exceptions=False)
        if result.exit_code != 0:
            raise SystemExit(result.output)
        seconds[name] = time.perf_counter() - t0
    split = json.loads((root / "data" / "splits" / f"{prop}.json").read_text())
    info = {
        "property": prop,
        "data": str(data),
        "max_records": n_records,
        "n_records": len(split["test"]) + len(split["pool"]),
        "n_test": len(split["test"]),
        "n_pool": len(split["pool"]),
        "read_seconds": seconds["read"],
        "graph_seconds": seconds["graph"],
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info
