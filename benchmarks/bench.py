"""Speed benchmark of mpprop against the original CGCNN data path, on the shared MP snapshot.

    python benchmarks/bench.py --quick            # CI: ~300 structures, < 2 minutes
    python benchmarks/bench.py                    # full: up to the whole shared set, minutes

Figures (each measured in its own subprocess, so its peak RSS is its own):
  featurize      ours: mpprop.graphs.build_graphs from snapshot arrays (lattice, Z, fractional
                 coordinates; JSON parsing is NOT included, it is reported separately as
                 `parse_json`, and both together as `featurize_from_json_per_s`)
  featurize_orig the original CGCNN: per-structure get_all_neighbors(8) + Python sort per site,
                 12 nearest, original GaussianDistance expansion, per-structure tensors
  train          ours: seconds per training pass (mpprop.training.run_batches with an
                 optimizer), steady state = median of the epochs after the first; with the
                 fused edge kernel (mpprop.kernels) and, as "plain", without it
                 (MPPROP_FUSED_KERNEL=0: the same model in plain PyTorch ops)
  train_orig     the original: per-structure tensors collated every step by cgcnn's
                 collate_pool, the original dense model (cgcnn2.model.CrystalGraphConvNet)
  predict        CGCNNPyfunc.predict: pymatgen structure dicts in, numbers out
  predict_all    the seven published models on the same structure dicts: one inference call
                 (parse, check and graphs once) vs seven separate calls, same run
  equivalence    same weights and batch in our model and the original model: outputs, MSE
                 loss and fc_full gradients agree (train and eval mode), for both our paths

Results: a table on stdout and JSON in benchmarks/results/bench.json (or --out).
The shared data file is read where it lies; nothing is copied into the repository.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mp_snapshot.jsonl.gz"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench.json"

XIE = dict(n_conv=4, n_h=1, atom_fea_len=64, h_fea_len=32, lr=0.02, optimizer="SGD")
LARGEST = dict(n_conv=5, n_h=5, atom_fea_len=256, h_fea_len=256, lr=0.01, optimizer="RAdam")
PRESETS = {"xie": XIE, "largest": LARGEST}
PROPS = ("formation_energy_per_atom", "bulk_modulus")


# ============================================================== helpers (run in subprocesses)
def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MiB, else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> dict[str, float]:
    """Peak RSS of this process (VmHWM: this program only; ru_maxrss would also count the
    parent's RSS at fork time) and of its largest finished child (ru_maxrss)."""
    own = _status_mb("VmHWM")
    if own is None:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_rss_children_mb": round(kids, 1)}


def graph_settings() -> Any:
    from mpprop.settings import GraphSettings

    return GraphSettings()


def hyperparams(preset: str, batch_size: int = 256, epochs: int = 1) -> Any:
    from mpprop.settings import Hyperparams

    return Hyperparams(**PRESETS[preset], lr_decay_epoch=10_000, epochs=epochs,
                       batch_size=batch_size)


def load_set(tmp: Path, name: str) -> tuple[Any, np.ndarray, np.ndarray]:
    """(snapshot subset, rows into the full snapshot, transformed target) of a named set."""
    from mpprop.snapshot import load_snapshot

    snap, _ = load_snapshot(tmp / "snapshot")
    with np.load(tmp / "sets.npz") as sets:
        rows = sets[name]
    prop = "bulk_modulus" if name.startswith("bulk") else "formation_energy_per_atom"
    y = snap.label(prop)[rows]
    if prop == "bulk_modulus":
        y = np.log10(y)
    return snap.subset(rows), rows, y


def sample(n: int, limit: int | None) -> np.ndarray:
    """A seeded random subset of positions (all when limit is None): the same for every task."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(7).choice(n, limit, replace=False))


def load_cache(tmp: Path, name: str) -> Any:
    from mpprop.graphs import load_graph_cache

    return load_graph_cache(tmp / "graphs", name, graph_settings(), mmap=False)


def original_featurizer() -> tuple[Any, Any]:
    """The original's atom initialiser (atom_init.json) and GaussianDistance, from cgcnn2."""
    from importlib import resources

    from cgcnn2.data import AtomCustomJSONInitializer, GaussianDistance

    path = resources.files("cgcnn2").joinpath("asset/atom_init.json")
    s = graph_settings()
    return (
        AtomCustomJSONInitializer(str(path)),
        GaussianDistance(dmin=s.gaussian_dmin, dmax=s.radius, step=s.gaussian_step),
    )


def original_graph(
    crystal: Any, ari: Any, gdf: Any, radius: float = 8.0, max_nbr: int = 12
) -> tuple[tuple[Any, Any, Any], np.ndarray]:
    """cgcnn's CIFData.__getitem__ (Xie's original, = cgcnn2 CIFData._load_item), minus the
    CIF read: per-structure get_all_neighbors, then a Python sort of every site's list."""
    import torch

    atom_fea = np.vstack([ari.get_atom_fea(crystal[i].specie.number) for i in range(len(crystal))])
    all_nbrs = crystal.get_all_neighbors(radius, include_index=True)
    all_nbrs = [sorted(nbrs, key=lambda x: x[1]) for nbrs in all_nbrs]
    nbr_fea_idx, nbr_fea = [], []
    for nbr in all_nbrs:
        if len(nbr) < max_nbr:
            warnings.warn("not enough neighbors to build graph", stacklevel=2)
            nbr_fea_idx.append([x[2] for x in nbr] + [0] * (max_nbr - len(nbr)))
            nbr_fea.append([x[1] for x in nbr] + [radius + 1.0] * (max_nbr - len(nbr)))
        else:
            nbr_fea_idx.append([x[2] for x in nbr[:max_nbr]])
            nbr_fea.append([x[1] for x in nbr[:max_nbr]])
    nbr_fea_idx, nbr_fea = np.array(nbr_fea_idx), np.array(nbr_fea)
    nbr_dist = nbr_fea
    nbr_fea = gdf.expand(nbr_fea)
    return (
        torch.as_tensor(atom_fea, dtype=torch.float32),
        torch.as_tensor(nbr_fea, dtype=torch.float32),
        torch.as_tensor(nbr_fea_idx, dtype=torch.long),
    ), nbr_dist


def original_items_from_cache(cache: Any, targets: np.ndarray) -> list[tuple[Any, Any, str]]:
    """Per-structure tensor sets in the original's format, from our (identical) graphs.

    The original pads atoms with < 12 neighbours with atom 0 at radius + 1 Å; so do we here.
    Building these is not timed: the original caches them after the first epoch too.
    """
    import torch

    ari, gdf = original_featurizer()
    k, r = cache.settings.max_neighbors, cache.settings.radius
    table = {z: ari.get_atom_fea(z) for z in ari.atom_types}
    items = []
    for i in range(len(cache)):
        g = cache.gather(np.array([i]))
        n = len(g["atomic_numbers"])
        idx = np.zeros((n, k), dtype=np.int64)
        dist = np.full((n, k), r + 1.0)
        rank = np.arange(len(g["edge_src"])) - np.searchsorted(g["edge_src"], g["edge_src"])
        idx[g["edge_src"], rank] = g["edge_dst"]
        dist[g["edge_src"], rank] = g["edge_distance"]
        atom_fea = np.vstack([table[int(z)] for z in g["atomic_numbers"]])
        items.append((
            (
                torch.as_tensor(atom_fea, dtype=torch.float32),
                torch.as_tensor(gdf.expand(dist), dtype=torch.float32),
                torch.as_tensor(idx, dtype=torch.long),
            ),
            torch.tensor([float(targets[i])], dtype=torch.float32),
            str(cache.material_id[i]),
        ))
    return items


def original_model(hp: Any) -> Any:
    from cgcnn2.model import CrystalGraphConvNet

    return CrystalGraphConvNet(
        92, 41, atom_fea_len=hp.atom_fea_len, n_conv=hp.n_conv, h_fea_len=hp.h_fea_len,
        n_h=hp.n_h,
    )


def make_optimizer(params: Any, hp: Any) -> Any:
    import torch

    if hp.optimizer == "SGD":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=0.0)
    return torch.optim.RAdam(params, lr=hp.lr, weight_decay=0.0)


