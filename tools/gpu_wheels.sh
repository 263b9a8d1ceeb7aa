#!/usr/bin/env bash
# The wheels that tools/gpu_check.sh needs on a GPU machine with torch but without a package registry (docs/gpu.md):
#
#   tools/gpu_wheels.sh DIR              # on a machine with internet; then, on the GPU machine:
#   LM_WHEELS=DIR tools/gpu_check.sh OUT
#
# Downloads, with --no-deps, for CPython 3.12 on manylinux x86_64 (PY_VERSION=3.11 etc. for another interpreter),
# what lm needs beyond what such a machine has (torch, triton, numpy, pandas, pyarrow, sentencepiece, tensorboard,
# safetensors, huggingface-hub, pyyaml, tqdm, psutil, ninja, py-cpuinfo, msgpack, einops, packaging, pytest), at the
# versions CI runs; DeepSpeed has no wheel on PyPI, so pip builds one from its source (pure Python: DeepSpeed
# compiles its ops on first use, and the configs here need none). Prints the wheels and their total size (the
# device machine's transfer limit counts it together with the repository).
set -euo pipefail
[ $# -eq 1 ] && [[ "$1" != -* ]] || { echo "usage: tools/gpu_wheels.sh DIR" >&2; exit 2; }
DIR=$1
PY=${PYTHON:-python3}
mkdir -p "$DIR"
WHEELS=(
  omegaconf==2.4.0                 # lm.config (2.4 vendors its antlr4 runtime)
  datasets==5.2.0                  # text loading (data.source=local and hf)
  dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0  # datasets' needs (fsspec: datasets takes <= 2026.9.0)
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0        # DeepSpeed's needs (pydantic wants typing-extensions >= 4.16)
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "${PY_VERSION:-3.12}" --implementation cp "${PLATFORMS[@]}" -d "$DIR" "${WHEELS[@]}"
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DIR" deepspeed==0.19.8
ls -l "$DIR"/*.whl
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $(du -cb "$DIR"/*.whl | tail -1 | cut -f1) bytes"
