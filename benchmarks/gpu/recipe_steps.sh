#!/usr/bin/env bash
# The convergence recipe's step time under variants, on one GPU (issue 15: at 48 tokens a clip
# the step is host-bound, so steps, not FLOPs, are what an 8-minute run is short of). Each variant
# trains examples/convergence.yaml from scratch for STEP_SECONDS (default 70; no checkpoint) and
# reports the iterations it reached and its last logged step time; one JSON line per variant in
# $OUT/recipe_steps.jsonl. PROFILE_STEPS="[700,701]" also profiles those steps and writes where the
# GPU idled (benchmarks/trace_gaps.py) to $OUT/gaps_<variant>.json:
#   OUT=/tmp/res bash benchmarks/gpu/recipe_steps.sh "model.backend=te" "model.backend=local" ...
# PYTHON (default python3) is the command that runs pretrain_mfm.py (a wrapper that sets up the
# process first, as benchmarks/gpu/conv_autotune.sh's).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEP_SECONDS=${STEP_SECONDS:-70}
for variant in "$@"; do
  name=$(echo "${variant:-recipe}" | sed 's/[^A-Za-z0-9.]/_/g' | cut -c1-80)
  work=/tmp/recipe_steps/$name; rm -rf "$work"; mkdir -p "$work"
  # shellcheck disable=SC2086  # a variant is a list of overrides
  timeout --signal=TERM --kill-after=15 "$STEP_SECONDS" ${PYTHON:-python3} pretrain_mfm.py --config examples/convergence.yaml \
    checkpoint.save= logging.interval=25 logging.tensorboard_dir= logging.metrics_file="$work/metrics.jsonl" \
    data.synthetic.workers="${WORKERS:-12}" ${PROFILE_STEPS:+"logging.profile_steps=$PROFILE_STEPS"} \
    ${PROFILE_STEPS:+"logging.profile_dir=$work/profile"} $variant > "$OUT/steps_$name.log" 2>&1
  [ -z "${PROFILE_STEPS:-}" ] || python3 benchmarks/trace_gaps.py "$work/profile/rank0.json" \
    --output "$OUT/gaps_$name.json" > /dev/null 2>&1
  python3 - "$variant" "$work/metrics.jsonl" >> "$OUT/recipe_steps.jsonl" <<'PY'
import json, sys
from pathlib import Path
variant, path = sys.argv[1], Path(sys.argv[2])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
rows = [row for row in rows if "loss" in row]
last = rows[-1] if rows else {}
print(json.dumps({"variant": variant, "iterations": last.get("iteration"), "loss": last.get("loss"),
                  "step_ms": [row.get("elapsed time per iteration (ms)") for row in rows[-8:]],
                  "data_wait_ms": last.get("data wait per iteration (ms)")}))
PY
  tail -n 1 "$OUT/recipe_steps.jsonl"
done
