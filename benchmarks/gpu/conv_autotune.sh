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
recipe() {  # $1: name, $2: 0/1 autotuner; the recipe for RECIPE_SECONDS, two steps profiled
  local name=$1 tuned=$2
  part "recipe_$name" $((RECIPE_SECONDS + 25)) timeout --signal=TERM --kill-after=15 "$RECIPE_SECONDS" python3 -c "
import runpy, sys, torch
torch.backends.cudnn.benchmark = bool($tuned)
sys.argv = ['pretrain_mfm.py'] + sys.argv[1:]
runpy.run_path('pretrain_mfm.py', run_name='__main__')" --config examples/convergence.yaml checkpoint.save= \
    logging.interval=25 logging.tensorboard_dir= logging.metrics_file="$WORK/$name.jsonl" \
    "logging.profile_steps=[700,701]" "logging.profile_dir=$WORK/profile_$name"
  python3 benchmarks/trace_gaps.py "$WORK/profile_$name/rank0.json" --output "$OUT/gaps_$name.json" > /dev/null 2>&1
  python3 - "$name" "$WORK/$name.jsonl" >> "$OUT/recipe_steps.jsonl" <<'PY'
import json, sys
from pathlib import Path
name, path = sys.argv[1], Path(sys.argv[2])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
rows = [row for row in rows if "loss" in row]
print(json.dumps({"variant": name, "iterations": rows[-1]["iteration"] if rows else None,
                  "step_ms": [row.get("elapsed time per iteration (ms)") for row in rows[-8:]],
                  "loss": rows[-1]["loss"] if rows else None}))
PY
}
RECIPE_SECONDS=${RECIPE_SECONDS:-80}
recipe heuristics 0
recipe autotuned 1
cat "$OUT/recipe_steps.jsonl"; cat "$OUT"/adapter_*.json | grep -E '"layout"|fwd_bwd_ms'
grep "^==" "$LOG"; echo "total $((SECONDS - START)) s"
