"""mpprop's own pretrained models, shipped as package data (src/mpprop/shipped/): one bundle
and one model card per property, listed in index.json with their SHA-256, test metrics and
provenance. `mpprop import-pretrained` registers them at the alias params.mlflow.shipped_alias
(e.g. `mpprop-2026`) beside the published 2018 checkpoints (`xie-2018`).

This module owns the folder, the index format and the checks (the file is the one listed,
its hash matches, at most MAX_BUNDLE_BYTES); benchmarks/fulldata.py writes it (`ship`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

SHIPPED_DIR = Path(str(resources.files("mpprop").joinpath("shipped")))
INDEX_FILE = "index.json"
MAX_BUNDLE_BYTES = 3 * 1024 * 1024
INDEX_FORMAT = 1


class ShippedModelError(ValueError):
    """A shipped model whose file or index entry cannot be trusted."""


@dataclass(frozen=True)
class ShippedModel:
    prop: str
    bundle: Path
    card: Path
    sha256: str
    facts: dict[str, Any]  # test metrics, data, budget: tags of its registry version


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_index(folder: Path = SHIPPED_DIR) -> dict[str, Any]:
    path = folder / INDEX_FILE
    if not path.exists():
        return {"format": INDEX_FORMAT, "models": {}}
    return json.loads(path.read_text())


def shipped_models(folder: Path = SHIPPED_DIR) -> list[ShippedModel]:
    """The models the index lists, each checked against its file (hash and size)."""
    out = []
    for prop, entry in read_index(folder).get("models", {}).items():
        bundle, card = folder / entry["file"], folder / entry["card"]
        if not bundle.is_file() or not card.is_file():
            raise ShippedModelError(f"shipped model of {prop}: {entry['file']} or "
                                    f"{entry['card']} is missing from {folder}")
        if bundle.stat().st_size > MAX_BUNDLE_BYTES:
            raise ShippedModelError(f"shipped model of {prop} is {bundle.stat().st_size} bytes, "
                                    f"over {MAX_BUNDLE_BYTES}")
        digest = sha256_of(bundle)
        if digest != entry["sha256"]:
            raise ShippedModelError(f"shipped model of {prop}: {bundle.name} has SHA-256 "
                                    f"{digest[:12]}, the index says {entry['sha256'][:12]}")
        out.append(ShippedModel(prop, bundle, card, digest, entry.get("facts", {})))
    return out


def add_to_index(folder: Path, prop: str, bundle: Path, card_text: str,
                 facts: dict[str, Any]) -> Path:
    """Copy `bundle` in as <prop>.pt with its card <prop>.md and list it in the index."""
    folder.mkdir(parents=True, exist_ok=True)
    data = bundle.read_bytes()
    if len(data) > MAX_BUNDLE_BYTES:
        raise ShippedModelError(f"{bundle} is {len(data)} bytes, over {MAX_BUNDLE_BYTES}")
    target = folder / f"{prop}.pt"
    target.write_bytes(data)
    (folder / f"{prop}.md").write_text(card_text)
    index = read_index(folder)
    index["format"] = INDEX_FORMAT
    index["models"][prop] = {"file": target.name, "card": f"{prop}.md",
                             "sha256": sha256_of(target), "facts": facts}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return target
