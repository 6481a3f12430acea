#!/usr/bin/env bash
# Install mpprop and run the main job end to end on a local MP snapshot file (no MP key,
# no network needed):   bash run.sh [SNAPSHOT_FILE]
# default SNAPSHOT_FILE: ../shared/data/mp_snapshot.jsonl.gz
set -euo pipefail
cd "$(dirname "$0")"
SNAPSHOT=$(realpath "${1:-../shared/data/mp_snapshot.jsonl.gz}")
[ -e "$SNAPSHOT" ] || { echo "snapshot file not found: $SNAPSHOT" >&2; exit 2; }
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
mpprop -S "data.path=$SNAPSHOT" fetch
mpprop featurize
mpprop split
mpprop train --property bulk_modulus --epochs "${EPOCHS:-50}"
echo "done: compare runs with  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db"
