#!/usr/bin/env python
"""Offline throughput of a mixture-of-experts model (dummy weights, real shapes; default Qwen3-30B-A3B
on one GPU, EP=1): raylight with its fused Triton MoE kernel, the same engine with the experts run by
`torch._grouped_mm` after a sort (the peer kernel), and HF transformers `generate`, in one run.

Workload: --num-prompts requests of exactly --input-len random prompt tokens and --output-len output
tokens (EOS ignored). HF runs the first --hf-prompts of them in static batches of --hf-batch (no padding
needed: equal lengths); our engine also runs that same subset, so the HF ratio compares like with like.
Each part runs in its own process (the model is 61 GB: two do not fit beside each other's KV cache).
Writes one JSON under benchmarks/results/ (moe-offline-<time>.json).

    python scripts/bench_moe_offline.py                       # the whole run (driver)
    python scripts/bench_moe_offline.py --part ours --num-prompts 8 --model qwen3-moe-tiny   # one part
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

H200_BW = 4.8e12  # bytes/s, HBM3e (METHOD.md)
H200_BF16 = 989e12  # dense bf16 FLOP/s


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts_for(args, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random prompts; each timed pass gets its own seed, so no pass hits another's prefix cache."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (args.input_len,), generator=g).tolist() for _ in range(args.num_prompts)]


def run_engine(args, experts_by_grouped_mm: bool) -> dict:
    from raylight import LLM, SamplingParams
    from raylight.models.config import PRESETS

    if experts_by_grouped_mm:  # the peer kernel inside the same engine
        import raylight.parallel.moe_layer as moe_layer
        from bench_fused_moe import grouped_mm_moe

        moe_layer.fused_experts = lambda x, w13, w2, w, ids: grouped_mm_moe(x, w13, w2, w, ids)
    vocab = PRESETS[args.model]["vocab_size"]
    prompts = prompts_for(args, vocab)
    t0 = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=args.input_len + args.output_len + 16,
              attention_backend=args.attention_backend, enforce_eager=args.enforce_eager)
    startup_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    out = {"startup_s": startup_s, "graph_capture_s": llm.engine.graph_capture_s}
    runs = [("all", prompts)] + [(f"all_again{i}", prompts_for(args, vocab, 100 + i)) for i in range(1, args.repeat)]
    for name, subset in runs + [("hf_subset", prompts_for(args, vocab, 1)[:args.hf_prompts])]:
        _sync()
        t = time.perf_counter()
        res = llm.generate(subset, sp, use_tqdm=False)
        _sync()
        dt = time.perf_counter() - t
        n_out = sum(len(r.outputs[0].token_ids) for r in res)
        out[name] = {"requests": len(subset), "seconds": dt, "output_tokens": n_out,
                     "output_tok_s": n_out / dt, "total_tok_s": (n_out + len(subset) * args.input_len) / dt}
    out["first_tokens"] = res[0].outputs[0].token_ids[:8]
    llm.shutdown()
    return out


def run_hf(args) -> dict:
    import transformers

    from raylight.models.config import PRESETS

    preset = dict(PRESETS[args.model])
    arch = preset.pop("architectures")[0]
    preset.pop("torch_dtype", None)
    cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**preset)
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    startup_s = time.perf_counter() - t0
    prompts = prompts_for(args, cfg.vocab_size, 1)[:args.hf_prompts]
    impl = getattr(model.config, "_experts_implementation", None)

    def generate(batch, new):
        ids = torch.tensor(batch, device="cuda")
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        generate(prompts[:2], 4)  # warm-up
        _sync()
        t = time.perf_counter()
        n_out = 0
        for i in range(0, len(prompts), args.hf_batch):
            out = generate(prompts[i:i + args.hf_batch], args.output_len)
            n_out += (out.shape[1] - args.input_len) * out.shape[0]
        _sync()
        dt = time.perf_counter() - t
    return {"startup_s": startup_s, "experts_implementation": impl, "batch": args.hf_batch,
            "hf_subset": {"requests": len(prompts), "seconds": dt, "output_tokens": n_out,
                          "output_tok_s": n_out / dt, "total_tok_s": (n_out + len(prompts) * args.input_len) / dt},
            "transformers": transformers.__version__}


def floor(args) -> dict:
    """A lower bound on the time of the 'all' workload: prefill FLOPs at the bf16 matrix rate, plus per
    decode step the weight bytes it must read (attention and the experts a batch of B tokens is expected
    to touch, E * (1 - (1 - K/E)^B) per layer) at HBM bandwidth. KV reads are left out (small here)."""
    from raylight.models.config import PRESETS

    p = PRESETS[args.model]
    H, L, E, K, I = p["hidden_size"], p["num_hidden_layers"], p["num_experts"], p["num_experts_per_tok"], \
        p["moe_intermediate_size"]
    hd, nq, nkv, V = p["head_dim"], p["num_attention_heads"], p["num_key_value_heads"], p["vocab_size"]
    attn = H * hd * (nq + 2 * nkv) + nq * hd * H
    expert = 3 * H * I
    active = L * (attn + K * expert + E * H) + 2 * V * H  # params a token multiplies (router, embed, head)
    B = args.num_prompts  # all requests decode together (the engine admits them all)
    touched = E * (1 - (1 - K / E) ** B)
    step_bytes = 2 * (L * (attn + touched * expert + E * H) + V * H)
    prefill_s = 2 * active * args.num_prompts * args.input_len / H200_BF16
    decode_s = args.output_len * step_bytes / H200_BW
    n_out = args.num_prompts * args.output_len
    return {"active_params": active, "decode_step_bytes": step_bytes, "prefill_floor_s": prefill_s,
            "decode_floor_s": decode_s, "floor_output_tok_s": n_out / (prefill_s + decode_s),
            "assumes": "H200 4.8 TB/s, 989 TFLOP/s bf16 dense; all requests in one decode batch"}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-prompts", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="time the whole workload this many times (JIT warm-up shows)")
    ap.add_argument("--part", choices=["ours", "grouped_mm", "hf"])
    ap.add_argument("--parts", default="ours,grouped_mm,hf")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "benchmarks", "results"))
    args = ap.parse_args(argv)
    if args.part:
        res = run_hf(args) if args.part == "hf" else run_engine(args, args.part == "grouped_mm")
        print("RESULT " + json.dumps(res), flush=True)
        return
    results = {}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--parts")]
    for part in args.parts.split(","):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--part", part, *passthrough], capture_output=True,
                              text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        results[part] = json.loads(line[7:]) if line else {"error": (proc.stderr or proc.stdout)[-3000:]}
        results[part]["wall_s"] = time.perf_counter() - t
        print(part, json.dumps(results[part])[:600], flush=True)
    ratios = {}
    ours = results.get("ours", {})
    for peer in ("grouped_mm", "hf"):
        p = results.get(peer, {})
        key = "all" if peer == "grouped_mm" else "hf_subset"
        if key in ours and key in p:
            ratios[f"ours_over_{peer}_output_tok_s"] = ours[key]["output_tok_s"] / p[key]["output_tok_s"]
    fl = floor(args) if args.model in ("qwen3-30b-a3b",) else {}
    if fl and "all" in ours:
        ratios["ours_fraction_of_floor"] = ours["all"]["output_tok_s"] / fl["floor_output_tok_s"]
    record = {"benchmark": "moe-offline", "device": device_name("cuda"), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "commit": git_commit(), "torch": torch.__version__,
              "workload": {"model": args.model, "load_format": "dummy", "dtype": "bfloat16", "ep": 1,
                           "num_prompts": args.num_prompts, "input_len": args.input_len,
                           "output_len": args.output_len, "hf_prompts": args.hf_prompts, "hf_batch": args.hf_batch,
                           "attention_backend": args.attention_backend, "ignore_eos": True},
              "results": results, "ratios": ratios, "floor": fl}
    path = write_record(args.out, "moe-offline", record)
    print("wrote", path, json.dumps(ratios))


if __name__ == "__main__":
    main()
