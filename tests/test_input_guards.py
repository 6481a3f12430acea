"""What a user-filed issue found, each refused in one line or reported in its row:

1. `predict --output` / `embed --output` destroyed data (the tracking DB, the input itself, a
   file in an input folder): refused with exit code 2 and nothing written;
2. a 1-atom cell of 0.02 Å took 18 GB and 29 s in the neighbour search: structures outside
   predict.max_atoms / min_volume_per_atom / min_distance fail their row first, in
   `mpprop predict`, `mpprop embed` and the served model alike;
3. a split whose pool held the test ids was trained on: split files are checked;
4. messages that hid the cause: a CIF with two atoms on one site, a symbol that is no element.

The models here are tiny untrained CGCNNs put in place of the registry (resolve_models), so
that the real commands run in seconds; structures are built in the tests.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner, Result
from conftest import REPO, nacl, tiny_registered_model
from pymatgen.core import Lattice, Structure

import mpprop.inference as inference
from mpprop.cli import main
from mpprop.config import load_params
from mpprop.data import SplitError, Workspace, load_split, split_path
from mpprop.graphs import graphs_from_structures
from mpprop.inference import StructureLimits
from mpprop.params_schema import PredictSection
from mpprop.predict_inputs import read_structure_file
from mpprop.prediction_csv import OUTPUT_COLUMNS, RegisteredModel, is_prediction_csv
from mpprop.served_model import CGCNNPyfunc
from mpprop.settings import ConfigError

PROP = "band_gap"
HEADER = ",".join(OUTPUT_COLUMNS)


# ---------------------------------------------------------------- helpers
def cif(a: float, sites: list[tuple[str, tuple[float, float, float]]], name: str = "x") -> str:
    """A P1 CIF of a cubic cell (written by hand: CifWriter would merge two atoms on one
    site, which is what one of these files must keep)."""
    atoms = "\n".join(f"{el}{i} {el} {x} {y} {z} 1" for i, (el, (x, y, z)) in enumerate(sites))
    return (f"data_{name}\n_cell_length_a {a}\n_cell_length_b {a}\n_cell_length_c {a}\n"
            "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
            "_symmetry_space_group_name_H-M 'P 1'\n"
            "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n"
            f"_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n{atoms}\n")


# a 1-atom cube of 0.02 Å: 8e-6 Å^3 per atom (the file)
COLLAPSED_CIF = cif(0.02, [("Na", (0, 0, 0))], "collapsed")
# Na and Cl on one site: pymatgen parses no structure ("Occupancy 2.0 exceeded tolerance")
TWO_ON_ONE_SITE_CIF = cif(5.64, [("Na", (0, 0, 0)), ("Cl", (0, 0, 0))], "twoonone")
# "Xx" is no element: pymatgen reads it as a dummy species
UNKNOWN_ELEMENT_POSCAR = ("x\n1.0\n5 0 0\n0 5 0\n0 0 5\nXx Na\n1 1\ndirect\n"
                          "0 0 0\n0.5 0.5 0.5\n")


def tiny_model() -> RegisteredModel:
    return tiny_registered_model(PROP)


@pytest.fixture
def guarded_search(monkeypatch) -> None:
    """A collapsed cell that reaches the neighbour search fails there at once (instead of
    taking gigabytes, should the checks before it ever let one through)."""
    real = inference.graphs_from_structures

    def guarded(structures, settings, *args, **kwargs):
        for s in structures:
            if s.volume / len(s) < 1.0 or min(s.lattice.abc) < 0.3:
                raise RuntimeError("a collapsed cell reached the neighbour search")
        return real(structures, settings, *args, **kwargs)

    monkeypatch.setattr(inference, "graphs_from_structures", guarded)


@pytest.fixture
def project(tmp_path: Path, monkeypatch, guarded_search) -> Path:
    """A project folder (params.yaml) whose registry is a tiny model."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    model = tiny_model()
    monkeypatch.setattr("mpprop.stages.predict.resolve_models",
                        lambda params, prop, alias=None, version=None: [model])
    return tmp_path


