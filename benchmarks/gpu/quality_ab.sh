#!/usr/bin/env bash
# Issue 15 on one 2x H200 host in one call (about 9 min with the install), on a machine set up
# with the gpu extra:
#   OUT=/tmp/res bash benchmarks/gpu/quality_ab.sh
# The convergence recipe (GPU 0) beside a variant (GPU 1, VARIANT_B; default: batch 256 from 64,
# since a step of 64 clips keeps an H200 busy ~10 ms of its ~190), each for TRAIN_SECONDS
# (default 290) and evaluated on every task (examples/convergence_h200.sh), then both evaluated
# without guidance on the tasks whose output is measured against ground truth. Each run profiles
# two training steps (torch profiler, where the step's host time goes): $OUT/trace_{a,b}.json.gz.
# Everything is packed in $OUT/r.tgz; the summary is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/run.log; DEADLINE=${DEADLINE:-520}  # the call: ~50 s staging install + this
source "$(dirname "$0")/parts.sh"
install_checkout
WORK=/tmp/quality_ab
VARIANT_B=${VARIANT_B:-train.micro_batch_size=256 train.global_batch_size=256 data.synthetic.workers=16}

VARIANT_B="$VARIANT_B logging.profile_dir=$WORK/profile_b" OUT=$OUT/conv WORK=$WORK \
  TRAIN_SECONDS=${TRAIN_SECONDS:-290} EVAL_SECONDS=${EVAL_SECONDS:-120} EVAL_ARGS="--samples 4" PYTHON=python3 \
  bash examples/convergence_h200.sh "logging.profile_steps=[600,601]" "logging.profile_dir=$WORK/profile_a" >> "$LOG" 2>&1

unguided() {  # $1: GPU, $2: checkpoints, $3: output folder
  CUDA_VISIBLE_DEVICES=$1 timeout "$(( $(left) > 20 ? $(left) - 5 : 15 ))" python3 -m tools.evaluate --load "$2" \
    --config examples/convergence.yaml --samples 4 --guidance-scale 1 --output "$3" \
    --tasks i2v itrans vexd isr vsr icolor iinp voutp vedit > "$3.log" 2>&1
}
unguided 0 "$WORK/a/checkpoints" "$OUT/conv/unguided" &
unguided 1 "$WORK/variant_b/checkpoints" "$OUT/conv/variant_b/unguided"
wait
for v in a b; do gzip -c "$WORK/profile_$v/rank0.json" > "$OUT/trace_$v.json.gz" 2>/dev/null; done

{
  for log in "$OUT"/conv/eval.log "$OUT"/conv/unguided.log "$OUT"/conv/variant_b/eval.log "$OUT"/conv/variant_b/unguided.log; do
    echo "== $log"; grep -vE "Warning|warn" "$log" 2>/dev/null | tail -n 17
  done
  tail -n 3 "$OUT"/conv/train.log "$OUT"/conv/variant_b/train.log | cut -c1-400
  ls -la "$OUT"
  echo "total $((SECONDS - START)) s"
} > "$OUT/summary.txt" 2>&1
tar czf "$OUT/r.tgz" -C "$OUT" --exclude r.tgz . ; cat "$OUT/summary.txt"
