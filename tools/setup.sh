#!/usr/bin/env bash
# Creates .venv and installs lm (the distribution kernelized-rpe-lm, editable) with its dependencies (idempotent: a no-op once done, until pyproject.toml or
# constraints-cpu.txt change). Without a GPU (no nvidia-smi) torch and deepspeed are pinned to CPU builds by
# constraints-cpu.txt; with a GPU, pip keeps/installs the CUDA torch. PYTHON=python3.x picks the interpreter.
# The eval extra (lm-eval, for tools/harness.py) and the hf extra (transformers, safetensors, for tools/export_hf.py)
# are installed too, so their tests run everywhere; neither pulls a torch of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if command -v nvidia-smi >/dev/null 2>&1; then CONSTRAINTS=(); else CONSTRAINTS=(-c constraints-cpu.txt); fi
STAMP=.venv/.lm-installed
WANT="$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16) ${CONSTRAINTS[*]:-gpu}"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then exit 0; fi
echo "lm set-up: installing into .venv (torch, deepspeed, lm-eval, transformers, ...: a few minutes, about 2 GB)" >&2
python -m pip install -q --disable-pip-version-check --upgrade pip
# this package was once installed as the distribution "lm": remove that editable install of this checkout (only
# that one: the package index's lm is another project)
if python -m pip show lm 2>/dev/null | grep -qx "Editable project location: $PWD"; then
  python -m pip uninstall -q -y --disable-pip-version-check lm
fi
python -m pip install -q --disable-pip-version-check "${CONSTRAINTS[@]}" -e ".[dev,eval,hf]"
python -c "import torch, deepspeed, sentencepiece, datasets, omegaconf, tensorboard, lm_eval, transformers; \
print('lm set-up done: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| lm-eval', lm_eval.__version__, \
'| transformers', transformers.__version__)" 2>&1 | grep -v WARNING >&2
echo "$WANT" > "$STAMP"
