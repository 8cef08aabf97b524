#!/usr/bin/env bash
# Train examples/convergence.yaml from scratch on one GPU for TRAIN_SECONDS (SIGTERM then saves
# and stops), evaluate every task on held-out clips, and leave in $OUT (default outputs/convergence):
#   metrics.jsonl (loss curve), train.log, eval/metrics.json, eval/contact_sheet.png
# The whole script ends within TRAIN_SECONDS + EVAL_SECONDS (default 150: an H200 evaluation of
# 15 tasks x 32 clips, sampled 32 at a time, took 43-52 s; the session-8 run lost half its figures
# to a 60 s budget). The goals are judged on the 32 clips' pooled PSNRs (tools/evaluate.py).
# Checkpoints go to $WORK (default /tmp/mfm_convergence), not $OUT.
#   OUT=/path bash examples/convergence_h200.sh [section.field=value ...]
# Two variants on two GPUs at once: VARIANT_B="optimizer.lr=1e-3 ..." trains the recipe with the
# arguments on GPU 0 into $OUT and with the arguments plus VARIANT_B on GPU 1 into $OUT/variant_b
# (each takes half of data.synthetic.workers' default unless an argument sets it).
# STAGE=train or STAGE=evaluate: only that half, for a run longer than one call allows (train in
# one call; evaluate the checkpoints left in $WORK in the next call, on the same warm machine).
# CPU smoke test (a minute or two):
#   EVAL_ARGS="--samples 1 --steps 2" bash examples/convergence_h200.sh model.preset=tiny train.iterations=5 \
#     train.micro_batch_size=2 train.global_batch_size=2 train.precision=fp32 data.synthetic.workers=1 \
#     model.cuda_graphs=false model.compile_glue=false
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/convergence}
WORK=${WORK:-/tmp/mfm_convergence}
STAGE=${STAGE:-both}
TRAIN_SECONDS=${TRAIN_SECONDS:-480}; [ "$STAGE" != evaluate ] || TRAIN_SECONDS=0
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
deadline=$(( start + TRAIN_SECONDS + ${EVAL_SECONDS:-150} ))

# run OUT WORK [overrides...]: train for TRAIN_SECONDS, evaluate in what is left before the deadline
run() {
  local out=$1 work=$2 status=0
  shift 2
  mkdir -p "$out"
  if [ "$STAGE" != evaluate ]; then
    rm -rf "$work" && mkdir -p "$work"
    timeout --signal=TERM --kill-after=20 "$TRAIN_SECONDS" "$PY" pretrain_mfm.py --config examples/convergence.yaml \
      checkpoint.save="$work/checkpoints" logging.metrics_file="$out/metrics.jsonl" \
      "$@" > "$out/train.log" 2>&1 || status=$?
    if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then  # 124: the time budget stopped it (and it saved)
      tail -n 30 "$out/train.log"; return "$status"
    fi
    echo "$out: trained $(( $(date +%s) - start )) s"
    "$PY" -m tools.summarize_run "$out/metrics.jsonl"
  fi
  [ "$STAGE" != train ] || return 0
  # the model's own layers first; the torch-native ones if those fail (the evaluation is what a
  # run is for: two H200 runs lost theirs to a loading bug)
  local backend left
  for backend in auto local; do
    left=$(( deadline - $(date +%s) - 2 ))
    [ "$left" -ge 10 ] || { echo "$out: no time left to evaluate with the $backend layers"; break; }
    # shellcheck disable=SC2086  # EVAL_ARGS is a list of flags
    timeout --kill-after=5 "$left" "$PY" -m tools.evaluate --load "$work/checkpoints" \
      --config examples/convergence.yaml --samples 32 --backend "$backend" --output "$out/eval" ${EVAL_ARGS:-} \
      > "$out/eval_$backend.log" 2>&1 && { cp "$out/eval_$backend.log" "$out/eval.log"; break; }
    echo "$out: evaluation with the $backend layers failed or ran past the deadline:"; tail -n 5 "$out/eval_$backend.log"
  done
}

if [ -n "${VARIANT_B:-}" ]; then
  half=$(( $("$PY" -c "from megatron_mfm.config import load_config as c; print(c('examples/convergence.yaml').data.synthetic.workers)") / 2 ))
  # shellcheck disable=SC2086  # VARIANT_B is a list of overrides
  CUDA_VISIBLE_DEVICES=1 run "$OUT/variant_b" "$WORK/variant_b" data.synthetic.workers="$half" "$@" $VARIANT_B &
  variant_b=$!
  CUDA_VISIBLE_DEVICES=0 run "$OUT" "$WORK/a" data.synthetic.workers="$half" "$@"
  wait "$variant_b"
else
  run "$OUT" "$WORK" "$@"
fi
# shellcheck disable=SC2086  # the globs: every backend's log, a stopped evaluation's included
cat "$OUT"/eval_*.log ${VARIANT_B:+"$OUT"/variant_b/eval_*.log} 2>/dev/null | grep -E "^(evaluated |goal |(i2v|t2v|iinp|isr|icolor)( pooled)?:)" || true
echo "total $(( $(date +%s) - start )) s; results in $OUT"