def mpprop(project: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--params", str(project / "params.yaml"), *args])


def predict(project: Path, inputs: list[Path], output: Path, *extra: str) -> Result:
    argv = ["predict", "--property", PROP, "--output", str(output), *extra]
    for p in inputs:
        argv += ["--input", str(p)]
    return mpprop(project, *argv)


def refused(result: Result) -> str:
    """The one `Error:` line of a refused command (exit code 2, no usage text)."""
    assert "Traceback" not in result.output
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --output "), lines
    return lines[0]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def cifs(project: Path) -> Path:
    folder = project / "in"
    folder.mkdir()
    nacl().to(filename=str(folder / "NaCl.cif"))
    (project / "list.txt").write_text("in/NaCl.cif\n")
    return folder


# ---------------------------------------------------------------- 1: where --output may go
def test_predict_never_replaces_the_tracking_database(project, cifs):
    db = project / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes(b"SQLite format 3\x00 the experiment log")
    for extra in ((), ("--overwrite",)):
        line = refused(predict(project, [cifs / "NaCl.cif"], db, *extra))
        assert "MLflow tracking store" in line and "even with --overwrite" in line
        assert db.read_bytes() == b"SQLite format 3\x00 the experiment log"
    assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]  # no temp file


@pytest.mark.parametrize(("output", "inputs", "reason"), [
    ("in/NaCl.cif", ["in/NaCl.cif"], "is the input"),
    ("list.txt", ["list.txt"], "is the input"),
    ("in/NaCl.cif", ["list.txt"], "is listed in the input list"),
    ("in/preds.csv", ["in"], "is inside the input folder"),
    ("in/sub/preds.csv", ["in"], "is inside the input folder"),
])
def test_predict_never_writes_over_or_into_its_inputs(project, cifs, output, inputs, reason):
    before = files_under(project)
    for extra in ((), ("--overwrite",)):
        line = refused(predict(project, [project / p for p in inputs], project / output,
                               *extra))
        assert reason in line, line
        assert files_under(project) == before
    # a symlink that leads to an input is the input
    link = project / "link.cif"
    link.symlink_to(cifs / "NaCl.cif")
    assert "is the input" in refused(predict(project, [cifs / "NaCl.cif"], link, "--overwrite"))
    assert (cifs / "NaCl.cif").read_bytes() == before["in/NaCl.cif"]


@pytest.mark.parametrize("inside", ["data/splits/p.csv", "data/p.csv", "data/snapshot/p.csv",
                                    "models/p.csv", "mlruns/artifacts/p.csv", ".dvc/p.csv",
                                    "optuna/p.csv"])
def test_predict_never_writes_into_project_folders(project, cifs, inside):
    for extra in ((), ("--overwrite",)):
        line = refused(predict(project, [cifs / "NaCl.cif"], project / inside, *extra))
        assert "the project's" in line or "store" in line, line
        assert not (project / inside).exists()


def test_an_existing_file_is_replaced_only_if_it_is_a_prediction_csv(project, cifs):
    notes = project / "notes.csv"
    notes.write_text("my,own,table\n1,2,3\n")
    line = refused(predict(project, [cifs / "NaCl.cif"], notes))
    assert "exists and is not an mpprop prediction CSV" in line and "--overwrite" in line
    assert notes.read_text() == "my,own,table\n1,2,3\n"

    result = predict(project, [cifs / "NaCl.cif"], notes, "--overwrite")
    assert result.exit_code == 0, result.output
    assert notes.read_text().splitlines()[0] == HEADER
    # an earlier prediction CSV is replaced without --overwrite
    result = predict(project, [project / "list.txt"], notes)
    assert result.exit_code == 0, result.output
    rows = read_rows(notes)
    assert [r["id"] for r in rows] == ["in/NaCl.cif"] and rows[0]["error"] == ""
    assert [p.name for p in project.iterdir() if p.name.startswith(".notes")] == []
    # an empty file (mktemp's) holds nothing to lose
    empty = project / "empty.csv"
    empty.touch()
    assert predict(project, [cifs / "NaCl.cif"], empty).exit_code == 0
    assert empty.read_text().splitlines()[0] == HEADER


