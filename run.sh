#!/usr/bin/env bash
# Install mpprop and run the main job end to end on a local MP snapshot file (no MP key,
# no network beyond the package index):
#   bash run.sh [SNAPSHOT_FILE]        default: ../shared/data/mp_snapshot.jsonl.gz
# The job (about 15 minutes on 2 cores): register the published CGCNN models (alias
# xie-2018), run the DVC pipeline (fetch -> featurize -> split -> tune -> train -> evaluate ->
# promote -> report) on the elastic properties of the whole elastic set, the Xie and tuned
# presets trained for the same epochs, then predict every property of those structures with
# the promoted champions and with the published models.
# It runs in its own DVC project, runs/demo/ (ignored by git), with a params.yaml derived from
# the repository's by the overrides below: the repository's tracked files stay as they are,
# and `dvc repro` at the top level still means the paper's protocol. FULL=1 runs that instead
# (params.yaml as it is, on its data.path: days on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"
SNAPSHOT=$(realpath -m "${1:-../shared/data/mp_snapshot.jsonl.gz}")   # -m: a missing file gets our message
[ -e "$SNAPSHOT" ] || { echo "snapshot file not found: $SNAPSHOT" >&2; exit 2; }
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1

# commit everything in the demo project (a machine without a git identity gets one for it)
demo_commit() {
    git add -A
    if git diff --cached --quiet; then return 0; fi
    git -c user.name="$(git config user.name || echo 'mpprop demo')" \
        -c user.email="$(git config user.email || echo 'demo@mpprop.invalid')" \
        commit -q -m "$1"
}

if [ "${FULL:-0}" = 1 ]; then
    mpprop import-pretrained
    dvc repro   # reads data.path from params.yaml
    RUN=.
else
    RUN=runs/demo
    mkdir -p "$RUN"
    # the code the pipeline depends on (DVC hashes src/ for the stages' deps)
    rm -rf "$RUN/src" && mkdir -p "$RUN/src" && cp -r src/mpprop "$RUN/src/"
    find "$RUN/src" -name __pycache__ -prune -exec rm -rf {} +
    # the demo budget: each -S overrides one key of params.yaml (validated like any params)
    mpprop -S "data.path=$SNAPSHOT" -S "data.require_property=bulk_modulus" \
        -S "data.max_records=${MAX_RECORDS:-null}" \
        -S "properties=[bulk_modulus, shear_modulus, poisson_ratio]" \
        -S "tune.n_trials=${TRIALS:-5}" -S "tune.epochs=${TUNE_EPOCHS:-8}" \
        -S "tune.pruner_warmup_steps=2" -S "tune.pruner_startup_trials=2" -S "tune.search_space.lr_decay_epoch={low: 2, high: 6}" \
        -S "presets.xie.epochs=${EPOCHS:-25}" -S "presets.xie.lr_decay_epoch=${DECAY:-20}" \
        show-params --out "$RUN/params.yaml"
    # the pipeline, with the plots of the demo's properties only
    mpprop --params "$RUN/params.yaml" show-pipeline --out "$RUN/dvc.yaml"
    cd "$RUN"
    # a project of its own: a git repository, so that `dvc exp run -S`, `dvc exp show`,
    # `dvc params diff` and `dvc plots diff` work there
    [ -d .git ] || git init -q
    [ -d .dvc ] || dvc init -q
    # a demo made by an earlier run.sh had no git
    if [ "$(dvc config core.no_scm 2>/dev/null || true)" = True ]; then dvc config --unset core.no_scm; fi
    mkdir -p .dvc/plots && cp ../../.dvc/plots/*.json .dvc/plots/   # mpprop's plot templates
    python ../../scripts/dvc_plots_offline.py --configure >/dev/null   # plots without internet
    for ignored in /mlruns/ /predictions/; do   # the MLflow store and predictions: not versioned
        grep -qxF "$ignored" .gitignore 2>/dev/null || echo "$ignored" >> .gitignore
    done
    demo_commit "demo project: params, pipeline and code"
    mpprop import-pretrained
    dvc repro
    demo_commit "dvc repro: models, metrics, plots, Table 2"
fi
mpprop predict --property all --input data/snapshot --output predictions/champion.csv
mpprop predict --property all --alias xie-2018 --input data/snapshot \
    --output predictions/xie-2018.csv
cat reports/table2.md
echo "done (in $RUN). Compare runs: mlflow ui --backend-store-uri sqlite:///$(realpath "$PWD")/mlruns/mlflow.db"
echo "then open $(mpprop ui-url) (the training runs, model-training view)"
