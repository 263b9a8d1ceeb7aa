#!/usr/bin/env bash
# One command that proves the GPU path and measures it (docs/gpu.md):
#
#   tools/gpu_check.sh OUT_DIR        (a new or empty folder: one that holds an earlier check's results is refused)
#
# Stages, each under its own time budget in seconds (LM_GPU_CHECK_BUDGET_<STAGE>=S overrides one), so that the
# whole run fits in 9 minutes on one H100 / H200 and a stage that fails or runs out of time never stops the next:
#   machine    versions, the GPU, the ceilings measured once (copy bandwidth, bf16 / fp32 matmul)          25
#   tests      pytest -m cuda tests/test_cuda.py (the op, decoding, DeepSpeed, checkpoints, torch.compile)  170
#   attention  tools/bench_attention.py: the fused Triton method (general, clipped, no RPE) and fft / band /
#              prefix on fp32 and bf16 inputs vs flash SDPA (bf16), N = 4k .. 64k, forward + backward, peak
#              memory, measured / predicted by the cost model (lm/ops/cost.py)                             120
#   train      tools/bench_train.py --precision bf16: kernelized_rpe (FFT, clipped) vs softmax at 512, 4k and
#              16k tokens of context: tokens/s, peak memory, model FLOP rate                                 60
#   wikitext   NGPU=1 ./launch.sh configs/wikitext103.yaml on the WikiText-103 sample for 300 steps (DeepSpeed,
#              bf16, ZeRO-1), then tools/eval_ppl.py and tools/generate.py on its checkpoint                110
#   generate   tools/bench_generate.py: decoding tokens/s and memory from 1k to 64k tokens of context       50
# then writes OUT_DIR/gpu_report.md and OUT_DIR/gpu_report.json (tools/bench_report.py; the stages' own files and
# logs are beside them) and prints the report last. Exit status: 0 when every stage passed, 1 when one did not
# (the report says which and why), 2 when the check cannot start.
#
# Environment:
#   LM_WHEELS=DIR           install the wheels in DIR (tools/gpu_wheels.sh makes them) with --no-deps into a
#                           temporary --target folder put first on PYTHONPATH: the machine's packages (torch
#                           above all) are never touched
#   LM_WIKITEXT_SAMPLE=DIR  a folder of wiki.{train,valid,test}.tokens for the wikitext stage (default
#                           ../shared/data/wikitext-103-sample beside the checkout); on a machine that receives
#                           only the repository, copy it into a git-ignored folder of the tree (e.g. .carry/)
#   LM_GPU_CHECK_STAGES=a,b run only these stages (the report marks the others "not run")
#   LM_GPU_CHECK_CPU=1      the same stages on the CPU at tiny sizes: a rehearsal of the script and the report
#                           (CI runs it). Without it, a machine without CUDA stops the check with a one-line error
#   PYTHON=python3          the interpreter that has torch (default python3)
set -uo pipefail

STAGES=(machine tests attention train wikitext generate)
declare -A BUDGET=([machine]=25 [tests]=170 [attention]=120 [train]=60 [wikitext]=110 [generate]=50)

