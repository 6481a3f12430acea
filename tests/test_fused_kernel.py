"""The fused edge kernel (mpprop.kernels, csrc/edge_gate.cpp) computes the plain path's numbers.

The plain PyTorch path is itself checked against the original CGCNN model in
test_speed_equivalence.py; here the two paths of our model are compared on graphs made in
the test: uniform and variable degree, an atom without edges, one row per edge and one per
distinct distance, 1 and 2 threads; train mode (outputs, loss, every gradient, running
statistics, a few SGD steps), eval mode with autograd, inference.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from conftest import skip_outside_ci

from mpprop import kernels
from mpprop.batches import Batch
from mpprop.model import CrystalGraphConvNet
from mpprop.settings import GraphSettings, Hyperparams

SETTINGS = GraphSettings()
XIE = Hyperparams(n_conv=3, n_h=2, atom_fea_len=32, h_fea_len=16, lr=0.05,
                  lr_decay_epoch=100, optimizer="SGD", epochs=1)


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    if kernels.edge_gate_ops() is None:
        skip_outside_ci("the fused kernel could not be built on this machine (no g++?)",
                        "the fused kernel must build in CI (g++ and the Python headers)")


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def random_graph(seed: int, n_crystals: int = 24, variable_degree: bool = True) -> dict:
    """Crystals of 1-9 atoms; edges grouped by centre, neighbours within the crystal,
    distances from a few shells (so they repeat, as in real crystals)."""
    rng = np.random.default_rng(seed)
    z, src, dst, dist, crystal = [], [], [], [], []
    start = 0
    for c in range(n_crystals):
        n = int(rng.integers(1, 10))
        shells = rng.uniform(1.8, 7.5, size=4).astype(np.float32)
        for i in range(n):
            k = int(rng.integers(0, 13)) if variable_degree else 12
            src += [start + i] * k
            dst += list(start + rng.integers(0, n, size=k))
            dist += list(np.sort(rng.choice(shells, size=k)))
        z += list(rng.integers(1, 84, size=n))
        crystal += [c] * n
        start += n
    if variable_degree:
        src_arr = np.asarray(src)
        assert np.any(np.bincount(src_arr, minlength=start) == 0), "an atom without edges"
    return {
        "atomic_numbers": np.asarray(z, dtype=np.int64),
        "edge_src": np.asarray(src, dtype=np.int64),
        "edge_dst": np.asarray(dst, dtype=np.int64),
        "edge_distance": np.asarray(dist, dtype=np.float32),
        "crystal_index": np.asarray(crystal, dtype=np.int64),
    }


def batch_of(arrays: dict, per_edge: bool) -> Batch:
    target = np.linspace(-1, 1, int(arrays["crystal_index"][-1]) + 1)
    batch = Batch.from_arrays(arrays, target)
    assert batch.atom_edge_offsets is not None
    if per_edge:
        batch.distance_values = batch.distance_index = None
    else:
        assert batch.distance_index is not None
    return batch


def run(model: CrystalGraphConvNet, batch: Batch, fused: bool, monkeypatch: pytest.MonkeyPatch,
        train: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    monkeypatch.setenv(kernels.ENV_SWITCH, "1" if fused else "0")
    model.train(train)
    model.zero_grad()
    out = model(batch)
    loss = torch.nn.functional.mse_loss(out, batch.target)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return out.detach(), loss.detach(), grads


def assert_grads_close(got: dict, ref: dict) -> None:
    for name, g in ref.items():
        # fc_full.bias: its true gradient is zero under bn1's batch statistics; both paths
        # give rounding noise around zero, so compare against the weight's scale
        scale = max(g.abs().max().item(), ref[name.replace(".bias", ".weight")].abs().max().item()
                    if name.endswith("fc_full.bias") else 0.0)
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5 * max(scale, 1e-6),
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("per_edge", [False, True], ids=["per-distance", "per-edge"])
@pytest.mark.parametrize("variable_degree", [True, False], ids=["variable", "uniform"])
def test_fused_equals_plain_in_training(per_edge: bool, variable_degree: bool, threads: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(threads)
    batch = batch_of(random_graph(1, variable_degree=variable_degree), per_edge)
    torch.manual_seed(0)
    fused_model = CrystalGraphConvNet(XIE, SETTINGS)
    plain_model = copy.deepcopy(fused_model)
    out_f, loss_f, grads_f = run(fused_model, batch, True, monkeypatch)
    out_p, loss_p, grads_p = run(plain_model, batch, False, monkeypatch)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads_f, grads_p)
    # bn1's running statistics are updated as nn.BatchNorm1d does
    for (name, a), (_, b) in zip(fused_model.state_dict().items(),
                                 plain_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert fused_model.convs[0].bn1.num_batches_tracked.item() == 1


def test_fused_training_follows_the_plain_trajectory(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    batches = [batch_of(random_graph(seed), per_edge=False) for seed in (2, 3, 4)]
    torch.manual_seed(1)
    models = {True: CrystalGraphConvNet(XIE, SETTINGS)}
    models[False] = copy.deepcopy(models[True])
    losses: dict[bool, list[float]] = {True: [], False: []}
    for fused, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            for batch in batches:
                _, loss, _ = run(model, batch, fused, monkeypatch)
                losses[fused].append(loss.item())
                opt.step()
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
    assert losses[True][-1] < losses[True][0]  # it learns
    for a, b in zip(models[True].parameters(), models[False].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_equals_plain_in_eval_and_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    batch = batch_of(random_graph(5), per_edge=False)
    torch.manual_seed(2)
    model = CrystalGraphConvNet(XIE, SETTINGS)
    with torch.no_grad():  # running statistics away from their initial values
        for _ in range(3):
            model.train()(batch)
    fused_model, plain_model = model, copy.deepcopy(model)
    out_f, _, grads_f = run(fused_model, batch, True, monkeypatch, train=False)
    out_p, _, grads_p = run(plain_model, batch, False, monkeypatch, train=False)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads_f, grads_p)
    # inference: bn1 folded into fc_full, no autograd
    with torch.no_grad():
        monkeypatch.setenv(kernels.ENV_SWITCH, "1")
        infer_f = fused_model.eval()(batch)
        monkeypatch.setenv(kernels.ENV_SWITCH, "0")
        infer_p = plain_model.eval()(batch)
    torch.testing.assert_close(infer_f, infer_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(infer_f, out_p, rtol=1e-5, atol=1e-5)


def test_non_finite_values_take_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel is compiled for finite numbers: a diverged model must still give NaN."""
    batch = batch_of(random_graph(6), per_edge=False)
    torch.manual_seed(3)
    model = CrystalGraphConvNet(XIE, SETTINGS)
    with torch.no_grad():
        model.convs[1].fc_full.weight[0, 0] = float("nan")
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    assert not kernels.can_fuse(torch.tensor([1.0, float("inf")]))
    assert not torch.isfinite(model.train()(batch)).any()


