#!/bin/bash
# mpprop tuning workers as a Slurm job array: every array task is one `mpprop tune` worker;
# all of them share one Optuna study (PostgreSQL) and log to one MLflow tracking server
# (docs/scale-out.md). The target --n-trials is a total over all workers, so the size of the
# array only sets how many run at once.
#
# Before the first submission (once; EDIT the names):
#   1. PostgreSQL reachable from the compute nodes, with a database for the study
#        createdb -h db.example.org -U mpprop optuna
#      and the password in ~/.pgpass (mode 600), not in this file:
#        db.example.org:5432:optuna:mpprop:SECRET
#   2. an MLflow tracking server the nodes reach (its own database, --serve-artifacts), e.g.
#        mlflow server --host 0.0.0.0 --port 5000 \
#            --backend-store-uri postgresql+psycopg2://mpprop@db.example.org/mlflow \
#            --serve-artifacts --artifacts-destination /shared/mlflow-artifacts \
#            --allowed-hosts 'mlflow.example.org,mlflow.example.org:*'
#   3. the project on a shared filesystem (params.yaml, .venv, data/), and the snapshot,
#      graph cache and splits built there once, on one node:
#        sbatch --cpus-per-task=8 --time=1:00:00 --chdir="$PWD" \
#            --wrap '.venv/bin/mpprop fetch && .venv/bin/mpprop featurize && .venv/bin/mpprop split'
#      and the fused CPU kernel built once (as scripts/install.sh does) on a compute node:
#        srun .venv/bin/python -c "from mpprop.kernels import report_build; report_build()"
#
# Submit (from the project folder; PROPERTY etc. can also be set on the command line):
#   sbatch scripts/slurm_tune.sh
#   sbatch --array=0-63%16 --export=ALL,PROPERTY=bulk_modulus scripts/slurm_tune.sh
# Watch:
#   squeue --me --name=mpprop-tune
#   tail -f mpprop-tune-<jobid>_<task>.out
# Stop (the running trials are failed and re-queued on the next start):
#   scancel <jobid>

# EDIT: how many workers (0-N-1; %K = at most K at once), cores and time per worker
#SBATCH --job-name=mpprop-tune
#SBATCH --array=0-15
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=24:00:00
#SBATCH --output=mpprop-tune-%A_%a.out
# EDIT: your partition / account, if the cluster wants them
##SBATCH --partition=cpu
##SBATCH --account=myproject

set -euo pipefail

# ---- EDIT: where things are (or export them before sbatch) --------------------------------
PROPERTY=${PROPERTY:-band_gap}
# Optuna storage: the PostgreSQL database of step 1 (no password here: ~/.pgpass)
OPTUNA_STORAGE=${OPTUNA_STORAGE:-postgresql://mpprop@db.example.org:5432/optuna}
# MLflow tracking server of step 2
MLFLOW_URI=${MLFLOW_URI:-http://mlflow.example.org:5000}
# the project folder on the shared filesystem (params.yaml, data/, tuned/)
PROJECT_DIR=${PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
# the graph cache (featurize's output) on the shared filesystem
GRAPH_CACHE=${GRAPH_CACHE:-$PROJECT_DIR/data/graphs}
# the virtual environment with mpprop installed (or `module load ...` and a conda env)
VENV=${VENV:-$PROJECT_DIR/.venv}
# --------------------------------------------------------------------------------------------

cd "$PROJECT_DIR"
# shellcheck disable=SC1091
source "$VENV/bin/activate"

if [[ ! -f "$GRAPH_CACHE/current.json" ]]; then
    echo "no graph cache in $GRAPH_CACHE: run fetch, featurize and split once first (step 3)" >&2
    exit 1
fi

# one torch/OpenMP thread per allocated core, and no spinning threads on shared nodes
THREADS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=$THREADS OMP_WAIT_POLICY=PASSIVE MKL_NUM_THREADS=$THREADS

echo "worker ${SLURM_ARRAY_TASK_ID:-0} of job ${SLURM_ARRAY_JOB_ID:-?} on $(hostname): $PROPERTY, $THREADS threads"

srun mpprop -S "mlflow.tracking_uri=$MLFLOW_URI" \
    -S "graph.cache_dir=$GRAPH_CACHE" \
    -S "train.torch_threads=$THREADS" \
    tune --property "$PROPERTY" --storage "$OPTUNA_STORAGE"
