"""`mpprop fetch`: file sources, the real mp_api client against a loopback MP API, validation
counts, metadata and atomic writing."""

from __future__ import annotations

import gzip
import json
import math
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import require_shared_data
from mp_api_server import GGA, MPAPIServer, load_records
from pymatgen.core import Lattice, Structure

from mpprop import mp_source
from mpprop.config import Params, validate_params
from mpprop.snapshot import load_snapshot, sha256_file
from mpprop.stages.fetch import FetchError, fetch_snapshot, format_fetch_summary

REPO = Path(__file__).resolve().parents[1]
PROPS = [
    "formation_energy_per_atom", "energy_per_atom", "efermi", "band_gap",
    "bulk_modulus", "shear_modulus", "poisson_ratio",
]
DUMMY_KEY = "0123456789abcdef0123456789abcdef"  # 32 characters, as mp_api requires


def make_params(root: Path, **data: Any) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(data)
    return Params(schema=validate_params(raw), root=root)


def write_jsonl_gz(path: Path, lines: list[Any]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for item in lines:
            # str items are written verbatim (malformed lines); json allows NaN tokens
            fh.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
    return path


def assert_same_snapshot(a, b) -> None:
    assert list(a.material_id) == list(b.material_id)
    assert a.property_names == b.property_names
    for key in ("lattice", "site_offsets", "atomic_numbers", "frac_coords"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    np.testing.assert_array_equal(a.labels, b.labels)  # NaN == NaN here


# ---------------------------------------------------------------- real records
@pytest.fixture(scope="module")
def real_records() -> list[dict[str, Any]]:
    """50 real MP records from the start of the shared file, all that carry an energy.

    The file lies in ../shared/data beside the repo; conftest skips (fails in CI) without it.
    """
    head = load_records(require_shared_data(), limit=400)
    with_energy = [r for r in head if r["energy_per_atom"] is not None]
    others = [r for r in head if r["energy_per_atom"] is None][: 50 - len(with_energy)]
    picked = {r["material_id"] for r in with_energy + others}
    return [r for r in head if r["material_id"] in picked]  # file order


def test_mp_api_fetch_equals_file_source(tmp_path, monkeypatch, real_records):
    recs = real_records
    assert len(recs) == 50 and sum(r["energy_per_atom"] is not None for r in recs) >= 10
    src = write_jsonl_gz(tmp_path / "recs.jsonl.gz", recs)
    meta_file = fetch_snapshot(
        make_params(tmp_path, source="file", path=str(src)), tmp_path / "file", progress=False
    )
    ids = [r["material_id"] for r in recs]
    with MPAPIServer(recs) as srv:
        monkeypatch.setenv("MP_API_ENDPOINT", srv.endpoint)
        monkeypatch.setenv("MP_API_KEY", DUMMY_KEY)
        params = make_params(
            tmp_path, source="mp-api",
            mp_api={"criteria": {"material_ids": ids}, "energy_thermo_type": GGA,
                    "chunk_size": 20},  # 50 docs: three pages of _limit/_skip
        )
        meta_api = fetch_snapshot(params, tmp_path / "api", progress=False)
        requests = list(srv.requests)
        endpoint = srv.endpoint
        served_summary = {d["material_id"]: d for d in srv.summary}

    file_snap, _ = load_snapshot(tmp_path / "file", verify=True)
    api_snap, _ = load_snapshot(tmp_path / "api", verify=True)
    assert_same_snapshot(api_snap, file_snap)
    assert list(api_snap.material_id) == ids
    assert meta_api["counts"] == meta_file["counts"]
    assert meta_api["excluded"] == meta_file["excluded"]
    assert meta_file["excluded"]["records"] == {}  # real records: none left out

    # energy comes from the GGA_GGA+U thermo docs, not the (shifted) summary field
    energy = api_snap.label("energy_per_atom")
    for i, r in enumerate(recs):
        if r["energy_per_atom"] is None:
            assert math.isnan(energy[i])
        else:
            assert energy[i] == r["energy_per_atom"]
            assert served_summary[r["material_id"]]["energy_per_atom"] == pytest.approx(
                r["energy_per_atom"] - 10.0)
    assert meta_api["counts"]["energy_per_atom"] == sum(
        r["energy_per_atom"] is not None for r in recs)

    # the metadata says where the data came from and which functional the energy is
    assert meta_api["source"] == "mp-api"
    assert meta_api["endpoint"] == endpoint
    assert meta_api["database_version"] == srv.db_version
    assert meta_api["query"]["criteria"] == {"material_ids": ids}
    assert GGA in meta_api["energy_per_atom_functional"]
    assert meta_api["mp_api"]["n_summary_docs"] == 50

    # what the real client sent: heartbeat, paged summary without energy, typed thermo
    paths = [p for p, _ in requests]
    assert "/heartbeat" in paths
    summary_q = [q for p, q in requests if p == "/materials/summary/"]
    thermo_q = [q for p, q in requests if p == "/materials/thermo/"]
    assert len(summary_q) == 3 and {q.get("_skip", "0") for q in summary_q} == {"0", "20", "40"}
    assert all("energy_per_atom" not in q["_fields"].split(",") for q in summary_q)
    assert all(q["material_ids"].split(",") == ids for q in summary_q)
    assert thermo_q and all(q["thermo_types"] == GGA for q in thermo_q)


def test_mp_api_long_id_list_is_split_by_client(tmp_path, monkeypatch):
    recs = load_records(require_shared_data(), limit=250)
    ids = [r["material_id"] for r in recs]
    # a URL with 250 ids is refused (414); the client retries in batches of 100
    with MPAPIServer(recs, max_url_length=2500) as srv:
        monkeypatch.setenv("MP_API_ENDPOINT", srv.endpoint)
        monkeypatch.setenv("MP_API_KEY", DUMMY_KEY)
        params = make_params(
            tmp_path, source="mp-api", mp_api={"criteria": {"material_ids": ids}})
        meta = fetch_snapshot(params, tmp_path / "api", progress=False)
        statuses = [len(q.get("material_ids", "").split(",")) for p, q in srv.requests
                    if p == "/materials/summary/"]
    snap, _ = load_snapshot(tmp_path / "api")
    assert list(snap.material_id) == ids and meta["n_records"] == 250
    assert statuses[0] == 250 and max(statuses[1:]) <= 100


def test_mp_api_refuses_empty_criteria_and_missing_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MP_API_KEY", DUMMY_KEY)
    params = make_params(tmp_path, source="mp-api", mp_api={"criteria": {}})
    with pytest.raises(FetchError, match="S3"):
        fetch_snapshot(params, tmp_path / "s", progress=False)
    monkeypatch.delenv("MP_API_KEY")
    params = make_params(
        tmp_path, source="mp-api", mp_api={"criteria": {"material_ids": ["mp-1"]}})
    with pytest.raises(FetchError, match="MP_API_KEY"):
        fetch_snapshot(params, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_mp_api_unreachable_endpoint_is_a_fetch_error(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MP_API_ENDPOINT", f"http://127.0.0.1:{port}/")
    monkeypatch.setenv("MP_API_KEY", DUMMY_KEY)
    params = make_params(
        tmp_path, source="mp-api", mp_api={"criteria": {"material_ids": ["mp-1"]}})
    with pytest.raises(FetchError, match="MP API query failed"):
        fetch_snapshot(params, tmp_path / "s", progress=False)


def test_mp_api_wrong_thermo_type_is_refused(tmp_path, monkeypatch, real_records):
    recs = [r for r in real_records if r["energy_per_atom"] is not None][:3]
    with MPAPIServer(recs) as srv:
        real_filter = srv._filter

        def ignore_thermo_types(docs, params, ranges, thermo):  # a careless server
            params = {k: v for k, v in params.items() if k != "thermo_types"}
            return real_filter(docs, params, ranges, thermo)

        srv._filter = ignore_thermo_types
        monkeypatch.setenv("MP_API_ENDPOINT", srv.endpoint)
        monkeypatch.setenv("MP_API_KEY", DUMMY_KEY)
        params = make_params(tmp_path, source="mp-api", mp_api={
            "criteria": {"material_ids": [r["material_id"] for r in recs]}})
        with pytest.raises(FetchError, match="refusing to mix functionals"):
            fetch_snapshot(params, tmp_path / "s", progress=False)


# ---------------------------------------------------------------- file source, bad records
def _structure(species: list[str], a: float = 4.0) -> Structure:
    coords = [[0, 0, 0], [0.5, 0.5, 0.5]][: len(species)]
    return Structure(Lattice.cubic(a), species, coords)


def _rec(mid: Any, structure: Any, **labels: Any) -> dict[str, Any]:
    base = {
        "formation_energy_per_atom": -1.0, "energy_per_atom": -5.0, "efermi": 2.0,
        "band_gap": 1.5, "bulk_modulus": {"vrh": 100.0}, "shear_modulus": {"vrh": 50.0},
        "homogeneous_poisson": 0.3,
    }
    if isinstance(structure, Structure):
        structure = structure.as_dict()
    return {"material_id": mid, "structure": structure, **base, **labels}


@pytest.fixture
def bad_file(tmp_path) -> Path:
    nacl = _structure(["Na", "Cl"], 5.6)
    no_sites = nacl.as_dict()
    no_sites["sites"] = []
    disordered = nacl.as_dict()
    disordered["sites"][0]["species"] = [{"element": "Na", "occu": 0.5}]
    lines = [
        _rec("mp-1", nacl),
        _rec("mp-2", _structure(["Si"], 3.0), energy_per_atom=None),
        _rec("mp-3", no_sites),
        _rec("mp-4", {"lattice": "not a lattice", "sites": [{"x": 1}]}),
        _rec("mp-5", _structure(["Cs", "Cl"], 4.1), band_gap=None),
        _rec("mp-6", _structure(["K", "Br"], 6.6), formation_energy_per_atom=float("nan")),
        _rec("mp-7", _structure(["Li", "F"], 4.0), efermi="nan"),
        _rec("mp-8", _structure(["Mg", "O"], 4.2), bulk_modulus={"vrh": -5.0}),
        _rec("mp-1", _structure(["Cu"], 3.6), band_gap=9.9),  # duplicate id: first kept
        _rec("mp-9", disordered),
        "",  # blank lines are not records
        "{this is not json",
        _rec(None, _structure(["Al"], 4.05)),
        _rec("mp-10", _structure(["Fe"], 2.87), shear_modulus=42.0,  # not {"vrh": ...}
             homogeneous_poisson=None),
    ]
    return write_jsonl_gz(tmp_path / "bad.jsonl.gz", lines)


def test_file_source_counts_every_exclusion(tmp_path, bad_file):
    meta = fetch_snapshot(
        make_params(tmp_path, source="file", path=str(bad_file)), tmp_path / "snap",
        progress=False)
    snap, _ = load_snapshot(tmp_path / "snap", verify=True)
    kept = ["mp-1", "mp-2", "mp-5", "mp-6", "mp-7", "mp-8", "mp-10"]
    assert list(snap.material_id) == kept
    assert meta["excluded"]["records"] == {
        "unparsable_record": 1, "missing_material_id": 1, "duplicate_material_id": 1,
        "unparsable_structure": 1, "no_sites": 1, "disordered_sites": 1,
    }
    assert meta["excluded"]["per_property"] == {
        "formation_energy_per_atom": {"non_finite": 1},
        "energy_per_atom": {"missing": 1},
        "efermi": {"non_numeric": 1},
        "band_gap": {"missing": 1},
        "bulk_modulus": {"non_positive_for_log10": 1},
        "shear_modulus": {"non_numeric": 1},
        "poisson_ratio": {"missing": 1},
    }
    assert meta["counts"] == {p: len(kept) - 1 for p in PROPS}
    assert meta["excluded_examples"]["duplicate_material_id"] == ["mp-1"]
    assert meta["n_examined"] == 13

    # good records keep their raw values; only the affected label is NaN
    row = {m: i for i, m in enumerate(kept)}
    assert snap.labels[row["mp-1"]].tolist() == [-1.0, -5.0, 2.0, 1.5, 100.0, 50.0, 0.3]
    assert snap.label("band_gap")[row["mp-1"]] == 1.5  # not the duplicate's 9.9
    assert math.isnan(snap.label("energy_per_atom")[row["mp-2"]])
    assert math.isnan(snap.label("bulk_modulus")[row["mp-8"]])
    assert snap.label("shear_modulus")[row["mp-8"]] == 50.0
    assert math.isnan(snap.label("efermi")[row["mp-7"]])
    assert snap.structure(row["mp-1"]).composition.reduced_formula == "NaCl"
    assert snap.structure(row["mp-10"]).composition.reduced_formula == "Fe"

    text = format_fetch_summary(meta)
    for word in ("duplicate_material_id", "non_positive_for_log10", "bulk_modulus", "mp-1"):
        assert word in text


def test_subsample_is_seeded_and_takes_valid_records(tmp_path, bad_file):
    def run(seed: int, n: int, name: str) -> tuple[list[str], dict]:
        params = make_params(tmp_path, source="file", path=str(bad_file),
                             max_records=n, subsample_seed=seed)
        meta = fetch_snapshot(params, tmp_path / name, progress=False)
        return list(load_snapshot(tmp_path / name)[0].material_id), meta

    ids_a, meta = run(7, 4, "a")
    ids_b, _ = run(7, 4, "b")
    assert ids_a == ids_b and len(ids_a) == 4  # deterministic, and only valid records
    assert set(ids_a) <= {"mp-1", "mp-2", "mp-5", "mp-6", "mp-7", "mp-8", "mp-10"}
    assert meta["subsample"]["applied"] and meta["subsample"]["n_available"] == 13
    assert {tuple(run(s, 4, f"s{s}")[0]) for s in range(6)} != {tuple(ids_a)}
    all_ids, meta_all = run(0, 100, "all")  # more than available: everything, not shuffled
    assert len(all_ids) == 7 and not meta_all["subsample"]["applied"]


def test_require_property_keeps_only_records_with_that_value(tmp_path, bad_file):
    params = make_params(tmp_path, source="file", path=str(bad_file),
                         require_property="poisson_ratio")
    meta = fetch_snapshot(params, tmp_path / "elastic", progress=False)
    ids = list(load_snapshot(tmp_path / "elastic")[0].material_id)
    # mp-10 has no Poisson ratio; the other valid records keep theirs
    assert ids == ["mp-1", "mp-2", "mp-5", "mp-6", "mp-7", "mp-8"]
    assert meta["excluded"]["records"]["lacks_required_property"] == 1
    assert meta["require_property"] == "poisson_ratio"
    with pytest.raises(ValueError, match="require_property"):
        fetch_snapshot(make_params(tmp_path, source="file", path=str(bad_file),
                                   require_property="hardness"), tmp_path / "x", progress=False)


# ---------------------------------------------------------------- CGCNN folder
def test_cgcnn_folder_source(tmp_path):
    folder = tmp_path / "cgcnn"
    folder.mkdir()
    good = {"mp-a": _structure(["Na", "Cl"], 5.6), "mp-b": _structure(["Si"], 3.1)}
    for mid, s in good.items():
        s.to(filename=str(folder / f"{mid}.cif"))
    (folder / "mp-bad.cif").write_text("data_broken\n_cell_length_a oops\nloop_\n")
    (folder / "id_prop.csv").write_text("mp-a,1.25\nmp-b,0.5\nmp-bad,2.0\nmp-nocif,3.0\n")
    params = make_params(tmp_path, source="file", path="cgcnn", cgcnn_property="band_gap")
    meta = fetch_snapshot(params, tmp_path / "snap", progress=False)
    snap, _ = load_snapshot(tmp_path / "snap", verify=True)

    assert list(snap.material_id) == ["mp-a", "mp-b"]
    np.testing.assert_array_equal(snap.label("band_gap"), [1.25, 0.5])
    others = [p for p in PROPS if p != "band_gap"]
    assert np.isnan(snap.labels[:, [PROPS.index(p) for p in others]]).all()
    assert meta["counts"] == {p: (2 if p == "band_gap" else 0) for p in PROPS}
    assert meta["excluded"]["records"] == {"missing_structure": 1, "unparsable_structure": 1}
    assert meta["source_format"] == "cgcnn" and meta["energy_per_atom_functional"] is None
    for i, s in enumerate(good.values()):
        np.testing.assert_allclose(snap.lattice[i], s.lattice.matrix, atol=1e-6)
        assert snap.structure(i).composition == s.composition
    # the digest covers the CIFs: editing one changes it
    sha = meta["source_sha256"]
    _structure(["K", "Cl"], 6.3).to(filename=str(folder / "mp-a.cif"))
    assert fetch_snapshot(params, tmp_path / "snap2", progress=False)["source_sha256"] != sha


# ---------------------------------------------------------------- writing and metadata
def test_crash_while_writing_keeps_the_previous_snapshot(tmp_path, bad_file, monkeypatch):
    """A write that dies half-way leaves the previous complete snapshot, and no litter."""
    params = make_params(tmp_path, source="file", path=str(bad_file))
    out = tmp_path / "snap"
    fetch_snapshot(params, out, progress=False)
    old_data = (out / "snapshot.npz").read_bytes()
    old_meta = (out / "snapshot.json").read_text()
    real_savez = np.savez

    def crash(fh, **arrays):
        fh.write(b"PK\x03\x04 half an archive")  # something is on disk when it dies
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="simulated"):
        fetch_snapshot(params, out, progress=False)
    monkeypatch.setattr(np, "savez", real_savez)

    assert sorted(p.name for p in out.iterdir()) == ["snapshot.json", "snapshot.npz"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp folders
    assert (out / "snapshot.npz").read_bytes() == old_data
    assert (out / "snapshot.json").read_text() == old_meta
    load_snapshot(out, verify=True)  # still vouched for


def test_metadata_contents(tmp_path, bad_file):
    params = make_params(tmp_path, source="file", path=str(bad_file))
    meta = fetch_snapshot(params, tmp_path / "snap", progress=False)
    on_disk = json.loads((tmp_path / "snap" / "snapshot.json").read_text())
    assert on_disk == meta
    snap, _ = load_snapshot(tmp_path / "snap", verify=True)
    assert meta["sha256"] == sha256_file(tmp_path / "snap" / "snapshot.npz")
    assert meta["n_records"] == len(snap) == 7
    assert meta["source_sha256"] == sha256_file(bad_file)
    assert meta["source"] == "file" and meta["source_path"] == str(bad_file.resolve())
    assert meta["query"] == {"path": str(bad_file)}
    assert meta["database_version"] is None
    assert meta["properties"] == PROPS == snap.property_names
    assert meta["created_at"].startswith(meta["snapshot_date"])
    assert "as supplied by the file" in meta["energy_per_atom_functional"]
    assert meta["counts"] == {
        p: int(np.isfinite(snap.label(p)).sum()) for p in snap.property_names}
    assert meta["subsample"] is None


def test_default_out_dir_and_no_valid_records(tmp_path):
    nothing = write_jsonl_gz(tmp_path / "none.jsonl.gz", [_rec("mp-1", None)])
    params = make_params(tmp_path, source="file", path=str(nothing),
                         snapshot_dir="data/snapshot")
    with pytest.raises(FetchError, match="no valid records"):
        fetch_snapshot(params, progress=False)
    assert not (tmp_path / "data" / "snapshot").exists()
    ok = write_jsonl_gz(tmp_path / "ok.jsonl.gz", [_rec("mp-1", _structure(["Si"]))])
    params.data.path = str(ok)
    fetch_snapshot(params, progress=False)
    assert (tmp_path / "data" / "snapshot" / "snapshot.json").exists()


# ---------------------------------------------------------------- MP API: busy server
def _api_records(n: int = 3) -> list[dict[str, Any]]:
    return [_rec(f"mp-{i}", _structure(["Na", "Cl"], 5.6 + 0.1 * i)) for i in range(n)]


@pytest.mark.parametrize("path", ["/materials/summary/", "/materials/thermo/", "/heartbeat"])
def test_mp_api_busy_503_is_retried_with_backoff(tmp_path, monkeypatch, path):
    monkeypatch.setattr(mp_source, "MP_API_BACKOFF_FACTOR", 0.01)  # keep the test fast
    recs = _api_records()
    ids = [r["material_id"] for r in recs]
    with MPAPIServer(recs, busy={path: 2}) as srv:  # 503 twice, then answers
        monkeypatch.setenv("MP_API_ENDPOINT", srv.endpoint)
        monkeypatch.setenv("MP_API_KEY", DUMMY_KEY)
        params = make_params(tmp_path, source="mp-api", mp_api={
            "criteria": {"material_ids": ids}, "energy_thermo_type": GGA})
        meta = fetch_snapshot(params, tmp_path / "api", progress=False)
        answers = [status for p, status in srv.statuses if p == path]
    assert answers[:3] == [503, 503, 200]
    assert 503 not in answers[3:]
    snap, _ = load_snapshot(tmp_path / "api", verify=True)
    assert list(snap.material_id) == ids and meta["n_records"] == 3
    assert meta["counts"]["energy_per_atom"] == 3  # the thermo answers came through


def test_mp_api_503_that_does_not_end_is_a_fetch_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mp_source, "MP_API_BACKOFF_FACTOR", 0.01)
    recs = _api_records()
    with MPAPIServer(recs, busy={"/materials/summary/": 1000}) as srv:
        monkeypatch.setenv("MP_API_ENDPOINT", srv.endpoint)
        monkeypatch.setenv("MP_API_KEY", DUMMY_KEY)
        params = make_params(tmp_path, source="mp-api", mp_api={
            "criteria": {"material_ids": [r["material_id"] for r in recs]}})
        with pytest.raises(FetchError, match="MP API query failed.*503"):
            fetch_snapshot(params, tmp_path / "api", progress=False)
        tries = [s for p, s in srv.statuses if p == "/materials/summary/"]
    assert tries == [503] * (mp_source.MP_API_MAX_RETRIES + 1)  # retried, then given up
    assert not (tmp_path / "api").exists()


# ---------------------------------------------------------------- the API key is never shown
class ReflectingServer(MPAPIServer):
    """An MP API behind a proxy that answers the data requests with the request's headers."""

    def _handle(self, h) -> None:
        if h.path.startswith("/materials/"):
            self._reply(h, 403, {"detail": f"forbidden; headers: {dict(h.headers)}"})
            return
        super()._handle(h)


def test_the_api_key_is_masked_in_fetch_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MP_API_KEY", DUMMY_KEY)
    params = make_params(tmp_path, source="mp-api", mp_api={"criteria": {"material_ids": ["mp-1"]}})
    with ReflectingServer([]) as srv:
        endpoint = srv.endpoint
        monkeypatch.setenv("MP_API_ENDPOINT", endpoint)
        with pytest.raises(FetchError) as info:
            fetch_snapshot(params, tmp_path / "s", progress=False)
    message = str(info.value)
    assert message.startswith(f"MP API query failed ({endpoint}): REST query returned with "
                              "error status code 403"), message
    assert "'x-api-key': '***'" in message and DUMMY_KEY not in message
    assert "\n" not in message and info.value.__cause__ is None  # one line, no unmasked cause
    assert capsys.readouterr().err == ""  # a loopback endpoint over http: no warning


def test_a_non_https_endpoint_warns_and_client_errors_are_masked(tmp_path, monkeypatch, capsys):
    from requests.exceptions import RequestException

    def failing(*args: Any, **kwargs: Any) -> None:
        raise RequestException(f"401 from a proxy; request had X-Api-Key: {DUMMY_KEY[::-1]}, "
                               f"key={DUMMY_KEY}")

    monkeypatch.setattr(mp_source, "_query_mp_api", failing)
    monkeypatch.setenv("MP_API_KEY", DUMMY_KEY)
    monkeypatch.setenv("MP_API_ENDPOINT", "http://mp.example.org/")
    params = make_params(tmp_path, source="mp-api", mp_api={"criteria": {"material_ids": ["mp-1"]}})
    with pytest.raises(FetchError) as info:
        fetch_snapshot(params, tmp_path / "s", progress=False)
    assert str(info.value) == ("MP API query failed (http://mp.example.org/): 401 from a proxy; "
                               "request had X-Api-Key: ***, key=***")
    assert capsys.readouterr().err.splitlines() == [
        "warning: MP_API_ENDPOINT http://mp.example.org/ is not https: the MP API key is sent "
        "unencrypted"]
    for endpoint in ("https://api.materialsproject.org/", "http://localhost:8000/"):
        mp_source.warn_if_insecure(endpoint)
    assert capsys.readouterr().err == ""
