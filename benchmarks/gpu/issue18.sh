#!/usr/bin/env bash
# Issue 18 on one H200 in one call (about 5 min; DEADLINE=345 s by default), on a machine set up
# with the gpu and pretrained extras and `pip install -e .`:
#   bash benchmarks/gpu/issue18.sh PATH_TO_OFFICIAL_MFM_CHECKOUT      (github leeruibin/MfM)
# The bf16 test writes mp4s: PyAV must be there too (the GPU image has none; its cp312 wheel is
# ~36 MB, so it travels in a call of its own and is installed with --no-deps).
# 1 at once, while the random MfM-2B pipeline folder for 3 is written:
#   tests/gpu/test_official_sampling_bf16.py  bf16 sampling = the official bf16 pipeline  -> $OUT/bf16_test.log
#   tests/gpu/test_serving_export_gpu.py      CUDA bf16 .pt2 = eager (compiling takes ~1-2 min) -> $OUT/export_test.log
# 2 then alone on the GPU: benchmarks/sampling_speed.py, seconds per video of t2v and i2v at 30
#   steps, 97x352x640, the official pipeline and ours in one launch (denoising timed over
#   TIMED_STEPS steps and extrapolated; VAE decode and the rest timed whole) -> $OUT/sampling_speed.json
# Logs in $OUT/issue18.log; the summary is printed last and written to $OUT/summary.txt.
set -uo pipefail
OFFICIAL=${1:?usage: bash benchmarks/gpu/issue18.sh PATH_TO_OFFICIAL_MFM_CHECKOUT}
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/issue18}; mkdir -p "$OUT" "$WORK"
LOG=$OUT/issue18.log; START=$SECONDS; DEADLINE=${DEADLINE:-345}; TIMED_STEPS=${TIMED_STEPS:-8}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} MFM_OFFICIAL_REPO=$OFFICIAL
# SPEED_ARGS: extra sampling_speed.py flags (a CPU smoke run: --device cpu --preset tiny --frames 9 --height 64 --width 96)
read -ra EXTRA <<< "${SPEED_ARGS:-}"
SPEED=(python3 benchmarks/sampling_speed.py --official-repo "$OFFICIAL" --folder "$WORK/pipeline" "${EXTRA[@]}")

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__)
from megatron_mfm.model.attention_backends.fa4 import fa4_unavailable_reason; print('fa4:', fa4_unavailable_reason() or 'ok')"
} >> "$LOG" 2>&1

echo "== 1: GPU tests and the pipeline folder (at $((SECONDS - START)) s)" | tee -a "$LOG"
timeout 240 python3 -m pytest -q -s -rs --durations=3 tests/gpu/test_serving_export_gpu.py > "$OUT/export_test.log" 2>&1 &
EXPORT=$!
timeout 180 python3 -m pytest -q -s -rs tests/gpu/test_official_sampling_bf16.py > "$OUT/bf16_test.log" 2>&1 &
BF16=$!
timeout 200 "${SPEED[@]}" --build-only >> "$LOG" 2>&1; echo "== folder: exit $? (at $((SECONDS - START)) s)" | tee -a "$LOG"
wait $BF16; echo "== bf16 test: exit $? (at $((SECONDS - START)) s)" | tee -a "$LOG"
wait $EXPORT; echo "== export test: exit $? (at $((SECONDS - START)) s)" | tee -a "$LOG"

LEFT=$(( DEADLINE - (SECONDS - START) ))
echo "== 2: sampling speed (limit ${LEFT} s, at $((SECONDS - START)) s)" | tee -a "$LOG"
timeout "$LEFT" "${SPEED[@]}" --timed-steps "$TIMED_STEPS" --output "$OUT/sampling_speed.json" \
  > "$OUT/sampling_speed.log" 2>&1; echo "== sampling speed: exit $? (at $((SECONDS - START)) s)" | tee -a "$LOG"

{
  echo "bf16 sampling vs the official bf16 pipeline:"
  grep -E "ours vs official|passed|failed|skipped|Error" "$OUT/bf16_test.log" | tail -8
  echo "CUDA .pt2 export:"
  grep -E "passed|failed|skipped|Error|[0-9.]+s call" "$OUT/export_test.log" | tail -4
  echo "official SDPA backends:"
  python3 -c "import json, sys; [print(' ', c['query'], 'masked' if c['masked'] else 'no mask', c['backend'])
for r in json.load(open(sys.argv[1]))['codes'] for c in r.get('official_sdpa', [])]" "$OUT/sampling_speed.json" 2>/dev/null
  grep -A8 "^seconds per video" "$OUT/sampling_speed.log" || tail -5 "$OUT/sampling_speed.log"
  echo "total $((SECONDS - START)) s"
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
