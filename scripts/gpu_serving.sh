#!/usr/bin/env bash
# The serving benchmark on one lent GPU, in one command (issue 18 item 6), from the repository root there:
#     bash scripts/gpu_serving.sh                      # carry [".whl", ".ficache-carry", ".device_commit"]
# Before it, on the same warm machine: the vLLM peer installed into /root/peer/site (.peer/COMMANDS.txt, see
# ../shared/peers/vllm/README.md) and Ray Serve into /root/raysite (scripts/pack_ray_wheels.sh: two calls).
# Phases, each bounded by `timeout`, each writing its part as soon as it ends (a later phase cut short
# loses nothing before it):
#   ours     `serve run configs/gpu.yaml` (a local Ray of its own; PYTHONPATH=/root/raysite:/tmp/site, our
#            site dirs only), waits for /health, runs scripts/bench_serving.py at every rate, stops it (SIGINT:
#            serve run shuts Serve and its Ray down; then the process group is killed, and the GPU waited on)
#   ours:<config>  the same with another config of the same model and port (label raylight-<its name>): an A/B
#   ours+<key>=<value>  the same with one application arg of $CONFIG changed (label raylight-<key>-<value>)
#   offline  the same requests through raylight's offline LLM with the config's engine_args
#   vllm     vLLM's OpenAI server (PYTHONPATH=/root/peer/site alone) on the same model shape, dummy weights,
#            the same scheduler limits, the same load
# then merges the parts into one record $OUT/serving-gpu-<date>.json (-cpu- with a CPU config; the parts stay
# in $OUT/parts, the servers' logs in $OUT/logs.tar.gz: 5 files come back).
# Knobs (environment): PHASES ("ours offline vllm"), SERVE_MODE (fast: Ray Serve's mode for `ours` phases),
# RATES ("1 4 16 64 inf"), DURATION_S (12: requests per finite rate = rate x this, at least 8), SAT_REQUESTS
# (1024, the `inf` rate), SEED (0), CONFIG (configs/gpu.yaml), VLLM_PORT (8100), RAYSITE, PEERSITE,
# START_OURS_S (180), START_VLLM_S (240), LOAD_S (200 per server), OFFLINE_S (180), BENCH_EXTRA (more
# bench_serving.py flags), PYSPY_AFTER / PYSPY_S (a py-spy profile of our server's processes during a rate:
# see profile_when), SKIP_GPU_ENV (1: do not source gpu_env.sh; for a CPU try with a CPU config). Expected on
# an H200: ours ~2.5-3 min (Ray, the engine's start and warm-up, 5 loads), offline ~1 min, vLLM ~3.5-4 min
# (its first start of a model shape compiles for ~2 min), 7-8.5 minutes in all: give the call timeout_s 600.
# If the vLLM phase is cut short, run it alone in the next call (PHASES=vllm) and merge the parts here:
# bench_serving.py --merge A.json B.json C.json.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/parts" "$OUT/logs"
PHASES=${PHASES:-"ours offline vllm"}
RATES=${RATES:-"1 4 16 64 inf"}
CONFIG=${CONFIG:-configs/gpu.yaml}
RAYSITE=${RAYSITE:-/root/raysite}
PEERSITE=${PEERSITE:-/root/peer/site}
VLLM_PORT=${VLLM_PORT:-8100}
SERVE_MODE=${SERVE_MODE:-fast}
WL="--config $CONFIG --rates $RATES --duration-s ${DURATION_S:-12} --saturation-requests ${SAT_REQUESTS:-1024} --seed ${SEED:-0} ${BENCH_EXTRA:-}"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

if [ "${SKIP_GPU_ENV:-0}" != 1 ]; then  # SKIP_GPU_ENV=1: the project is importable already (a CPU try)
  source scripts/gpu_env.sh || { echo "gpu_env.sh failed (are the project wheels in .whl?)"; exit 1; }
fi
OURPATH="$RAYSITE${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
# = the `serve` command. A background job of a script starts with SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler: restore it, so that SIGINT stops `serve run` gracefully (Serve, then its Ray).
SERVE_CLI='import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)
from ray.serve.scripts import cli; sys.argv[0] = "serve"; cli()'
eval "$(PYTHONPATH=$OURPATH python3 - "$CONFIG" <<'EOF'
import shlex, sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
app = cfg["applications"][0]["args"]
e = app.get("engine_args") or {}
vals = dict(MODEL=app.get("model") or "", SERVED=app.get("served_model_name") or app.get("model") or "",
            OUR_PORT=cfg.get("http_options", {}).get("port", 8000), LOAD_FORMAT=e.get("load_format", "auto"),
            MAX_MODEL_LEN=e.get("max_model_len", 4096), MAX_NUM_SEQS=e.get("max_num_seqs", 256),
            MAX_BATCHED=e.get("max_num_batched_tokens", 8192), GPU_UTIL=e.get("gpu_memory_utilization", 0.85),
            DTYPE=e.get("dtype", "bfloat16"))
