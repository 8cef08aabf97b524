#!/usr/bin/env bash
# One node: bash examples/train_torchrun.sh examples/mfm_2b.yaml [section.field=value ...]
set -euo pipefail
CONFIG=${1:?usage: train_torchrun.sh CONFIG.yaml [overrides...]}; shift
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # lets TP communication overlap compute
cd "$(dirname "$0")/.."
# torchrun SIGKILLs its workers --shutdown-timeout s after a SIGTERM (default 30): give the save its time
torchrun --standalone --nproc-per-node "$GPUS" --shutdown-timeout "${MFM_SAVE_GRACE_S:-270}" pretrain_mfm.py --config "$CONFIG" "$@"