def test_prediction_csv_is_recognised_by_its_header(tmp_path):
    cases = {
        "now.csv": HEADER + "\r\n",
        "older.csv": "id,property,prediction,value,unit,model,error\n",  # an earlier version
        "other.csv": "id,property,prediction,price\n",
        "binary.csv": "\x00\x01SQLite",
        "empty.csv": "",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    found = {name for name in cases if is_prediction_csv(tmp_path / name)}
    assert found == {"now.csv", "older.csv"}


def test_embed_output_follows_the_same_rules(project, cifs):
    def embed(output: Path, *extra: str) -> Result:
        return mpprop(project, "embed", "--property", PROP, "--input", str(cifs),
                      "--output", str(output), *extra)

    before = files_under(cifs)
    assert "is inside the input folder" in refused(embed(cifs / "x.npy", "--overwrite"))
    assert "the project's models folder" in refused(embed(project / "models" / "x.npy"))
    assert files_under(cifs) == before

    mine = project / "mine.npy"
    np.save(mine, np.arange(4))  # someone's array, not an embedding
    assert "is not an mpprop embedding" in refused(embed(mine))
    assert np.array_equal(np.load(mine), np.arange(4))
    ids = project / "out.ids.txt"
    ids.write_text("my notes\n")  # the ids file an embedding to out.npy would write
    assert "would write " + str(ids) + ", which exists" in refused(embed(project / "out.npy"))
    assert ids.read_text() == "my notes\n"

    result = embed(project / "out.npy", "--overwrite")
    assert result.exit_code == 0, result.output
    assert np.load(project / "out.npy").shape == (1, 8)
    assert ids.read_text() == "NaCl.cif\n"
    assert embed(project / "out.npy").exit_code == 0  # its own output: no --overwrite needed
    result = embed(project / "out.parquet")
    assert result.exit_code == 0, result.output
    assert embed(project / "out.parquet").exit_code == 0
    assert list(pd.read_parquet(project / "out.parquet").columns[:2]) == ["id", "f0"]


# ---------------------------------------------------------------- 2: bounded work per structure
def test_a_collapsed_cell_fails_its_row_before_the_neighbour_search(project, cifs):
    (cifs / "collapsed.cif").write_text(COLLAPSED_CIF)
    out = project / "p.csv"
    result = predict(project, [cifs], out)
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in read_rows(out)}
    assert rows["collapsed.cif"]["error"] == (
        "volume per atom 8e-06 Å^3 is below predict.min_volume_per_atom (1.0 Å^3; crystals "
        "have > ~5): the crystal graph would explode")
    assert rows["collapsed.cif"]["prediction"] == ""
    assert rows["NaCl.cif"]["error"] == "" and rows["NaCl.cif"]["prediction"] != ""
    assert "1 ok, 1 failed" in result.output


def test_atom_count_and_distance_limits(project, cifs):
    # 1.25 Å^3 per atom, within min_volume_per_atom, but 0.05 Å from its own images: the
    # distance check stops it (a plane of images 0.05 Å apart: ~10^5 neighbours per atom)
    thin = Structure(Lattice.orthorhombic(0.05, 0.05, 500.0), ["Na"], [[0, 0, 0]])
    structures = {
        "close.vasp": Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0, 0, 0.02]]),
        "near.vasp": Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0, 0, 0.09]]),
        "thin.vasp": thin,
    }
    for name, s in structures.items():
        s.to(filename=str(cifs / name), fmt="poscar")
    out = project / "p.csv"
    result = mpprop(project, "-S", "predict.max_atoms=4", "predict", "--property", PROP,
                    "--input", str(cifs), "--output", str(out))
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in read_rows(out)}
    assert rows["NaCl.cif"]["error"] == (
        "8 atoms is above predict.max_atoms (4): too large to featurize here")
    assert rows["close.vasp"]["error"].startswith(
        "shortest interatomic distance 0.1 Å (periodic images included) is below "
        "predict.min_distance (0.3 Å)")
    assert rows["thin.vasp"]["error"].startswith("shortest interatomic distance 0.05 Å")
    # 0.45 Å: above min_distance, so a prediction with the old warning
    assert rows["near.vasp"]["error"] == "" and "closer than 0.5 Å" in rows["near.vasp"]["warning"]
    # the limits are params: 0 turns the atom count bound off
    result = mpprop(project, "-S", "predict.max_atoms=0", "predict", "--property", PROP,
                    "--input", str(cifs / "NaCl.cif"), "--output", str(out))
    assert result.exit_code == 0 and read_rows(out)[0]["error"] == ""


