#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (CuPy installed): the whole test suite with the xp fixture on CuPy,
# then the training-step benchmark on the GPU. Logs go to $OUT (default ./gpu-out).
#   bash benchmarks/gpu_checks.sh
set -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NPGPT_HYPOTHESIS_PROFILE=${NPGPT_HYPOTHESIS_PROFILE:-quick}
{ nvidia-smi -L; python3 -c "import cupy, numpy, sys; print('python', sys.version.split()[0], 'cupy', cupy.__version__, 'numpy', numpy.__version__)"; } 2>&1 | tee "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -p no:cacheprovider -q -k cupy -m "not slow" -x -W ignore::DeprecationWarning 2>&1 | tee "$OUT/cupy_tests.log" | tail -30
timeout "${BENCH_TIMEOUT:-120}" python3 benchmarks/bench_train.py --device cuda --steps 20 2>&1 | tee "$OUT/bench_gpu.log"
