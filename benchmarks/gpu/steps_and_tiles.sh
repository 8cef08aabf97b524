#!/usr/bin/env bash
# One 2x H200 call (give it 600 s; ~50 s of it the staging's install), on a machine set up with
# the gpu extra:   OUT=/tmp/res bash benchmarks/gpu/steps_and_tiles.sh
# GPU 0 (issue 16): the pinned-batch GPU test, FA4's sm90 backward under other tile configurations
#   (benchmarks/fa4_backward_tiles.py -> $OUT/fa4_tiles.json), then the kernel breakdown of
#   MfM-2B row (d) (layernorm + mlp_act recompute, bf16 gradients and moments, FA4, compiled glue)
#   -> $OUT/row_d/results.json.
# GPU 1 (issue 15): the convergence recipe's step time under variants (recipe_steps.sh ->
#   $OUT/recipe_steps.jsonl).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/run.log; DEADLINE=${DEADLINE:-540}
source "$(dirname "$0")/parts.sh"
install_checkout
CUDA_VISIBLE_DEVICES=1 STEP_SECONDS=${STEP_SECONDS:-70} OUT=$OUT timeout $(( $(left) - 10 )) \
  bash benchmarks/gpu/recipe_steps.sh "" "model.backend=local" "model.backend=local model.compile_glue=true" \
  "train.micro_batch_size=512 train.global_batch_size=512" \
  "model.backend=local train.micro_batch_size=512 train.global_batch_size=512" > "$OUT/recipe_steps.log" 2>&1 &
steps=$!
export CUDA_VISIBLE_DEVICES=0
part pinned_batches 60 python3 -m pytest -q -rs tests/gpu/test_pinned_batches.py
part fa4_tiles 270 python3 benchmarks/fa4_backward_tiles.py --output "$OUT/fa4_tiles.json"
part row_d 150 python3 benchmarks/profile_throughput.py --presets mfm-2b --frames 97 --height 352 --width 640 \
  --glue compiled --attention-backend fa4 --iterations 3 --warmup 2 --recompute outputs --optimizer-state bf16 \
  --precision bf16 --kernel-breakdown --output "$OUT/row_d"
wait $steps
{ grep "^==" "$LOG"; cat "$OUT/fa4_tiles.json" 2>/dev/null | python3 -c "import json,sys
for r in json.load(sys.stdin)['rows']: print(r.get('candidate'), r.get('backward_ms'), r.get('tflops'), r.get('dq_rel_err'), r.get('dv_rel_err'), r.get('error', ''))"
  tail -n 6 "$OUT/row_d.log" 2>/dev/null; grep -iE "step|mfu|error" "$LOG" | tail -n 8 | cut -c1-300
  cat "$OUT/recipe_steps.jsonl"; echo "total $((SECONDS - START)) s"; } > "$OUT/summary.txt" 2>&1
tar czf "$OUT/r.tgz" -C "$OUT" --exclude r.tgz . ; cat "$OUT/summary.txt"
