#!/usr/bin/env bash
# The same bf16 TE training at 1 GPU and at other layouts (same data and seed), loss curves side by
# side. On 2 GPUs: tiny at TP2, TP2+SP, CP2 (all-to-all and ring), PP2, DP2; MfM-2B at TP2+SP, CP2.
# On 4 GPUs (SET=four): tiny at TP2xCP2, PP2xCP2, CP4 and TP2xCP2 with Transformer Engine's ring,
# an 8-layer tiny at PP4 x 2 virtual stages (interleaved 1F1B), and a checkpoint saved at TP2xCP2
# resumed at PP2xCP2 with the ring; MfM-2B for 12 iterations at TP2xCP2, PP2xCP2 and CP4 (TE ring).
# Usage: bash benchmarks/gpu/parallel_parity.sh  (logs under $OUT; ONLY=<regex> keeps the 1-GPU
# baselines and the runs whose name matches)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CUDA_DEVICE_MAX_CONNECTIONS=1
ONLY=${ONLY:-}
SET=${SET:-two}
run() {  # name nproc overrides...
  local name=$1 n=$2 ckpt=${CKPT:-checkpoint.save= checkpoint.load=}; shift 2
  [[ -z $ONLY || $name == *1gpu || $name =~ $ONLY ]] || return 0
  torchrun --standalone --nproc-per-node "$n" pretrain_mfm.py "$@" logging.metrics_file="$OUT/$name.jsonl" \
    $ckpt logging.tensorboard_dir= logging.wandb_project= logging.sample_interval=0 \
    > "$OUT/$name.log" 2>&1 || { echo "$name FAILED"; grep -E "Error|error" "$OUT/$name.log" | tail -3; }
}
TINY=(--config examples/tiny_cpu.yaml model.backend=te train.precision=bf16 train.iterations=20 logging.interval=1
      train.global_batch_size=4 train.micro_batch_size=2)
B2=(--config examples/mfm_2b.yaml train.global_batch_size=2 train.micro_batch_size=1
    data.synthetic.image_fraction=0 logging.interval=1 parallel.distributed_optimizer=false)
run tiny_1gpu 1 "${TINY[@]}"
if [[ $SET == two ]]; then
  run tiny_tp2 2 "${TINY[@]}" parallel.tensor_parallel=2
  run tiny_tp2sp 2 "${TINY[@]}" parallel.tensor_parallel=2 parallel.sequence_parallel=true
  run tiny_cp2 2 "${TINY[@]}" parallel.context_parallel=2
  run tiny_cp2ring 2 "${TINY[@]}" parallel.context_parallel=2 parallel.context_parallel_comm=p2p
  run tiny_pp2 2 "${TINY[@]}" parallel.pipeline_parallel=2
  run tiny_dp2 2 "${TINY[@]}"
  run mfm2b_1gpu 1 "${B2[@]}" train.iterations=8
  run mfm2b_tp2sp 2 "${B2[@]}" train.iterations=8 parallel.tensor_parallel=2 parallel.sequence_parallel=true
  run mfm2b_cp2 2 "${B2[@]}" train.iterations=8 parallel.context_parallel=2
  GROUPS_="tiny_1gpu,tiny_tp2,tiny_tp2sp,tiny_cp2,tiny_cp2ring,tiny_pp2,tiny_dp2 mfm2b_1gpu,mfm2b_tp2sp,mfm2b_cp2"
else
  run tiny_tp2cp2 4 "${TINY[@]}" parallel.tensor_parallel=2 parallel.sequence_parallel=true parallel.context_parallel=2
  run tiny_pp2cp2 4 "${TINY[@]}" parallel.pipeline_parallel=2 parallel.context_parallel=2
  run tiny_cp4ring 4 "${TINY[@]}" parallel.context_parallel=4 parallel.context_parallel_comm=p2p
  run tiny_tp2cp2ring 4 "${TINY[@]}" parallel.tensor_parallel=2 parallel.context_parallel=2 parallel.context_parallel_comm=p2p
  DEEP=("${TINY[@]}" model.num_layers=8 train.global_batch_size=8 train.micro_batch_size=1)
  run tiny8_1gpu 1 "${DEEP[@]}"
  run tiny8_pp4vp2 4 "${DEEP[@]}" parallel.pipeline_parallel=4 parallel.virtual_pipeline_stages=2
  # save at TP2xCP2 after 10 iterations, resume at PP2xCP2 (ring attention) for the last 10
  if [[ -z $ONLY || resume =~ $ONLY ]]; then
    CK=/tmp/ckpt_tp2cp2; rm -rf "$CK"
    CKPT="checkpoint.save=$CK checkpoint.load=" run tiny_resume_save 4 "${TINY[@]}" parallel.tensor_parallel=2 \
      parallel.context_parallel=2 train.stop_iteration=10
    CKPT="checkpoint.save= checkpoint.load=$CK" run tiny_resume_load 4 "${TINY[@]}" parallel.pipeline_parallel=2 \
      parallel.context_parallel=2 parallel.context_parallel_comm=p2p
    grep -hE "resumed from|no complete checkpoint|saved checkpoint|Error" "$OUT/tiny_resume_save.log" "$OUT/tiny_resume_load.log" | cut -c1-200
    cat "$OUT/tiny_resume_save.jsonl" "$OUT/tiny_resume_load.jsonl" > "$OUT/tiny_resumed.jsonl" 2>/dev/null
  fi
  run mfm2b_1gpu 1 "${B2[@]}" train.iterations=12
  run mfm2b_tp2cp2 4 "${B2[@]}" train.iterations=12 parallel.tensor_parallel=2 parallel.sequence_parallel=true parallel.context_parallel=2
  run mfm2b_pp2cp2 4 "${B2[@]}" train.iterations=12 parallel.pipeline_parallel=2 parallel.context_parallel=2
  run mfm2b_cp4ring 4 "${B2[@]}" train.iterations=12 parallel.context_parallel=4 parallel.context_parallel_comm=p2p
  GROUPS_="tiny_1gpu,tiny_tp2cp2,tiny_pp2cp2,tiny_cp4ring,tiny_tp2cp2ring,tiny_resumed tiny8_1gpu,tiny8_pp4vp2
           mfm2b_1gpu,mfm2b_tp2cp2,mfm2b_pp2cp2,mfm2b_cp4ring"
fi
python3 - "$OUT" $GROUPS_ <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def curve(name):
    p = out / f"{name}.jsonl"
    return {r["iteration"]: r for r in map(json.loads, p.read_text().splitlines())} if p.exists() else {}
for group in (g.split(",") for g in sys.argv[2:]):
    curves = {g: curve(g) for g in group}
    print("iter " + " ".join(f"{g:>12s}" for g in group))
    for i in sorted(curves[group[0]]):
        print(f"{i:4d} " + " ".join(f"{curves[g][i]['loss']:12.5f}" if i in curves[g] else f"{'-':>12s}" for g in group))
    base = curves[group[0]]
    for g in group[1:]:
        common = [i for i in base if i in curves[g]]
        if common:
            worst = max(abs(curves[g][i]["loss"] - base[i]["loss"]) / abs(base[i]["loss"]) for i in common)
            step = sorted(curves[g][i]["elapsed time per iteration (ms)"] for i in common[2:] or common)
            print(f"  {g}: worst relative loss difference {worst:.2e}, median step {step[len(step)//2]:.0f} ms")
    print()
PY
