# Sourced on a lent GPU: carried wheels (scripts/device_wheels.sh downloads them into .whl here) and the
# project installed offline; FlashInfer's JIT cache in .ficache, so a warm machine reuses it and a copy can
# travel to the next machine.
export PYTHONUNBUFFERED=1
# A call that carries no wheels (a vLLM batch fills the transfer) reuses those an earlier call on this
# machine installed.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
elif [ ! -d /tmp/site/flashinfer ]; then
  echo "no carried wheels (.whl) and none installed on this machine yet"; return 1
fi
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || return 1
export FLASHINFER_WORKSPACE_BASE=$PWD/.ficache
mkdir -p "$FLASHINFER_WORKSPACE_BASE"
if ls .ficache-carry/ficache.tar.gz.* >/dev/null 2>&1 && [ ! -f .ficache/.restored ]; then
  cat .ficache-carry/ficache.tar.gz.* | tar xzf - && touch .ficache/.restored
fi
# ninja rebuilds an op when a header it read is newer than the build it logged: the wheels just installed
# carry fresh mtimes, so date them (and the generated sources) back before the carried builds.
find /tmp/site "$FLASHINFER_WORKSPACE_BASE" -path '*cached_ops*' -prune -o -exec touch -h -d 2020-01-01 {} + 2>/dev/null
