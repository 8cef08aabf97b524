#!/usr/bin/env bash
# Issue 16's memory goal on one H200 in one call (< 8 min), with the gpu extra installed:
#   bash benchmarks/gpu/issue16_memory.sh PATH_TO_OFFICIAL_MFM_CHECKOUT      (github leeruibin/MfM)
# MfM-2B at 97x352x640 (22k tokens), compiled glue, FlashAttention-4, no block recompute; every
# row in a process of its own (--isolate-rows), so each peak is that row's alone:
#   1 bf16 gradient buffers + bf16 Adam moments with (d) layernorm + mlp_act recompute (the norm
#     and GELU outputs freed after use) and (c) mlp_act alone, bf16 -> $OUT/memory_rows_16bit.json
#   2 (d) under FP8 delayed (where both are no-ops)             -> $OUT/memory_rows_fp8.json
#   3 (a) today's defaults and the official compiled Transformer3DModel -> $OUT/memory_rows_fp32.json
#   4 the memory breakdown of (d) in bf16                       -> $OUT/memory_16bit.json
# A short summary is printed last and written to $OUT/memory_summary.txt; logs to $OUT/issue16_memory.log.
set -uo pipefail
OFFICIAL=${1:?usage: bash benchmarks/gpu/issue16_memory.sh PATH_TO_OFFICIAL_MFM_CHECKOUT}
OUT=${OUT:-/tmp/out}; WORK=/tmp/issue16_memory; mkdir -p "$OUT" "$WORK"
LOG=$OUT/issue16_memory.log; DEADLINE=${DEADLINE:-400}
source "$(dirname "$0")/parts.sh"
ROWS=(benchmarks/profile_throughput.py --presets mfm-2b --frames 97 --height 352 --width 640 --glue compiled
      --attention-backend fa4 --iterations 3 --warmup 2 --isolate-rows)
STATE16=(model.compile_glue=true model.attention_backend=fa4 model.recompute_modules=[layernorm,mlp_act]
         optimizer.grad_dtype=bf16 optimizer.moments_dtype=bf16 parallel.distributed_optimizer=true)
install_checkout

part rows_16bit 130 python3 "${ROWS[@]}" --recompute outputs mlp_act --optimizer-state bf16 --precision bf16 \
  --output "$WORK/rows_16bit"
cp "$WORK/rows_16bit/results.json" "$OUT/memory_rows_16bit.json" 2>/dev/null

part rows_fp8 80 python3 "${ROWS[@]}" --recompute outputs --optimizer-state bf16 --precision fp8 --fp8-recipe delayed \
  --output "$WORK/rows_fp8"
cp "$WORK/rows_fp8/results.json" "$OUT/memory_rows_fp8.json" 2>/dev/null

part rows_fp32 150 python3 "${ROWS[@]}" --recompute none --optimizer-state fp32 --precision bf16 \
  --compare-official "$OFFICIAL" --output "$WORK/rows_fp32"
cp "$WORK/rows_fp32/results.json" "$OUT/memory_rows_fp32.json" 2>/dev/null

part breakdown 60 python3 benchmarks/memory_breakdown.py --preset mfm-2b --frames 97 --height 352 --width 640 \
  --set "${STATE16[@]}" --output "$OUT/memory_16bit.json"

python3 benchmarks/summarise_profile.py "$OUT" memory_rows_fp32.json memory_rows_16bit.json memory_rows_fp8.json memory_16bit.json \
  > "$OUT/memory_summary.txt" 2>&1
cat "$OUT/memory_summary.txt"
