#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment from requirements.txt and setup.py.
# The environment lives in $SDTRAIN_VENV (default: .venv in the repository); it is rebuilt only
# when those files change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SDTRAIN_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
want=$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)
stamp="$VENV/.sdtrain-requirements"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "installing dependencies into $VENV (first run downloads PyTorch; this takes a few minutes)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r requirements.txt
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
