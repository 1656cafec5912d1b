"""Summarizes py-spy raw stacks (`py-spy record --format raw`, as scripts/gpu_serving.sh writes them with
PYSPY_AFTER): the share of samples per thread group (the engine loop's thread against the rest) and the
heaviest stacks outside it, each cut to its innermost frames.

    python scripts/pyspy_summary.py logs/pyspy-EngineReplica.txt [--rate 100 --seconds 8] [--top 20]

With --gil samples (what gpu_serving.sh records) a sample is a moment some thread held the GIL, so with
--rate and --seconds the shares read as fractions of wall time."""

from __future__ import annotations

import argparse
import collections

ENGINE_LOOP = "EngineLoop.run"  # the frame every engine-loop stack passes through (a replica's thread or the engine process)


def load(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(stacks, top: int = 20, depth: int = 3) -> dict:
    groups: collections.Counter = collections.Counter()
    heavy: collections.Counter = collections.Counter()
    for frames, n in stacks:
        in_loop = any(ENGINE_LOOP in f for f in frames)
        groups["engine loop" if in_loop else "other threads"] += n
        if not in_loop:
            heavy[" > ".join(f.split(" (")[0] for f in frames[-depth:])] += n
    return dict(samples=sum(groups.values()), groups=dict(groups), top_other=heavy.most_common(top))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+")
    p.add_argument("--rate", type=float, default=100.0, help="py-spy's sampling rate (-r)")
    p.add_argument("--seconds", type=float, default=8.0, help="py-spy's duration (-d)")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    wall = args.rate * args.seconds
    for path in args.paths:
        s = summarize(load(path), args.top)
        print(f"{path}: {s['samples']} samples")
        for name, n in s["groups"].items():
            print(f"  {name:14s} {n:6d}  {n / wall:6.1%} of wall time")
        for stack, n in s["top_other"]:
            print(f"    {n:6d}  {stack}")


if __name__ == "__main__":
    main()
