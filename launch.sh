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
#
# Signals: SIGINT (Ctrl-C), SIGTERM, SIGUSR1 and SIGUSR2 sent to this script are passed on to every rank, which
# finishes its step, saves it and exits with status 75 (preemption.signals; docs/clusters.md); the script waits for
# the ranks and exits with their status. (DeepSpeed's own launcher, given the signal, would pass SIGTERM on and
# SIGKILL the ranks 30 s later, possibly mid-save.) With HOSTFILE the signal goes to DeepSpeed's runner, which
# sends SIGTERM to the ranks of every host and does not wait for them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
# Use the current Python environment if it has lm's dependencies (e.g. a cluster's CUDA env); otherwise the
# project's .venv, created on first use by tools/setup.sh. This checkout's lm/ is always the one imported.
# (found, not imported: importing them takes seconds, and the ranks import them anyway)
if ! python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
                ('deepspeed', 'sentencepiece', 'omegaconf', 'datasets')))" >/dev/null 2>&1; then
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
  # the cores shared among the ranks, unless the user chose: OpenMP's pools, and torch's with compute.cpu_threads=0
  # (torch uses compute.cpu_threads threads, by default 1)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / N > 0 ? $(nproc) / N : 1 ))}"
fi

# --log_level error: the launcher's INFO lines (no hostfile, world info, CUDA_VISIBLE_DEVICES, spawned, exited) tell a
# user nothing; its errors still show
CMD=(deepspeed --no_local_rank --log_level error)
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

# The launcher runs in a process group of its own (job control), so that a Ctrl-C reaches this script only; the
# trap passes each signal on to the ranks, the grandchildren of the launcher (deepspeed -> deepspeed.launcher.launch
# -> tools/train.py), as soon as they exist. Multi-node (HOSTFILE): SIGTERM to DeepSpeed's runner, which passes it
# to every host. Without pgrep: SIGTERM to the launcher's group (DeepSpeed then gives the ranks 30 s).
set -m
"${CMD[@]}" &
LAUNCHER=$!
set +m
PENDING=""
forward() {
  local ranks="" child
  if [ -n "${HOSTFILE:-}" ]; then kill -s TERM "$LAUNCHER" 2>/dev/null || true; return; fi
  if ! command -v pgrep >/dev/null 2>&1; then kill -s TERM -- "-$LAUNCHER" 2>/dev/null || true; return; fi
  for child in $(pgrep -P "$LAUNCHER" || true); do ranks+=" $(pgrep -P "$child" || true)"; done
  if [ -n "${ranks// /}" ]; then
    PENDING=""
    kill -s "$1" $ranks 2>/dev/null || true
  else
    PENDING=$1  # the ranks are not started yet
  fi
}
for sig in INT TERM USR1 USR2; do trap "forward $sig" "$sig"; done
while kill -0 "$LAUNCHER" 2>/dev/null; do
  if [ -n "$PENDING" ]; then sleep 0.2; forward "$PENDING"; else wait "$LAUNCHER" || true; fi  # a signal ends a wait
done
STATUS=0
wait "$LAUNCHER" || STATUS=$?
exit "$STATUS"
