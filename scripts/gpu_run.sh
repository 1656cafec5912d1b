#!/usr/bin/env bash
# One lent-GPU session: the stages named in $@ (tests, test-<file>, k:<expr>, w1-<backend>, w1mb-<backend>,
# w1noHF-<backend>, b1-<backend>, prof-<backend> (profile_steps), profsharegpt (its mixed steps, after p-sharegpt-*), profb1tp<N> (batch-1 8B at TP=N), profbs<N> (8B decode at batch N), par (bench_parallel, 2 GPUs),
# disagg2 / epd / eplb (issues 20 and 21, 2+ GPUs), kbench
# (bench_kernels), gemv (bench_gemv), gemvrows (its few-row kernel at 8/32/64 rows; its winners, gemv-rows.env, pass to the later stages), ficache; U/<stage> runs a stage with the fused kernels off, RAYLIGHT_FUSED_KERNELS=0; R<n>/<stage> with
# projections of up to n rows through gemv_rows;
# NP/<stage> without piecewise CUDA graphs; PDL0/ PDL1/ without / with programmatic dependent launch;
# MNS<n>/ MBT<n>/ at another max_num_seqs / max_num_batched_tokens).
# BENCH_EXTRA adds flags to every benchmark, e.g. "--max-num-batched-tokens 8192". Each stage gets
# STAGE_TIMEOUT seconds (default 300; stage@N gives one stage N), then SIGINT (pytest and Python print where they were stuck).
set -uo pipefail
if [ "${1:-}" != "--one" ]; then
  source "$(dirname "$0")/gpu_env.sh" || exit 1
  export OUT=${OUT:-/tmp/out}
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  for spec in "$@"; do  # a stage, or stage@seconds for its own time limit
    stage=${spec%@*}; limit=${STAGE_TIMEOUT:-300}; [ "$spec" != "$stage" ] && limit=${spec##*@}
    echo "=== $stage (limit ${limit}s) $(date +%T)"
    timeout -s INT -k 20 "$limit" bash "$0" --one "$stage"
    echo "=== $stage exit $? $(date +%T)"
    # gemv's and gemvrows' winners reach the stages after them
    if [ -s "$OUT/gemv.env" ] && [ -z "${RAYLIGHT_GEMV_CONFIG:-}" ]; then
      export RAYLIGHT_GEMV_CONFIG=$(cat "$OUT/gemv.env"); echo "RAYLIGHT_GEMV_CONFIG=$RAYLIGHT_GEMV_CONFIG"
    fi
    if [ -s "$OUT/gemv-rows.env" ] && [ -z "${RAYLIGHT_GEMV_ROWS_CONFIG:-}" ]; then
      export RAYLIGHT_GEMV_ROWS_CONFIG=$(cat "$OUT/gemv-rows.env"); echo "RAYLIGHT_GEMV_ROWS_CONFIG=$RAYLIGHT_GEMV_ROWS_CONFIG"
    fi
  done
  echo "=== done $(date +%T)"
  exit 0
fi
stage=$2
# Prefixes, any of them in any order, each setting one thing for this stage:
#   U/       the fused Triton elementwise kernels off (the torch ops)
#   NP/      no piecewise CUDA graphs (prefill and mixed steps launched eagerly)
#   R<n>/    projections of up to n rows through our Triton kernels (RAYLIGHT_GEMV_MAX_ROWS=n: gemv_rows)
#   PDL0/ PDL1/  our Triton kernels without / with programmatic dependent launch (RAYLIGHT_PDL)
#   PF<n>/   with PDL, n weight columns per row prefetched by our GEMV kernels before their wait (RAYLIGHT_GEMV_PREFETCH)
#   RK0/ RK1/    the rotary + KV write kernel off / on (RAYLIGHT_ROPE_KV)
#   TC0/ TC1/    FlashInfer decode without / with its tensor-core kernels
#   MNS<n>/ MBT<n>/  max_num_seqs / max_num_batched_tokens n (vLLM's offline defaults and ours on GPUs of 70 GiB or more: 1024 / 16384)
#   SMD0/ SMD1/  the sampled rows' logits in float32 / in the model's dtype (greedy argmax on bf16; default 1)
#   DPS<n>/  Triton decode: a batch too large to split at 4 programs per SM splits against n (RAYLIGHT_DECODE_PROGRAMS_PER_SM; default 16; DPS4/ the rule before)
while :; do case $stage in
  U/*) export RAYLIGHT_FUSED_KERNELS=0 ;;
  NP/*) BENCH_EXTRA="${BENCH_EXTRA:-} --max-piecewise-graph-tokens 0" ;;
  R[0-9]*/*) n=${stage%%/*}; export RAYLIGHT_GEMV_MAX_ROWS=${n#R} ;;
  PDL0/*|PDL1/*) export RAYLIGHT_PDL=${stage:3:1} ;;
  PF[0-9]*/*) n=${stage%%/*}; export RAYLIGHT_GEMV_PREFETCH=${n#PF} ;;
  RK0/*|RK1/*) export RAYLIGHT_ROPE_KV=${stage:2:1} ;;
  TC0/*|TC1/*) export RAYLIGHT_FI_DECODE_TENSOR_CORES=${stage:2:1} ;;
  MNS[0-9]*/*) n=${stage%%/*}; BENCH_EXTRA="${BENCH_EXTRA:-} --max-num-seqs ${n#MNS}" ;;
  MBT[0-9]*/*) n=${stage%%/*}; BENCH_EXTRA="${BENCH_EXTRA:-} --max-num-batched-tokens ${n#MBT}" ;;
  DPS[0-9]*/*) n=${stage%%/*}; export RAYLIGHT_DECODE_PROGRAMS_PER_SM=${n#DPS} ;;
  SMD0/*|SMD1/*) export RAYLIGHT_SAMPLE_IN_MODEL_DTYPE=${stage:3:1} ;;
  *) break ;;
esac; stage=${stage#*/}; done
W1="--dummy --model-config llama-3.2-1b --fixed --num-requests 256 --input-len 512 --output-len 256 --max-model-len 4096 --quiet"
B1="--dummy --model-config llama-3.1-8b --fixed --num-requests 1 --input-len 128 --output-len 256 --max-model-len 4096 --quiet"
quiet() { grep --line-buffered -v "Warning\|warnings.warn"; }
case $stage in
  # The whole log lands in $OUT as it goes (a stage cut short by its limit still returns what ran).
  tests) python3 -m pytest -v -rA -x -m gpu -p no:cacheprovider --durations=30 tests/gpu 2>&1 | quiet \
          | tee "$OUT/pytest-all.log" | tail -60 ;;
  test-*) f=${stage#test-}; [ -f "tests/gpu/$f" ] || f=test_$f  # test-engine_gpu.py or test-test_engine_gpu.py
          python3 -m pytest -v -rA -m gpu -p no:cacheprovider "tests/gpu/$f" ${PYTEST_EXTRA:-} 2>&1 | quiet \
          | tee "$OUT/pytest-$f.log" ;;
  k:*) python3 -m pytest -v -rA -m gpu -p no:cacheprovider tests/gpu -k "${stage#k:}" 2>&1 | quiet \
          | tee "$OUT/pytest-k.log" | tail -60 ;;
  w1-*) python3 scripts/bench_throughput.py $W1 --hf-batch-size 256 --gpu-memory-utilization 0.45 \
          --attention-backend "${stage#w1-}" ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  w1noHF-*) python3 scripts/bench_throughput.py $W1 --skip-hf --attention-backend "${stage#w1noHF-}" \
          ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  w1mb-*) python3 scripts/bench_throughput.py $W1 --hf-batch-size 256 --gpu-memory-utilization 0.45 \
          --num-microbatches 2 --attention-backend "${stage#w1mb-}" ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  b1-*) python3 scripts/bench_throughput.py $B1 --hf-batch-size 1 --gpu-memory-utilization 0.6 \
          --attention-backend "${stage#b1-}" ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  # p-<preset>-<backend>: bench_throughput's named workloads (w1 b1 b8 b32 long sharegpt); HF generate
  # beside the batch-1 preset only (the others' static batches take minutes). pHF-... adds it anyway.
  p-*|pHF-*) rest=${stage#*-}; preset=${rest%%-*}; backend=${rest#*-}; hf="--skip-hf"; mem=0.85
          # HF's copy of the model needs room beside ours (an 8B copy did not fit beside 0.85)
          { [ "$preset" = b1 ] || [ "${stage%%-*}" = pHF ]; } && hf="--hf-batch-size 256" && mem=0.6
          python3 scripts/bench_throughput.py --preset "$preset" --attention-backend "$backend" --quiet $hf \
            --gpu-memory-utilization $mem --save-workload "/tmp/wl-$preset.json" ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  # vLLM on the same GPU (its packages alone on the path; ../shared/peers/vllm installs them)
  vllm-w1) PYTHONPATH=/root/peer/site python3 /root/peer/vllm_bench.py --max-num-seqs default 2>&1 | grep '^{"m"\|SUMMARY\|Error' ;;
  vllm-lat) PYTHONPATH=/root/peer/site python3 /root/peer/vllm_latency.py 1 2>&1 | grep '^{"m"\|Error' ;;
  vllm-wl-*) wl="/tmp/wl-${stage#vllm-wl-}.json"; [ -f "$wl" ] || wl=".wl/wl-${stage#vllm-wl-}.json"
          PYTHONPATH=/root/peer/site python3 scripts/peer_vllm_offline.py "$wl" \
          --gpu-memory-utilization 0.85 2>&1 | grep '^{"m"\|Error' ;;
  par) python3 scripts/bench_parallel.py ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  # Multi-GPU issues, each one stage (NGPU: how many ranks; default every visible GPU):
  # disagg2 (issue 20: prefill on GPU 0, decode on GPU 1, the push probe over both transports, then load),
  # epd (issue 21: EP dispatch/combine), eplb (issue 21: EPLB under Zipf skew).
  disagg2) python3 scripts/bench_disagg.py --devices 0,1 --kv-transport both --push-probe 1024 8192 32768 \
             ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  epd) python3 -m torch.distributed.run --nproc-per-node "${NGPU:-$(nvidia-smi -L | wc -l)}" \
         scripts/bench_ep_dispatch.py ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  eplb) python3 scripts/bench_eplb.py --tp "${NGPU:-2}" ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  tpdiag) python3 scripts/diag_tp.py 2>&1 ;;
  prof-*) python3 scripts/profile_steps.py --attention-backend "${stage#prof-}" ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  # the sharegpt mix's mixed prefill+decode steps (item 5): its requests as p-sharegpt-* saved them
  profsharegpt) python3 scripts/profile_steps.py --workload-file /tmp/wl-sharegpt.json --max-model-len 8192 \
          --gpu-memory-utilization 0.85 --mixed-steps 60 ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  # profbs<N>: the 8B shape's decode at batch N (N requests of 128 prompt tokens), its kernels by time
  profbs*) python3 scripts/profile_steps.py --model-config llama-3.1-8b --num-requests "${stage#profbs}" --input-len 128 \
          --gpu-memory-utilization 0.85 ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  profb1tp*) python3 scripts/profile_steps.py --model-config llama-3.1-8b --num-requests 1 --input-len 128 \
          --gpu-memory-utilization 0.6 --tensor-parallel-size "${stage#profb1tp}" ${BENCH_EXTRA:-} --out "$OUT" 2>&1 | quiet ;;
  kbench) python3 scripts/bench_kernels.py --out "$OUT" 2>&1 | quiet ;;
  # GEMV_SHAPES narrows either sweep, GEMV_ROWS the few-row one (e.g. GEMV_SHAPES="tp1_o tp1_qkv" GEMV_ROWS="8 32")
  gemv) python3 scripts/bench_gemv.py ${GEMV_SHAPES:+--shapes $GEMV_SHAPES} --out "$OUT" 2>&1 | quiet ;;
  gemvrows) python3 scripts/bench_gemv.py --rows ${GEMV_ROWS:-8 32 64} ${GEMV_SHAPES:+--shapes $GEMV_SHAPES} \
              --out "$OUT" 2>&1 | quiet ;;
  ficache) tar czf - .ficache | split -b 15m - "$OUT/ficache.tar.gz." && ls -la "$OUT" ;;
  *) echo "unknown stage $stage" ;;
esac
