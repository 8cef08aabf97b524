#!/usr/bin/env bash
# One 2x H200 call (give it 600 s; ~25 s of it the install), on a machine set up with the gpu extra:
#   OUT=/tmp/res bash benchmarks/gpu/eight_minutes.sh PATH_TO_OFFICIAL_MFM_CHECKOUT [recipe overrides...]
# Issue 15 on GPU 0: the convergence recipe (examples/convergence.yaml, with the overrides) trained
#   for at most TRAIN_SECONDS (default 400: the call's 600 s less the boot, the install and the
#   evaluations), then every task evaluated at the recipe's guidance with the EMA weights, split
#   over both GPUs, then ten tasks with the raw weights
#   -> $OUT/conv/{metrics.jsonl,train.log}, $OUT/eval_{a,b,raw_a,raw_b}/{metrics.json,contact_sheet.png}.
# Issue 16 on GPU 1 while GPU 0 trains: the condition adapter's layouts (benchmarks/condition_adapter.py),
#   MfM-2B row (d) (layernorm + mlp_act recompute, 16-bit state) and the official compiled
#   Transformer3DModel in the same launch (bf16 and FP8 rows) -> $OUT/official.json, then row (d)
#   with its kernel profile -> $OUT/rows_d.json.
# GPU 1's rows share the host's CPUs with the training, which is host-bound: its step is ~10%
# slower than alone (session 9: 219 ms alone, ~240 ms beside another run).
set -uo pipefail
OFFICIAL=${1:?usage: bash benchmarks/gpu/eight_minutes.sh PATH_TO_OFFICIAL_MFM_CHECKOUT [recipe overrides...]}
shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/run.log; DEADLINE=${DEADLINE:-545}  # the boot takes ~40 s of the call's 600
source "$(dirname "$0")/parts.sh"
install_checkout
WORK=/tmp/eight_minutes; ROWS_WORK=/tmp/eight_minutes_rows; TRAIN_SECONDS=${TRAIN_SECONDS:-400}

CUDA_VISIBLE_DEVICES=0 EVAL_SECONDS=0 TRAIN_SECONDS=$TRAIN_SECONDS PYTHON=python3 OUT=$OUT/conv WORK=$WORK \
  bash examples/convergence_h200.sh "$@" \
  > "$OUT/conv.log" 2>&1 &
training=$!
ROWS=(benchmarks/profile_throughput.py --presets mfm-2b --frames 97 --height 352 --width 640 --glue compiled
      --attention-backend fa4 --iterations 3 --warmup 2)
(
  export CUDA_VISIBLE_DEVICES=1
  part adapter 40 python3 benchmarks/condition_adapter.py --output "$OUT/adapter.json"
  part official 230 python3 "${ROWS[@]}" --isolate-rows --recompute outputs --optimizer-state bf16 --precision bf16 fp8 \
    --fp8-recipe delayed --compare-official "$OFFICIAL" --output "$ROWS_WORK/official"
  cp "$ROWS_WORK/official/results.json" "$OUT/official.json" 2>/dev/null
  part row_d 100 python3 "${ROWS[@]}" --recompute outputs --optimizer-state bf16 --precision bf16 --kernel-breakdown \
    --output "$ROWS_WORK/rows_d"
  cp "$ROWS_WORK/rows_d/results.json" "$OUT/rows_d.json" 2>/dev/null
) &
rows=$!
wait "$training"

evaluate() {  # $1: GPU, $2: output folder; the rest: evaluate.py flags
  local gpu=$1 out=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout "$(( $(left) > 20 ? $(left) - 5 : 15 ))" python3 -m tools.evaluate --backend local \
    --load "$WORK/checkpoints" --config examples/convergence.yaml --samples 4 --output "$out" "$@" > "$out.log" 2>&1
}
wait "$rows"  # GPU 1's parts end within the training's time (their limits add up to 370 s)
pack() {  # summary.txt and r.tgz of everything so far (the call may end before the next pack)
  {
    grep "^==" "$LOG"; tail -n 2 "$OUT/conv/train.log" | cut -c1-300
    for log in "$OUT"/eval_*.log; do
      echo "== $log"; grep -vE "Warning|warn" "$log" | tail -n 10
    done
    echo "total $((SECONDS - START)) s"
  } > "$OUT/summary.txt" 2>&1
  tar czf /tmp/r.tgz -C "$OUT" --exclude r.tgz . && mv /tmp/r.tgz "$OUT/r.tgz"
}
evaluate 0 "$OUT/eval_a" --tasks t2v i2v itrans vexd vtrans isr vsr icolor &
evaluate 1 "$OUT/eval_b" --tasks t2i vcolor iinp ioutp vinp voutp vedit
wait
pack
evaluate 0 "$OUT/eval_raw_a" --weights raw --tasks t2v i2v itrans isr icolor &  # EMA 0.998 against the raw weights
evaluate 1 "$OUT/eval_raw_b" --weights raw --tasks vexd vtrans iinp ioutp vcolor
wait
pack; cat "$OUT/summary.txt"
