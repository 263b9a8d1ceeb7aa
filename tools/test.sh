#!/usr/bin/env bash
# The test command (README and CI): the whole suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
exec python -m pytest -q "$@"
