# Sourced by the benchmarks/gpu/issue16*.sh scripts: a log, parts that each run under their own
# time limit (one failure keeps the rest), and the install of this checkout on the GPU machine.
# The caller sets OUT (results folder), LOG (one log of everything) and DEADLINE (seconds).
START=$SECONDS
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CUDA_DEVICE_MAX_CONNECTIONS=1

left() { echo $(( DEADLINE - (SECONDS - START) )); }
part() {  # $1: name, $2: seconds at most; the rest: command. Never fails the script.
  local name=$1 limit=$2; shift 2
  local budget; budget=$(left); [ "$budget" -lt "$limit" ] && limit=$budget
  if [ "$limit" -lt 20 ]; then echo "== $name: skipped (no time left)" | tee -a "$LOG"; return; fi
  echo "== $name (limit ${limit}s, at $((SECONDS - START))s)" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1; echo "== $name: exit $?" | tee -a "$LOG"
}
install_checkout() {  # wheels put in .gpu/extra/ first (machines without network), then this checkout
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    ls .gpu/extra/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps --no-index .gpu/extra/*.whl
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
    python3 -c "import torch; print('torch', torch.__version__)
from megatron_mfm.model.attention_backends.fa4 import fa4_unavailable_reason; print('fa4:', fa4_unavailable_reason() or 'ok')"
  } >> "$LOG" 2>&1
}
