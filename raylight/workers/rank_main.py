"""Entry point of a rank that `LocalRanks` starts: `python -m raylight.workers.rank_main RANK THREADS`.

A module entry point, not multiprocessing's spawn: spawn re-runs the parent's `__main__`, which
does not exist as a file when the engine was made from `python -c`, stdin or a notebook.

The `RankSpec` arrives pickled on stdin, written by the parent (the engine's process, on this
machine) into the pipe it created for this child: the child trusts exactly what its own parent
handed it, as multiprocessing's spawn does; nothing here reads a socket. Anything that goes
wrong is printed to stderr, which the parent keeps the tail of for its error message.
"""

from __future__ import annotations

import logging
import os
import pickle  # the parent's own RankSpec, over the parent's pipe (see the module docstring)
import sys
import traceback

from raylight.utils.child_process import watch_parent


def main(argv: list[str]) -> None:
    rank, threads = int(argv[0]), int(argv[1])
    level = argv[2] if len(argv) > 2 else "WARNING"
    if len(argv) > 3:
        watch_parent(int(argv[3]))  # a rank without rank 0 would wait in the rendezvous until its timeout
    data = sys.stdin.buffer.read()  # first, so the parent's write never waits on our imports
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s")
    try:
        from raylight.workers.worker import local_rank_main

        spec = pickle.loads(data)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    local_rank_main(spec, rank, threads)  # exits the process itself on an error


if __name__ == "__main__":
    main(sys.argv[1:])
