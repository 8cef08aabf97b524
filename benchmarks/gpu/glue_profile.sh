#!/usr/bin/env bash
# MfM-2B (97x352x640, 22k tokens) on one GPU: eager against compiled glue (model.compile_glue), then
# the recompute settings the compiled glue's smaller activations allow, then FP8 on the fastest of
# them; each phase one device call with `pip install -e ".[gpu]"`:
#   PHASE=1 bash benchmarks/gpu/glue_profile.sh   # bf16, full recompute, eager vs compiled, kernel breakdown
#   PHASE=2 bash benchmarks/gpu/glue_profile.sh   # compiled: first14, first7, none recomputed
#   PHASE=3 bash benchmarks/gpu/glue_profile.sh   # bf16 and FP8 delayed at phase 2's fastest recompute, vs plain PyTorch
# Results persist in /tmp/glue_profile on the machine between calls; logs under $OUT, a summary on stdout.
set -uo pipefail
OUT=${OUT:-/tmp/out}; KEEP=/tmp/glue_profile; mkdir -p "$OUT" "$KEEP"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CUDA_DEVICE_MAX_CONNECTIONS=1
SIZE=(--presets mfm-2b --frames 97 --height 352 --width 640 --backend te --iterations 3 --warmup 2)

summary() {  # $1: results folder; the rows' step, memory and losses, then the profiler's tables
  python3 - "$1" <<'EOF'
import json, sys
for row in json.load(open(sys.argv[1] + "/results.json")):
    what = f"{row['recompute']:>8} {row['glue']:>8} {row['precision']}/{row.get('fp8_recipe') or '-'}"
    if "error" in row:
        print(what, row["error"]); continue
    plain = row.get("plain_step_s")
    print(f"{what}: step {row['step_s']:.3f} s, {row['tflops_per_gpu']:.1f} TFLOP/s, "
          f"MFU(bf16 peak) {row['tflops_per_gpu'] / 989:.1%}, peak {row['peak_memory_gib'] or 0:.1f} GiB, "
          f"roofline {row['roofline_s']:.3f} s, busy {row.get('kernel_busy_s', 0):.3f} s, "
          f"plain {plain if plain is None else round(plain, 3)} {row.get('plain_error', '')}, "
          f"losses {[round(x, 5) for x in row['losses']]}")
EOF
}

run() {  # $1: name; the rest: profiler arguments
  local name=$1; shift
  timeout 560 python3 benchmarks/profile_throughput.py "${SIZE[@]}" "$@" --output "$KEEP/$name" > "$KEEP/$name.log" 2>&1
  echo "exit $? ($name)"
  cp "$KEEP/$name.log" "$OUT/" 2>/dev/null
  grep -E "Error|error:" "$KEEP/$name.log" | grep -v Warning | tail -5 | cut -c1-300
  summary "$KEEP/$name"
  sed -n '/kernel time per step/,$p' "$KEEP/$name.log" | grep -v "^wrote" | cut -c1-260
}

case ${PHASE:-1} in
1)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  run glue --precision bf16 --recompute full --glue eager compiled --kernel-breakdown ;;
2)
  run recompute --precision bf16 --recompute first14 first7 none --glue compiled --kernel-breakdown ;;
3)
  best=$(python3 - "$KEEP/recompute" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1] + "/results.json")) if "error" not in r]
print(min(rows, key=lambda r: r["step_s"])["recompute"] if rows else "full")
EOF
)
  echo "fastest recompute that fits: $best"
  run fp8 --precision bf16 fp8 --fp8-recipe delayed --recompute "$best" --glue compiled --kernel-breakdown --compare-plain ;;
esac
