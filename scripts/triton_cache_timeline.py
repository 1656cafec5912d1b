"""Which Triton kernels a run compiled, and when: reads a Triton cache directory (TRITON_CACHE_DIR) that
started empty and prints each kernel's compile count and the seconds between consecutive compiles
(an upper bound on each compile's time when compiles run back to back, as in start-up).

    TRITON_CACHE_DIR=/tmp/tc python3 scripts/bench_throughput.py ...; python3 scripts/triton_cache_timeline.py /tmp/tc
"""

from __future__ import annotations

import collections
import json
import os
import sys


def main(argv=None) -> None:
    root = (argv or sys.argv[1:] or [os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))])[0]
    done = []  # (mtime, kernel name) of each compiled kernel's metadata
    for d in os.listdir(root):
        for f in os.listdir(os.path.join(root, d)):
            if f.endswith(".json") and not f.startswith("__grp__"):
                p = os.path.join(root, d, f)
                try:
                    name = json.load(open(p)).get("name", f[:-5])
                except (OSError, ValueError):
                    name = f[:-5]
                done.append((os.path.getmtime(p), name))
    if not done:
        print(f"{root}: no compiled kernels")
        return
    done.sort()
    t0 = done[0][0]
    per = collections.defaultdict(lambda: [0, 0.0])
    prev = t0
    for t, name in done:
        per[name][0] += 1
        per[name][1] += t - prev
        prev = t
    print(f"{len(done)} kernels compiled over {done[-1][0] - t0:.1f} s (first to last)")
    for name, (n, s) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:40s} {n:4d} compiles, {s:7.1f} s between compiles")


if __name__ == "__main__":
    main()
