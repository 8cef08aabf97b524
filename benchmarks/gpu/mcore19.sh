#!/usr/bin/env bash
# megatron-core 0.19.2 against 0.16.1 on one H200 in one call (about 5 min; DEADLINE=290 s by
# default), on a machine with TE, flash-attn-4 and megatron-core 0.16.1 installed (Python 3.12)
# and the 0.19.2 wheel carried in .gpu/mcore19/ (its only dependencies, torch, numpy and packaging,
# are there already; 2.4 MB), fetched on a machine with a registry:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 megatron-core==0.19.2 -d .gpu/mcore19
#   bash benchmarks/gpu/mcore19.sh
# Parts, each under its own time limit (benchmarks/gpu/parts.sh):
# 1 the GPU tests of TE, optimizer memory and FA4 under 0.19.2
# 2 profile_throughput.py, MfM-2B 97x352x640, compiled glue, FA4, no recompute, bf16, under 0.19.2:
#   eager and with the full-iteration CUDA graph (forward + backward captured)   -> $OUT/profile_0.19.2/
# 3 the same eager row under 0.16.1                                               -> $OUT/profile_0.16.1/
# Logs in $OUT/mcore19.log; the summary is printed last and written to $OUT/summary.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/mcore19}; mkdir -p "$OUT" "$WORK"
LOG=$OUT/mcore19.log; DEADLINE=${DEADLINE:-290}
source "$(dirname "$0")/parts.sh"
WHEEL=$(ls .gpu/mcore19/megatron_core-0.19.2-*.whl 2>/dev/null | head -1)
[ -n "$WHEEL" ] || { echo "no megatron_core-0.19.2 wheel in .gpu/mcore19/ (the pip download above)"; exit 2; }
install_checkout
python3 -m pip install -q --no-deps --no-index --target "$WORK/site" "$WHEEL" >> "$LOG" 2>&1
NEW=(env PYTHONPATH="$WORK/site:$PYTHONPATH")
VERSIONS="import megatron.core, transformer_engine as te; print('megatron-core', megatron.core.__version__, 'TE', te.__version__)"
{ python3 -c "$VERSIONS"; "${NEW[@]}" python3 -c "$VERSIONS"; } >> "$LOG" 2>&1
ROW=(benchmarks/profile_throughput.py --presets mfm-2b --frames 97 --height 352 --width 640 --glue compiled
     --attention-backend fa4 --recompute none --precision bf16 --iterations 3 --warmup 2)

part "GPU tests under 0.19.2" 110 "${NEW[@]}" python3 -m pytest -q -rs --durations=5 \
  tests/gpu/test_transformer_engine.py tests/gpu/test_optimizer_memory_gpu.py tests/gpu/test_fa4.py
part "profile under 0.19.2, eager and full-iteration graph" 125 "${NEW[@]}" python3 "${ROW[@]}" \
  --cuda-graph none full_iteration --output "$OUT/profile_0.19.2"
part "profile under 0.16.1" 75 python3 "${ROW[@]}" --output "$OUT/profile_0.16.1"

{
  grep -E "^(torch|NVIDIA|megatron-core)|^== " "$LOG"
  grep -E "[0-9]+ (passed|failed)|^(FAILED|ERROR|SKIPPED)" "$LOG" | tail -8
  python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for version in ("0.16.1", "0.19.2"):
    results = Path(sys.argv[1]) / f"profile_{version}" / "results.json"
    for row in json.loads(results.read_text()) if results.exists() else [{"error": "no results"}]:
        if "error" in row:
            print(f"{version} {row.get('cuda_graph', '')}: {row['error']}")
            continue
        print(f"{version} graph={row['cuda_graph']}: step {row['step_s']:.3f} s, MFU {row['mfu']:.1%}, "
              f"peak {row['peak_memory_gib']:.1f} GiB, losses {[round(x, 5) for x in row['losses']]}")
EOF
  grep -E "^\w*(Error|Exception)" "$LOG" | sort | uniq -c | head -5
  echo "total $((SECONDS - START)) s"
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
