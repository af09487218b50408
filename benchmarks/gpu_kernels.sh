#!/bin/bash
# The one script for the GPU machine: kernel GPU tests, then the benchmark. Logs go to $OUT.
#   OUT=/some/dir [PYTEST_K=quantize] bash benchmarks/gpu_kernels.sh [--sweep quantize|gemm|all] [--quick]
set -u
OUT=${OUT:-.}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
timeout ${PYTEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider --maxfail=15 --durations=15 ${PYTEST_K:+-k "$PYTEST_K"} tests/test_kernels_gpu.py > "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/pytest_gpu.log")"
start=$(date +%s)
timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_kernels.py --out "$OUT" "$@" > "$OUT/bench_kernels.log" 2>&1
echo "bench rc=$? in $(( $(date +%s) - start )) s"
grep -v "^sweep\|^  " "$OUT/bench_kernels.log" | tail -45
