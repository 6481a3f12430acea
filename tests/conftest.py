"""Shared test helpers: where the real MP data lies, a project folder per test, and small
crystals built in the tests."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from pymatgen.core import Lattice, Structure

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_SNAPSHOT = SHARED_DATA / "mp_snapshot.jsonl.gz"


def skip_outside_ci(reason: str, ci_reason: str) -> None:
    """Skip the test with `reason`; under CI (CI=true) fail it with `ci_reason` instead: CI
    has everything, so a missing piece there is an error."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(ci_reason)
    pytest.skip(reason)


def require_shared_data() -> Path:
    """The shared MP snapshot; skipped with a reason where it is absent, never in CI."""
    if not SHARED_SNAPSHOT.exists():
        skip_outside_ci(f"real MP data not found at {SHARED_SNAPSHOT} (../shared/data beside the repo)",
                        f"CI must have the shared data at {SHARED_SNAPSHOT}")
    return SHARED_SNAPSHOT


def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5]])


def small_structures() -> list[Structure]:
    """Rock salt, diamond Si, CsCl and a distorted low-symmetry cell with three elements."""
    si = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.43), ["Si"], [[0, 0, 0]])
    cscl = Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    tri = Structure(Lattice.from_parameters(4.1, 5.3, 6.2, 81, 95, 103),
                    ["Li", "Fe", "O", "O"],
                    [[0, 0, 0], [0.5, 0.4, 0.3], [0.2, 0.7, 0.1], [0.8, 0.1, 0.6]])
    return [nacl(), si, cscl, tri]


def six_crystals() -> list[Structure]:
    """small_structures and two rock-salt supercells: six crystals to train on."""
    return small_structures() + [nacl() * (1, 1, 2), nacl() * (2, 1, 1)]


# two auxiliary properties' labels of six_crystals' first four (trained on, in the multi-task
# tests); NaN = no label there
AUX_LABELS = np.array([[1.0, np.nan], [0.0, 5.0], [np.nan, 4.0], [2.0, 7.0]])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh project folder with the repo's params.yaml; MLflow and data stay inside it."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def shared_record_lines(prop: str, n: int, skip: int = 0) -> list[str]:
    """Lines n after the first `skip` of the shared snapshot's records that have `prop`."""
    out: list[str] = []
    with gzip.open(require_shared_data(), "rt") as fh:
        for line in fh:
            if json.loads(line).get(prop) is not None:
                out.append(line)
                if len(out) == skip + n:
                    break
    return out[skip:]


def run_cli(root: Path, *args: str, ok: bool = True) -> str:
    """`mpprop --params root/params.yaml ARGS` in-process; asserts success (or failure)."""
    from mpprop.cli import main  # the CLI, imported only by the tests that run it

    result = CliRunner().invoke(main, ["--params", str(root / "params.yaml"), *args])
    assert (result.exit_code == 0) == ok, result.output + repr(result.exception)
    return result.output


def small_project(root: Path, lines: list[str], prop: str) -> Path:
    """A project of these MP records: params.yaml (batch 16, one thread), snapshot, graphs
    and the property's split, made through the CLI."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(batch_size=16, torch_threads=1)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    with gzip.open(root / "records.jsonl.gz", "wt") as fh:
        fh.writelines(lines)
    for args in (["-S", f"data.path={root / 'records.jsonl.gz'}", "fetch"],
                 ["featurize", "--workers", "1"], ["split", "--property", prop]):
        run_cli(root, *args)
    return root


def tiny_registered_model(prop: str = "band_gap"):
    """An untrained one-convolution CGCNN as a registered model of `prop` (no MLflow)."""
    # imported here: conftest stays importable where only the helpers above are needed
    import torch

    from mpprop.bundle import LoadedModel
    from mpprop.model import CrystalGraphConvNet, Normalizer
    from mpprop.prediction_csv import RegisteredModel
    from mpprop.settings import GraphSettings, Hyperparams, PropertySpec

    torch.manual_seed(0)
    hp = Hyperparams(n_conv=1, n_h=1, atom_fea_len=8, h_fea_len=8, lr=0.01,
                     lr_decay_epoch=10, optimizer="SGD", epochs=1)
    net = CrystalGraphConvNet(hp, GraphSettings()).eval()
    spec = PropertySpec(prop, prop, "eV", "none", "lower")
    return RegisteredModel(prop, f"models:/mpprop-{prop}/1",
                           LoadedModel(f"mpprop-{prop}@test v1", net, Normalizer(0.0, 1.0),
                                       spec, {}))


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package `chromium`
# headless on a machine without network: no sandbox (root), no GPU, and none of Chromium's
# own background connections (refused here, and slow to fail)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@contextlib.contextmanager
def headless_browser():
    """A Playwright browser on the system Chromium; skipped with a reason where it is absent,
    never in CI (.ci/run installs it)."""
    if not CHROMIUM.exists():
        skip_outside_ci(f"{CHROMIUM} not found (Debian package chromium)",
                        f"{CHROMIUM} missing: .ci/run installs the Debian package chromium")
    # imported here: only the browser tests need Playwright
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            yield browser
        finally:
            browser.close()
