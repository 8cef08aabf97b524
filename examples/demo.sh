#!/usr/bin/env bash
# The tiny MfM demo on CPU: pretrain on synthetic data with all 15 tasks, checkpoint, export to
# the official layout, sample a t2v and an i2v clip. Usage: examples/demo.sh [PYTHON] [OUT]
set -euo pipefail
PY=${1:-python3}
OUT=${2:-outputs/demo}
cd "$(dirname "$0")/.."
rm -rf "$OUT"
start=$(date +%s)
"$PY" pretrain_mfm.py --config examples/tiny_cpu.yaml \
  checkpoint.save="$OUT/checkpoints" logging.tensorboard_dir="$OUT/tensorboard" \
  logging.metrics_file="$OUT/metrics.jsonl" logging.sample_dir="$OUT/validation"
ckpt="$OUT/checkpoints/$(cat "$OUT/checkpoints/latest")"
"$PY" tools/convert_checkpoint.py export-official --load "$ckpt" --output "$OUT/export/transformer" --weights ema
# The tiny run trains at small shifts: sample with a matching scheduler shift (the official 3 suits 2B/8B).
"$PY" tools/sample.py --load "$ckpt" --tasks t2v i2v --output "$OUT/samples" --steps 30 --guidance-scale 3 \
  --schedule scheduler --shift 1.5 --frames 5 --height 32 --width 32 --negative-prompt "" \
  --data-config examples/tiny_cpu.yaml  # the demo's clip size and scenes
# Per-task metrics on held-out clips of the demo's data (given-frame PSNR of i2v, colours of t2v)
"$PY" -m tools.evaluate --load "$ckpt" --config examples/tiny_cpu.yaml --tasks t2v i2v --samples 3 --output "$OUT/eval"
"$PY" -m tools.summarize_run "$OUT/metrics.jsonl"
cat <<TXT

demo finished in $(( $(date +%s) - start )) s
  checkpoint:        $ckpt
  official export:   $OUT/export/transformer (config.json + diffusion_pytorch_model.safetensors)
  samples:           $OUT/samples/t2v.mp4, $OUT/samples/i2v.mp4
  contact sheet:     $OUT/samples/contact_sheet.png
  evaluation:        $OUT/eval/metrics.json, $OUT/eval/contact_sheet.png (condition, sample, truth);
                     its goal lines are the 8-minute GPU recipe's, which a few CPU minutes do
                     not reach (README, "What the demo shows")
  metrics:           $OUT/metrics.jsonl, TensorBoard: $OUT/tensorboard
TXT
