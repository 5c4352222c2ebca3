#!/usr/bin/env bash
# Install diffenc-diffusers and everything its training, tests and linting need into the active Python.
# Where torch is missing, the CPU wheel is installed first (set TORCH_SPEC to choose another build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PYTHON" -m pip install --quiet -e ".[train,test,dev]"
