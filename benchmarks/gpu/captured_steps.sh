#!/usr/bin/env bash
# One 1x H200 call (~5 min with the staging's install), on a machine set up with the gpu extra:
#   OUT=/tmp/res bash benchmarks/gpu/captured_steps.sh [VARIANT ...]
# model.cuda_graphs (model/cuda_graphs.py): its GPU test (graphed training steps equal eager ones,
# fp32 and bf16, images and videos; SDPA captured alone at the recipe's attention shapes), then
# the convergence recipe's step under each VARIANT (default: the recipe, graphed at batch 64, and
# the same eager; benchmarks/gpu/recipe_steps.sh, STEP_SECONDS each) -> $OUT/recipe_steps.jsonl.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/run.log; DEADLINE=${DEADLINE:-420}
source "$(dirname "$0")/parts.sh"
install_checkout
part graph_test 150 python3 -m pytest -q -x -rs tests/gpu/test_cuda_graphs_gpu.py
VARIANTS=("$@"); [ $# -gt 0 ] || VARIANTS=("" "model.cuda_graphs=false")
part recipe_steps 220 env OUT="$OUT" STEP_SECONDS="${STEP_SECONDS:-80}" bash benchmarks/gpu/recipe_steps.sh "${VARIANTS[@]}"
grep -E "^==|passed|failed|Error" "$LOG" | tail -n 20; cat "$OUT/recipe_steps.jsonl" 2>/dev/null
for log in "$OUT"/steps_*.log; do echo "== $log"; grep -vE "Warning|warn" "$log" | tail -n 6 | cut -c1-300; done
echo "total $((SECONDS - START)) s"