die() { echo "gpu_check.sh: $*" >&2; exit 2; }
[ $# -eq 1 ] && [[ "$1" != -* ]] || die "usage: tools/gpu_check.sh OUT_DIR (environment: see the top of this file)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || die "cannot create the output folder $1"
OUT="$(cd "$1" && pwd)"
[ -e "$OUT/stages.jsonl" ] || [ -e "$OUT/gpu_report.md" ] &&
  die "$OUT already holds the results of a check; give a new or empty folder (nothing there is overwritten)"
cd "$ROOT"
PY="$(command -v "${PYTHON:-python3}")" || die "${PYTHON:-python3} is not on PATH; set PYTHON to the interpreter that has torch"
STAGES_WANTED="${LM_GPU_CHECK_STAGES:-}"
for s in ${STAGES_WANTED//,/ }; do
  [ -n "${BUDGET[$s]:-}" ] || die "LM_GPU_CHECK_STAGES names '$s'; the stages are ${STAGES[*]}"
done

if [ -n "${LM_GPU_CHECK_CPU:-}" ]; then
  MODE=cpu
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"  # CI shares its cores
else
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 ||
    die "CUDA is not available to $PY (torch.cuda.is_available() is False): run it on a GPU machine, or set LM_GPU_CHECK_CPU=1 for the CPU rehearsal at tiny sizes"
  MODE=cuda
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || die "cannot create a temporary folder"
trap 'rm -rf "$WORK"' EXIT
if [ -n "${LM_WHEELS:-}" ]; then
  compgen -G "$LM_WHEELS/*.whl" >/dev/null || die "LM_WHEELS=$LM_WHEELS holds no *.whl (tools/gpu_wheels.sh DIR makes them)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$WORK/site" "$LM_WHEELS"/*.whl >"$OUT/wheels.log" 2>&1 ||
    die "installing the wheels of LM_WHEELS=$LM_WHEELS failed (see $OUT/wheels.log)"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$WORK/site/bin:$PATH"  # e.g. the deepspeed launcher
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lm, installed or not
# launch.sh and DeepSpeed's launcher call the interpreter `python`: make that name this interpreter
mkdir -p "$WORK/bin" && printf '#!/bin/sh\nexec %q "$@"\n' "$PY" >"$WORK/bin/python" && chmod +x "$WORK/bin/python"
export PATH="$WORK/bin:$PATH" PYTHONUNBUFFERED=1 OUT PY MODE ROOT
export LM_WIKITEXT_SAMPLE="${LM_WIKITEXT_SAMPLE:-$ROOT/../shared/data/wikitext-103-sample}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.torch_extensions}"

if [ "$MODE" = cuda ]; then
  export ATTENTION_CASES="sdpa fused fused_band fused_prefix fft band prefix"
  export ATTENTION_ARGS="--device cuda --n 4096 8192 16384 32768 65536 --heads 8 --head-dim 64 --features 64
    --repeats 3 --max-memory-gb 100 --threads 8"
  export TRAIN_ARGS="--device cuda --contexts 512,4096,16384 --tokens-per-step 32768 --layers 6 --d-model 512
    --heads 8 --features 64 --vocab 16000 --steps 3 --repeats 2"
  export WIKITEXT_ARGS="max_steps=300 log_every=25 save_every=300 optim.warmup_steps=30 micro_batch_size=32"
  export EVAL_ARGS="" GENERATE_TOKENS=128
  export GENERATE_ARGS="--device cuda --contexts 1024,4096,16384,32768,65536 --rounds 8 --block 4"
else
  export ATTENTION_ARGS="--device cpu --n 256 --heads 2 --head-dim 16 --features 8 --band-l 33 --repeats 1 --threads 1"
  export ATTENTION_CASES="sdpa fused fft band prefix"  # the fused kernels run interpreted on CPU: one case is enough
  export TRAIN_ARGS="--device cpu --contexts 32,64 --tokens-per-step 64 --layers 1 --d-model 32 --heads 2
    --features 8 --vocab 64 --steps 1 --repeats 1"
  export WIKITEXT_ARGS="max_steps=20 log_every=5 save_every=20 optim.warmup_steps=2 optim.lr=3e-3 batch_size=8
    micro_batch_size=8 data.seq_len=64 model.n_layers=1 model.d_model=32 model.n_heads=2 model.d_ff=64
    model.attention.num_features=8 model.attention.rpe_max_distance=64 data.tokenizer.vocab_size=1024
    data.tokenizer.character_coverage=0.9995 data.tokenizer.train_max_bytes=200000 data.num_proc=1"
  export EVAL_ARGS="--batch-size 16" GENERATE_TOKENS=16
  export GENERATE_ARGS="--device cpu --contexts 128,256 --rounds 2 --block 2 --softmax-max-prefill 64
    --vocab-size 512"
fi

# ------------------------------------------------------------------------------------------------- the stages
stage_machine() { "$PY" tools/bench_report.py machine "$OUT" --device "$MODE"; }
stage_tests() { "$PY" -m pytest -v -rfEs -p no:cacheprovider -m cuda tests/test_cuda.py; }
stage_attention() {
  # shellcheck disable=SC2086
  # on CPU (the rehearsal) the fused method runs in Triton's interpreter
  [ "$MODE" = cuda ] || export TRITON_INTERPRET=1
  "$PY" tools/bench_attention.py $ATTENTION_ARGS --cases $ATTENTION_CASES --bf16 \
    --no-fp64 --no-isolate \
    --bias decay --out "$OUT/attention"
}
# shellcheck disable=SC2086
stage_train() { "$PY" tools/bench_train.py $TRAIN_ARGS --precision bf16 --json "$OUT/train/train.json"; }
stage_wikitext() {
  set -eo pipefail
  local sample dir=$OUT/wikitext split
  for split in train valid test; do
    [ -f "$LM_WIKITEXT_SAMPLE/wiki.$split.tokens" ] || {
      echo "gpu_check: no $LM_WIKITEXT_SAMPLE/wiki.$split.tokens: set LM_WIKITEXT_SAMPLE to a folder of" \
           "wiki.{train,valid,test}.tokens (inside the repository tree on a machine that receives only the tree)"
      exit 3; }
  done
  sample="$(cd "$LM_WIKITEXT_SAMPLE" && pwd)"
  mkdir -p "$dir"
  # shellcheck disable=SC2086
  NGPU=1 LM_SKIP_SETUP=1 ./launch.sh configs/wikitext103.yaml data.source=local "data.path=$sample" \
    "run_dir=$dir/run" "data.cache_dir=$dir/cache" data.progress=false eval_every=0 keep_checkpoints=1 \
    $WIKITEXT_ARGS 2>&1 | tee "$dir/train.log"
  # shellcheck disable=SC2086
  "$PY" tools/eval_ppl.py "$dir/run" --json "$dir/eval.json" --no-progress --device "$MODE" $EVAL_ARGS 2>&1 |
    tee "$dir/eval.log"
  "$PY" tools/generate.py "$dir/run" --prompt "The history of the" --temperature 0 \
    --max-new-tokens "$GENERATE_TOKENS" --device "$MODE" >"$dir/generate.txt" 2>"$dir/generate.log"
  cat "$dir/generate.log" "$dir/generate.txt"
}
stage_generate() {
  # shellcheck disable=SC2086
  "$PY" tools/bench_generate.py $GENERATE_ARGS --no-isolate --json "$OUT/generate/generate.json"
}
export -f stage_machine stage_tests stage_attention stage_train stage_wikitext stage_generate

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

total=0
for s in "${STAGES[@]}"; do
  v="LM_GPU_CHECK_BUDGET_${s^^}"
  BUDGET[$s]="${!v:-${BUDGET[$s]}}"
  total=$(awk -v a="$total" -v b="${BUDGET[$s]}" 'BEGIN { print a + b }')
done
echo "gpu_check: $MODE mode, output in $OUT; stage budgets add up to ${total} s" >&2
for s in "${STAGES[@]}"; do
  if [ -n "$STAGES_WANTED" ] && [[ ",$STAGES_WANTED," != *",$s,"* ]]; then
    printf '{"stage": "%s", "rc": null, "budget_s": %s, "seconds": null, "log": null}\n' "$s" "${BUDGET[$s]}" \
      >>"$OUT/stages.jsonl"
    continue
  fi
  echo "gpu_check: $s (budget ${BUDGET[$s]} s) ..." >&2
  t0=$(date +%s.%N)
  timeout --kill-after=5 "${BUDGET[$s]}" bash -c "stage_$s" >"$OUT/$s.log" 2>&1
  rc=$?
  printf '{"stage": "%s", "rc": %d, "budget_s": %s, "seconds": %s, "log": "%s.log"}\n' "$s" "$rc" \
    "${BUDGET[$s]}" "$(elapsed "$t0")" "$s" >>"$OUT/stages.jsonl"
  echo "gpu_check: $s finished with status $rc after $(elapsed "$t0") s (log: $OUT/$s.log)" >&2
done
"$PY" tools/bench_report.py report "$OUT" --mode "$MODE"
