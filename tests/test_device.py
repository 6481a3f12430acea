"""Device plumbing (issue: GPU-ready training): tested on the CPU, and on CUDA where present.

The same tests run on a GPU machine (the `DEVICES` list grows by "cuda"); benchmarks/gpu_check.py
times and compares the two there.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import small_structures
from pymatgen.core import Lattice, Structure

from mpprop.batches import iterate_batches
from mpprop.config import load_params
from mpprop.device import DeviceError, autocast, resolve_device, training_device
from mpprop.graphs import graphs_from_structures
from mpprop.model import CrystalGraphConvNet
from mpprop.settings import GraphSettings, Hyperparams
from mpprop.training import fit, model_device, predict, run_batches

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HP = Hyperparams(n_conv=2, n_h=1, atom_fea_len=16, h_fea_len=24, lr=0.01, lr_decay_epoch=50,
                 optimizer="Adam", epochs=3, batch_size=4)


@pytest.fixture(scope="module")
def cache():
    rock_salts = [Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"],
                                            [[0, 0, 0], [0.5, 0.5, 0.5]])
                  for a in (5.4, 5.6, 5.8, 6.0, 6.2, 6.4)]
    structures = small_structures() + rock_salts
    return graphs_from_structures(structures, GraphSettings())


def targets(n: int) -> np.ndarray:
    return np.linspace(-1.0, 1.0, n)


def test_resolve_device_names_and_clear_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device|only"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="only 2 CUDA"):
        resolve_device("cuda:2")


def test_params_device_is_validated_and_resolved(tmp_path):
    params = load_params(overrides=["train.device=cpu", "train.precision=bf16"])
    assert training_device(params.train.device, params.train.precision) == (torch.device("cpu"), "bf16")
    with pytest.raises(ValueError, match="train.device"):
        load_params(overrides=["train.device=gpu0"])


def test_batch_to_moves_every_tensor_once(cache):
    (_, batch), = list(iterate_batches(cache, np.arange(len(cache)), 64, targets(len(cache))))
    assert batch.to(torch.device("cpu")) is batch  # nothing to copy
    moved = batch.to(torch.device("meta"))  # a non-CPU device every machine has
    tensors = [k for k, v in vars(batch).items() if isinstance(v, torch.Tensor)]
    assert {"atomic_numbers", "edge_src", "target", "atom_edge_offsets"} <= set(tensors)
    for k in tensors:
        assert getattr(moved, k).device.type == "meta", k
        assert getattr(moved, k).shape == getattr(batch, k).shape
    assert (moved.n_crystals, moved.degree) == (batch.n_crystals, batch.degree)


@pytest.mark.parametrize("device", DEVICES)
def test_model_moved_and_back_gives_same_numbers(cache, device):
    torch.manual_seed(0)
    model = CrystalGraphConvNet(HP, GraphSettings()).eval()
    rows = np.arange(len(cache))
    here = run_batches(model, cache, rows, 3)
    there = run_batches(copy.deepcopy(model).to(device), cache, rows, 3)
    back = run_batches(copy.deepcopy(model).to(device).to("cpu"), cache, rows, 3)
    np.testing.assert_allclose(there, here, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(back, here)


@pytest.mark.parametrize("device", DEVICES)
def test_fit_runs_where_asked_and_matches_cpu(cache, device):
    y = targets(len(cache))
    rows = np.arange(len(cache))
    runs = {d: fit(HP, GraphSettings(), cache, rows[:8], y[:8], rows[8:], y[8:], seed=1, device=d)
            for d in {"cpu", device}}
    result = runs[device]
    assert model_device(result.model).type == torch.device(device).type
    # the same seed gives the same initial weights on every device; CUDA kernels sum in
    # another order, so the MAEs agree to float32 noise over 3 epochs
    assert result.best_val_mae == pytest.approx(runs["cpu"].best_val_mae, rel=1e-3, abs=1e-5)
    pred = predict(result.model, result.normalizer, cache, rows[8:])
    assert np.isfinite(pred).all() and pred.dtype == np.float64


def test_bf16_autocast_changes_numbers_a_little(cache):
    torch.manual_seed(0)
    model = CrystalGraphConvNet(HP, GraphSettings()).eval()
    rows = np.arange(len(cache))
    fp32 = run_batches(model, cache, rows, 4)
    bf16 = run_batches(model, cache, rows, 4, precision="bf16")
    assert not np.array_equal(fp32, bf16)  # autocast really ran in bf16
    np.testing.assert_allclose(bf16, fp32, atol=0.05 * np.abs(fp32).max() + 0.02)
    with pytest.raises(ValueError, match="precision"):
        with autocast(torch.device("cpu"), "fp16"):
            pass
    y = targets(len(cache))
    result = fit(HP, GraphSettings(), cache, rows[:8], y[:8], rows[8:], y[8:], seed=1,
                 precision="bf16")
    assert np.isfinite(result.best_val_mae)


def test_training_core_imports_only_torch_and_numpy():
    """model, batches and the batch loop on a machine with only torch and numpy: every other
    third-party package is made unimportable in a fresh interpreter."""
    script = textwrap.dedent("""
        import importlib.abc, sys
        ALLOWED = {"torch", "numpy"}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                top = name.split(".")[0]
                if top in ("pymatgen", "mlflow", "optuna", "pydantic", "yaml", "click",
                           "filelock", "pandas", "tqdm", "cgcnn2", "scipy", "sklearn"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import mpprop.training, mpprop.model, mpprop.batches, mpprop.graph_cache, mpprop.device
        print(" ".join(sorted(m for m in sys.modules if m.startswith("mpprop"))))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "mpprop.config" not in out.stdout.split()
    assert "mpprop.graphs" not in out.stdout.split()


def test_stage_fails_at_once_on_an_absent_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = load_params(overrides=["train.device=cuda"])
    with pytest.raises(DeviceError, match="no CUDA device"):
        training_device(params.train.device, params.train.precision)
