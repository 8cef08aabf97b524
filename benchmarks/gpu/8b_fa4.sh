#!/usr/bin/env bash
# Issue 16 item 5 on 4 H200 (one call per phase, < 10 min each), with the gpu extra installed
# (Transformer Engine, flash-attn-4): MfM-8B at 97x720x1280 (90k tokens) with all of issue 16 on:
# FA4 attention, compiled glue, recompute=auto (plus the layernorm and mlp_act output recompute),
# distributed optimizer. On a machine without network, wheels put in .gpu/extra/ are installed first.
#   PHASE=cp4 bash benchmarks/gpu/8b_fa4.sh      CP4 (all-to-all): bf16 and FP8 delayed, then bf16
#                                                 with bf16 gradients and Adam moments
#   PHASE=tp2cp2 bash benchmarks/gpu/8b_fa4.sh   TP2 x CP2 (sequence parallel): bf16 and FP8 delayed
#   PHASE=cp2 bash benchmarks/gpu/8b_fa4.sh      2 GPUs: 20 of MfM-8B's 40 blocks at CP2, FA4 bf16 and FP8,
#                                                 then cuDNN bf16 (recompute=auto's prediction against the peak)
#   PHASE=one bash benchmarks/gpu/8b_fa4.sh      1 GPU: 10 blocks at 97x720x640 (45,000 tokens, a CP2 rank's
#                                                 share; FP8 pads it to 45,008): FA4 bf16 and FP8, then FP8 on
#                                                 cuDNN (the masked path FP8's padded keys took before they were cut)
# Results under $OUT (8b_<phase>*.json, all logs in 8b_<phase>.log), a summary printed last.
set -uo pipefail
PHASE=${PHASE:-cp4}
OUT=${OUT:-/tmp/out}; WORK=/tmp/8b; mkdir -p "$OUT" "$WORK"
LOG=$OUT/8b_$PHASE.log; DEADLINE=${DEADLINE:-570}
source "$(dirname "$0")/parts.sh"
SIZE=(--presets mfm-8b --frames 97 --height 720 --width 1280 --backend te --distributed-optimizer --glue compiled
      --attention-backend fa4 --recompute auto --fp8-recipe delayed --iterations 2 --warmup 2)
SET=("model.recompute_modules=[layernorm,mlp_act]")
[ -f "$WORK/installed" ] || { install_checkout; touch "$WORK/installed"; }
profile() {  # $1: name, $2: seconds at most; the rest: profiler arguments
  local name=$1 limit=$2; shift 2
  part "$name" "$limit" torchrun --standalone --nproc-per-node "${GPUS:-4}" benchmarks/profile_throughput.py "${SIZE[@]}" --set "${SET[@]}" "$@" \
    --output "$WORK/$name"
  cp "$WORK/$name/results.json" "$OUT/8b_$name.json" 2>/dev/null
}
case $PHASE in
  cp4) profile cp4 380 --layouts cp4 --precision bf16 fp8
       profile cp4_bf16_state 200 --layouts cp4 --precision bf16 --optimizer-state bf16
       files=(8b_cp4.json 8b_cp4_bf16_state.json) ;;
  tp2cp2) profile tp2cp2 500 --layouts tp2cp2 --precision bf16 fp8
       files=(8b_tp2cp2.json) ;;
  cp2) GPUS=2; SET+=(model.num_layers=20)
       profile cp2 330 --layouts cp2 --precision bf16 fp8
       profile cp2_cudnn 200 --layouts cp2 --precision bf16 --attention-backend cudnn
       files=(8b_cp2.json 8b_cp2_cudnn.json) ;;
  one) GPUS=1; SET+=(model.num_layers=10); SIZE+=(--width 640)
       profile one 300 --precision bf16 fp8
       profile one_cudnn 180 --precision fp8 --attention-backend cudnn
       files=(8b_one.json 8b_one_cudnn.json) ;;
  *) echo "PHASE=$PHASE: choose cp4, tp2cp2, cp2 or one"; exit 2 ;;
esac
python3 benchmarks/summarise_profile.py "$OUT" "${files[@]}" | tee "$OUT/8b_${PHASE}_summary.txt"
grep -E "Error|error" "$LOG" | grep -v "^== " | tail -5
