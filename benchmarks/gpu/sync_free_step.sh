#!/usr/bin/env bash
# One 1x H200 call (give it 600 s; ~40 s of it the install), on a machine set up with the gpu extra:
#   OUT=/tmp/res bash benchmarks/gpu/sync_free_step.sh PATH_TO_OFFICIAL_MFM_CHECKOUT
# The optimizer step around the loop's one host read (training/optimizer_step.py; the benchmark's
# step does the loop's skip decision too). In order:
# 1. the headline rows, the host to itself: row (d) bf16 and FP8 against the official compiled
#    step, each in its own process, with their kernel profiles (GPU busy against the step) -> $OUT/headline.json
#    (244 s in session 11);
# 2. row (d) bf16 with the compiled glue's kernels tuned (`--glue tuned`: model.compile_glue=tuned,
#    inductor's coordinate-descent tuning; session 12: the glue 75 -> 60 ms, the step -8 ms)
#    (the QK-norm + RoPE kernels moved ~1.5 TB/s in session 10; 100 s was too little) -> $OUT/tuned.json;
# 3. the full-iteration CUDA graph's GPU test (its row now starts on a side stream).
set -uo pipefail
OFFICIAL=${1:?usage: bash benchmarks/gpu/sync_free_step.sh PATH_TO_OFFICIAL_MFM_CHECKOUT}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/run.log; DEADLINE=${DEADLINE:-540}
source "$(dirname "$0")/parts.sh"
export MFM_OFFICIAL_REPO=$OFFICIAL
install_checkout
WORK=/tmp/sync_free
ROW=(benchmarks/profile_throughput.py --presets mfm-2b --frames 97 --height 352 --width 640 --glue compiled
     --attention-backend fa4 --iterations 3 --warmup 2 --recompute outputs --optimizer-state bf16 --kernel-breakdown)
part headline 300 python3 "${ROW[@]}" --precision bf16 fp8 --fp8-recipe delayed --isolate-rows \
  --compare-official "$OFFICIAL" --output "$WORK/headline"
cp "$WORK/headline/results.json" "$OUT/headline.json" 2>/dev/null
part tuned 150 python3 "${ROW[@]}" --glue tuned --precision bf16 --output "$WORK/tuned"
cp "$WORK/tuned/results.json" "$OUT/tuned.json" 2>/dev/null
part graph_test 60 python3 -m pytest -q -x tests/gpu/test_full_iteration_graph.py
python3 benchmarks/summarise_profile.py "$OUT" headline.json tuned.json 2>&1 | tee "$OUT/summary.txt"
python3 - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for name in ("headline.json", "tuned.json"):
    try:
        rows = json.load(open(f"{sys.argv[1]}/{name}"))
    except (OSError, ValueError):
        continue
    for row in rows:
        if "kernel_busy_s" in row:
            print(name, row["precision"], f"step {row['step_s']:.4f} busy {row['kernel_busy_s']:.4f}",
                  {k: round(v, 4) for k, v in row["kernel_seconds"].items()})
PY
grep "^==" "$LOG"; echo "total $((SECONDS - START)) s"
