#!/usr/bin/env bash
# One GPU-machine call per stage (each fits the device's 10-minute limit); logs under $OUT.
#   bash bench/gpu_session.sh tests        # kernel GPU tests (bf16/fp16)
#   bash bench/gpu_session.sh tests-models # BLIP model and pre-training GPU tests
#   bash bench/gpu_session.sh kernels      # attention + contrastive benchmarks, host time per call
#   bash bench/gpu_session.sh models       # BLIP training steps (ARGS="--compile --profile")
#   bash bench/gpu_session.sh sweep        # attention tile sweep (ARGS="--shapes a,b" to narrow)
# Each stage stops itself (SIGINT, so pytest and the scripts still write their summaries
# and result files) before the device's 10-minute limit: the whole call, install and
# cache unpacking included, ends within LIMIT seconds of its start (default 560); each
# step gets what is left (steps that share a stage split it). Exit status: 0 when every
# step passed, 1 when one failed or was stopped, 2 for an unknown stage.
# With 15 minutes of device time a session (the machine's start counts), run the
# correctness gate first, `LIMIT=400 ... tests` (bf16/fp16 kernel tests), then, while the
# machine is still warm, `LIMIT=200 ... kernels`; the other stages in later sessions.
# Kernels compiled ahead on a CPU machine (`python bench/precompile_for_gpu.py --stage
# tests --stage tests-models --stage benchmarks`, with Triton 3.6; also `--stage sweep`)
# travel as .triton-cache.tar.xz (name it in the device call's carry): unpacked into
# Triton's cache here, they are found instead of compiled when their cache keys agree
# (the unpacking says whether they do).
set -u
STAGE=${1:-tests}
case "$STAGE" in
  tests|tests-models|kernels|models|sweep) ;;
  *) echo "unknown stage $STAGE (tests, tests-models, kernels, models, sweep)"; exit 2 ;;
esac
OUT=${OUT:-/tmp/blipfast-out}
LIMIT=${LIMIT:-560}
KILL_AFTER=20  # after SIGINT, a step has this long to write its results before SIGKILL
DEADLINE=$((SECONDS + LIMIT))
status=0
# left [SHARE]: seconds a step may run so that it (SIGKILL margin included) ends by the
# deadline (0 or less: none); with SHARE n, 1/n of that (the first of n steps sharing it).
left() { echo $(( (DEADLINE - SECONDS - KILL_AFTER) / ${1:-1} )); }
# bounded [-s SHARE] COMMAND...: COMMAND, stopped by SIGINT when its time is up; not run
# (status 124, as timeout's) when no time is left.
bounded() {
  local share=1
  if [ "$1" = "-s" ]; then share=$2; shift 2; fi
  local seconds; seconds=$(left "$share")
  if [ "$seconds" -lt 1 ]; then echo "no time left within LIMIT=$LIMIT: not run: $*" >&2; return 124; fi
  timeout --signal=INT --kill-after=$KILL_AFTER "$seconds" "$@"
}
# step NAME STATUS: report a step's exit status; any failure makes the call's status 1.
step() { echo "$1 exit $2"; [ "$2" -eq 0 ] || status=1; }
mkdir -p "$OUT"
bounded python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { echo "install failed (blipfast.kernels needs the package mapping):"; tail -5 "$OUT/install.log"; exit 1; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# Fail in seconds, not after every stage's processes fail alike: what each stage imports,
# from the repository root as the stages run (python -m puts it on sys.path).
bounded python -c "
import torch, triton, transformers
import transformers.models.blip.modeling_blip
import blipfast, blipfast.models, blipfast.train, blipfast.kernels.attention
assert torch.cuda.is_available(), 'no CUDA device'
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers',
      transformers.__version__, torch.cuda.get_device_name())
" > "$OUT/preflight.log" 2>&1 \
  || { echo "preflight failed:"; tail -8 "$OUT/preflight.log"; exit 1; }
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/blipfast-triton-cache}
if [ -f .triton-cache.tar.xz ]; then
  bounded python bench/precompile_for_gpu.py --unpack .triton-cache.tar.xz \
    --into "$TRITON_CACHE_DIR" > "$OUT/triton-cache.log" 2>&1
  tail -4 "$OUT/triton-cache.log"
fi
cached_kernels() { find "$TRITON_CACHE_DIR" -name '__grp__*.json' 2>/dev/null | wc -l; }
cached_before=$(cached_kernels)

# parallel_pytest NAME "ARGS" "ARGS" ...: one pytest process per ARGS, all at once, each
# logging to $OUT/NAME-<i>.log; prints each group's exit status, summary and failures.
parallel_pytest() {
  local name=$1; shift
  local index=0 pids=() groups=()
  for group in "$@"; do
    index=$((index + 1))
    eval "bounded python -m pytest -q -p no:cacheprovider --maxfail=20 -rf $group" \
      > "$OUT/$name-$index.log" 2>&1 &
    pids+=($!); groups+=("$group")
  done
  for index in "${!pids[@]}"; do
    wait "${pids[$index]}"; local exit_status=$?
    [ "$exit_status" -eq 0 ] || status=1
    echo "[$name $((index + 1))] exit $exit_status: ${groups[$index]}"
    grep -E "^(FAILED|ERROR)| in [0-9.]+s" "$OUT/$name-$((index + 1)).log" | tail -12
  done
}
case "$STAGE" in
  tests|tests-models)
    # Compilation dominates (every case x dtype is its own kernel specialization), and it
    # runs on the host: the groups (bench/gpu_test_groups.txt) run as parallel processes.
    mapfile -t groups < <(sed -n "s/^$STAGE: //p" bench/gpu_test_groups.txt)
    parallel_pytest "gpu-$STAGE" "${groups[@]}" ;;
  kernels)
    # host_overhead.py takes under a minute; the benchmarks split the rest.
    DEADLINE=$((DEADLINE - 60)) bounded -s 2 python bench/run_attention.py --out "$OUT" \
      > "$OUT/attention.log" 2>&1
    step attention $?
    DEADLINE=$((DEADLINE - 60)) bounded python bench/run_contrastive.py --out "$OUT" \
      > "$OUT/contrastive.log" 2>&1
    step contrastive $?
    bounded python bench/host_overhead.py > "$OUT/host_overhead.log" 2>&1
    step "host overhead" $?
    tail -25 "$OUT/attention.log"; tail -25 "$OUT/contrastive.log"; cat "$OUT/host_overhead.log" ;;
  models)
    bounded python bench/run_models.py --out "$OUT" ${ARGS:-} > "$OUT/models.log" 2>&1
    step models $?
    tail -15 "$OUT/models.log" ;;
  sweep)
    # Compile every candidate first, in 12 parallel processes (into Triton's disk cache),
    # within half of the time left, then time them all in one process.
    for part in $(seq 1 12); do
      bounded -s 2 python bench/sweep_attention_configs.py --compile-only \
        --part "$part/12" ${ARGS:-} > "$OUT/sweep-compile-$part.log" 2>&1 &
    done
    wait
    echo "compiled: $(cat "$OUT"/sweep-compile-*.log | grep -c '^#') candidates failed"
    bounded python bench/sweep_attention_configs.py --out "$OUT/sweep.jsonl" ${ARGS:-} \
      > "$OUT/sweep.log" 2>&1
    step sweep $?; grep " best " "$OUT/sweep.log" | tail -30 ;;
esac
echo "Triton compiled $(( $(cached_kernels) - cached_before )) kernels in this stage"
echo "$STAGE: exit $status after $SECONDS s (limit $LIMIT)"
exit $status
