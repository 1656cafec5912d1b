#!/usr/bin/env python
"""Offline throughput: raylight vs HF transformers `generate`, same model, same workload, same run.

Default workload (CPU, SmolLM2-135M): 64 requests, prompt lengths uniform in [16, 256], output
lengths uniform in [16, 256], seeded, EOS ignored. HF runs static batches (left padding, each
batch generating its longest output) and only the requested tokens count as useful.
`--fixed` runs 32 requests x 128 prompt tokens x 128 output tokens.
Writes one JSON file under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    return f"{model} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def write_record(out_dir: str, prefix: str, record: dict) -> str:
    """One JSON file per benchmark run: {out_dir}/{prefix}-{timestamp}.json."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{prefix}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")
    return path


def make_workload(args, vocab: int):
    rng = np.random.default_rng(args.seed)
    n = args.num_requests
    if args.fixed:
        in_lens = np.full(n, args.input_len)
        out_lens = np.full(n, args.output_len)
    else:
        in_lens = rng.integers(args.min_input, args.max_input + 1, n)
        out_lens = rng.integers(args.min_output, args.max_output + 1, n)
    # Random ids away from the special tokens at the start of most vocabularies.
    prompts = [rng.integers(100, vocab - 1, L).tolist() for L in in_lens]
    return prompts, out_lens.tolist()


def run_ours(args, prompts, out_lens):
    from raylight import LLM, SamplingParams

    t0 = time.perf_counter()
    engine_args = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       device=args.device, attention_backend=args.attention_backend)
    if args.dummy:
        engine_args["load_format"] = "dummy"
    llm = LLM(args.model_config if args.dummy and args.model_config else args.model, **engine_args)
    ready_s = time.perf_counter() - t0
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in out_lens]
    warm = prompts[:2]
    llm.generate(warm, [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)] * len(warm),
                 use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    elapsed = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(out_lens), (produced, sum(out_lens))
    m = llm.get_metrics()
    return llm, dict(elapsed_s=elapsed, output_tokens=produced, output_tok_s=produced / elapsed,
                     total_tok_s=(produced + sum(map(len, prompts))) / elapsed, ready_s=ready_s,
                     engine_steps=m["num_steps"], preemptions=m["preemptions"])


@torch.inference_mode()
def run_hf(args, llm, prompts, out_lens):
    from transformers import AutoModelForCausalLM

    path = llm.engine.model_path
    dev = llm.engine.device
    model = AutoModelForCausalLM.from_pretrained(path, dtype=llm.engine.dtype).to(dev).eval()
    pad = 0

    def batch_generate(batch_prompts, max_new):
        L = max(map(len, batch_prompts))
        ids = torch.full((len(batch_prompts), L), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch_prompts):  # left padding
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        return model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new,
                              min_new_tokens=max_new, do_sample=False, pad_token_id=pad)

    batch_generate(prompts[:2], 4)  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(prompts), args.hf_batch_size):
        batch_generate(prompts[s : s + args.hf_batch_size], max(out_lens[s : s + args.hf_batch_size]))
    elapsed = time.perf_counter() - t0
    useful = sum(out_lens)
    return dict(elapsed_s=elapsed, useful_output_tokens=useful, output_tok_s=useful / elapsed,
                batch_size=args.hf_batch_size, transformers_version=__import__("transformers").__version__)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir / .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dummy", action="store_true", help="random weights with the model's (or preset's) shapes")
    p.add_argument("--model-config", default=None, help="preset shape for --dummy, e.g. llama-3.2-1b")
    p.add_argument("--device", default="auto")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--fixed", action="store_true", help="fixed lengths: 32 x 128 in x 128 out")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--min-input", type=int, default=16)
    p.add_argument("--max-input", type=int, default=256)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)
    if args.num_requests is None:
        args.num_requests = 32 if args.fixed else 64

    from raylight.models.loader import resolve_model

    vocab = resolve_model(args.model_config if args.dummy and args.model_config else args.model,
                          "dummy" if args.dummy else "auto").arch.vocab_size
    prompts, out_lens = make_workload(args, vocab)
    llm, ours = run_ours(args, prompts, out_lens)
    print(f"raylight: {ours['output_tok_s']:.1f} output tok/s ({ours['output_tokens']} tokens in "
          f"{ours['elapsed_s']:.1f}s, {ours['engine_steps']} steps)")
    hf = None
    if not args.skip_hf:
        hf = run_hf(args, llm, prompts, out_lens)
        print(f"HF generate (static batches of {args.hf_batch_size}): {hf['output_tok_s']:.1f} useful output tok/s "
              f"({hf['elapsed_s']:.1f}s)")
        print(f"ratio raylight / HF: {ours['output_tok_s'] / hf['output_tok_s']:.2f}x")

    workload = ("fixed" if args.fixed else "mixed")
    record = dict(
        benchmark="bench_throughput", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        commit=git_commit(), device=device_name(str(llm.engine.device)), torch=torch.__version__,
        model=llm.engine.model_name, dtype=str(llm.engine.dtype).replace("torch.", ""),
        attention_backend=llm.engine.attn_backend.name,
        workload=dict(name=workload, num_requests=args.num_requests, seed=args.seed,
                      input_lens=[args.input_len] * 2 if args.fixed else [args.min_input, args.max_input],
                      output_lens=[args.output_len] * 2 if args.fixed else [args.min_output, args.max_output],
                      total_prompt_tokens=sum(map(len, prompts)), total_output_tokens=sum(out_lens),
                      ignore_eos=True),
        raylight=ours, peer_hf_generate=hf,
        ratio_vs_hf=(ours["output_tok_s"] / hf["output_tok_s"]) if hf else None,
        command=" ".join(sys.argv),
    )
    dev = "gpu" if llm.engine.device.type == "cuda" else "cpu"
    write_record(args.out, f"throughput-{dev}-{workload}-{llm.engine.attn_backend.name}", record)


if __name__ == "__main__":
    main()
