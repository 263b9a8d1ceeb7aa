#!/usr/bin/env bash
# Creates .venv and installs lm with its dependencies. On a machine without a GPU torch and deepspeed are
# pinned to CPU builds (constraints-cpu.txt); with nvidia-smi present the installed/CUDA torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install -q -e ".[dev]"
else
  python -m pip install -q -c constraints-cpu.txt -e ".[dev]"
fi
python -c "import torch, deepspeed, sentencepiece, datasets, omegaconf; print('lm set-up done: torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
