#!/usr/bin/env bash
# Issue 16 on one H200 in one call (< 9 min), with the gpu extra installed (pip install -e ".[gpu]":
# Transformer Engine, flash-attn-4 and its CuTe DSL runtime):
#   bash benchmarks/gpu/issue16.sh PATH_TO_OFFICIAL_MFM_CHECKOUT      (github leeruibin/MfM)
# On a machine without network, wheels put in .gpu/extra/ are installed first.
# Parts, each under its own time limit so one failure keeps the rest, JSON written as they go:
#   1 tests/gpu/test_fa4.py                       -> $OUT/tests_fa4.log
#   2 MfM-2B 22k tokens, compiled glue, bf16 + FP8 delayed, cudnn + fa4, no recompute,
#     with the official Transformer3DModel in the same launch  -> $OUT/profile.json
#   3 the memory breakdown of the no-recompute bf16 step        -> $OUT/memory.json
#   4 the fastest row of part 2 again with --kernel-breakdown, and with recompute=auto
#                                                               -> $OUT/profile_best.json
# A short summary is printed last and written to $OUT/summary.txt; all logs to $OUT/issue16.log.
set -uo pipefail
OFFICIAL=${1:?usage: bash benchmarks/gpu/issue16.sh PATH_TO_OFFICIAL_MFM_CHECKOUT}
OUT=${OUT:-/tmp/out}; WORK=/tmp/issue16; mkdir -p "$OUT" "$WORK"
LOG=$OUT/issue16.log; DEADLINE=${DEADLINE:-530}
source "$(dirname "$0")/parts.sh"
export MFM_OFFICIAL_REPO=$OFFICIAL
SIZE=(--presets mfm-2b --frames 97 --height 352 --width 640 --glue compiled --iterations 4 --warmup 2)
install_checkout

part tests 150 python3 -m pytest -q -x tests/gpu/test_fa4.py -rs -s
grep -E "relative|passed|failed|skipped|Error" "$LOG" | tail -20 > "$OUT/tests_fa4.log"

part profile 250 python3 benchmarks/profile_throughput.py "${SIZE[@]}" --precision bf16 fp8 --fp8-recipe delayed \
  --attention-backend cudnn fa4 --recompute none --compare-official "$OFFICIAL" --output "$WORK/profile"
cp "$WORK/profile/results.json" "$OUT/profile.json" 2>/dev/null

part memory 70 python3 benchmarks/memory_breakdown.py --preset mfm-2b --frames 97 --height 352 --width 640 \
  --set model.compile_glue=true --output "$OUT/memory.json"

best=$(python3 - "$WORK/profile/results.json" 2>/dev/null <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if "error" not in r]
best = min(rows, key=lambda r: r["step_s"])
print(best["attention_backend"], best["precision"])
EOF
)
read -r attention precision <<< "${best:-fa4 bf16}"
part best 150 python3 benchmarks/profile_throughput.py "${SIZE[@]}" --precision "$precision" --fp8-recipe delayed \
  --attention-backend "$attention" --recompute none auto --kernel-breakdown --output "$WORK/best"
cp "$WORK/best/results.json" "$OUT/profile_best.json" 2>/dev/null

python3 benchmarks/summarise_profile.py "$OUT" profile.json profile_best.json memory.json > "$OUT/summary.txt" 2>&1
cat "$OUT/tests_fa4.log" "$OUT/summary.txt"
