#!/usr/bin/env bash
# Set up the environment and run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${SDTRAIN_VENV:-.venv}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
exec "$VENV/bin/python" -m pytest -n 2 -q -m "not slow" "$@"
