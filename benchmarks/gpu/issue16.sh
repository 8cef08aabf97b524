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
LOG=$OUT/issue16.log; START=$SECONDS; DEADLINE=${DEADLINE:-530}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CUDA_DEVICE_MAX_CONNECTIONS=1 MFM_OFFICIAL_REPO=$OFFICIAL
SIZE=(--presets mfm-2b --frames 97 --height 352 --width 640 --glue compiled --iterations 4 --warmup 2)

left() { echo $(( DEADLINE - (SECONDS - START) )); }
part() {  # $1: name, $2: seconds at most; the rest: command. Never fails the script.
  local name=$1 limit=$2; shift 2
  local budget; budget=$(left); [ "$budget" -lt "$limit" ] && limit=$budget
  if [ "$limit" -lt 20 ]; then echo "== $name: skipped (no time left)" | tee -a "$LOG"; return; fi
  echo "== $name (limit ${limit}s, at $((SECONDS - START))s)" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1; echo "== $name: exit $?" | tee -a "$LOG"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  ls .gpu/extra/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps --no-index .gpu/extra/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
  python3 -c "import torch; print('torch', torch.__version__)
from megatron_mfm.model.attention_backends.fa4 import fa4_unavailable_reason; print('fa4:', fa4_unavailable_reason() or 'ok')"
} >> "$LOG" 2>&1

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

python3 - "$OUT" > "$OUT/summary.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("profile.json", "profile_best.json"):
    if not (out / name).exists():
        print(name, "missing"); continue
    for r in json.loads((out / name).read_text()):
        what = f"{r['precision']:>5} {r['attention_backend']:>6} {r['recompute']:>5}"
        if "error" in r:
            print(what, r["error"]); continue
        decision = r.get("recompute_decision", {})
        print(f"{what}: step {r['step_s']:.3f} s, MFU {r['mfu'] or 0:.1%}, peak {r['peak_memory_gib']:.1f} GiB, "
              f"official {r.get('official_step_s', 0):.3f} s / {r.get('official_peak_memory_gib') or 0:.1f} GiB, "
              f"speedup {r.get('speedup_vs_official', 0):.2f}x {r.get('official_error', '')}"
              + (f", auto recomputes {decision['recomputed_blocks']}, predicted peak "
                 f"{decision['predicted_peak_bytes'] / 2**30:.1f} GiB" if decision else ""))
if (out / "memory.json").exists():
    memory = json.loads((out / "memory.json").read_text())
    print("memory: static", {k: round(v, 1) for k, v in memory["static_gib"].items()}, "peak", round(memory["peak_gib"], 1),
          "blocks kept", round(memory["blocks_total_kept_gib"], 1))
EOF
cat "$OUT/tests_fa4.log" "$OUT/summary.txt"
