#!/usr/bin/env bash
# The convergence recipe's step time under variants, on one GPU (issue 15: at 48 tokens a clip
# the step is host-bound, so steps, not FLOPs, are what an 8-minute run is short of). Each variant
# trains examples/convergence.yaml from scratch for STEP_SECONDS (default 70; no checkpoint) and
# reports the iterations it reached and its last logged step time; one JSON line per variant in
# $OUT/recipe_steps.jsonl:
#   OUT=/tmp/res bash benchmarks/gpu/recipe_steps.sh "model.backend=te" "model.backend=local" ...
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEP_SECONDS=${STEP_SECONDS:-70}
for variant in "$@"; do
  name=$(echo "${variant:-recipe}" | sed 's/[^A-Za-z0-9.]/_/g' | cut -c1-80)
  work=/tmp/recipe_steps/$name; rm -rf "$work"; mkdir -p "$work"
  # shellcheck disable=SC2086  # a variant is a list of overrides
  timeout --signal=TERM --kill-after=15 "$STEP_SECONDS" python3 pretrain_mfm.py --config examples/convergence.yaml \
    checkpoint.save= logging.interval=25 logging.tensorboard_dir= logging.metrics_file="$work/metrics.jsonl" \
    data.synthetic.workers="${WORKERS:-12}" $variant > "$OUT/steps_$name.log" 2>&1
  python3 - "$variant" "$work/metrics.jsonl" >> "$OUT/recipe_steps.jsonl" <<'PY'
import json, sys
from pathlib import Path
variant, path = sys.argv[1], Path(sys.argv[2])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
rows = [row for row in rows if "loss" in row]
last = rows[-1] if rows else {}
print(json.dumps({"variant": variant, "iterations": last.get("iteration"), "loss": last.get("loss"),
                  "step_ms": last.get("elapsed time per iteration (ms)"),
                  "data_wait_ms": last.get("data wait per iteration (ms)")}))
PY
  tail -n 1 "$OUT/recipe_steps.jsonl"
done
