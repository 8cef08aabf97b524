#!/usr/bin/env bash
# One 1x H200 call (give it 330 s; ~25 s of it the install), on a machine set up with the gpu extra:
#   OUT=/tmp/res bash benchmarks/gpu/host_gaps.sh
# Where the GPU waits on the host: MfM-2B row (d) idles ~37 ms of its 1.097 s step (session 10),
# and the convergence recipe's step is host-bound. In order:
# 1. the full-iteration CUDA graph's GPU test (tests/gpu/test_full_iteration_graph.py);
# 2. row (d) eager and under megatron's full-iteration CUDA graph: the difference is the host's
#    share of the step -> $OUT/graph.json;
# 3. row (d)'s profiled step with its Chrome trace (the timeline of the gaps) -> $OUT/trace_row.json, r.tgz;
# 4. the recipe for 80 s with two profiled steps (150-151, away from checkpoints) -> r.tgz;
# 5. each trace's idle intervals and what the GPU waited on (benchmarks/trace_gaps.py) -> $OUT/gaps_*.json.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/run.log; DEADLINE=${DEADLINE:-295}  # the boot takes ~30 s of the call
source "$(dirname "$0")/parts.sh"
install_checkout
WORK=/tmp/host_gaps
ROWS=(benchmarks/profile_throughput.py --presets mfm-2b --frames 97 --height 352 --width 640 --glue compiled
      --attention-backend fa4 --iterations 3 --warmup 2 --recompute outputs --optimizer-state bf16 --precision bf16)
part graph_test 60 python3 -m pytest -q -x tests/gpu/test_full_iteration_graph.py
part graph_rows 80 python3 "${ROWS[@]}" --cuda-graph none full_iteration --output "$WORK/graph"
cp "$WORK/graph/results.json" "$OUT/graph.json" 2>/dev/null
part trace 60 python3 "${ROWS[@]}" --kernel-breakdown --kernel-trace "$WORK/traces" --output "$WORK/trace"
cp "$WORK/trace/results.json" "$OUT/trace_row.json" 2>/dev/null
part recipe 100 env TRAIN_SECONDS=80 EVAL_SECONDS=0 PYTHON=python3 OUT="$WORK/recipe" WORK="$WORK/recipe_work" \
  bash examples/convergence_h200.sh "logging.profile_steps=[150,151]" "logging.profile_dir=$WORK/recipe_profile"
for trace in "$WORK"/traces/*.json; do python3 benchmarks/trace_gaps.py "$trace" --output "$OUT/gaps_row.json" >/dev/null; done
python3 benchmarks/trace_gaps.py "$WORK/recipe_profile/rank0.json" --output "$OUT/gaps_recipe.json" >/dev/null
gzip -f "$WORK"/traces/*.json "$WORK"/recipe_profile/*.json 2>/dev/null
tar czf "$OUT/r.tgz" -C "$WORK" traces recipe_profile recipe/train.log 2>/dev/null
grep "^==" "$LOG"; echo "total $((SECONDS - START)) s"
