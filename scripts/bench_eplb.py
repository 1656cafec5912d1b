#!/usr/bin/env python
"""EPLB under skew, on N >= 2 GPUs: the same MoE model (dummy weights, default Qwen3-30B-A3B shape)
served with expert parallelism over N GPUs, its routers skewed towards a Zipf(s) popularity
(RAYLIGHT_MOE_ROUTER_ZIPF, read by parallel/moe_layer.py), with EPLB off and on (redundant experts);
offline throughput and the balancedness EPLB reports. One JSON under benchmarks/results/.

    python scripts/bench_eplb.py --tp 2 --zipf 1.2 --num-redundant 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import device_name, git_commit, write_record  # noqa: E402


def run_part(args, eplb: bool) -> dict:
    from raylight import LLM, SamplingParams
    from raylight.models.config import PRESETS

    vocab = PRESETS[args.model]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (args.input_len,), generator=g).tolist() for _ in range(args.num_prompts)]
    extra = dict(enable_eplb=True, eplb_config=dict(num_redundant_experts=args.num_redundant,
                                                    step_interval=args.step_interval, window_size=args.window,
                                                    log_balancedness=True, log_balancedness_interval=50)) if eplb else {}
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", tensor_parallel_size=args.tp,
              enable_expert_parallel=True, max_model_len=args.input_len + args.output_len + 16, **extra)
    sp = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts, sp, use_tqdm=False)  # warm-up: with EPLB, the load it balances on
    t = time.perf_counter()
    res = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    n = sum(len(r.outputs[0].token_ids) for r in res)
    m = llm.get_metrics()
    llm.shutdown()
    return {"seconds": dt, "output_tok_s": n / dt, **{k: v for k, v in m.items() if "eplb" in k or "balanced" in k}}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--num-redundant", type=int, default=16)
    ap.add_argument("--step-interval", type=int, default=200)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--part", choices=["off", "on"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "benchmarks", "results"))
    args = ap.parse_args(argv)
    if args.part:
        print("RESULT " + json.dumps(run_part(args, args.part == "on")), flush=True)
        return
    if torch.cuda.device_count() < args.tp:
        sys.exit(f"needs {args.tp} GPUs, found {torch.cuda.device_count()}")
    env = {**os.environ, "RAYLIGHT_MOE_ROUTER_ZIPF": str(args.zipf)}
    results = {}
    for part in ("off", "on"):
        proc = subprocess.run([sys.executable, __file__, "--part", part, *(argv or sys.argv[1:])], env=env,
                              capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        results[part] = json.loads(line[7:]) if line else {"error": (proc.stderr or proc.stdout)[-3000:]}
        print(part, results[part], flush=True)
    speedup = (results["on"]["output_tok_s"] / results["off"]["output_tok_s"]
               if "output_tok_s" in results["on"] and "output_tok_s" in results["off"] else None)
    record = {"benchmark": "eplb-skew", "device": f"{args.tp}x {device_name('cuda')}",
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(), "workload": vars(args),
              "results": results, "eplb_speedup": speedup}
    print("wrote", write_record(args.out, f"eplb-skew-{args.tp}gpu", record))


if __name__ == "__main__":
    main()
