#!/bin/bash
# The GPU machine's end-to-end run: install, the backend's GPU tests, then bench_e2e.py. Logs go to $OUT.
#   OUT=/some/dir bash benchmarks/gpu_e2e.sh [bench_e2e.py arguments]
# That machine has no diffusers and no network: `pip download --no-deps diffusers==0.42.1 -d .wheels`
# here and carry .wheels along; this script installs it.
set -u
OUT=${OUT:-.}
python3 -m pip install -q --no-deps .wheels/*.whl && python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || { echo "install failed"; cat /tmp/install.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
timeout ${PYTEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_cuda_graphs_gpu.py tests/test_backend_gpu.py > "$OUT/pytest_backend_gpu.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/pytest_backend_gpu.log")"
grep -E "^(FAILED|ERROR)|Error" "$OUT/pytest_backend_gpu.log" | head -20
python3 benchmarks/bench_e2e.py --out "$OUT" "$@"
