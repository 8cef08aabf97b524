#!/usr/bin/env bash
# Train examples/convergence.yaml from scratch on one GPU for TRAIN_SECONDS (SIGTERM then saves
# and stops), evaluate every task on held-out clips, and leave in $OUT (default outputs/convergence):
#   metrics.jsonl (loss curve), train.log, eval/metrics.json, eval/contact_sheet.png
# Checkpoints go to $WORK (default /tmp/mfm_convergence), not $OUT.
#   OUT=/path bash examples/convergence_h200.sh [section.field=value ...]
# CPU smoke test (a minute or two):
#   EVAL_ARGS="--samples 1 --steps 2" bash examples/convergence_h200.sh model.preset=tiny train.iterations=5 \
#     train.micro_batch_size=2 train.global_batch_size=2 train.precision=fp32 data.synthetic.workers=1
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/convergence}
WORK=${WORK:-/tmp/mfm_convergence}
TRAIN_SECONDS=${TRAIN_SECONDS:-300}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${MODEL_BACKEND:-}" ]; then  # Transformer Engine if importable, else the local layers
  "$PY" -c "import transformer_engine.pytorch" 2>/dev/null && MODEL_BACKEND=te || MODEL_BACKEND=local
fi
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
start=$(date +%s)
status=0
timeout --signal=TERM --kill-after=120 "$TRAIN_SECONDS" "$PY" pretrain_mfm.py --config examples/convergence.yaml \
  model.backend="$MODEL_BACKEND" checkpoint.save="$WORK/checkpoints" logging.metrics_file="$OUT/metrics.jsonl" \
  "$@" > "$OUT/train.log" 2>&1 || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then  # 124: the time budget stopped it (and it saved)
  tail -n 30 "$OUT/train.log"; exit "$status"
fi
trained=$(( $(date +%s) - start ))
# shellcheck disable=SC2086  # EVAL_ARGS is a list of flags
"$PY" -m tools.evaluate --load "$WORK/checkpoints" --config examples/convergence.yaml --samples 6 \
  --output "$OUT/eval" ${EVAL_ARGS:-} | tee "$OUT/eval.log"
"$PY" - "$OUT/metrics.jsonl" <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "loss" in r]  # training records (not checkpoint ones)
first, last = rows[0], rows[-1]
print(f"loss: iteration {first['iteration']} {first['loss']:.4f} -> iteration {last['iteration']} {last['loss']:.4f}, "
      f"{last['elapsed time per iteration (ms)']:.0f} ms/iteration at the end")
PY
echo "trained ${trained}s, total $(( $(date +%s) - start ))s; results in $OUT"
