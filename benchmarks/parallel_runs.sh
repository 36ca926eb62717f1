#!/usr/bin/env bash
# The multi-GPU figures of benchmarks/RESULTS.md, one torchrun per layout (run from the repo root on
# a machine with 4 GPUs, after `source benchmarks/device_env.sh`). Appends JSON lines to $1.
out=${1:-parallel.jsonl}
for run in "1 1 adamw" "2 2 zero1" "2 2 adamw" "4 4 zero1" "4 4 adamw" "2 1 zero1" "2 1 adamw" "2 1 torch-zero"; do
  set -- $run
  python3 -m torch.distributed.run --standalone --nproc-per-node "$1" benchmarks/parallel_step.py \
    --ep "$2" --optimizer "$3" 2>&1 | grep '^{' | tee -a "$out"
done