# ============================================================== tasks
def task_featurize(tmp: Path, name: str, workers: int, limit: int | None, save: bool) -> dict:
    from mpprop.graphs import build_graphs, cache_key, save_graph_cache

    snap, _, _ = load_set(tmp, name)
    snap = snap.subset(sample(len(snap), limit))
    t0 = time.perf_counter()
    cache = build_graphs(snap, graph_settings(), workers=workers, progress=False)
    sec = time.perf_counter() - t0
    out = {
        "n": len(snap), "workers": workers, "seconds": sec, "per_s": len(snap) / sec,
        "atoms_per_structure": float(snap.n_sites.mean()),
        "cache_bytes": cache.nbytes(), "cache_bytes_per_structure": cache.nbytes() / len(snap),
    }
    if save:
        cache.key = cache_key(name, graph_settings())
        folder = save_graph_cache(cache, tmp / "graphs", {"set": name})
        out["cache_disk_bytes"] = sum(p.stat().st_size for p in folder.iterdir())
    return out


def task_featurize_orig(tmp: Path, name: str, limit: int) -> dict:
    """The original graph building on the first `limit` structures of a set, and the largest
    difference between its distances and ours (float64, before the float32 cache)."""
    from mpprop.graphs import nearest_neighbors

    snap, _, _ = load_set(tmp, name)
    snap = snap.subset(sample(len(snap), limit))
    ari, gdf = original_featurizer()
    t0 = time.perf_counter()
    dists = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(snap)):
            _, d = original_graph(snap.structure(i), ari, gdf)
            dists.append(d)
    sec = time.perf_counter() - t0
    # same distances? (padding slots of atoms with < 12 neighbours excluded)
    settings = graph_settings()
    max_diff = 0.0
    for i, d in enumerate(dists):
        src, _, dist = nearest_neighbors(snap.structure(i), settings)
        ours = np.full(d.shape, np.nan)
        rank = np.arange(len(src)) - np.searchsorted(src, src)
        ours[src, rank] = dist
        real = d <= settings.radius
        if not np.array_equal(real, ~np.isnan(ours)):
            raise AssertionError(f"structure {i}: neighbour counts differ from the original")
        max_diff = max(max_diff, float(np.abs(d[real] - ours[real]).max(initial=0.0)))
    return {"n": len(snap), "seconds": sec, "per_s": len(snap) / sec,
            "atoms_per_structure": float(snap.n_sites.mean()), "max_distance_diff": max_diff}


