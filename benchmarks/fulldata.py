"""Full-data models: every property on all its records, away from every property's fixed
test set, with the modern recipe and a pretrained trunk, against the Xie preset and the
published checkpoints.

    python benchmarks/fulldata.py build                  # workspace: snapshot, graphs, splits
    python benchmarks/fulldata.py run JOB [JOB ...]      # train (resumes per epoch)
    python benchmarks/fulldata.py list                   # jobs and their state

Runs one torch thread per process (start several processes for several jobs). The fixed
test sets are `mpprop split`'s for the whole snapshot (6,247 formation energy and band gap,
6,246 Fermi energy, 980 elastic, 273 energy per atom); the union of all of them (10,937
materials) is removed from every job's pool before its train/val split, so no reported
model and no trunk has seen a test material of any property. Results (test predictions,
CPU-hours) go to benchmarks/results/fulldata/<job>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from workspace import DEFAULT_DATA, REPO

from mpprop.config import Hyperparams, load_params
from mpprop.data import open_workspace
from mpprop.experiment import Job, all_test_ids, run_job

WORK = REPO / "benchmarks" / "work" / "fulldata"
RESULTS = REPO / "benchmarks" / "results" / "fulldata"

# the modern recipe (DESIGN.md §6, kgcnn's CGCNN): L1 loss, AdamW, warm-up then cosine decay,
# an exponential moving average of the weights, 128 units, batch 128
MODERN = {"n_conv": 4, "n_h": 2, "atom_fea_len": 128, "h_fea_len": 128, "lr": 2e-3,
          "lr_decay_epoch": 1, "optimizer": "AdamW", "batch_size": 128,
          "weight_decay": 1e-3, "loss": "l1", "lr_schedule": "warmup_cosine",
          "warmup_epochs": 3, "ema_decay": 0.999}
# the Xie preset (params.yaml) with its decay at 80% of the epochs, as quality.py
XIE = {"n_conv": 4, "n_h": 1, "atom_fea_len": 64, "h_fea_len": 32, "lr": 0.02,
       "optimizer": "SGD", "batch_size": 256}

JOBS = {
    # the trunk: formation energy, the largest labelled set; also formation energy's model
    "trunk-fe": Job("trunk-fe", "formation_energy_per_atom", {**MODERN, "epochs": 100}),
    # the Xie preset at the same final epochs, on the same data
    "xie-fe": Job("xie-fe", "formation_energy_per_atom",
                  {**XIE, "epochs": 100, "lr_decay_epoch": 80}),
}


def build() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", WORK / "params.yaml")
    mpprop = str(Path(sys.executable).with_name("mpprop"))
    import subprocess  # only the build step runs the CLI

    for cmd in (["-S", f"data.path={DEFAULT_DATA}", "fetch"], ["featurize", "--workers", "2"],
                ["split"]):
        subprocess.run([mpprop, *cmd], cwd=WORK, check=True)


def run(names: list[str]) -> None:
    torch.set_num_threads(1)
    params = load_params(WORK / "params.yaml")
    ws = open_workspace(params)
    excluded = all_test_ids(params, ws)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in names:
        job = JOBS[name]
        parent_dir = None
        if job.parent is not None:
            parent = JOBS[job.parent]
            parent_dir = next((WORK / "jobs").glob(f"{parent.name}-*"), None)
            if parent_dir is None or not (parent_dir / "model.pt").exists():
                raise SystemExit(f"{name} needs its parent {parent.name} trained first")
        record = run_job(params, ws, job, Hyperparams, WORK / "jobs", excluded, parent_dir,
                         progress=lambda line: print(line, flush=True))
        (RESULTS / f"{name}.json").write_text(json.dumps(record) + "\n")
        print(f"{name}: test MAE {record['test_mae']:.4f}, {record['cpu_hours']:.2f} CPU-h",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("build")
    r = sub.add_parser("run")
    r.add_argument("jobs", nargs="+", choices=sorted(JOBS))
    sub.add_parser("list")
    args = ap.parse_args()
    if args.command == "build":
        build()
    elif args.command == "run":
        run(args.jobs)
    else:
        for name in JOBS:
            done = (RESULTS / f"{name}.json").exists()
            print(f"{name:24s} {'done' if done else 'to do'}")


if __name__ == "__main__":
    main()
