"""Ensemble bundles, the OOD score and embeddings on tiny hand-made models and crystals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from mpprop.bundle import (
    BundleError,
    load_model,
    save_bundle,
    stored_precision,
    with_half_weights,
    with_int8_weights,
)
from mpprop.graphs import graphs_from_structures
from mpprop.inference import (
    SHORT_BOND_RATIO,
    VACUUM_GAP,
    covalent_radii,
    embed,
    graph_warnings,
    predict_structures,
    shortest_bond_ratios,
    structure_warning,
    vacuum_gap,
)
from mpprop.model import CrystalGraphConvNet, Normalizer
from mpprop.ood import OODReference, knn_mean_distance
from mpprop.settings import GraphSettings, Hyperparams, PropertySpec
from mpprop.training import predict

SPEC = PropertySpec("band_gap", "band_gap", "eV", "none", "higher")
HP = Hyperparams(2, 1, 16, 8, 0.01, 10, "SGD", 1)


def net(seed: int) -> CrystalGraphConvNet:
    torch.manual_seed(seed)
    return CrystalGraphConvNet(HP, GraphSettings()).eval()


def rocksalts() -> list[Structure]:
    return [Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [x, y], [[0, 0, 0], [.5, .5, .5]])
            for a, x, y in ((5.64, "Na", "Cl"), (6.29, "K", "Cl"), (4.21, "Mg", "O"),
                            (5.13, "Li", "Cl"), (5.97, "Na", "Br"), (4.81, "Ca", "O"))]


def test_knn_distance_and_scale() -> None:
    ref = np.array([[0.0], [1.0], [3.0]], np.float32)
    assert knn_mean_distance(np.array([[0.0]], np.float32), ref, 2).tolist() == [0.5]
    assert knn_mean_distance(ref, ref, 1, exclude_self=True).tolist() == [1.0, 1.0, 2.0]
    ood = OODReference.fit(ref, ref, k=1, quantile=1.0, max_reference=10, seed=0)
    assert ood.scale == pytest.approx(4 / 3)
    # a training point scores its own nearest distance; one far away scores far more
    assert ood.scores(np.array([[100.0]], np.float32))[0] > 50


def test_ensemble_bundle_round_trip_mean_std_and_ood(tmp_path) -> None:
    members = [(net(s), Normalizer(1.0 + s, 2.0)) for s in range(3)]
    cache = graphs_from_structures(rocksalts(), GraphSettings())
    emb = embed(members[0][0], cache)
    assert emb.shape == (6, HP.h_fea_len)
    ood = OODReference.fit(emb[:4], emb[4:], k=2, quantile=0.5, max_reference=100, seed=0)
    path = save_bundle(tmp_path / "model.pt", *members[0], SPEC, members=members[1:], ood=ood)
    loaded = load_model(path, "test")
    assert loaded.n_members == 3 and loaded.ood is not None
    np.testing.assert_allclose(loaded.ood.embeddings, ood.embeddings)

    structures = rocksalts()[:2]
    out = predict_structures([loaded], structures)
    with torch.no_grad():
        each = np.stack([predict(m, n, graphs_from_structures(structures, GraphSettings()))
                         for m, n in members])
    np.testing.assert_allclose(out.values[0], each.mean(0), rtol=1e-6)
    np.testing.assert_allclose(out.stds[0], each.std(0), rtol=1e-6)
    assert np.all(out.stds[0] > 0)  # the members differ
    assert np.all(np.isfinite(out.ood_scores[0]))


def floored_ensemble(folder, n_members: int):
    """A float32 bundle of `n_members` different nets, with a zero floor (a key to keep)."""
    members = [(net(s), Normalizer(1.0 + s, 2.0)) for s in range(n_members)]
    return save_bundle(folder / "model.pt", *members[0], SPEC, members=members[1:],
                       zero_below=0.1)


def test_half_weights_halve_the_file_and_keep_every_member_and_prediction(tmp_path) -> None:
    full = floored_ensemble(tmp_path, 2)
    half = with_half_weights(full, tmp_path / "half.pt")
    assert (stored_precision(full), stored_precision(half)) == ("float32", "float16")
    stored = torch.load(half, weights_only=True)
    for state in (stored["state_dict"], stored["members"][0]["state_dict"]):
        assert {v.dtype for v in state.values()} == {torch.float16, torch.int64}
    assert half.stat().st_size < 0.65 * full.stat().st_size  # keys and settings stay
    a, b = load_model(full, "full"), load_model(half, "half")
    assert b.n_members == 2 and b.zero_below == 0.1
    for (net_a, _), (net_b, _) in zip(a.members, b.members, strict=True):
        for (name, wa), wb in zip(net_a.state_dict().items(), net_b.state_dict().values(),
                                  strict=True):
            assert wb.dtype == wa.dtype, name  # loaded back as float32 networks
            np.testing.assert_allclose(wb.float(), wa.float(), rtol=1e-3, atol=1e-4)
    structures = rocksalts()
    pa, pb = (predict_structures([m], structures).values[0] for m in (a, b))
    np.testing.assert_allclose(pb, pa, rtol=1e-2, atol=1e-3)
    assert not np.array_equal(pa, pb)  # rounded: the copy's own predictions are measured


def test_int8_weights_quarter_the_matrices_and_load_within_half_a_step(tmp_path) -> None:
    full = floored_ensemble(tmp_path, 3)
    small = with_int8_weights(full, tmp_path / "int8.pt")
    assert stored_precision(small) == "int8"
    stored = torch.load(small, weights_only=True)
    assert stored["format"] == 3 and torch.load(full, weights_only=True)["format"] == 2
    for part in (stored, *stored["members"]):
        matrices = {k for k, v in part["state_dict"].items() if v.dim() >= 2}
        assert matrices and set(part["int8_scales"]) == matrices
        assert {part["state_dict"][k].dtype for k in matrices} == {torch.int8}
    a, b = load_model(full, "full"), load_model(small, "int8")
    assert b.n_members == 3 and b.zero_below == 0.1
    for (net_a, _), (net_b, _), part in zip(a.members, b.members, (stored, *stored["members"]),
                                            strict=True):
        for name, wa in net_a.state_dict().items():
            wb = net_b.state_dict()[name]
            assert wb.dtype == wa.dtype, name  # loaded back as float32 networks
            if name in part["int8_scales"]:  # rounded to the nearest of 255 steps per row
                step = part["int8_scales"][name].view(-1, *[1] * (wa.dim() - 1))
                assert torch.all((wb - wa).abs() <= step / 2 + 1e-7), name
                # the largest weight of each row is exactly representable
                assert torch.allclose(wb.abs().flatten(1).amax(1), wa.abs().flatten(1).amax(1))
    structures = rocksalts()
    pa, pb = (predict_structures([m], structures).values[0] for m in (a, b))
    np.testing.assert_allclose(pb, pa, rtol=3e-2, atol=3e-3)
    assert not np.array_equal(pa, pb)
    # the file is smaller than the float16 copy (the keys and settings stay the same)
    assert small.stat().st_size < with_half_weights(full, tmp_path / "half.pt").stat().st_size
    # int8 integers must never load as weights: not without their scales, not as format 2
    part = {k: v for k, v in stored.items() if k != "int8_scales"}
    torch.save(part, tmp_path / "no_scales.pt")
    with pytest.raises(BundleError, match="int8 weights without their scales"):
        load_model(tmp_path / "no_scales.pt", "x")
    torch.save({**stored, "format": 2}, tmp_path / "old.pt")
    with pytest.raises(BundleError, match="int8 weights in a bundle of format 2"):
        load_model(tmp_path / "old.pt", "x")
    with pytest.raises(BundleError, match="already holds int8 weights"):
        with_int8_weights(small, tmp_path / "again.pt")


def test_odd_structures_score_higher_than_ordinary_ones() -> None:
    """A model's embedding of salts (the reference) vs an isolated atom and a crushed cell."""
    model = net(0)
    train = rocksalts()
    ref_emb = embed(model, graphs_from_structures(train, GraphSettings()))
    ood = OODReference.fit(ref_emb, ref_emb, k=2, quantile=1.0, max_reference=100, seed=0)
    ordinary = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.4), ["Na", "Cl"],
                                         [[0, 0, 0], [.5, .5, .5]])
    isolated = Structure(Lattice.cubic(20.0), ["Na"], [[0, 0, 0]])
    crushed = ordinary.copy()
    crushed.scale_lattice(ordinary.volume * 0.125)  # 0.5x in each direction
    scores = ood.scores(embed(model, graphs_from_structures([ordinary, isolated, crushed],
                                                            GraphSettings())))
    assert scores[1] > scores[0] and scores[2] > scores[0]


