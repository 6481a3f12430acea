"""Bad input is counted or refused in one line, never a traceback, and nothing written is lost.

Each test feeds one kind of bad input to the real command (click's CliRunner on `mpprop`):
elements without CGCNN atom features, a line that is not UTF-8, an integer label beyond float
range, a file named .gz that is not gzip, a truncated gzip stream, a property with too few
labels to train, and an Optuna storage URL that cannot be used.
"""

from __future__ import annotations

import gzip
import json
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import REPO, small_structures
from pymatgen.core import Lattice, Structure

from mpprop.cli import main
from mpprop.config import load_params
from mpprop.graphs import GraphError, build_graphs, graphs_from_structures
from mpprop.presets import hyperparams
from mpprop.snapshot import Snapshot, load_snapshot
from mpprop.training import MIN_TRAIN_LABELS, TrainingDataError, fit


# ---------------------------------------------------------------- helpers
def structure(species: list[str], a: float = 4.0) -> Structure:
    coords = [[0, 0, 0], [0.5, 0.5, 0.5]][: len(species)]
    return Structure(Lattice.cubic(a), species, coords)


def record(mid: str, species: list[str] | None = None, **labels: Any) -> dict[str, Any]:
    base = {
        "formation_energy_per_atom": -1.0, "energy_per_atom": -5.0, "efermi": 2.0,
        "band_gap": 1.5, "bulk_modulus": {"vrh": 100.0}, "shear_modulus": {"vrh": 50.0},
        "homogeneous_poisson": 0.3,
    }
    s = structure(species or ["Na", "Cl"], 5.6)
    return {"material_id": mid, "structure": s.as_dict(), **base, **labels}


def line_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item  # written verbatim (a malformed line)
    return json.dumps(item).encode("utf-8")


def write_records(path: Path, items: list[Any]) -> Path:
    payload = b"".join(line_bytes(i) + b"\n" for i in items)
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    dst = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", dst)
    return dst


def mpprop(params_file: Path, *args: str, sets: tuple[str, ...] = ()) -> Result:
    argv = ["--params", str(params_file)]
    for s in sets:
        argv += ["-S", s]
    return CliRunner().invoke(main, [*argv, *args])


def fetch(params_file: Path, data: Path, out: Path) -> Result:
    return mpprop(params_file, "fetch", "--out", str(out),
                  sets=("data.source=file", f"data.path={data}"))


def error_lines(result: Result) -> list[str]:
    """The `Error: ...` lines of a failed command (tqdm's bars share stderr, without a
    newline after a bar that was left open)."""
    assert "Traceback" not in result.output
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # click's own exit, not a crash
    return [line[line.index("Error:"):] for line in result.output.splitlines()
            if "Error:" in line]


def snapshot_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def previous_snapshot(tmp_path: Path, params_file: Path) -> Path:
    """A snapshot folder made by a good fetch: a failed fetch must leave it as it is."""
    good = write_records(tmp_path / "good.jsonl", [record("mp-1"), record("mp-2", ["Si"])])
    out = tmp_path / "snap"
    result = fetch(params_file, good, out)
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------- finding 1: elements 101-118
def test_elements_without_atom_features_are_counted_at_fetch(tmp_path, params_file):
    data = write_records(tmp_path / "heavy.jsonl.gz", [
        record("mp-1"),
        record("mp-og", ["Og", "Cl"]),  # Z = 118
        record("mp-2", ["Si"]),
        record("mp-db", ["Db"]),  # Z = 105
        record("mp-fm", ["Fm"]),  # Z = 100: the last element of the table, kept
    ])
    result = fetch(params_file, data, tmp_path / "snap")
    assert result.exit_code == 0, result.output
    snap, meta = load_snapshot(tmp_path / "snap", verify=True)
    assert list(snap.material_id) == ["mp-1", "mp-2", "mp-fm"]
    assert meta["excluded"]["records"] == {"unsupported_element": 2}
    assert meta["excluded_examples"]["unsupported_element"] == ["mp-og", "mp-db"]
    assert "unsupported_element" in result.output  # the fetch summary
    assert int(snap.atomic_numbers.max()) == 100


def test_featurize_names_every_structure_outside_the_feature_table(tmp_path, params_file):
    structs = [structure(["Na", "Cl"]), structure(["Og"]), structure(["Si"]),
               structure(["Db", "Cl"])]
    ids = ["mp-1", "mp-og", "mp-2", "mp-db"]
    snap = Snapshot.from_structures(ids, structs, np.zeros((4, 0)), [])
    settings = load_params(params_file).graph_settings()
    with pytest.raises(GraphError, match=r"2 structure\(s\).*mp-og \(Og\), mp-db \(Db\)"):
        build_graphs(snap, settings, workers=1, chunk_size=1, progress=False)