def test_limits_are_params_with_the_inference_defaults(tmp_path):
    params = load_params(REPO / "params.yaml")
    assert params.structure_limits() == StructureLimits()
    fields = PredictSection.model_fields
    assert StructureLimits() == StructureLimits(
        max_atoms=fields["max_atoms"].default,
        min_volume_per_atom=fields["min_volume_per_atom"].default,
        min_distance=fields["min_distance"].default)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert {k: raw["predict"][k] for k in ("max_atoms", "min_volume_per_atom",
                                           "min_distance")} == {
        "max_atoms": 1000, "min_volume_per_atom": 1.0, "min_distance": 0.3}
    with pytest.raises(ConfigError, match="predict.min_distance: must be >= 0"):
        load_params(REPO / "params.yaml", ["predict.min_distance=-1"])


def test_the_served_model_applies_the_same_checks(guarded_search):
    served = CGCNNPyfunc()
    served.loaded = tiny_model().loaded
    served.spec = served.loaded.spec
    frame = pd.DataFrame({"cif": [COLLAPSED_CIF, TWO_ON_ONE_SITE_CIF, cif(
        5.64, [("Na", (0, 0, 0)), ("Cl", (0.5, 0.5, 0.5))], "ok")]})
    out = served.predict(None, frame)
    assert out["error"][0].startswith("volume per atom 8e-06 Å^3 is below")
    assert "Occupancy 2.0 exceeded tolerance" in out["error"][1]
    assert out["error"][2] == "" and np.isfinite(out["prediction"][2])
    assert out["prediction"][0] is None and out["prediction"][1] is None  # null when served