def test_vacuum_gap_tells_layers_and_molecules_from_bulk() -> None:
    rock_salt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                          [[0, 0, 0], [.5, .5, .5]])
    graphene = Structure(Lattice.hexagonal(2.46, 20.0), ["C", "C"],
                         [[1 / 3, 2 / 3, 0.5], [2 / 3, 1 / 3, 0.5]])
    isolated = Structure(Lattice.cubic(15.0), ["Na"], [[0.3, 0.3, 0.3]])
    assert vacuum_gap(rock_salt) == pytest.approx(5.64 / 2)
    assert vacuum_gap(graphene) == pytest.approx(20.0)
    assert vacuum_gap(isolated) == pytest.approx(15.0)
    # an oblique cell: the gap is measured across the lattice planes (c sin beta), not along c
    slab = Structure(Lattice.from_parameters(3.0, 3.0, 30.0, 90, 120, 90), ["Na"], [[0, 0, 0]])
    assert vacuum_gap(slab) == pytest.approx(30.0 * np.sin(np.radians(120)))
    assert structure_warning(rock_salt) == ""
    assert "vacuum" in structure_warning(graphene) and vacuum_gap(graphene) > VACUUM_GAP



def test_short_bond_warning_catches_compressed_cells() -> None:
    salts = rocksalts()[:2]  # NaCl, KCl
    squeezed = []
    for s in salts:
        c = s.copy()
        c.scale_lattice(s.volume * 0.5**3)
        squeezed.append(c)
    cache = graphs_from_structures([*salts, *squeezed], GraphSettings())
    ratios = shortest_bond_ratios(cache)
    radii = covalent_radii()
    nacl = (5.64 / 2) / (radii[11] + radii[17])  # Na-Cl at half the cubic edge
    assert ratios[0] == pytest.approx(nacl, rel=1e-5)
    assert ratios[2] == pytest.approx(nacl / 2, rel=1e-5)  # the same bond at 0.5x
    assert ratios[1] > SHORT_BOND_RATIO > ratios[3]
    warnings = graph_warnings(cache)
    assert warnings[:2] == ["", ""]
    assert all("compressed" in w for w in warnings[2:])


def test_shortest_bond_ratio_skips_elements_without_a_radius(monkeypatch) -> None:
    cache = graphs_from_structures(rocksalts()[:1], GraphSettings())
    radii = covalent_radii().copy()
    radii[17] = np.nan  # no Cl radius: the Na-Cl edges drop out, the Na-Na ones remain
    monkeypatch.setattr("mpprop.inference.covalent_radii", lambda: radii)
    na_na = (5.64 / np.sqrt(2)) / (2 * radii[11])
    assert shortest_bond_ratios(cache)[0] == pytest.approx(na_na, rel=1e-5)
