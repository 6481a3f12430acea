"""`mpprop split`: each property's fixed, seeded test split (test_fraction of its labelled
records) and the train+val pool, stored by material id in data/splits/<prop>.json.

Made from the snapshot alone (ids and labels): graph settings do not change it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpprop.config import Params
from mpprop.data import SplitError, make_test_split, read_split, split_path, write_split
from mpprop.snapshot import load_snapshot


def split_property(params: Params, prop: str, overwrite: bool = False) -> dict[str, Any]:
    """Read the property's split if it exists for this snapshot, else make and write it."""
    snap, meta = load_snapshot(params.snapshot_dir())
    path = split_path(params, prop)
    if path.exists() and not overwrite:
        split = read_split(path)
        if split.get("snapshot_sha256") == meta["sha256"]:
            return split
    if prop not in snap.property_names:
        raise SplitError(f"property {prop!r} is not in the snapshot")
    labels = snap.label(prop)
    split = make_test_split(snap.material_id, np.isfinite(labels),
                            params.split.test_fraction, params.split.seed)
    split.update(property=prop, snapshot_sha256=meta["sha256"], seed=params.split.seed,
                 test_fraction=params.split.test_fraction)
    write_split(path, split)
    return split