def _steady(times: list[float]) -> float:
    return float(np.median(times[1:])) if len(times) > 1 else float(times[0])


def task_train(
    tmp: Path, name: str, preset: str, epochs: int, threads: int, batch_size: int,
    warmup_batches: int = 0,
) -> dict:
    """Training passes; `warmup_batches` untimed steps first (then epoch 1 is steady too)."""
    import torch

    from mpprop.model import CrystalGraphConvNet, Normalizer
    from mpprop.training import run_batches

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cache = load_cache(tmp, name)
    _, _, y = load_set(tmp, name)
    hp = hyperparams(preset, batch_size, epochs)
    norm = Normalizer.fit(y)
    y_norm = np.asarray(norm.norm(y))
    model = CrystalGraphConvNet(hp, cache.settings)
    opt = make_optimizer(model.parameters(), hp)
    rng = np.random.default_rng(0)
    rows = np.arange(len(cache))
    if warmup_batches:
        warm = rows[: warmup_batches * hp.batch_size]
        run_batches(model, cache, warm, hp.batch_size, y_norm[warm], opt, rng)
    times, cpu = [], []
    for _ in range(epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        run_batches(model, cache, rows, hp.batch_size, y_norm, opt, rng)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    t0 = time.perf_counter()
    run_batches(model, cache, rows, 512)
    eval_sec = time.perf_counter() - t0
    sec = _steady(times) if not warmup_batches else float(np.median(times))
    cpu_sec = _steady(cpu) if not warmup_batches else float(np.median(cpu))
    from mpprop.kernels import edge_gate_ops

    return {"n": len(rows), "preset": preset, "threads": threads,
            "fused_kernel": edge_gate_ops() is not None, "epoch_seconds": times,
            "steady_epoch_seconds": sec, "per_s": len(rows) / sec,
            "epoch_cpu_seconds": cpu, "steady_epoch_cpu_seconds": cpu_sec,
            "eval_seconds": eval_sec, "eval_per_s": len(rows) / eval_sec}


def task_train_orig(tmp: Path, name: str, preset: str, epochs: int, threads: int,
                    batch_size: int) -> dict:
    """The original training loop (cgcnn main.py train()) over collate_pool batches."""
    import torch
    from cgcnn2.data import collate_pool
    from torch.utils.data import DataLoader

    from mpprop.model import Normalizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cache = load_cache(tmp, name)
    _, _, y = load_set(tmp, name)
    hp = hyperparams(preset, batch_size, epochs)
    items = original_items_from_cache(cache, y)
    norm = Normalizer.fit(y)
    model = original_model(hp)
    opt = make_optimizer(model.parameters(), hp)
    criterion = torch.nn.MSELoss()
    loader = DataLoader(items, batch_size=hp.batch_size, shuffle=True, collate_fn=collate_pool)
    times, cpu = [], []
    for _ in range(epochs):
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        for inputs, target, _ids in loader:
            target_normed = norm.norm(target)
            output, _ = model(*inputs)
            loss = criterion(output, target_normed)
            # the original tracks loss and MAE per batch
            _mae = torch.mean(torch.abs(norm.denorm(output.data.cpu()) - target))
            _l = loss.data.cpu()
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    sec = _steady(times)
    return {"n": len(items), "preset": preset, "threads": threads, "epoch_seconds": times,
            "steady_epoch_seconds": sec, "per_s": len(items) / sec,
            "epoch_cpu_seconds": cpu, "steady_epoch_cpu_seconds": _steady(cpu)}


def task_equivalence(tmp: Path, name: str, n: int) -> dict:
    """Our model and the original with the same state_dict on the same batch."""
    import torch
    from cgcnn2.data import collate_pool

    from mpprop.model import Batch, CrystalGraphConvNet

    torch.manual_seed(1)
    cache = load_cache(tmp, name)
    _, _, y = load_set(tmp, name)
    # crystals whose atoms all have a full shell of 12 (where the two graphs are identical)
    full = np.flatnonzero(np.diff(cache.edge_offsets) == 12 * cache.n_atoms)[:n]
    hp = hyperparams("xie")
    ours = CrystalGraphConvNet(hp, cache.settings)
    orig = original_model(hp)
    orig.load_state_dict(ours.state_dict())
    target = torch.as_tensor(y[full] - y[full].mean(), dtype=torch.float32)
    batch = Batch.from_arrays(cache.gather(full), target.numpy())
    items = original_items_from_cache(cache, y)
    inputs, _, _ = collate_pool([items[i] for i in full])
    res: dict[str, Any] = {"n_crystals": len(full), "dtype": "float32"}
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        orig.train(mode == "train")
        ours.zero_grad()
        orig.zero_grad()
        a = ours(batch)
        b = orig(*inputs)[0].squeeze(1)
        la = torch.nn.functional.mse_loss(a, target)
        lb = torch.nn.functional.mse_loss(b, target)
        la.backward()
        lb.backward()
        # relative to the largest magnitude of each gradient matrix
        gdiff = max(
            float((ca.fc_full.weight.grad - cb.fc_full.weight.grad).abs().max()
                  / cb.fc_full.weight.grad.abs().max())
            for ca, cb in zip(ours.convs, orig.convs, strict=True)
        )
        scale = float(b.abs().max())
        res[mode] = {
            "loss_ours": float(la), "loss_orig": float(lb),
            "max_output_diff": float((a - b).abs().max()),
            "max_output_rel_diff": float((a - b).abs().max()) / max(scale, 1e-30),
            "loss_rel_diff": abs(float(la) - float(lb)) / max(abs(float(lb)), 1e-30),
            "max_fc_full_grad_rel_diff": gdiff,
        }
        if mode == "train":
            with torch.no_grad():  # running statistics away from their initial values
                for _ in range(3):
                    ours(batch)
                    orig(*inputs)
    with torch.no_grad():  # the inference path (eval, no autograd: bn1 folded into fc_full)
        ours.eval()
        orig.eval()
        a, b = ours(batch), orig(*inputs)[0].squeeze(1)
        res["infer"] = {"max_output_rel_diff": float((a - b).abs().max() / b.abs().max())}
    res["tolerance"] = 1e-5
    res["ok"] = all(
        res[m]["max_output_rel_diff"] < 1e-5
        and res[m].get("loss_rel_diff", 0.0) < 1e-5
        and res[m].get("max_fc_full_grad_rel_diff", 0.0) < 1e-5
        for m in ("train", "eval", "infer")
    )
    from mpprop.kernels import edge_gate_ops

    res["fused_kernel"] = edge_gate_ops() is not None
    return res


def task_predict(tmp: Path, threads: int, single: int) -> dict:
    """CGCNNPyfunc.predict end to end: structure dicts in, predictions out."""
    import pandas as pd
    import torch

    from mpprop.bundle import LoadedModel
    from mpprop.model import CrystalGraphConvNet, Normalizer
    from mpprop.served_model import CGCNNPyfunc
    from mpprop.settings import PropertySpec

    torch.set_num_threads(threads)
    dicts = json.loads((tmp / "predict_structures.json").read_text())
    pyfunc = CGCNNPyfunc()
    spec = PropertySpec("bulk_modulus", "bulk_modulus.vrh", "log10(GPa)", "log10", "higher")
    # what CGCNNPyfunc.load_context gives, without a logged model
    pyfunc.loaded = LoadedModel("bench", CrystalGraphConvNet(hyperparams("xie"), graph_settings()).eval(),
                                Normalizer(0.0, 1.0), spec, {})
    pyfunc.spec = spec
    torch.set_grad_enabled(False)
    frame = pd.DataFrame({"structure": dicts})
    pyfunc.predict(None, frame.iloc[:20])  # warm-up
    t0 = time.perf_counter()
    out = pyfunc.predict(None, frame)
    sec = time.perf_counter() - t0
    if out["prediction"].isna().any():
        raise AssertionError(f"prediction failed: {out['error'][out['prediction'].isna()]}")
    t0 = time.perf_counter()
    for i in range(single):
        pyfunc.predict(None, frame.iloc[i : i + 1])
    single_ms = (time.perf_counter() - t0) / max(single, 1) * 1e3
    return {"n": len(dicts), "seconds": sec, "per_s": len(dicts) / sec,
            "atoms_per_structure": float(np.mean([len(d["sites"]) for d in dicts])),
            "single_call_ms": single_ms}


def task_predict_all(tmp: Path, threads: int) -> dict:
    """The seven published models on the same structures: one inference call for all seven
    (structures parsed and checked once, graphs built once) vs seven separate calls (each
    parses, checks and builds graphs for itself, as seven `mpprop predict` runs would)."""
    import torch
    from pymatgen.core import Structure

    from mpprop.bundle import LoadedModel
    from mpprop.config import load_params
    from mpprop.inference import predict_structures
    from mpprop.model import PRETRAINED_FILES, load_checkpoint, pretrained_path

    torch.set_num_threads(threads)
    dicts = json.loads((tmp / "predict_structures.json").read_text())
    params = load_params(REPO / "params.yaml")
    models = []
    for prop in PRETRAINED_FILES:
        net, norm, _ = load_checkpoint(pretrained_path(prop), params.graph_settings())
        models.append(LoadedModel(f"xie-2018 {prop}", net, norm, params.property_spec(prop), {}))

    def run(chosen: list[LoadedModel]) -> np.ndarray:
        structures = [Structure.from_dict(d) for d in dicts]
        out = predict_structures(chosen, structures, batch_size=params.predict.batch_size)
        if any(out.errors):
            raise AssertionError(f"prediction failed: {[e for e in out.errors if e][:3]}")
        return np.stack(out.values)

    torch.set_grad_enabled(False)
    run(models[:1])  # warm-up
    t0 = time.perf_counter()
    together = run(models)
    all_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    separate = np.concatenate([run([m]) for m in models])
    sep_s = time.perf_counter() - t0
    np.testing.assert_allclose(together, separate, rtol=1e-6)  # same numbers either way
    return {"n": len(dicts), "models": len(models), "threads": threads, "seconds_all": all_s,
            "per_s": len(dicts) / all_s, "seconds_separate": sep_s,
            "separate_per_s": len(dicts) / sep_s, "speedup": sep_s / all_s}


# our model without the fused kernel: the plain PyTorch path
PLAIN = {"MPPROP_FUSED_KERNEL": "0"}

TASKS = {
    "featurize": task_featurize,
    "featurize_orig": task_featurize_orig,
    "train": task_train,
    "train_orig": task_train_orig,
    "equivalence": task_equivalence,
    "predict": task_predict,
    "predict_all": task_predict_all,
}


def run_task(tmp: Path, task: str, env: dict[str, str] | None = None, **kwargs: Any) -> dict:
    """Run one task in a fresh interpreter; its result and peak RSS come back as JSON."""
    spec = json.dumps({"task": task, "tmp": str(tmp), "kwargs": kwargs})
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--task", spec],
        capture_output=True, text=True, check=False, env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"task {task} {kwargs} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    label = ", ".join(f"{k}={v}" for k, v in {**kwargs, **(env or {})}.items())
    print(f"  {task}({label}): {_brief(result)}", file=sys.stderr, flush=True)
    return result


def _brief(r: dict) -> str:
    keys = ("per_s", "steady_epoch_seconds", "peak_rss_mb", "ok")
    return ", ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                     for k in keys if k in r)


def task_main(spec_json: str) -> None:
    import pymatgen.core  # noqa: F401 - the libraries every task loads, for the RSS baseline
    import torch  # noqa: F401

    import mpprop.model  # noqa: F401

    spec = json.loads(spec_json)
    start = _status_mb("VmRSS")
    result = TASKS[spec["task"]](Path(spec["tmp"]), **spec["kwargs"])
    result.update(peak_rss_mb())
    result["rss_after_imports_mb"] = None if start is None else round(start, 1)
    print(json.dumps(result))


# ============================================================== data preparation
def _structure_arrays(sd: dict, z_of: dict[str, int]) -> tuple[np.ndarray, ...] | None:
    """(lattice, Z, frac) straight from a Structure.as_dict(); None if a site is disordered."""
    zs = []
    for site in sd["sites"]:
        sp = site["species"]
        if len(sp) != 1 or sp[0].get("occu", 1.0) != 1.0:
            return None
        el = sp[0]["element"]
        if el not in z_of:
            from pymatgen.core import Element

            z_of[el] = Element(el).Z
        zs.append(z_of[el])
    lattice = np.asarray(sd["lattice"]["matrix"], dtype=np.float64)
    frac = np.asarray([site["abc"] for site in sd["sites"]], dtype=np.float64)
    return lattice, np.asarray(zs, dtype=np.int16), frac


def set_name(n: int | None) -> str:
    return "mp_all" if n is None else f"mp_{n}"


def prepare(tmp: Path, data: Path, quick: bool, sizes: list[int | None], n_predict: int,
            n_json: int) -> dict:
    """Read the JSONL once into a snapshot (arrays) in `tmp`; define the benchmark sets."""
    from pymatgen.core import Structure

    from mpprop.snapshot import Snapshot, save_snapshot

    t0 = time.perf_counter()
    ids, lat, zs, fracs, labels, predict_dicts = [], [], [], [], [], []
    z_of: dict[str, int] = {}
    json_lines: list[str] = []
    with gzip.open(data, "rt", encoding="utf-8") as fh:
        for line in fh:
            if len(json_lines) < n_json:
                json_lines.append(line)
            rec = json.loads(line)
            arrays = _structure_arrays(rec["structure"], z_of)
            if arrays is None:
                continue
            bulk = (rec.get("bulk_modulus") or {}).get("vrh")
            fe = rec.get("formation_energy_per_atom")
            ids.append(rec["material_id"])
            lat.append(arrays[0])
            zs.append(arrays[1])
            fracs.append(arrays[2])
            labels.append([np.nan if fe is None else fe,
                           np.nan if bulk is None or bulk <= 0 else bulk])
            if 8 <= len(arrays[1]) <= 12 and len(predict_dicts) < n_predict:
                predict_dicts.append(rec["structure"])
    read_sec = time.perf_counter() - t0
    offsets = np.zeros(len(zs) + 1, dtype=np.int64)
    np.cumsum([len(z) for z in zs], out=offsets[1:])
    snap = Snapshot(
        material_id=np.asarray(ids, dtype=str), lattice=np.stack(lat), site_offsets=offsets,
        atomic_numbers=np.concatenate(zs), frac_coords=np.concatenate(fracs),
        labels=np.asarray(labels, dtype=np.float64), property_names=list(PROPS),
    )
    save_snapshot(snap, tmp / "snapshot", {"source": str(data)})
    (tmp / "predict_structures.json").write_text(json.dumps(predict_dicts))

    # the project's parsing path for JSON records: json.loads + Structure.from_dict
    t0 = time.perf_counter()
    parsed = []
    for line in json_lines:
        s = Structure.from_dict(json.loads(line)["structure"])
        parsed.append((s.lattice.matrix, [sp.Z for sp in s.species], s.frac_coords))
    json_sec = time.perf_counter() - t0
    # the direct array reading above gives the same arrays as Structure.from_dict
    pos = {m: j for j, m in enumerate(ids)}
    for line, (m, z, f) in zip(json_lines, parsed, strict=True):
        j = pos.get(json.loads(line)["material_id"])
        if j is not None and not (
            np.array_equal(m, lat[j]) and np.array_equal(z, zs[j]) and np.array_equal(f, fracs[j])
        ):
            raise AssertionError(f"{ids[j]}: direct arrays differ from Structure.from_dict")

    rng = np.random.default_rng(20201224)
    fe_rows = np.flatnonzero(np.isfinite(snap.labels[:, 0]))
    fe_rows = fe_rows[rng.permutation(len(fe_rows))]
    bulk_rows = np.flatnonzero(np.isfinite(snap.labels[:, 1]))
    bulk_rows = bulk_rows[rng.permutation(len(bulk_rows))]
    # "bulk": the 80% non-test part of the elastic set, as a Xie-preset training set
    n_bulk = 300 if quick else int(round(0.8 * len(bulk_rows)))
    sets = {"bulk": np.sort(bulk_rows[:n_bulk]),
            # for the largest point of the search space (slow per structure)
            "bulk_small": np.sort(bulk_rows[: 100 if quick else 500])}
    for n in sizes:
        sets[set_name(n)] = np.sort(fe_rows[: len(fe_rows) if n is None else n])
    np.savez(tmp / "sets.npz", **sets)
    return {
        "records": len(snap), "read_seconds": read_sec,
        "parse_json": {"n": len(json_lines), "seconds": json_sec,
                       "per_s": len(json_lines) / json_sec},
        "sets": {k: len(v) for k, v in sets.items()},
        "n_formation_energy": len(fe_rows), "n_bulk_modulus": len(bulk_rows),
    }


# ============================================================== report
def fmt(x: float, digits: int = 3) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def print_table(res: dict) -> None:
    rows: list[tuple[str, str, str, str]] = []

    def add(what: str, value: str, ref: str, mem: dict | None) -> None:
        peak = "" if mem is None else fmt(max(mem["peak_rss_mb"], mem["peak_rss_children_mb"]))
        rows.append((what, value, ref, peak))

    f = res["featurize"]
    pj = res["prepare"]["parse_json"]
    add("parse JSON (json.loads + Structure.from_dict)", f"{fmt(pj['per_s'])} struct/s",
        f"n={pj['n']}", None)
    fj = res["featurize_from_json_per_s"]
    add("JSON -> graphs, ours 1 process (bulk / mp)", f"{fmt(fj['bulk'])} / {fmt(fj['mp'])}/s",
        "parse + build_graphs", None)
    for key in ("bulk", "mp"):
        o1, op, base = f[f"{key}_ours_1"], f[f"{key}_ours"], f[f"{key}_orig"]
        add(f"featurize {key} ({base['atoms_per_structure']:.1f} at/struct), original",
            f"{fmt(base['per_s'])} struct/s", f"n={base['n']}", base)
        add(f"featurize {key}, ours 1 process (same structures)",
            f"{fmt(o1['per_s'])} struct/s", f"x{o1['per_s'] / base['per_s']:.0f} vs original",
            o1)
        add(f"featurize {key}, ours {op['workers']} processes (n={op['n']})",
            f"{fmt(op['per_s'])} struct/s", f"x{op['per_s'] / base['per_s']:.0f} vs original",
            op)
    for preset in ("xie", "largest"):
        b = res["train"][f"{preset}_orig"]
        add(f"train epoch {preset}, original (n={b['n']})",
            f"{fmt(b['steady_epoch_seconds'])} s ({fmt(b['per_s'])}/s)", "", b)
        for key, how in ((f"{preset}_plain", "ours, plain PyTorch"), (preset, "ours, fused kernel")):
            t = res["train"][key]
            add(f"train epoch {preset}, {how} (n={t['n']})",
                f"{fmt(t['steady_epoch_seconds'])} s ({fmt(t['per_s'])}/s)",
                f"x{b['steady_epoch_seconds'] / t['steady_epoch_seconds']:.1f} vs original "
                f"(CPU time x{b['steady_epoch_cpu_seconds'] / t['steady_epoch_cpu_seconds']:.1f})",
                t)
    for key, t in res["train"].items():
        if key.startswith("threads_"):
            how = ", OMP_WAIT_POLICY=PASSIVE" if key.endswith("passive") else ""
            add(f"train epoch xie, ours, torch threads={t['threads']}{how}",
                f"{fmt(t['steady_epoch_seconds'])} s",
                f"epochs: {', '.join(fmt(x) for x in t['epoch_seconds'])}", t)
    p = res["predict"]
    add(f"predict end to end ({p['atoms_per_structure']:.1f} at/struct, xie)",
        f"{fmt(p['per_s'])} struct/s", f"1 per call: {p['single_call_ms']:.1f} ms", p)
    pa = res["predict_all"]
    add(f"predict --property all ({pa['models']} published models, one graph build, "
        f"{pa['threads']} threads)",
        f"{fmt(pa['per_s'])} struct/s",
        f"x{pa['speedup']:.1f} vs {pa['models']} separate runs ({fmt(pa['separate_per_s'])} struct/s)",
        pa)
    for s in res["scaling"]:
        add(f"scaling n={s['n']}: featurize / epoch xie",
            f"{fmt(s['featurize_per_s'])}/s / {fmt(s['epoch_seconds'])} s",
            f"{fmt(s['epoch_us_per_structure'])} us/struct/epoch, "
            f"{fmt(s['cache_bytes_per_structure'])} B/struct", s["memory"])
    for key, how in (("equivalence", "fused"), ("equivalence_plain", "plain")):
        e = res[key]
        for m in ("train", "eval"):
            r = e[m]
            add(f"equivalence {how}, {m} mode ({e['n_crystals']} crystals, same weights)",
                "OK" if e["ok"] else "FAILED",
                f"loss {r['loss_ours']:.6g} vs {r['loss_orig']:.6g}; rel. diff out "
                f"{r['max_output_rel_diff']:.0e}, loss {r['loss_rel_diff']:.0e}, "
                f"fc_full grad {r['max_fc_full_grad_rel_diff']:.0e}", None)
        add(f"equivalence {how}, inference path (no autograd)", "OK" if e["ok"] else "FAILED",
            f"rel. diff out {e['infer']['max_output_rel_diff']:.0e}", None)
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    head = ("measurement", "value", "note", "peak MiB")
    w = [max(a, len(b)) for a, b in zip(w, head, strict=True)]
    line = "  ".join(h.ljust(n) for h, n in zip(head, w, strict=True))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(n) for c, n in zip(r, w, strict=True)))
    print(f"\nload average before/after: {res['machine']['loadavg_before']} / "
          f"{res['machine']['loadavg_after']} on {res['machine']['cpus']} CPUs")


