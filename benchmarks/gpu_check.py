"""GPU check: the training core on a device vs the CPU, and its speed there, in one short run.

Two steps, so the GPU side needs only torch and numpy (and this repository's src/ on the path):

  # 1. here (full mpprop environment): a small self-contained folder from the shared snapshot
  python benchmarks/gpu_check.py --export gpu_check_data --property bulk_modulus
  # 2. on the GPU machine (copy the folder and the repository; ~6 MB for the elastic set)
  PYTHONPATH=src python benchmarks/gpu_check.py --data gpu_check_data --device cuda \
      --out gpu_check.json

`--quick` (CI, on the CPU) exports a few hundred records and runs every step briefly.

What it checks and times (table on stdout, everything in the JSON):
1. equivalence on one training batch of the Xie preset: outputs, loss and every parameter's
   gradient on the device vs the CPU float32 reference (on the CPU itself: the fused kernel vs
   the plain PyTorch path), as the largest difference relative to the largest reference value;
   gradients relative to the largest gradient of any parameter; it passes within
   OUTPUT_TOL / GRAD_TOL (float32 sums in another order);
2. steady training epochs (median of --epochs after one warm-up epoch), at the Xie preset and
   at the largest point of the paper's search space: plain path on the device, the fused
   kernel where the device is the CPU, torch.compile of the plain path where asked;
3. bf16 autocast vs float32: best validation MAE after --bf16-epochs epochs, same seed;
4. N concurrent tuning workers sharing the device (processes, N from --workers): trials per
   hour for trials of the study's epochs per trial (tune.epochs), from the measured epochs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpprop import kernels
from mpprop.batches import iterate_batches
from mpprop.device import resolve_device
from mpprop.graph_cache import CACHE_ARRAYS, CACHE_META, GraphCache
from mpprop.model import CrystalGraphConvNet
from mpprop.settings import Hyperparams
from mpprop.training import fit, make_optimizer, run_batches

# float32 on another device sums in another order: differences relative to the largest value
OUTPUT_TOL = 1e-4
GRAD_TOL = 1e-4
TARGETS_FILE = "targets.npy"  # standardised-free targets (target units) of rows.npy
ROWS_FILE = "rows.npy"  # cache rows with a label (the property's non-test pool)
ATOM_FEATURES_FILE = "atom_features.npy"
CHECK_FILE = "check.json"  # property, Xie preset, largest search point, tune.epochs
VAL_FRACTION = 0.2
QUICK_RECORDS = 300
SEED = 0


# --------------------------------------------------------------------------- export (mpprop env)
def export(folder: Path, prop: str, data: Path, max_records: int | None) -> Path:
    """Graph cache + targets + atom features + the settings to check, from the shared snapshot
    through the real CLI (fetch, featurize, split)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from workspace import build_workspace

    from mpprop.config import load_params
    from mpprop.data import open_workspace, property_data
    from mpprop.graph_cache import atom_feature_table
    from mpprop.presets import hyperparams

    work = Path(tempfile.mkdtemp(prefix="gpu-check-ws-"))
    try:
        build_workspace(work, data, prop, max_records, workers=1)
        params = load_params(work / "params.yaml")
        ws = open_workspace(params)
        pdata = property_data(params, ws, prop)
        source = params.graph_cache_dir() / ws.cache.key
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name in CACHE_ARRAYS:
            shutil.copy(source / f"{name}.npy", folder / f"{name}.npy")
        shutil.copy(source / CACHE_META, folder / CACHE_META)
        np.save(folder / ROWS_FILE, pdata.pool_rows)
        np.save(folder / TARGETS_FILE, pdata.pool_targets)
        np.save(folder / ATOM_FEATURES_FILE, atom_feature_table())
        space = params.tune.search_space
        xie = hyperparams(params, "xie", prop)

        def top(key: str) -> Any:
            entry = space[key]
            return max(entry) if isinstance(entry, list) else entry.high

        largest = {**xie.as_dict(), **{k: top(k) for k in ("n_conv", "n_h", "atom_fea_len",
                                                             "h_fea_len")},
                   "optimizer": space["optimizer"][0] if isinstance(space["optimizer"], list)
                   else xie.optimizer}
        (folder / CHECK_FILE).write_text(json.dumps({
            "property": prop, "xie": xie.as_dict(), "largest": largest,
            "tune_epochs": int(params.tune.epochs), "n_records": len(ws.cache),
            "n_labelled": int(len(pdata.pool_rows)),
        }, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- check (torch only)
class CheckData:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.cache = GraphCache.from_folder(folder, mmap=False)
        self.rows = np.load(folder / ROWS_FILE)
        self.targets = np.load(folder / TARGETS_FILE)
        self.atom_table = np.load(folder / ATOM_FEATURES_FILE)
        self.check = json.loads((folder / CHECK_FILE).read_text())
        perm = np.random.default_rng(SEED).permutation(len(self.rows))
        n_val = max(1, int(round(VAL_FRACTION * len(perm))))
        self.val, self.train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        mean, std = self.targets[self.train].mean(), self.targets[self.train].std()
        self.norm = (self.targets - mean) / (std if std > 0 else 1.0)

    def hyperparams(self, which: str, **changes: Any) -> Hyperparams:
        return Hyperparams(**{**self.check[which], **changes})

    def model(self, hp: Hyperparams, device: torch.device) -> CrystalGraphConvNet:
        torch.manual_seed(SEED)
        return CrystalGraphConvNet(hp, self.cache.settings, self.atom_table).to(device)


def _one_batch_grads(model: CrystalGraphConvNet, data: CheckData, batch_size: int) -> dict:
    rows = data.rows[data.train[:batch_size]]
    ((_, batch),) = list(iterate_batches(data.cache, rows, batch_size, data.norm[data.train[:batch_size]]))
    device = next(model.parameters()).device
    batch = batch.to(device)
    model.train()
    out = model(batch)
    loss = torch.nn.functional.mse_loss(out, batch.target)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {"out": out.detach().cpu(), "loss": loss.detach().cpu(),
            **{f"grad.{n}": p.grad.detach().cpu() for n, p in model.named_parameters()}}


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) / scale


def check_equivalence(data: CheckData, device: torch.device) -> dict[str, Any]:
    """One batch: device vs the CPU reference (CPU: fused kernel vs plain path)."""
    hp = data.hyperparams("xie")
    bs = min(hp.batch_size, len(data.train))
    os.environ[kernels.ENV_SWITCH] = "0"  # the reference: plain PyTorch on the CPU
    ref = _one_batch_grads(data.model(hp, torch.device("cpu")), data, bs)
    os.environ[kernels.ENV_SWITCH] = "1"
    fused = device.type == "cpu" and kernels.edge_gate_ops() is not None
    got = _one_batch_grads(data.model(hp, device), data, bs)
    grads = [k for k in ref if k.startswith("grad.")]
    result = {
        "compared": f"{device} {'fused kernel' if fused else 'plain'} vs cpu plain",
        "batch_crystals": bs,
        "output_rel_diff": _rel_diff(got["out"], ref["out"]),
        "loss_rel_diff": _rel_diff(got["loss"], ref["loss"]),
        # relative to the largest gradient of any parameter: a bias in front of a batch norm
        # has a true gradient of zero, so its own scale is float32 noise
        "grad_rel_diff_max": max(float((got[k] - ref[k]).abs().max()) for k in grads)
        / max(float(ref[k].abs().max()) for k in grads),
        "grad_worst_parameter": max(grads, key=lambda k: float((got[k] - ref[k]).abs().max())),
        "output_tol": OUTPUT_TOL, "grad_tol": GRAD_TOL,
    }
    result["pass"] = bool(result["output_rel_diff"] <= OUTPUT_TOL
                          and result["loss_rel_diff"] <= OUTPUT_TOL
                          and result["grad_rel_diff_max"] <= GRAD_TOL)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_epochs(data: CheckData, which: str, device: torch.device, epochs: int,
                path: str) -> dict[str, Any]:
    """Median seconds of a training epoch (after one warm-up) over the labelled train rows."""
    hp = data.hyperparams(which)
    os.environ[kernels.ENV_SWITCH] = "1" if path == "fused" else "0"
    model = data.model(hp, device)
    if path == "compile":
        model = torch.compile(model, dynamic=True)
    optimizer = make_optimizer(model, hp)
    rng = np.random.default_rng(SEED)
    rows, y = data.rows[data.train], data.norm[data.train]
    times = []
    for _ in range(epochs + 1):
        _sync(device)
        t0 = time.perf_counter()
        run_batches(model, data.cache, rows, hp.batch_size, y, optimizer, rng)
        _sync(device)
        times.append(time.perf_counter() - t0)
    os.environ[kernels.ENV_SWITCH] = "1"
    steady = statistics.median(times[1:])
    return {"config": which, "path": path, "device": str(device), "epochs_timed": epochs,
            "first_epoch_s": times[0], "steady_epoch_s": steady,
            "crystals_per_s": len(rows) / steady, "n_train": int(len(rows)),
            "hyperparams": {k: hp.as_dict()[k] for k in ("n_conv", "n_h", "atom_fea_len",
                                                           "h_fea_len", "batch_size")}}


def bf16_effect(data: CheckData, device: torch.device, epochs: int) -> dict[str, Any]:
    hp = data.hyperparams("xie", epochs=epochs, lr_decay_epoch=max(1, int(0.8 * epochs)))
    out: dict[str, Any] = {"epochs": epochs}
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        torch.manual_seed(SEED)
        res = fit(hp, data.cache.settings, data.cache,
                  data.rows[data.train], data.targets[data.train],
                  data.rows[data.val], data.targets[data.val], seed=SEED, device=device,
                  precision=precision)
        out[precision] = {"best_val_mae": res.best_val_mae, "seconds": time.perf_counter() - t0}
    out["mae_ratio_bf16_over_fp32"] = out["bf16"]["best_val_mae"] / out["fp32"]["best_val_mae"]
    return out


def _worker(folder: str, device: str, epochs: int, threads: int, start: Any) -> float:
    torch.set_num_threads(threads)
    data = CheckData(Path(folder))
    hp = data.hyperparams("xie")
    model = data.model(hp, torch.device(device))
    optimizer = make_optimizer(model, hp)
    rng = np.random.default_rng(SEED)
    start.wait()  # every worker starts its epochs at once
    t0 = time.perf_counter()
    for _ in range(epochs):
        run_batches(model, data.cache, data.rows[data.train], hp.batch_size,
                    data.norm[data.train], optimizer, rng)
    _sync(torch.device(device))
    return time.perf_counter() - t0


def concurrent_workers(data: CheckData, device: torch.device, counts: list[int],
                       epochs: int) -> list[dict[str, Any]]:
    """N processes training the Xie preset at once on the device: trials per hour."""
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // max(counts)) if device.type == "cuda" else 1
    rows = []
    for n in counts:
        with ctx.Manager() as manager:
            start = manager.Barrier(n)
            with ctx.Pool(n) as pool:
                walls = pool.starmap(_worker, [(str(data.folder), str(device), epochs, threads,
                                                start)] * n)
        per_epoch = max(walls) / epochs
        trial_s = per_epoch * data.check["tune_epochs"]
        rows.append({"workers": n, "epochs_each": epochs, "wall_s": max(walls),
                     "epoch_s_per_worker": per_epoch, "threads_per_worker": threads,
                     "trials_per_hour": n * 3600.0 / trial_s,
                     "trial_epochs": data.check["tune_epochs"]})
    return rows


def run_check(folder: Path, device_name: str, epochs: int, bf16_epochs: int,
              workers: list[int], worker_epochs: int, compile_: bool) -> dict[str, Any]:
    device = resolve_device(device_name)
    data = CheckData(folder)
    t0 = time.perf_counter()
    paths = ["plain"] + (["fused"] if device.type == "cpu" and kernels.edge_gate_ops() else [])
    paths += ["compile"] if compile_ else []
    timings = []
    for which in ("xie", "largest"):
        for path in paths:
            try:
                timings.append(time_epochs(data, which, device, epochs, path))
            except Exception as exc:  # noqa: BLE001 - torch.compile may not handle a shape: say so
                timings.append({"config": which, "path": path, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return {
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "device": str(device),
                    "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                    else f"{os.cpu_count()} CPU cores"),
                    "cpu_threads": torch.get_num_threads()},
        "data": {**{k: data.check[k] for k in ("property", "n_records", "n_labelled", "tune_epochs")},
                 "n_train": int(len(data.train)), "n_val": int(len(data.val))},
        "equivalence": check_equivalence(data, device),
        "epochs": timings,
        "bf16": bf16_effect(data, device, bf16_epochs),
        "workers": concurrent_workers(data, device, workers, worker_epochs),
        "seconds": time.perf_counter() - t0,
    }


def print_table(result: dict[str, Any]) -> None:
    eq, m = result["equivalence"], result["machine"]
    print(f"gpu_check on {m['device']} ({m['device_name']}), torch {m['torch']}, "
          f"{result['data']['property']}: {result['data']['n_train']} train crystals")
    print(f"equivalence ({eq['compared']}, one batch of {eq['batch_crystals']}): output "
          f"{eq['output_rel_diff']:.1e}, loss {eq['loss_rel_diff']:.1e}, gradients "
          f"{eq['grad_rel_diff_max']:.1e} (tol {OUTPUT_TOL:g} / {GRAD_TOL:g}): "
          f"{'PASS' if eq['pass'] else 'FAIL'}")
    print("| config | path | steady s/epoch | crystals/s | first epoch s |\n|---|---|---|---|---|")
    base = {}
    for t in result["epochs"]:
        if "error" in t:
            print(f"| {t['config']} | {t['path']} | error: {t['error'][:80]} | | |")
            continue
        base.setdefault(t["config"], t["steady_epoch_s"])
        print(f"| {t['config']} | {t['path']} | {t['steady_epoch_s']:.3f} "
              f"(x{base[t['config']] / t['steady_epoch_s']:.2f} vs plain) | "
              f"{t['crystals_per_s']:.0f} | {t['first_epoch_s']:.2f} |")
    b = result["bf16"]
    print(f"bf16 vs fp32 after {b['epochs']} epochs: best val MAE {b['bf16']['best_val_mae']:.4f} vs "
          f"{b['fp32']['best_val_mae']:.4f} (ratio {b['mae_ratio_bf16_over_fp32']:.3f}); "
          f"{b['bf16']['seconds']:.1f} s vs {b['fp32']['seconds']:.1f} s")
    print("| workers | s/epoch each | trials/hour (trial = "
          f"{result['data']['tune_epochs']} epochs) |\n|---|---|---|")
    for w in result["workers"]:
        print(f"| {w['workers']} | {w['epoch_s_per_worker']:.3f} | {w['trials_per_hour']:.1f} |")


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, help="write a check folder from the shared snapshot")
    ap.add_argument("--data", type=Path, help="a folder written by --export")
    ap.add_argument("--property", default="bulk_modulus")
    ap.add_argument("--snapshot", type=Path, default=repo.parent / "shared" / "data" / "mp_snapshot.jsonl.gz")
    ap.add_argument("--max-records", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per configuration")
    ap.add_argument("--bf16-epochs", type=int, default=20)
    ap.add_argument("--workers", default="1,4,8", help="concurrent workers to time, comma-separated")
    ap.add_argument("--worker-epochs", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the plain path")
    ap.add_argument("--quick", action="store_true", help="CI: a tiny export, every step briefly")
    ap.add_argument("--out", type=Path, default=repo / "benchmarks" / "results" / "gpu_check.json")
    args = ap.parse_args()
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        folder = export(tmp / "data", args.property, args.snapshot, QUICK_RECORDS)
        result = run_check(folder, args.device, 1, 2, [1, 2], 1, args.compile)
        shutil.rmtree(tmp, ignore_errors=True)
    elif args.export:
        folder = export(args.export, args.property, args.snapshot, args.max_records)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        print(f"wrote {folder} ({size:.1f} MB); on the GPU machine: PYTHONPATH=src python "
              f"benchmarks/gpu_check.py --data {folder} --device cuda")
        return
    elif args.data:
        counts = [int(n) for n in args.workers.split(",")]
        result = run_check(args.data, args.device, args.epochs, args.bf16_epochs, counts,
                           args.worker_epochs, args.compile)
    else:
        ap.error("give --export DIR, --data DIR or --quick")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    if not result["equivalence"]["pass"]:
        raise SystemExit("equivalence check failed")


if __name__ == "__main__":
    main()