def test_ungrouped_edges_and_switch_off_take_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = random_graph(7)
    order = np.random.default_rng(0).permutation(len(arrays["edge_src"]))
    shuffled = {**arrays, **{k: arrays[k][order] for k in ("edge_src", "edge_dst", "edge_distance")}}
    batch, shuffled_batch = Batch.from_arrays(arrays), Batch.from_arrays(shuffled)
    assert shuffled_batch.atom_edge_offsets is None  # not grouped by centre: no CSR offsets
    torch.manual_seed(4)
    model = CrystalGraphConvNet(XIE, SETTINGS).eval()
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")
    with torch.no_grad():
        fused = model(batch)
        plain_order = model(shuffled_batch)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.edge_gate_ops() is None
    with torch.no_grad():
        off = model(batch)
    torch.testing.assert_close(fused, plain_order, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, off, rtol=1e-5, atol=1e-5)


def test_a_lock_left_by_a_killed_build_does_not_block(tmp_path) -> None:
    """torch's loader waits forever on a lock file left by a process killed while building;
    a built kernel is imported directly, and a lock older than a build is removed."""
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    built = Path(kernels.edge_gate_ops().__file__)
    copy_dir = tmp_path / built.parent.name
    copy_dir.mkdir()
    shutil.copy(built, copy_dir / built.name)
    lock = copy_dir / "lock"
    lock.touch()
    old = time.time() - 2 * kernels.STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    code = "from mpprop import kernels; print(kernels.edge_gate_ops().__file__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path),
                               kernels.ENV_SWITCH: "1"})
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == copy_dir / built.name
    assert not lock.exists()
