#!/usr/bin/env bash
# The test command (README and CI): installs what is missing (tools/setup.sh), then runs the whole suite,
# slow tests included. Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow" tests/test_ops_values.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
exec python -m pytest -q "$@"
