#!/usr/bin/env bash
# Here (not on the GPU machine): download the wheels a lent GPU lacks into .whl/, which gpu_env.sh installs
# there (carry [".whl"]; ~35 MB). The GPU image has torch, triton, transformers, numpy and most of
# FlashInfer's needs; it lacks FlashInfer 0.6.14 and four of its companions (apache-tvm-ffi, cuda-tile,
# nvidia-cudnn-frontend, and nvidia-cutlass-dsl's 10 KB metapackage), pydantic (with pydantic-core,
# annotated-types, typing-inspection, and a typing-extensions new enough for it) and py-spy. The GPU's
# Python is 3.12. A new checkout starts without .whl (it is git-excluded): run this once.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
P=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
for n in 17 24 27 28 31 34 35; do P+=(--platform "manylinux_2_${n}_x86_64"); done
P+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q "${P[@]}" flashinfer-python==0.6.14 "apache-tvm-ffi>=0.1.6,<0.2,!=0.1.8,!=0.1.8.post0" \
  "cuda-tile>=1.4.0" "nvidia-cudnn-frontend>=1.13.0" "nvidia-cutlass-dsl>=4.5.0" \
  pydantic pydantic-core annotated-types typing-inspection typing-extensions py-spy
ls .whl && du -sh .whl
