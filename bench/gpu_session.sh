#!/usr/bin/env bash
# One GPU-machine call per stage (each fits the device's 10-minute limit); logs under $OUT.
#   bash bench/gpu_session.sh tests        # kernel GPU tests (bf16/fp16)
#   bash bench/gpu_session.sh tests-models # BLIP model and pre-training GPU tests
#   bash bench/gpu_session.sh kernels      # attention + contrastive benchmarks, host time per call
#   bash bench/gpu_session.sh models       # BLIP training steps (ARGS="--compile --profile")
#   bash bench/gpu_session.sh sweep        # attention tile sweep (ARGS="--shapes a,b" to narrow)
# Each stage stops itself (SIGINT, so pytest and the scripts still write their summaries
# and result files) before the device's 10-minute limit: LIMIT seconds, default 560.
set -u
OUT=${OUT:-/tmp/blipfast-out}
LIMIT=${LIMIT:-560}
bounded() { timeout --signal=INT --kill-after=20 "$LIMIT" "$@"; }
mkdir -p "$OUT"
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { echo "install failed (blipfast.kernels needs the package mapping):"; tail -5 "$OUT/install.log"; exit 1; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
case "${1:-tests}" in
  tests)
    bounded python -m pytest -q -p no:cacheprovider tests/test_attention_gpu.py \
      tests/test_layer_norm_gpu.py tests/test_bias_gelu_gpu.py tests/test_cross_entropy_gpu.py \
      tests/test_contrastive_gpu.py \
      tests/test_hard_negatives.py --maxfail=20 -rf > "$OUT/gpu-tests.log" 2>&1
    echo "gpu tests exit $?"; tail -15 "$OUT/gpu-tests.log" ;;
  tests-models)
    bounded python -m pytest -q -p no:cacheprovider tests/test_blip_models_gpu.py \
      tests/test_pretraining_gpu.py --maxfail=20 -rf > "$OUT/gpu-model-tests.log" 2>&1
    echo "gpu model tests exit $?"; tail -15 "$OUT/gpu-model-tests.log" ;;
  kernels)
    LIMIT=$((LIMIT / 2)) bounded python bench/run_attention.py --out "$OUT" > "$OUT/attention.log" 2>&1
    echo "attention exit $?"
    LIMIT=$((LIMIT / 2)) bounded python bench/run_contrastive.py --out "$OUT" > "$OUT/contrastive.log" 2>&1
    echo "contrastive exit $?"
    timeout 120 python bench/host_overhead.py > "$OUT/host_overhead.log" 2>&1
    echo "host overhead exit $?"
    tail -25 "$OUT/attention.log"; tail -25 "$OUT/contrastive.log"; cat "$OUT/host_overhead.log" ;;
  models)
    bounded python bench/run_models.py --out "$OUT" ${ARGS:-} > "$OUT/models.log" 2>&1
    echo "models exit $?"
    tail -15 "$OUT/models.log" ;;
  sweep)
    bounded python bench/sweep_attention_configs.py --out "$OUT/sweep.jsonl" ${ARGS:-} \
      > "$OUT/sweep.log" 2>&1
    echo "sweep exit $?"; grep " best " "$OUT/sweep.log" | tail -30 ;;
  *) echo "unknown stage $1"; exit 2 ;;
esac
