#!/usr/bin/env bash
# Every GPU figure the README quotes, in one go on one CUDA device: each benchmark in turn, what it
# prints kept under DIR (default benchmark-logs), the stores written there too (the disk measured).
#
#   bash benchmarks/on_gpu.sh [DIR [STORES]]
#
# About 1.7 h of audio (the bundled corpus repeated) for the extraction figures and the study's
# projected time (about 20 GB free under STORES while they run, default DIR: name a folder on the
# disk you care about); a few minutes on an H100. Each benchmark is stopped after BENCH_TIMEOUT
# seconds (default 600) so that one that hangs leaves the others their turn; BENCHMARKS="extract
# study-time" runs only those (the names below). The CPU-only
# benchmarks (shared_cpu.py, int8_store.py, probe_cost.py's profile) are not run.
# Exits 1 if any benchmark failed, after running the others; the last lines name those that did.
set -u -o pipefail
dir=$(realpath -m "${1:-$(dirname "$0")/../benchmark-logs}")  # DIR as the caller named it
stores=$(realpath -m "${2:-$dir}")
cd "$(dirname "$0")/.."
mkdir -p "$dir" "$stores"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's w2vcache, installed or not
failed=()

run() {
    local name=$1
    shift
    [[ -z "${BENCHMARKS:-}" || " $BENCHMARKS " == *" $name "* ]] || return 0
    echo "== python benchmarks/$*" | tee "$dir/$name.txt"
    timeout "${BENCH_TIMEOUT:-600}" "${PYTHON:-python3}" "benchmarks/$@" 2>&1 | tee -a "$dir/$name.txt" || failed+=("$name")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$dir/gpu.txt"
"${PYTHON:-python3}" -c "import os, torch, transformers; print('cpus', os.cpu_count(), 'torch', torch.__version__, \
'transformers', transformers.__version__)" | tee -a "$dir/gpu.txt"
df -hT "$stores" | tee -a "$dir/gpu.txt"
run extract extract_overhead.py --device cuda --seconds 6000 --variants --dir "$stores"
run stand-in extract_overhead.py --stand-in --device cuda --seconds 6000 --dir "$stores"
run data-wait probe_cost.py --data-wait --device cuda
run concurrency probe_concurrency.py --device cuda
run finetune-step finetune_step.py --device cuda --steps 20  # 3 steps of 35-50 ms are within their spread
run compute-dtype compute_dtype.py --device cuda
run study-time study_time.py --device cuda --repeat 12 --memory-budget 20 --dir "$stores"
run study-time-bf16 study_time.py --device cuda --repeat 12 --memory-budget 20 --precision bf16 --dir "$stores"

if ((${#failed[@]})); then
    echo "failed: ${failed[*]} (their output is under $dir)" >&2
    exit 1
fi
echo "all benchmarks ran; their output is under $dir"
