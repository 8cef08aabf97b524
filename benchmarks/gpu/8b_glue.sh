#!/usr/bin/env bash
# 4 GPUs (H200), with `pip install -e ".[gpu]"`: MfM-8B at 97x720x1280
# (90k tokens), CP4, distributed optimizer, compiled glue; PHASE=1: bf16 and FP8 with full
# recompute; PHASE=2: partial recompute (bf16), then the attention kernel benchmark on GPU 0
# (TE bf16 and FP8 attention at MfM-2B's shape). Logs under $OUT, a summary on stdout.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CUDA_DEVICE_MAX_CONNECTIONS=1
SIZE=(--presets mfm-8b --frames 97 --height 720 --width 1280 --layouts cp4 --backend te --distributed-optimizer
      --iterations 2 --warmup 2 --glue compiled)
profile() {  # $1: name; the rest: profiler arguments
  local name=$1; shift
  timeout 540 torchrun --standalone --nproc-per-node 4 benchmarks/profile_throughput.py "${SIZE[@]}" "$@" \
    --output "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "exit $? ($name)"
  sed -n '/tokens_per_s/,$p' "$OUT/$name.log" | grep -v "^wrote" | cut -c1-330
}
case ${PHASE:-1} in
1) nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
   profile cp4_full --recompute full --precision bf16 fp8 --fp8-recipe delayed ;;
2) profile cp4_partial --recompute first30 first25 --precision bf16
   CUDA_VISIBLE_DEVICES=0 NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 timeout 200 python3 benchmarks/attention.py \
     --tokens 22000 --heads 28 --fp8-bwd-bf16 > "$OUT/attention.log" 2>&1
   echo "exit $? (attention)"; grep -A30 "^attention B=" "$OUT/attention.log" | cut -c1-200 ;;
esac