# ---------------------------------------------------------------- 3: split files are checked
@pytest.fixture
def split_ws(tmp_path: Path):
    """Params of a project in tmp_path and a workspace of four small crystals."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    params = load_params(tmp_path / "params.yaml")
    ids = ["mp-1", "mp-2", "mp-3", "mp-4"]
    structures = [nacl(), nacl(), nacl(), nacl()]
    cache = graphs_from_structures(structures, params.graph_settings(), ids)
    ws = Workspace({"sha256": "abc123"}, np.ones((4, 1)), [PROP], cache)
    return params, ws


def good_split(**changes) -> dict:
    split = {"test": ["mp-1"], "pool": ["mp-2", "mp-3", "mp-4"], "snapshot_sha256": "abc123"}
    split.update(changes)
    return split


@pytest.mark.parametrize(("content", "problem"), [
    ("[1, 2]", "must be a JSON object with the lists `test` and `pool` (got [1, 2])"),
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at "
                  "line 1, column 2)"),
    (json.dumps(good_split(pool=["mp-2", "mp-3", "mp-4", "mp-1"])),
     "1 ids are in both test and pool (e.g. mp-1)"),
    (json.dumps(good_split(pool=["mp-2", "mp-3", "mp-3"])),
     "1 ids occur more than once in `pool` (e.g. mp-3)"),
    (json.dumps(good_split(test=[1])), "`test` must hold material ids as strings (got 1)"),
    (json.dumps(good_split(test="mp-1")), "`test` must be a list of material ids (got \"mp-1\")"),
    (json.dumps({"test": ["mp-1"]}), "`pool` must be a list of material ids (got nothing)"),
    (json.dumps(good_split(pool=["mp-2", "mp-99"])),
     "1 ids are not in the snapshot's graph cache (e.g. mp-99)"),
])
def test_a_bad_split_file_is_one_line_naming_file_and_problem(split_ws, content, problem):
    params, ws = split_ws
    path = split_path(params, PROP)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(SplitError) as info:
        load_split(params, ws, PROP)
    message = str(info.value)
    assert message == (f"{path}: {problem}; rerun `mpprop split --property {PROP} "
                       "--overwrite`"), message
    assert "\n" not in message


def test_a_good_split_file_loads(split_ws):
    params, ws = split_ws
    path = split_path(params, PROP)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(good_split()))
    assert load_split(params, ws, PROP)["pool"] == ["mp-2", "mp-3", "mp-4"]


def test_train_refuses_a_split_whose_pool_holds_test_ids(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    data = tmp_path / "records.jsonl"
    records = []
    for i, (a, b) in enumerate([("Na", "Cl"), ("K", "Br"), ("Li", "F"), ("Cs", "I"),
                                ("Rb", "Cl"), ("Na", "F")]):
        s = Structure(Lattice.cubic(5.0 + 0.1 * i), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])
        records.append({"material_id": f"mp-{i + 1}", "structure": s.as_dict(),
                        "band_gap": 1.0 + i})
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    sets = ["-S", "data.source=file", "-S", f"data.path={data}", "-S", "train.torch_threads=1"]

    def run(*args: str) -> Result:
        return CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), *sets,
                                         *args])

    for step in (["fetch"], ["featurize", "--workers", "1"], ["split", "--property", PROP]):
        result = run(*step)
        assert result.exit_code == 0, result.output
    path = tmp_path / "data" / "splits" / f"{PROP}.json"
    split = json.loads(path.read_text())
    split["pool"] += split["test"]  # what the issue did
    path.write_text(json.dumps(split))
    for content in (json.dumps(split), "[1, 2]"):
        path.write_text(content)
        result = run("train", "--property", PROP, "--epochs", "1")
        assert "Traceback" not in result.output and result.exit_code == 1, result.output
        lines = [line[line.index("Error:"):] for line in result.output.splitlines()
                 if "Error:" in line]
        assert len(lines) == 1 and str(path) in lines[0], result.output
        assert ("are in both test and pool" if content != "[1, 2]"
                else "must be a JSON object") in lines[0]
    assert not list(tmp_path.glob("models/*/*/metrics.json"))


# ---------------------------------------------------------------- 4: messages that name the cause
def test_a_cif_with_two_atoms_on_one_site_gives_pymatgens_reason(tmp_path):
    path = tmp_path / "two.cif"
    path.write_text(TWO_ON_ONE_SITE_CIF)
    (row,) = read_structure_file(path, "two.cif")
    assert row.structure is None
    assert row.error == ("ValueError: Invalid CIF file with no structures! pymatgen: "
                         "Occupancy 2.0 exceeded tolerance.")


def test_a_symbol_that_is_no_element_is_named(project, cifs):
    (cifs / "POSCAR").write_text(UNKNOWN_ELEMENT_POSCAR)
    (cifs / "two.cif").write_text(TWO_ON_ONE_SITE_CIF)
    Structure(Lattice.cubic(3.5), ["Md"], [[0, 0, 0]]).to(filename=str(cifs / "Md.vasp"),
                                                          fmt="poscar")
    out = project / "p.csv"
    result = predict(project, [cifs], out)
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in read_rows(out)}
    assert rows["POSCAR"]["error"] == ("unusable structure: Xx is not a chemical element "
                                       "(the CGCNN feature table covers elements 1-100)")
    assert rows["Md.vasp"]["error"] == ("element(s) Md outside the CGCNN feature table "
                                        "(elements 1-100)")
    assert "Occupancy 2.0 exceeded tolerance" in rows["two.cif"]["error"]
