"""Unit tests on small structures built here: graphs, batching, model, metrics, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import nacl, small_structures
from pymatgen.core import Lattice, Structure

from mpprop import kernels
from mpprop.config import load_params
from mpprop.data import make_test_split, train_val_split
from mpprop.graph_cache import gather_ranges, gaussian_centers
from mpprop.graphs import (
    GraphError,
    build_graphs,
    graphs_from_structures,
    nearest_neighbors,
)
from mpprop.model import (
    PRETRAINED_FILES,
    Batch,
    CrystalGraphConvNet,
    Normalizer,
    load_checkpoint,
    pretrained_path,
)
from mpprop.presets import hyperparams
from mpprop.settings import ConfigError, GraphSettings, Hyperparams
from mpprop.snapshot import Snapshot
from mpprop.stats import screening_precision

SETTINGS = GraphSettings()
XIE = Hyperparams(n_conv=4, n_h=1, atom_fea_len=64, h_fea_len=32, lr=0.02,
                  lr_decay_epoch=800, optimizer="SGD", epochs=1)


def test_neighbours_match_pymatgen_all_neighbors():
    for s in small_structures() + [nacl() * (2, 2, 2)]:
        src, dst, dist = nearest_neighbors(s, SETTINGS)
        all_nb = s.get_all_neighbors(SETTINGS.radius)
        for i, nb in enumerate(all_nb):
            ref = sorted(n.nn_distance for n in nb)[: SETTINGS.max_neighbors]
            got = dist[src == i]
            np.testing.assert_allclose(got, ref, atol=1e-10)
            # the neighbour indices point at sites at those distances
            assert np.all(np.diff(got) >= 0)
        assert np.all((dst >= 0) & (dst < len(s)))


def test_sparse_atoms_keep_only_real_neighbours():
    # a molecule-like cell: a 20 Å box with two atoms 1 Å apart has 1 neighbour each
    s = Structure(Lattice.cubic(20.0), ["H", "H"], [[0, 0, 0], [0.05, 0, 0]])
    src, dst, dist = nearest_neighbors(s, SETTINGS)
    assert src.tolist() == [0, 1]
    assert dst.tolist() == [1, 0]
    np.testing.assert_allclose(dist, [1.0, 1.0])


def test_element_outside_feature_table_names_material():
    s = Structure(Lattice.cubic(4.0), ["Og"], [[0, 0, 0]])  # Z=118
    snap = Snapshot.from_structures(["mp-bad"], [s], np.zeros((1, 0)), [])
    with pytest.raises(GraphError, match="mp-bad.*Og"):
        build_graphs(snap, SETTINGS, workers=1, progress=False)


def test_gaussian_centres_as_original():
    c = gaussian_centers(SETTINGS)
    assert len(c) == 41 and c[0] == 0.0 and c[-1] == pytest.approx(8.0)


def test_gather_ranges_and_batch_renumbering():
    assert gather_ranges(np.array([5, 0, 2]), np.array([2, 0, 3])).tolist() == [5, 6, 2, 3, 4]
    structs = small_structures()
    cache = graphs_from_structures(structs, SETTINGS)
    arrays = cache.gather(np.array([2, 0]))
    n2, n0 = len(structs[2]), len(structs[0])
    assert len(arrays["atomic_numbers"]) == n2 + n0
    assert arrays["crystal_index"].tolist() == [0] * n2 + [1] * n0
    # edges of the second crystal point at atoms after the first crystal's
    second = arrays["edge_src"] >= n2
    assert np.all(arrays["edge_dst"][second] >= n2)
    assert np.all(arrays["edge_dst"][~second] < n2)
    batch = Batch.from_arrays(arrays)
    assert batch.n_crystals == 2 and batch.degree == SETTINGS.max_neighbors


def test_model_is_permutation_consistent_and_batch_independent():
    torch.manual_seed(0)
    model = CrystalGraphConvNet(XIE, SETTINGS).eval()
    cache = graphs_from_structures(small_structures(), SETTINGS)
    with torch.no_grad():
        together = model(Batch.from_arrays(cache.gather(np.arange(4))))
        reversed_ = model(Batch.from_arrays(cache.gather(np.arange(4)[::-1].copy())))
        alone = torch.cat([model(Batch.from_arrays(cache.gather(np.array([i])))) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together, reversed_.flip(0), rtol=1e-5, atol=1e-5)


def test_sparse_path_equals_dense_path(monkeypatch):
    """The index_add path (any degree) and the dense-view path give the same numbers.

    Both are plain PyTorch paths: with the fused kernel available every batch of sorted
    edges would take the kernel and the comparison would test nothing, so it is off here."""
    monkeypatch.setattr(kernels, "can_fuse", lambda *tables: False)
    torch.manual_seed(1)
    model = CrystalGraphConvNet(XIE, SETTINGS).train()
    cache = graphs_from_structures(small_structures(), SETTINGS)
    dense = Batch.from_arrays(cache.gather(np.arange(4)))
    assert dense.degree == 12
    sparse = Batch.from_arrays(cache.gather(np.arange(4)))
    sparse.degree = 0
    torch.testing.assert_close(model(dense), model(sparse), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prop", sorted(PRETRAINED_FILES))
def test_published_checkpoints_load_safely_and_predict(prop):
    model, normalizer, hp = load_checkpoint(pretrained_path(prop), SETTINGS)
    assert (hp.n_conv, hp.atom_fea_len, hp.h_fea_len) == (4, 64, 32)
    cache = graphs_from_structures(small_structures(), SETTINGS)
    with torch.no_grad():
        out = normalizer.denorm(model(Batch.from_arrays(cache.gather(np.arange(4)))))
    assert torch.isfinite(out).all()
    if prop == "formation_energy_per_atom":
        # NaCl: MP gives about -2.0 eV/atom; the published model should be close
        assert out[0].item() == pytest.approx(-2.0, abs=0.4)


def test_screening_precision_hand_made():
    y = np.arange(100, dtype=float)
    # perfect ranking, 3% of 100 = 3 materials
    assert screening_precision(y, y, 3, "higher") == 100.0
    assert screening_precision(y, y, 3, "lower") == 100.0
    # reversed ranking finds none of the top
    assert screening_precision(y, -y, 3, "higher") == 0.0
    # two of the three predicted top are truly top
    pred = y.copy()
    pred[97] = -1.0
    pred[50] = 1000.0
    assert screening_precision(y, pred, 3, "higher") == pytest.approx(200 / 3)
    # ceil: 3% of 10 -> 1 material
    assert screening_precision(np.arange(10.0), np.arange(10.0), 3, "lower") == 100.0
    assert screening_precision(y, y, 3, None) is None


def test_normalizer_roundtrip_and_unbiased_std():
    n = Normalizer.fit(np.array([1.0, 2.0, 3.0]))
    assert n.mean == 2.0 and n.std == pytest.approx(1.0)
    x = np.array([0.5, 7.0])
    np.testing.assert_allclose(n.denorm(n.norm(x)), x)


def test_splits_are_seeded_disjoint_and_cover():
    ids = np.array([f"mp-{i}" for i in range(100)])
    labelled = np.ones(100, bool)
    labelled[::10] = False
    a = make_test_split(ids, labelled, 0.2, seed=7)
    b = make_test_split(ids, labelled, 0.2, seed=7)
    assert a == b
    assert len(a["test"]) == 18 and len(a["pool"]) == 72
    assert not set(a["test"]) & set(a["pool"])
    assert "mp-0" not in a["test"] + a["pool"]
    tr, va = train_val_split(72, 0.2, seed=3)
    assert len(va) == 14 and len(tr) == 58 and not set(tr) & set(va)


def test_params_overrides_and_errors(tmp_path):
    p = load_params("params.yaml", ["train.batch_size=64", "presets.xie.epochs=3"])
    hp = hyperparams(p, "xie", "band_gap", lr=0.1)
    assert (hp.batch_size, hp.epochs, hp.lr, hp.n_conv) == (64, 3, 0.1, 4)
    with pytest.raises(ConfigError, match="unknown key"):
        load_params("params.yaml", ["train.no_such_key=1"])
    with pytest.raises(ConfigError, match="no tuned hyperparameters"):
        hyperparams(load_params("params.yaml", [f"tune.best_params_dir={tmp_path}"]),
                    "tuned", "band_gap")
    with pytest.raises(ConfigError, match="optimizer"):
        Hyperparams(n_conv=1, n_h=1, atom_fea_len=8, h_fea_len=8, lr=0.1, lr_decay_epoch=1,
                    optimizer="LBFGS", epochs=1)


def test_structure_problem_reasons():
    from pymatgen.core import DummySpecies

    from mpprop.snapshot import structure_problem

    assert structure_problem(nacl()) is None
    disordered = Structure(Lattice.cubic(4.0), [{"Na": 0.5, "K": 0.5}], [[0, 0, 0]])
    assert structure_problem(disordered) == "disordered_sites"
    dummy = Structure(Lattice.cubic(4.0), [DummySpecies("X")], [[0, 0, 0]])
    assert structure_problem(dummy) == "unsupported_species"
    flat = Structure(Lattice([[1, 0, 0], [0, 1, 0], [0, 0, 0]]), ["Na"], [[0, 0, 0]])
    assert structure_problem(flat) == "invalid_geometry"
