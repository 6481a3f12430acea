"""Shared test helpers: where the real MP data lies, and a project folder per test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_SNAPSHOT = SHARED_DATA / "mp_snapshot.jsonl.gz"


def require_shared_data() -> Path:
    """The shared MP snapshot; skipped with a reason where it is absent, never in CI."""
    if not SHARED_SNAPSHOT.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have the shared data at {SHARED_SNAPSHOT}")
        pytest.skip(f"real MP data not found at {SHARED_SNAPSHOT} (../shared/data beside the repo)")
    return SHARED_SNAPSHOT


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh project folder with the repo's params.yaml; MLflow and data stay inside it."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path
