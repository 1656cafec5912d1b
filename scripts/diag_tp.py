#!/usr/bin/env python
"""Where does a TP=2 replica on two GPUs get stuck? Runs a small TP=2 engine (eager, then CUDA
graphs) in a child interpreter; every rank prints its Python stacks after --dump-after-s."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r'''
import faulthandler, sys, time
faulthandler.dump_traceback_later(float(sys.argv[2]), exit=False)
from raylight import LLM, SamplingParams
t0 = time.monotonic()
llm = LLM("llama-3.2-1b", load_format="dummy", device="cuda", tensor_parallel_size=2, max_model_len=1024,
          num_kv_blocks=512, enforce_eager=sys.argv[1] == "eager", distributed_timeout_s=float(sys.argv[3]),
          max_cuda_graph_batch_size=8)
print(f"READY {time.monotonic() - t0:.1f}s graphs={llm.engine.runner.graphs is not None}", flush=True)
out = llm.generate([[5, 6, 7, 8], [9, 10, 11]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                   use_tqdm=False)
print("GENERATED", [o.outputs[0].token_ids for o in out], flush=True)
llm.shutdown()
print(f"DONE {time.monotonic() - t0:.1f}s", flush=True)
'''


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="eager,graphs")
    p.add_argument("--dump-after-s", type=float, default=45)
    p.add_argument("--timeout-s", type=float, default=75)
    args = p.parse_args()
    env = {**os.environ, "RAYLIGHT_DUMP_STACKS_AFTER_S": str(args.dump_after_s), "PYTHONUNBUFFERED": "1",
           "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN")}
    for mode in args.modes.split(","):
        print(f"--- TP=2 {mode}", flush=True)
        try:
            r = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.dump_after_s), str(args.timeout_s - 20)],
                               env=env, capture_output=True, text=True, timeout=args.timeout_s)
            out, err, code = r.stdout, r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            code = "timeout"
        print(f"exit {code}\n{out[-1500:]}", flush=True)
        lines = [ln for ln in err.splitlines() if "Warning" not in ln and "warnings.warn" not in ln]
        print("\n".join(lines[-120:]), flush=True)


if __name__ == "__main__":
    main()
