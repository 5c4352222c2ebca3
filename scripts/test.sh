#!/usr/bin/env bash
# Set up this machine and run the checks: ruff, then the default (fast) test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the long tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh
"$PYTHON" -m ruff check .
"$PYTHON" -m pytest "$@"
