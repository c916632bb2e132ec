#!/usr/bin/env bash
# Every GPU figure the README quotes, in one go on one CUDA device: each benchmark in turn, what it
# prints kept under DIR (default benchmark-logs), the stores written there too (the disk measured).
#
#   bash benchmarks/on_gpu.sh [DIR]
#
# About 1.7 h of audio (the bundled corpus repeated) for the extraction figures, as in the README's
# GPU table; a few minutes on an H100.
set -u
dir=${1:-benchmark-logs}
mkdir -p "$dir"
export PYTHONUNBUFFERED=1

run() {
    local name=$1
    shift
    echo "== python benchmarks/$*" | tee "$dir/$name.txt"
    python "benchmarks/$@" 2>&1 | tee -a "$dir/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$dir/gpu.txt"
python -c "import os, torch, transformers; print('cpus', os.cpu_count(), 'torch', torch.__version__, \
'transformers', transformers.__version__)" | tee -a "$dir/gpu.txt"
run stand-in extract_overhead.py --stand-in --seconds 6000 --dir "$dir"
run extract extract_overhead.py --device cuda --seconds 6000 --dir "$dir"
run compute-dtype compute_dtype.py --device cuda
run data-wait probe_cost.py --data-wait --device cuda
run finetune-step finetune_step.py --device cuda