# ---------------------------------------------------------------- finding 2: not UTF-8
@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.gz"])
def test_line_that_is_not_utf8_is_counted_with_file_and_line(tmp_path, params_file, name):
    bad = line_bytes(record("mp-2")).replace(b'"mp-2"', b'"mp-\xff\xfe2"')
    data = write_records(tmp_path / name, [
        record("mp-1"), b"", bad, record("mp-3", ["Si"]), b"\xc3(", record("mp-4", ["Cu"]),
    ])
    result = fetch(params_file, data, tmp_path / "snap")
    assert result.exit_code == 0, result.output
    snap, meta = load_snapshot(tmp_path / "snap", verify=True)
    assert list(snap.material_id) == ["mp-1", "mp-3", "mp-4"]  # the lines after it are read
    assert meta["excluded"]["records"] == {"unreadable_line": 2}
    # physical line numbers (the blank line 2 counts), with the file name
    assert meta["excluded_examples"]["unreadable_line"] == [f"{name}:3", f"{name}:5"]
    assert meta["n_examined"] == 5
    assert f"{name}:3" in result.output


def test_unreadable_lines_are_counted_in_a_subsample_too(tmp_path, params_file):
    data = write_records(tmp_path / "bad.jsonl.gz", [
        record("mp-1"), b"\xff{}", record("mp-2", ["Si"]), record("mp-3", ["Cu"]),
    ])
    result = mpprop(params_file, "fetch", "--out", str(tmp_path / "snap"), sets=(
        "data.source=file", f"data.path={data}", "data.max_records=10"))
    assert result.exit_code == 0, result.output
    _, meta = load_snapshot(tmp_path / "snap")
    assert meta["excluded"]["records"] == {"unreadable_line": 1}
    assert meta["subsample"]["n_available"] == 4


# ---------------------------------------------------------------- finding 3: huge integer
def test_integer_label_beyond_float_range_is_a_non_finite_label(tmp_path, params_file):
    huge = 10**400  # json writes all 401 digits; json.loads gives an int float() refuses
    data = write_records(tmp_path / "huge.jsonl.gz", [
        record("mp-1"), record("mp-2", ["Si"], band_gap=huge, bulk_modulus={"vrh": -huge}),
    ])
    assert b"0" * 400 in gzip.decompress(data.read_bytes())
    result = fetch(params_file, data, tmp_path / "snap")
    assert result.exit_code == 0, result.output
    snap, meta = load_snapshot(tmp_path / "snap", verify=True)
    assert list(snap.material_id) == ["mp-1", "mp-2"]  # only the label is left out
    assert meta["excluded"]["per_property"]["band_gap"] == {"non_finite": 1}
    assert meta["excluded"]["per_property"]["bulk_modulus"] == {"non_finite": 1}
    assert np.isnan(snap.label("band_gap")[1]) and snap.label("efermi")[1] == 2.0
    assert meta["counts"]["band_gap"] == 1


# ---------------------------------------------------------------- finding 4: bad gzip files
def test_file_named_gz_that_is_not_gzip_fails_in_one_line(
    tmp_path, params_file, previous_snapshot
):
    before = snapshot_bytes(previous_snapshot)
    data = tmp_path / "plain.jsonl.gz"
    data.write_bytes(line_bytes(record("mp-9")) + b"\n")  # JSON text, not gzip
    lines = error_lines(fetch(params_file, data, previous_snapshot))
    assert len(lines) == 1, lines
    assert str(data) in lines[0] and "not a gzip file" in lines[0]
    assert snapshot_bytes(previous_snapshot) == before  # the previous snapshot stays