print("\n".join(f"{k}={shlex.quote(str(v))}" for k, v in vals.items()))
EOF
)" || { echo "cannot read $CONFIG"; exit 1; }
echo "=== serving benchmark: $SERVED ($MODEL, load_format $LOAD_FORMAT), rates $RATES, phases: $PHASES $(date +%T)"

# A server in its own process group (setsid), its output in $OUT/logs/$1.log; sets SPID.
start_bg() {
  local name=$1 path=$2; shift 2
  PYTHONPATH=$path setsid "$@" > "$OUT/logs/$name.log" 2>&1 &
  SPID=$!
}

# Waits until http://127.0.0.1:$1/health answers 200, for at most $2 seconds, while process $3 lives.
wait_health() {
  local port=$1 limit=$2 pid=$3 t0=$SECONDS
  while (( SECONDS - t0 < limit )); do
    if ! kill -0 "$pid" 2>/dev/null; then echo "server process $pid exited"; return 1; fi
    if python3 -c "import urllib.request as u, sys; sys.exit(u.urlopen('http://127.0.0.1:$port/health', timeout=3).read() is None)" 2>/dev/null; then
      echo "health OK on :$port after $((SECONDS - t0))s"; return 0
    fi
    sleep 2
  done
  echo "no health on :$port after ${limit}s"; return 1
}

# Signal $2 (INT or TERM: a graceful stop) to server $1, then after at most 45 s its whole process group.
stop_bg() {
  local pid=$1 t0=$SECONDS
  kill -"$2" "$pid" 2>/dev/null
  while kill -0 "$pid" 2>/dev/null && (( SECONDS - t0 < 45 )); do sleep 1; done
  echo "server $pid stopped after $((SECONDS - t0))s (SIG$2)"
  kill -KILL -- "-$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}

# Waits (at most 60 s) until no process holds the GPU and its memory is back under 4 GiB; after 30 s kills
# the processes still listed (leftovers of the phase before: this machine runs nothing else).
wait_gpu_free() {
  command -v nvidia-smi >/dev/null || return 0
  local t0=$SECONDS left used
  while (( SECONDS - t0 < 60 )); do
    left=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ')
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | sort -n | tail -1)
    if [ -z "$left" ] && [ "${used:-0}" -lt 4096 ]; then echo "GPU free (${used} MiB used)"; return 0; fi
    (( SECONDS - t0 > 30 )) && for p in $left; do kill -KILL "$p" 2>/dev/null; done
    sleep 2
  done
  echo "GPU still busy (${used} MiB used): $(nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader)"
}

# Once the bench output $2 shows $1 (PYSPY_AFTER, e.g. "rate 64:": the `inf` rate starts next), py-spy records
# for PYSPY_S seconds (default 8) which Python stacks hold the GIL in the engine replica, the ingress and the
# proxy, and the engine's own process when it has one (raw stacks in $OUT/logs/pyspy-<name>.txt).
# py-spy comes from PATH or from the carried wheels (.whl/py_spy-*.whl, installed into /tmp/site/bin).
profile_when() {
  local spy pid name
  spy=$(command -v py-spy || ls /tmp/site/bin/py-spy 2>/dev/null) || { echo "no py-spy: no profile"; return; }
  for _ in $(seq 1 1200); do grep -q "$1" "$2" 2>/dev/null && break; sleep 0.5; done
  sleep "${PYSPY_DELAY_S:-1}"
  for name in EngineReplica OpenAIIngress ProxyActor raylight.engine.engine_process; do
    pid=$(pgrep -f "$name" | head -1)
    [ -n "$pid" ] && "$spy" record -p "$pid" -d "${PYSPY_S:-8}" -r 100 --gil --format raw --nonblocking \
      -o "$OUT/logs/pyspy-$name.txt" > "$OUT/logs/pyspy-$name.log" 2>&1 &
  done
  wait
}

bench() {  # bench_serving.py with our site dirs, bounded
  PYTHONPATH=$OURPATH timeout -s INT -k 20 "$1" python3 scripts/bench_serving.py "${@:2}" --out "$OUT/parts"
}