# ============================================================== main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for CI (< 2 minutes)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MP snapshot JSONL(.gz)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for training and prediction (default 1: robust on a "
                         "shared machine; the full run also measures all cores)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--task", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.task:
        task_main(args.task)
        return 0

    quick = args.quick
    cpus = os.cpu_count() or 1
    sizes: list[int | None] = [150, 300] if quick else [1000, 4000, 16000, None]
    epochs = 2 if quick else 4
    n_orig_feat = {"bulk": 60 if quick else 300, "mp": 30 if quick else 150}
    res: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "machine": {"cpus": cpus, "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in os.getloadavg()]},
        "data": str(args.data),
        "notes": {
            "featurize": "build_graphs from snapshot arrays (Structure made from arrays "
                         "included); JSON parsing excluded, see prepare.parse_json",
            "train": "training pass only (run_batches with optimizer); steady = median of "
                     "epochs after the first",
            "train_orig": "per-structure tensors from the same graphs, cgcnn collate_pool "
                          "every step, cgcnn2 CrystalGraphConvNet; tensor building not timed",
            "peak_rss": "VmHWM of the measuring subprocess (incl. interpreter + torch + "
                        "pymatgen imports, see rss_after_imports_mb); children = largest "
                        "worker process (ru_maxrss)",
            "predict": "CGCNNPyfunc.predict on a DataFrame of Structure.as_dict() dicts: "
                       "parse, validate, graphs, model, numbers; untrained Xie-preset weights",
        },
    }
    import torch

    res["machine"]["torch"] = torch.__version__
    tmp = Path(tempfile.mkdtemp(prefix="mpprop-bench-"))
    t_start = time.perf_counter()
    try:
        print(f"preparing data from {args.data} in {tmp}", file=sys.stderr, flush=True)
        res["prepare"] = prepare(tmp, args.data, quick, sizes, n_predict=300 if quick else 2000,
                                 n_json=300 if quick else 2000)
        set_sizes = res["prepare"]["sets"]
        mp_max = set_name(sizes[-1])

        # ---- featurization: ours (1 process, all processes) vs the original
        feat: dict[str, Any] = {}
        feat["bulk_ours"] = run_task(tmp, "featurize", name="bulk", workers=cpus, limit=None,
                                     save=True)
        run_task(tmp, "featurize", name="bulk_small", workers=cpus, limit=None, save=True)
        feat["bulk_ours_1"] = run_task(tmp, "featurize", name="bulk", workers=1,
                                       limit=n_orig_feat["bulk"], save=False)
        feat["bulk_orig"] = run_task(tmp, "featurize_orig", name="bulk",
                                     limit=n_orig_feat["bulk"])
        feat["mp_ours_1"] = run_task(tmp, "featurize", name=mp_max, workers=1,
                                     limit=n_orig_feat["mp"], save=False)
        feat["mp_orig"] = run_task(tmp, "featurize_orig", name=mp_max, limit=n_orig_feat["mp"])
        res["featurize"] = feat

        # ---- scaling: featurization and epoch time with data size
        scaling = []
        for n in sizes:
            name = set_name(n)
            fr = run_task(tmp, "featurize", name=name, workers=cpus, limit=None, save=True)
            if name == mp_max:
                feat["mp_ours"] = fr
            tr = run_task(tmp, "train", name=name, preset="xie", epochs=1, threads=args.threads,
                          batch_size=256, warmup_batches=2)
            scaling.append({
                "n": set_sizes[name], "featurize_per_s": fr["per_s"],
                "featurize_seconds": fr["seconds"],
                "cache_bytes_per_structure": fr["cache_bytes_per_structure"],
                "cache_bytes": fr["cache_bytes"],
                "epoch_seconds": tr["steady_epoch_seconds"],
                "epoch_us_per_structure": 1e6 * tr["steady_epoch_seconds"] / set_sizes[name],
                "atoms_per_structure": fr["atoms_per_structure"],
                "memory": {"peak_rss_mb": max(fr["peak_rss_mb"], tr["peak_rss_mb"]),
                           "peak_rss_children_mb": fr["peak_rss_children_mb"]},
                "featurize": fr, "train": tr,
            })
        res["scaling"] = scaling

        # ---- training: Xie preset and the largest point of the search space
        train: dict[str, Any] = {}
        train["xie"] = run_task(tmp, "train", name="bulk", preset="xie", epochs=epochs,
                                threads=args.threads, batch_size=256)
        train["xie_plain"] = run_task(tmp, "train", env=PLAIN, name="bulk", preset="xie",
                                      epochs=epochs, threads=args.threads, batch_size=256)
        train["xie_orig"] = run_task(tmp, "train_orig", name="bulk", preset="xie",
                                     epochs=epochs, threads=args.threads, batch_size=256)
        train["largest"] = run_task(tmp, "train", name="bulk_small", preset="largest",
                                    epochs=2, threads=args.threads, batch_size=256)
        train["largest_plain"] = run_task(tmp, "train", env=PLAIN, name="bulk_small",
                                          preset="largest", epochs=2, threads=args.threads,
                                          batch_size=256)
        train["largest_orig"] = run_task(tmp, "train_orig", name="bulk_small",
                                         preset="largest", epochs=2, threads=args.threads,
                                         batch_size=256)
        if cpus > 1 and not quick:
            # torch's default: one thread per core; with other load on the cores, OpenMP's
            # spinning threads can collapse throughput; OMP_WAIT_POLICY=PASSIVE avoids that
            train[f"threads_{cpus}"] = run_task(tmp, "train", name="bulk", preset="xie",
                                                epochs=2, threads=cpus, batch_size=256)
            train[f"threads_{cpus}_passive"] = run_task(
                tmp, "train", env={"OMP_WAIT_POLICY": "PASSIVE"}, name="bulk", preset="xie",
                epochs=epochs, threads=cpus, batch_size=256)
        res["train"] = train

        # ---- prediction end to end, and the equivalence check
        res["predict"] = run_task(tmp, "predict", threads=args.threads, single=20)
        # all cores, as `mpprop predict` runs by default
        res["predict_all"] = run_task(tmp, "predict_all", threads=os.cpu_count() or 1)
        res["equivalence"] = run_task(tmp, "equivalence", name="bulk", n=64)
        res["equivalence_plain"] = run_task(tmp, "equivalence", env=PLAIN, name="bulk", n=64)
        pj = res["prepare"]["parse_json"]["per_s"]
        res["featurize_from_json_per_s"] = {
            # parse + graphs back to back, one process: 1 / (1/parse + 1/graphs)
            k: 1.0 / (1.0 / pj + 1.0 / feat[f"{k}_ours_1"]["per_s"]) for k in ("bulk", "mp")
        }
        res["ratios"] = {
            "featurize_bulk_1proc": feat["bulk_ours_1"]["per_s"] / feat["bulk_orig"]["per_s"],
            "featurize_mp_1proc": feat["mp_ours_1"]["per_s"] / feat["mp_orig"]["per_s"],
            "featurize_bulk_parallel": feat["bulk_ours"]["per_s"] / feat["bulk_orig"]["per_s"],
            "train_xie": train["xie_orig"]["steady_epoch_seconds"]
            / train["xie"]["steady_epoch_seconds"],
            "train_xie_cpu_time": train["xie_orig"]["steady_epoch_cpu_seconds"]
            / train["xie"]["steady_epoch_cpu_seconds"],
            "train_largest": train["largest_orig"]["steady_epoch_seconds"]
            / train["largest"]["steady_epoch_seconds"],
            "train_xie_plain": train["xie_orig"]["steady_epoch_seconds"]
            / train["xie_plain"]["steady_epoch_seconds"],
            "train_largest_plain": train["largest_orig"]["steady_epoch_seconds"]
            / train["largest_plain"]["steady_epoch_seconds"],
            "fused_kernel_xie": train["xie_plain"]["steady_epoch_seconds"]
            / train["xie"]["steady_epoch_seconds"],
        }
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    res["total_seconds"] = time.perf_counter() - t_start
    print()
    print_table(res)
    print("\nratios ours/original: " + ", ".join(f"{k} x{v:.1f}" for k, v in res["ratios"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"results: {args.out}  ({res['total_seconds']:.0f} s)")
    return 0 if res["equivalence"]["ok"] and res["equivalence_plain"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