def test_truncated_gzip_fails_in_one_line_saying_how_far_it_got(
    tmp_path, params_file, previous_snapshot
):
    before = snapshot_bytes(previous_snapshot)
    full = tmp_path / "full.jsonl.gz"
    write_records(full, [record(f"mp-{i}", band_gap=float(i)) for i in range(300)])
    packed = full.read_bytes()
    cut = packed[: len(packed) // 2]  # cut mid-stream, as an interrupted download
    data = tmp_path / "cut.jsonl.gz"
    data.write_bytes(cut)
    # the complete lines in the part that is there
    n_complete = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")
    assert 0 < n_complete < 300

    lines = error_lines(fetch(params_file, data, previous_snapshot))
    assert len(lines) == 1, lines
    assert str(data) in lines[0] and "truncated" in lines[0]
    assert f"{n_complete} records read before the end" in lines[0]
    assert snapshot_bytes(previous_snapshot) == before

    # the same with a subsample, whose first pass only counts the records
    result = mpprop(params_file, "fetch", "--out", str(previous_snapshot), sets=(
        "data.source=file", f"data.path={data}", "data.max_records=5"))
    lines = error_lines(result)
    assert len(lines) == 1 and "truncated" in lines[0], lines
    assert snapshot_bytes(previous_snapshot) == before


def test_corrupt_gzip_data_fails_in_one_line(tmp_path, params_file, previous_snapshot):
    before = snapshot_bytes(previous_snapshot)
    full = write_records(tmp_path / "full.jsonl.gz", [record(f"mp-{i}") for i in range(50)])
    packed = bytearray(full.read_bytes())
    packed[len(packed) // 2 : len(packed) // 2 + 16] = b"\xff" * 16  # garbage mid-stream
    data = tmp_path / "corrupt.jsonl.gz"
    data.write_bytes(bytes(packed))
    lines = error_lines(fetch(params_file, data, previous_snapshot))
    assert len(lines) == 1 and str(data) in lines[0] and "corrupt gzip" in lines[0], lines
    assert snapshot_bytes(previous_snapshot) == before


# ---------------------------------------------------------------- finding 5: too few labels
@pytest.fixture(scope="module")
def tiny_cache():
    params = load_params(REPO / "params.yaml")
    settings = params.graph_settings()
    return params, graphs_from_structures(small_structures(), settings)


def test_fit_refuses_too_few_labelled_records(tiny_cache):
    params, cache = tiny_cache
    hp = hyperparams(params, "xie", "band_gap", epochs=1)
    graph = params.graph_settings()
    one = np.array([0]), np.array([1.0])
    val = np.array([3]), np.array([2.0])
    with pytest.raises(TrainingDataError, match="too few labelled records.*1 train"):
        fit(hp, graph, cache, *one, *val, seed=0)
    with pytest.raises(ValueError, match="0 validation"):  # the CLI prints a ValueError
        fit(hp, graph, cache, np.array([0, 1]), np.array([1.0, 2.0]),
            np.array([], dtype=np.int64), np.array([]), seed=0)
    with pytest.raises(TrainingDataError, match="not finite"):
        fit(hp, graph, cache, np.array([0, 1]), np.array([1.0, np.nan]), *val, seed=0)
    assert MIN_TRAIN_LABELS >= 2


def test_fit_with_constant_targets_does_not_divide_by_zero(tiny_cache):
    params, cache = tiny_cache
    hp = hyperparams(params, "xie", "band_gap", epochs=1)
    result = fit(hp, params.graph_settings(), cache, np.array([0, 1, 2]),
                 np.array([1.0, 1.0, 1.0]), np.array([3]), np.array([1.0]), seed=0)
    assert result.normalizer.std == 1.0
    assert np.isfinite(result.best_val_mae)
    json.dumps({"best_val_mae": result.best_val_mae}, allow_nan=False)


def test_train_on_a_property_with_two_labels_fails_in_one_line(tmp_path, params_file):
    data = write_records(tmp_path / "few.jsonl.gz", [
        record("mp-1"), record("mp-2", ["Si"]),
        record("mp-3", ["Cu"], band_gap=None), record("mp-4", ["K", "Br"], band_gap=None),
        record("mp-5", ["Li", "F"], band_gap=None),
    ])
    sets = ("data.source=file", f"data.path={data}", "train.torch_threads=1")
    assert mpprop(params_file, "fetch", sets=sets).exit_code == 0
    result = mpprop(params_file, "featurize", "--workers", "1", sets=sets)
    assert result.exit_code == 0, result.output
    assert mpprop(params_file, "split", "--property", "band_gap", sets=sets).exit_code == 0
    result = mpprop(params_file, "train", "--property", "band_gap", "--epochs", "1", sets=sets)
    lines = error_lines(result)
    assert len(lines) == 1 and "too few labelled records" in lines[0], lines
    assert not list(tmp_path.glob("models/band_gap/*/metrics.json"))


# ---------------------------------------------------------------- finding 7: storage URLs
@pytest.mark.parametrize(("url", "shown", "cause"), [
    ("notadb://x", "notadb://x", "NoSuchModuleError"),
    ("postgresql://nouser:hunter2@127.0.0.1:1/x", "postgresql://nouser:***@127.0.0.1:1/x",
     "Connection refused"),
    ("no url at all", "no url at all", "ArgumentError"),
])
def test_unusable_optuna_storage_fails_in_one_line(tmp_path, params_file, url, shown, cause):
    result = mpprop(params_file, "tune", "--property", "band_gap", "--storage", url)
    lines = error_lines(result)
    assert len(lines) == 1, result.output
    assert shown in lines[0] and cause in lines[0]
    assert "hunter2" not in result.output
    assert len(result.output.strip().splitlines()) <= 2  # not a 54-line traceback