for phase in $PHASES; do
  echo "=== $phase $(date +%T)"
  wait_gpu_free
  case $phase in
    ours|ours@*|ours:*|ours+*)
      # ours:<config>: our server with another config (same model, port and load), labelled raylight-<name>:
      # an A/B of server settings in one call, e.g. PHASES="ours ours:/tmp/gil.yaml".
      # ours+<key>=<value>: $CONFIG with one application arg set (a YAML value), labelled
      # raylight-<key>-<value>, e.g. PHASES="ours ours+engine_process=false".
      # ours@<mode>: the same under another Ray Serve mode (raylight/cluster/serve_mode.py: classic, fast,
      # haproxy), labelled raylight-<mode>, e.g. PHASES="ours@classic ours@fast ours@haproxy"; plain `ours`
      # runs under $SERVE_MODE (default fast, as `raylight serve`).
      mode=$SERVE_MODE at=""
      case $phase in *@*) mode=${phase##*@}; phase=${phase%@*}; at=-$mode ;; esac
      cfg=$CONFIG label=raylight
      case $phase in
        ours:*) cfg=${phase#ours:}; label=raylight-$(basename "$cfg" .yaml) ;;
        ours+*)
          kv=${phase#ours+}; label=raylight-${kv%%=*}-${kv#*=}; cfg=/tmp/$label.yaml
          PYTHONPATH=$OURPATH python3 - "$CONFIG" "$cfg" "${kv%%=*}" "${kv#*=}" <<'EOF'
import sys, yaml
src, dst, key, value = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg["applications"][0]["args"][key] = yaml.safe_load(value)
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
EOF
          ;;
      esac
      if ! PYTHONPATH=$OURPATH python3 -c "import ray.serve, fastapi" 2>/dev/null; then
        echo "ray[serve] is not in $RAYSITE: run scripts/pack_ray_wheels.sh --device-1 / --device-2 first"; continue
      fi
      label=$label$at
      MODE_ENV=$(PYTHONPATH=$OURPATH python3 -c "from raylight.cluster.serve_mode import serve_env; import sys
print(' '.join(f'{k}={v}' for k, v in serve_env(sys.argv[1]).items()))" "$mode") || { echo "serve mode $mode: unusable"; continue; }
      echo "serve mode $mode: $MODE_ENV"
      start_bg "serve_$label" "$OURPATH" env $MODE_ENV python3 -c "$SERVE_CLI" run --address local "$cfg"
      if wait_health "$OUR_PORT" "${START_OURS_S:-180}" "$SPID"; then
        PROF=""
        if [ -n "${PYSPY_AFTER:-}" ]; then profile_when "$PYSPY_AFTER" "$OUT/logs/bench_$label.log" & PROF=$!; fi
        bench "${LOAD_S:-200}" --url "http://127.0.0.1:$OUR_PORT" --model "$SERVED" --label "$label" $WL \
          2>&1 | tee "$OUT/logs/bench_$label.log"
        echo "bench exit ${PIPESTATUS[0]}"
        if [ -n "$PROF" ]; then  # a profile under way ends by itself; one still waiting for its cue, now
          for _ in $(seq 1 $(( ${PYSPY_S:-8} + 10 ))); do kill -0 "$PROF" 2>/dev/null || break; sleep 1; done
          kill "$PROF" 2>/dev/null
        fi
      fi
      stop_bg "$SPID" INT
      tail -3 "$OUT/logs/serve_$label.log"
      mkdir -p "$OUT/logs/ray" && cp -r /tmp/ray/session_latest/logs/serve "$OUT/logs/ray/" 2>/dev/null
      cp /tmp/ray/session_latest/logs/*.err "$OUT/logs/ray/" 2>/dev/null
      ;;
    offline)
      bench "${OFFLINE_S:-180}" --offline --label offline --quiet $WL 2>&1 | tee "$OUT/logs/offline.log" | grep -v "Warning\|warnings.warn"
      ;;
    vllm)
      if ! PYTHONPATH=$PEERSITE python3 -c "import vllm" 2>/dev/null; then
        echo "vLLM is not in $PEERSITE: install the peer first (.peer/COMMANDS.txt)"; continue
      fi
      VARGS=()
      if [ -d "$MODEL" ]; then
        VMODEL=$MODEL; [ "$LOAD_FORMAT" = dummy ] && VARGS+=(--load-format dummy)
      else  # a preset shape: its config.json, random weights, no tokenizer (prompts are token ids)
        VMODEL=/tmp/vllm_model_$MODEL
        PYTHONPATH=$OURPATH python3 scripts/bench_serving.py --write-model-dir "$VMODEL" --config "$CONFIG" || continue
        VARGS+=(--load-format dummy --skip-tokenizer-init)
      fi
      start_bg serve_vllm "$PEERSITE" python3 -m vllm.entrypoints.cli.main serve "$VMODEL" "${VARGS[@]}" \
        --served-model-name "$SERVED" --dtype "$DTYPE" --max-model-len "$MAX_MODEL_LEN" --max-num-seqs "$MAX_NUM_SEQS" \
        --max-num-batched-tokens "$MAX_BATCHED" --gpu-memory-utilization "$GPU_UTIL" --seed 0 \
        --host 127.0.0.1 --port "$VLLM_PORT" --disable-uvicorn-access-log --uvicorn-log-level warning
      if wait_health "$VLLM_PORT" "${START_VLLM_S:-240}" "$SPID"; then
        bench "${LOAD_S:-200}" --url "http://127.0.0.1:$VLLM_PORT" --model "$SERVED" --label vllm $WL
        echo "bench exit $?"
      fi
      stop_bg "$SPID" TERM
      grep -E "Error|error|Traceback" "$OUT/logs/serve_vllm.log" | tail -5
      ;;
    *) echo "unknown phase $phase" ;;
  esac
done

echo "=== merge $(date +%T)"
parts=$(ls "$OUT"/parts/serving-*.json 2>/dev/null)
[ -n "$parts" ] && PYTHONPATH=$OURPATH python3 scripts/bench_serving.py --merge $parts --out "$OUT"
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
ls -la "$OUT" "$OUT/parts"
echo "=== done $(date +%T)"
