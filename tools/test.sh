#!/usr/bin/env bash
# The test command: installs what is missing (tools/setup.sh), then runs the suite. By default every test but the
# `long` end-to-end runs of several processes (under 10 minutes on 2 idle cores); `--all` first runs those too (what
# CI runs). Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow" tests/test_ops_values.py`
# (an -m given here replaces the default selection).
set -euo pipefail
cd "$(dirname "$0")/.."
SELECT=(-m "not long")
if [ "${1:-}" = "--all" ]; then
  SELECT=()
  shift
fi
bash tools/setup.sh
. .venv/bin/activate
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
exec python -m pytest -q "${SELECT[@]}" "$@"
