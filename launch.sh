#!/usr/bin/env bash
# Train under DeepSpeed:  ./launch.sh [CONFIG.yaml] [key=value ...]      (default CONFIG: configs/wikitext103.yaml)
#
#   all visible GPUs (nvidia-smi), NGPU=N to use fewer; without a GPU: CPU ranks on gloo (NGPU=2 gives two).
#   HOSTFILE=path   multi-node: a DeepSpeed hostfile ("host slots=N" per line); passwordless ssh to every host,
#                   the same checkout/venv path and a shared run_dir on all of them. MASTER_ADDR / MASTER_PORT
#                   are passed on when set.
#   DRY_RUN=1       print the launcher command instead of running it.
#   TORCH_EXTENSIONS_DIR  where DeepSpeed compiles its C++ ops (default: .torch_extensions in the project).
#   LM_SKIP_SETUP=1 never install anything: use the current Python environment as it is, or stop with an error
#                   (the test suite sets it, so tests never run tools/setup.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
# Use the current Python environment if it has lm's dependencies (e.g. a cluster's CUDA env); otherwise the
# project's .venv, created on first use by tools/setup.sh. This checkout's lm/ is always the one imported.
if ! python -c "import deepspeed, sentencepiece, omegaconf, datasets" >/dev/null 2>&1; then
  if [ -n "${LM_SKIP_SETUP:-}" ]; then
    echo "launch.sh: $(command -v python || echo python) lacks lm's dependencies and LM_SKIP_SETUP is set, so nothing" \
         "is installed; activate the environment that has them (e.g. . .venv/bin/activate) or unset LM_SKIP_SETUP" >&2
    exit 2
  fi
  bash tools/setup.sh
  . .venv/bin/activate
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

CONFIG=configs/wikitext103.yaml
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then CONFIG=$1; shift; fi
if [ ! -f "$CONFIG" ]; then echo "launch.sh: config file '$CONFIG' does not exist" >&2; exit 2; fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}"

GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if [ "$GPUS" -gt 0 ]; then N=${NGPU:-$GPUS}; else N=${NGPU:-1}; fi
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then echo "launch.sh: NGPU must be a positive integer, got '$N'" >&2; exit 2; fi
if [ "$GPUS" -gt 0 ]; then
  if [ "$N" -gt "$GPUS" ]; then echo "launch.sh: NGPU=$N but only $GPUS GPU(s) visible" >&2; exit 2; fi
else
  export DS_ACCELERATOR=cpu
  # one thread pool per rank sharing the cores, unless the user chose
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / N > 0 ? $(nproc) / N : 1 ))}"
fi

CMD=(deepspeed --no_local_rank)
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -f "$HOSTFILE" ]; then echo "launch.sh: HOSTFILE '$HOSTFILE' does not exist" >&2; exit 2; fi
  CMD+=(--hostfile "$HOSTFILE")
  [ -n "${NGPU:-}" ] && CMD+=(--num_gpus "$N")
else
  CMD+=(--num_gpus "$N")
fi
[ -n "${MASTER_ADDR:-}" ] && CMD+=(--master_addr "$MASTER_ADDR")
CMD+=(--master_port "${MASTER_PORT:-$(( 29500 + RANDOM % 1000 ))}")
CMD+=(tools/train.py "$CONFIG" "$@")

if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
