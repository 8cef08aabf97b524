#!/usr/bin/env bash
# What one device call runs after the last stage's boot.sh: install, GPU tests, a bf16 TE run.
# Usage on the GPU machine: bash benchmarks/gpu/session.sh  (logs under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the checkout as it is (no build step there)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -m pytest -q -s tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "rel err|passed|failed|Error" 
python3 pretrain_mfm.py --config examples/tiny_cpu.yaml model.backend=te train.precision=bf16 train.iterations=60 \
  logging.interval=10 checkpoint.save= logging.tensorboard_dir= logging.metrics_file="$OUT/tiny_bf16_te.jsonl" \
  > "$OUT/tiny_bf16_te.log" 2>&1; grep -E "iteration +(10|60)/|Error" "$OUT/tiny_bf16_te.log" | cut -c1-220
python3 benchmarks/profile_throughput.py --presets mfm-2b --frames 97 --height 352 --width 640 --precision bf16 \
  --recompute full none --backend te --iterations 5 --warmup 2 --output "$OUT/profile_2b" > "$OUT/profile_2b.log" 2>&1
tail -4 "$OUT/profile_2b.log" | cut -c1-250
python3 pretrain_mfm.py --config examples/mfm_2b.yaml train.iterations=6 train.global_batch_size=1 \
  data.synthetic.image_fraction=0 logging.interval=1 checkpoint.save= checkpoint.load= logging.tensorboard_dir= \
  logging.wandb_project= logging.sample_interval=0 logging.metrics_file="$OUT/mfm2b_bf16_te.jsonl" \
  > "$OUT/mfm2b_bf16_te.log" 2>&1; grep -E "iteration|Error|error" "$OUT/mfm2b_bf16_te.log" | cut -c1-330 | tail -5
