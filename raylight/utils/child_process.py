"""What our own child processes share (a rank's, `workers/rank_main.py`; the engine's,
`engine/engine_process.py`): started as `python -m <module>` with the environment that imports this
raylight whatever the parent's sys.path or working directory, and gone as soon as their parent is."""

from __future__ import annotations

import os
import threading
import time


def child_env() -> dict[str, str]:
    """This process's environment, with the directory holding the `raylight` package on PYTHONPATH."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def watch_parent(parent: int, poll_s: float = 1.0) -> None:
    """Ends this process once `parent` is gone, from the first instant on: loading torch and a model
    takes a while, and a child without its parent would hold its memory (a GPU's) until it noticed."""

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="raylight-parent-watch", daemon=True).start()
