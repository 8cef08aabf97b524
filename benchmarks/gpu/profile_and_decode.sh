#!/usr/bin/env bash
# One device call with `pip install -e ".[gpu,dali]"`, with PyAV's wheel
# carried in .gpu/av and the clips in .gpu/bench_media (written here beforehand), on a machine with
# >= 2 GPUs: GPU tests (TE spec, FP8) and the MfM-2B profile rows (bf16, FP8 delayed and current,
# against the plain-PyTorch step; then partial recompute) on GPU 0, while GPU 1 runs the DALI (NVDEC) vs PyAV decode benchmark on the same H.264 720p files.
# Logs under $OUT (also packed in logs.tgz), a summary on stdout.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CUDA_DEVICE_MAX_CONNECTIONS=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -m pip install -q --no-deps --no-index .gpu/av/*.whl 2>&1 | tail -1
CUDA_VISIBLE_DEVICES=1 timeout 420 python3 benchmarks/dataloader.py --synthetic 16 --codec h264 \
  --synthetic-size 1280x720 --synthetic-dir .gpu/bench_media --backends pyav dali --dali-device gpu \
  --workers 8 16 --frames 49 --height 480 --width 832 --fps 16 --batch-size 4 --clips 32 --step-ms 2200 \
  --steps 4 --output "$OUT/bench.json" > "$OUT/bench.log" 2>&1 &
export CUDA_VISIBLE_DEVICES=0
timeout 150 python3 -m pytest -q -s tests/gpu > "$OUT/gpu_tests.log" 2>&1
grep -E "rel err|passed|failed|Error" "$OUT/gpu_tests.log" | cut -c1-240
SIZE=(--presets mfm-2b --frames 97 --height 352 --width 640 --backend te --iterations 4 --warmup 2)
timeout 300 python3 benchmarks/profile_throughput.py "${SIZE[@]}" --precision bf16 fp8 --fp8-recipe delayed current \
  --recompute full --compare-plain --output "$OUT/profile_2b" > "$OUT/profile_2b.log" 2>&1
tail -6 "$OUT/profile_2b.log" | cut -c1-400
timeout 100 python3 benchmarks/profile_throughput.py "${SIZE[@]}" --precision bf16 --recompute first19 \
  --output "$OUT/profile_2b_partial" > "$OUT/profile_2b_partial.log" 2>&1
tail -3 "$OUT/profile_2b_partial.log" | cut -c1-400
wait
tail -12 "$OUT/bench.log" | cut -c1-300
tar czf /tmp/logs.tgz -C "$OUT" . && mv /tmp/logs.tgz "$OUT/"
