#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one run (CuPy installed; no network needed):
#   suite:   the whole test suite on CuPy (the xp fixture's cupy variants, kernels against their NumPy
#            twins, float64 gradchecks included), 8 pytest workers sharing the GPU,
#   probe:   GEMM / copy / launch ceilings and attention materialized vs chunked (benchmarks/gpu_probe.py),
#   bench:   GPT-2 124M / small training throughput vs PyTorch (benchmarks/bench_gpu.py),
#   train:   a short real run, Shakespeare with the GPT-2 tokenizer in fp16, then a sample;
#   kernels: only the kernel, attention, mixed-precision and training tests (a quick first look);
#   nccl:    NCCL through CuPy (benchmarks/nccl_smoke.py): communicator, all-reduce / reduce-scatter /
#            all-gather on device buffers, one data-parallel step (plain and ZeRO-1) against the plain step,
#            the bandwidth of a 256 MiB all-reduce; one rank per GPU under mpiexec when there are several;
#   profile: the fp16 step kernel by kernel (benchmarks/gpu_profile.py: torch.profiler records CuPy's
#            kernels too), npgpt and npgpt-flash beside torch-sdpa, GPT-2 124M and small (~90 s);
#   issue15: = kernels15 prof15 bench15, at most 5 minutes: the GPU work prepared without a GPU (issue 15),
#     kernels15: flash attention, fused residual+layer norm and bias+GELU, vectorized layer-norm and
#                cross-entropy kernels, CUDA graphs (whole step and micro-step) and padded-vocabulary
#                cross-entropy against float64 NumPy, plus the existing kernel tests (~80 s),
#     prof15:    layer-norm and cross-entropy kernels alone, scalar vs vectorized, GPT-2 124M shapes (~20 s),
#     bench15:   fp16 GPT-2 124M and small: npgpt (padded vocab), +flash, +graphs (whole step), +graphs of
#                the micro-steps only, +flash+graphs, +vectorized kernels, unpadded, against torch-sdpa and
#                torch.compile, MFU from the detected GPU, peak memory (~190 s);
#     their logs are also copied to benchmarks/logs/gpu15_*_DATE.
# Logs go to $OUT (default ./gpu-out). Each stage has its own time limit (seconds, env overridable).
#   bash benchmarks/gpu_checks.sh [stages...]      (default: suite probe bench train nccl)
#   bash benchmarks/gpu_checks.sh issue15          (issue 15's checks in <= 5 minutes)
set -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NPGPT_HYPOTHESIS_PROFILE=${NPGPT_HYPOTHESIS_PROFILE:-quick}
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-$PWD/.cupy-cache}
STAGES=${*:-suite probe bench train nccl}
STAGES=${STAGES//issue15/kernels15 prof15 bench15}
DAY=$(date -u +%F)
PYTEST="python3 -m pytest -p no:cacheprovider -q -W ignore::DeprecationWarning"
{ date -u; nvidia-smi -L; python3 -c "import cupy, numpy, sys; print('python', sys.version.split()[0], 'cupy', cupy.__version__, 'numpy', numpy.__version__)"; } 2>&1 | tee "$OUT/gpu.txt"

for stage in $STAGES; do
  echo "=== $stage $(date -u +%T)" | tee -a "$OUT/gpu.txt"
  case $stage in
    kernels)
      timeout "${KERNEL_TIMEOUT:-150}" $PYTEST -m "cupy and not slow" -n 4 \
        tests/test_kernels.py tests/test_attention.py tests/test_optim.py tests/test_mixed_precision.py tests/test_train.py 2>&1 \
        | tee "$OUT/kernel_tests.log" | tail -25 ;;
    probe)
      timeout "${PROBE_TIMEOUT:-90}" python3 benchmarks/gpu_probe.py 2>&1 | tee "$OUT/probe.txt" | tail -40 ;;
    bench)
      timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_gpu.py --max-seconds "${BENCH_BUDGET:-200}" \
        --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log" | tail -30 ;;
    train)
      { [ -f data/shakespeare_gpt2/meta.json ] || python3 -m npgpt.cli prepare --tokenizer gpt2 --out_dir data/shakespeare_gpt2 --no_progress
        timeout "${TRAIN_TIMEOUT:-200}" python3 -m npgpt.cli train --config examples/shakespeare_gpt2_gpu.toml --progress=false ${TRAIN_ARGS}
        python3 -m npgpt.cli sample --out_dir out-shakespeare-gpt2-gpu --device cuda --start "ROMEO:" --max_new_tokens 120 --seed 1
        cp out-shakespeare-gpt2-gpu/log.jsonl "$OUT/train_log.jsonl"; } 2>&1 | tee "$OUT/train_gpu.log" | tail -30 ;;
    kernels15)
      timeout "${KERNELS15_TIMEOUT:-90}" $PYTEST -m cupy -n 4 tests/test_flash_attention.py tests/test_fused_layers.py \
        tests/test_vectorized_kernels.py tests/test_cuda_graphs.py tests/test_vocab_padding.py tests/test_kernels.py 2>&1 \
        | tee "$OUT/kernels15.log" | tail -25
      mkdir -p benchmarks/logs && cp "$OUT/kernels15.log" "benchmarks/logs/gpu15_kernels_$DAY.log" ;;
    prof15)
      timeout "${PROF15_TIMEOUT:-40}" python3 benchmarks/bench_kernels_gpu.py --json "$OUT/prof15.json" 2>&1 \
        | tee "$OUT/prof15.log" | tail -10
      mkdir -p benchmarks/logs && cp "$OUT/prof15.log" "benchmarks/logs/gpu15_prof_$DAY.log" ;;
    bench15)
      timeout "${BENCH15_TIMEOUT:-200}" python3 benchmarks/bench_gpu.py --precisions fp16 --configs gpt2-124m small \
        --frameworks ${BENCH15_FRAMEWORKS:-npgpt npgpt-flash npgpt-graphs npgpt-graphs-micro npgpt-flash-graphs npgpt-vec npgpt-nopad torch-sdpa torch-compile} \
        --steps 8 --warmup 2 --max-seconds "${BENCH15_BUDGET:-190}" --timeout 120 --json "$OUT/bench15.json" 2>&1 \
        | tee "$OUT/bench15.log" | tail -30
      mkdir -p benchmarks/logs && cp "$OUT/bench15.log" "benchmarks/logs/gpu15_bench_$DAY.log"
      if [ -f "$OUT/bench15.json" ]; then cp "$OUT/bench15.json" "benchmarks/logs/gpu15_bench_$DAY.json"; fi ;;
    profile)
      timeout "${PROFILE_TIMEOUT:-150}" python3 benchmarks/gpu_profile.py --variants ${PROFILE_VARIANTS:-npgpt npgpt-flash torch-sdpa} \
        --json "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log" | tail -60 ;;
    suite)
      timeout "${SUITE_TIMEOUT:-240}" $PYTEST -m "cupy and not slow" -n 8 2>&1 \
        | tee "$OUT/cupy_tests.log" | tail -25 ;;
    nccl)
      { GPUS=$(nvidia-smi -L | wc -l)
        if [ "$GPUS" -gt 1 ] && command -v mpiexec >/dev/null && python3 -c "import mpi4py" 2>/dev/null; then
          timeout "${NCCL_TIMEOUT:-180}" mpiexec -n "$GPUS" python3 benchmarks/nccl_smoke.py --json "$OUT/nccl_smoke.json"
        else
          timeout "${NCCL_TIMEOUT:-180}" python3 benchmarks/nccl_smoke.py --json "$OUT/nccl_smoke.json"
        fi; } 2>&1 | tee "$OUT/nccl_smoke.log" | tail -20 ;;
    *) echo "unknown stage $stage (suite probe bench train kernels nccl profile kernels15 prof15 bench15 issue15)" ;;
  esac
done
echo "=== done $(date -u +%T)" | tee -a "$OUT/gpu.txt"
