#!/usr/bin/env bash
# One lent-GPU session: the stages named in $@ (tests, test-<file>, w1-<backend>, w1mb-<backend>, b1-<backend>,
# par (bench_parallel, 2 GPUs), kbench (bench_kernels), k:<expr>, ficache). BENCH_EXTRA adds flags to every benchmark, e.g. "--max-num-batched-tokens 8192".
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" || exit 1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests) python3 -m pytest -q -x -m gpu tests/gpu 2>&1 | tail -30 ;;
    # SIGINT first: pytest then prints where each test was stuck (and the summary) before it is killed
    test-*) timeout -s INT -k 20 "${STAGE_TIMEOUT:-240}" python3 -m pytest -v -rA -m gpu -p no:cacheprovider \
              "tests/gpu/${stage#test-}" 2>&1 | grep -v "Warning\|warnings.warn\|^  " | tail -60 ;;
    w1-*) python3 scripts/bench_throughput.py --dummy --model-config llama-3.2-1b --fixed --num-requests 256 \
            --input-len 512 --output-len 256 --hf-batch-size 256 --max-model-len 4096 --quiet \
            --gpu-memory-utilization 0.45 --attention-backend "${stage#w1-}" ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | grep -v Warning ;;
    w1noHF-*) python3 scripts/bench_throughput.py --dummy --model-config llama-3.2-1b --fixed --num-requests 256 \
            --input-len 512 --output-len 256 --max-model-len 4096 --quiet --skip-hf \
            --attention-backend "${stage#w1noHF-}" --out "$OUT" 2>&1 | grep -v Warning ;;
    w1mb-*) python3 scripts/bench_throughput.py --dummy --model-config llama-3.2-1b --fixed --num-requests 256 \
            --input-len 512 --output-len 256 --hf-batch-size 256 --max-model-len 4096 --quiet --num-microbatches 2 \
            --gpu-memory-utilization 0.45 --attention-backend "${stage#w1mb-}" ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | grep -v Warning ;;
    b1-*) python3 scripts/bench_throughput.py --dummy --model-config llama-3.1-8b --fixed --num-requests 1 \
            --input-len 128 --output-len 256 --hf-batch-size 1 --max-model-len 4096 --quiet \
            --gpu-memory-utilization 0.6 --attention-backend "${stage#b1-}" ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | grep -v Warning ;;
    k:*) python3 -m pytest -q -m gpu tests/gpu -k "${stage#k:}" 2>&1 | tail -30 ;;
    kbench) python3 scripts/bench_kernels.py --out "$OUT" 2>&1 | grep -v Warning ;;
    par) timeout -s INT -k 20 "${STAGE_TIMEOUT:-300}" python3 scripts/bench_parallel.py ${BENCH_EXTRA:-} \
              --out "$OUT" 2>&1 | grep -v Warning ;;
    ficache) tar czf - .ficache | split -b 15m - "$OUT/ficache.tar.gz." && ls -la "$OUT" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done $(date +%T)"
