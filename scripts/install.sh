#!/usr/bin/env bash
# Create .venv and install mpprop with its test tools. torch is pinned to 2.13.0 in
# pyproject.toml: on our machines that is the CPU build lying on local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# compile the fused CPU kernel now (about 30 s, once per machine and torch version) rather
# than in the first training run, where several tuning workers would wait on one build
.venv/bin/python -c "from mpprop.kernels import report_build; report_build()"
# `dvc plots show` readable without internet: a page template with Vega inlined, made this
# clone's default (.dvc/config.local)
.venv/bin/python scripts/dvc_plots_offline.py --configure
echo "installed: $(.venv/bin/mpprop --help | head -1)"
