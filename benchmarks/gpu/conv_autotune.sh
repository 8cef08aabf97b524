#!/usr/bin/env bash
# One 1x H200 call (~270 s): does cuDNN's autotuner (torch.backends.cudnn.benchmark) speed up the
# condition adapter's convolutions, and where does the convergence recipe's step idle now?
#   OUT=/tmp/res bash benchmarks/gpu/conv_autotune.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/run.log; DEADLINE=${DEADLINE:-560}
source "$(dirname "$0")/parts.sh"
install_checkout
WORK=/tmp/conv_autotune; rm -rf "$WORK"; mkdir -p "$WORK"
part adapter_2b 90 python3 benchmarks/condition_adapter.py --frames 97 --height 352 --width 640 --output "$OUT/adapter_2b.json"
part adapter_recipe 60 python3 benchmarks/condition_adapter.py --preset base --batch 64 --frames 9 --height 64 --width 64 \
  --iterations 30 --output "$OUT/adapter_recipe.json"
# the recipe for 80 s without and with the autotuner, two steps profiled (benchmarks/gpu/recipe_steps.sh)
cat > "$WORK/autotuned.py" <<'PY'
import runpy, sys, torch
torch.backends.cudnn.benchmark = True
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
PY
for tuned in heuristics autotuned; do
  launcher=python3; [ "$tuned" = heuristics ] || launcher="python3 $WORK/autotuned.py"
  part "recipe_$tuned" 110 env OUT="$OUT/$tuned" STEP_SECONDS=80 PROFILE_STEPS="[700,701]" PYTHON="$launcher" \
    bash benchmarks/gpu/recipe_steps.sh ""
done
cat "$OUT"/*/recipe_steps.jsonl; cat "$OUT"/adapter_*.json | grep -E '"layout"|fwd_bwd_ms'
grep "^==" "$LOG"; echo "total $((SECONDS - START)) s"
