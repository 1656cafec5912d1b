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
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from raylight.kernels.config import KernelConfig
from raylight.kernels.fused import fused_ops_enabled
from raylight.utils.kernel_builds import KernelBuilds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_SWITCHES = ("fused_kernels", "gemv", "custom_allreduce", "flashinfer_decode_tensor_cores")


def add_kernel_flags(p) -> None:
    """--[no-]fused-kernels, --[no-]gemv, --[no-]custom-allreduce, --[no-]flashinfer-decode-tensor-cores:
    the engine's kernel switches (unset: the engine's default; the RAYLIGHT_* env vars still override)."""
    import argparse

    for name in KERNEL_SWITCHES:
        p.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None)


def kernel_args(args) -> dict:
    return {k: getattr(args, k) for k in KERNEL_SWITCHES if getattr(args, k) is not None}


def fused_kernels_on(engine) -> bool:
    """Whether the engine's layers run the fused elementwise kernels."""
    return KernelConfig.from_args(engine.args).fused_kernels and fused_ops_enabled(engine.device)


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
    # The device machine gets a copy of the working tree whose .git may not be current: the commit
    # written into .device_commit before the run (git-ignored, carried to the device) wins there. Only
    # there (a machine with nvidia-smi): on the development machine the file outlives its device call,
    # and a CPU record stamped with it named a commit from hours before.
    stamp = os.path.join(REPO, ".device_commit")
    if os.path.exists(stamp) and shutil.which("nvidia-smi"):
        with open(stamp) as f:
            return f.read().strip()
    try:
        return subprocess.check_output(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def write_record(out_dir: str, prefix: str, record: dict) -> str:
    """One JSON file per benchmark run: {out_dir}/{prefix}-{timestamp}.json."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = prefix.replace("+", "-")  # e.g. the flashinfer+triton backend: plain file names travel everywhere
    path = os.path.join(out_dir, f"{prefix}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")
    return path


def measure_ceilings(device: torch.device) -> dict:
    """The two rates a floor is counted against, measured here (METHOD.md): device-to-device copy
    bandwidth (bytes read + written) and a large bf16 matrix product."""
    def timed(fn, reps=10):
        fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return float(np.median(times))

    src = torch.randn(2**29, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    src = dst = None
    n = 8192
    x, y = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_s = timed(lambda: x @ y)
    return dict(copy_bandwidth_GBps=2 * 2**30 / copy_s / 1e9, bf16_matmul_TFLOPs=2 * n**3 / mm_s / 1e12)


def model_counts(engine) -> dict:
    """Bytes a decode step must read (weights; the embedding table only when it is also the LM head)
    and FLOPs per token of the dense layers, for the floors."""
    a = engine.arch
    elem = torch.tensor([], dtype=engine.dtype).element_size()
    total = sum(p.numel() for p in engine.model.parameters())
    embed = a.vocab_size * a.hidden_size
    head = embed  # the LM head's matmul, tied or not
    body = total - embed - (0 if a.tie_word_embeddings else head)  # layers + norms
    kv_per_token = a.num_hidden_layers * 2 * a.num_key_value_heads * a.head_dim * elem
    return dict(decode_weight_bytes=(body + head) * elem, body_params=body, head_params=head,
                kv_bytes_per_token=kv_per_token, layers=a.num_hidden_layers, q_width=a.num_attention_heads * a.head_dim)


def attention_flops(counts: dict, ctx: int) -> int:
    """QK^T and PV for one query over ctx keys, every layer."""
    return 4 * counts["layers"] * counts["q_width"] * ctx


def prefill_flops(counts: dict, num_prompts: int, length: int) -> int:
    """Prefill of `num_prompts` fresh prompts of `length` tokens: the dense layers for every token,
    causal attention (query t sees t + 1 keys), and the LM head for each prompt's last token."""
    causal = 4 * counts["layers"] * counts["q_width"] * length * (length + 1) // 2
    return num_prompts * (length * 2 * counts["body_params"] + 2 * counts["head_params"] + causal)


def floors(counts: dict, ceil: dict, batch: int, in_len: int, out_len: int) -> dict:
    """Fixed workload: prefill FLOPs over the matrix rate, plus every decode step's
    max(bytes / bandwidth, FLOPs / matrix rate), summed over the steps."""
    bw, peak = ceil["copy_bandwidth_GBps"] * 1e9, ceil["bf16_matmul_TFLOPs"] * 1e12
    c = counts
    prefill = prefill_flops(c, batch, in_len)
    prefill_s = prefill / peak
    decode_s = 0.0
    for step in range(out_len - 1):
        ctx = in_len + step + 1
        by = c["decode_weight_bytes"] + batch * ctx * c["kv_bytes_per_token"]
        fl = batch * (2 * (c["body_params"] + c["head_params"]) + attention_flops(c, ctx))
        decode_s += max(by / bw, fl / peak)
    mid_ctx = in_len + out_len // 2
    step_bytes = c["decode_weight_bytes"] + batch * mid_ctx * c["kv_bytes_per_token"]
    return dict(prefill_flops=prefill, prefill_floor_s=prefill_s, decode_floor_s=decode_s,
                floor_s=prefill_s + decode_s, floor_output_tok_s=batch * out_len / (prefill_s + decode_s),
                decode_step_bytes_mid=step_bytes, decode_step_floor_s_mid=step_bytes / bw, mid_context=mid_ctx)


def measure_prefill(llm, vocab: int, num: int, length: int) -> dict:
    """Prefill-only throughput: `num` prompts of `length` tokens, one output token each."""
    from raylight import SamplingParams

    rng = np.random.default_rng(1)
    prompts = [rng.integers(100, vocab - 1, length).tolist() for _ in range(num)]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts[:2], one, use_tqdm=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(prompts, one, use_tqdm=False)
    torch.cuda.synchronize()
    return dict(prompts=num, prompt_len=length, seconds=time.perf_counter() - t0)


def graph_replay_times(engine, batch_sizes) -> dict:
    """GPU time of one decode forward replayed from its CUDA graph (no host work), per batch size:
    what a decode step would cost if the host kept up."""
    graphs = engine.runner.graphs
    if graphs is None:
        return {}
    out = {}
    for b in batch_sizes:
        size = next((s for s in graphs.sizes if s >= b), None)
        if size is None:
            continue
        g = graphs.graphs[size].graph
        g.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        out[size] = start.elapsed_time(end) / 20 / 1e3
    return out


# Named workloads (`--preset`): the GPU figures, each one command. Random prompt ids, EOS
# ignored, greedy. `--save-workload` writes the requests for the vLLM probe (scripts/peer_vllm_offline.py).
PRESETS = {
    "w1": dict(model_config="llama-3.2-1b", fixed=True, num_requests=256, input_len=512, output_len=256,
               max_model_len=4096),
    "b1": dict(model_config="llama-3.1-8b", fixed=True, num_requests=1, input_len=128, output_len=256,
               max_model_len=4096),
    "b8": dict(model_config="llama-3.1-8b", fixed=True, num_requests=8, input_len=128, output_len=256,
               max_model_len=4096),
    "b32": dict(model_config="llama-3.1-8b", fixed=True, num_requests=32, input_len=128, output_len=256,
                max_model_len=4096),
    "long": dict(model_config="llama-3.2-1b", fixed=True, num_requests=32, input_len=8192, output_len=128,
                 max_model_len=8448),
    "sharegpt": dict(model_config="llama-3.2-1b", fixed=False, num_requests=1024, max_model_len=8192),
}
# The sharegpt preset's mix (raylight/testing/workloads.py): prompts lognormal around 256 tokens with a
# tail to 6,144 (about 1% past 4,096), outputs around 150 up to 768.
SHAREGPT_MIX = dict(prompt_median=256, prompt_range=(4, 6144))


def load_workload_file(path: str) -> tuple[str, list[list[int]], list[int]]:
    """A workload saved as JSON: {"name", "prompts": [[ids]], "output_lens": [n]}."""
    with open(path) as f:
        w = json.load(f)
    return w.get("name", os.path.basename(path)), w["prompts"], w["output_lens"]


def make_workload(args, vocab: int):
    if args.workload_file:
        _, prompts, out_lens = load_workload_file(args.workload_file)
        return prompts, out_lens
    if args.preset == "sharegpt":
        from raylight.testing.workloads import sharegpt_like

        return sharegpt_like(args.num_requests, args.seed, vocab, **SHAREGPT_MIX)
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


def first_requests(llm, prompts, vocab: int, n: int = 3, new_tokens: int = 32) -> dict:
    """The latency of the first requests after the engine is ready (each alone: one prompt of the
    workload's first prompt's length, other token ids, `new_tokens` out): the first one against the
    later ones shows whether a user's first request pays for start-up work."""
    from raylight import SamplingParams

    rng = np.random.default_rng(12345)
    length = min(len(prompts[0]), llm.engine.max_model_len - new_tokens)
    sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    times = []
    for _ in range(n):
        ids = rng.integers(100, vocab - 1, length).tolist()
        t0 = time.perf_counter()
        llm.generate([ids], sp, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return dict(prompt_len=length, new_tokens=new_tokens, seconds=times, first_s=times[0],
                steady_s=float(np.median(times[1:])) if n > 1 else None)


def run_ours(args, prompts, out_lens):
    from raylight import LLM, SamplingParams

    t0 = time.perf_counter()
    engine_args = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       device=args.device, attention_backend=args.attention_backend,
                       enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
                       max_piecewise_graph_tokens=args.max_piecewise_graph_tokens,
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       num_microbatches=args.num_microbatches,
                       async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
                       **kernel_args(args))
    if args.dummy:
        engine_args["load_format"] = "dummy"
    llm = LLM(args.model_config if args.dummy and args.model_config else args.model, **engine_args)
    ready_s = time.perf_counter() - t0  # time-to-ready: load, KV profiling, CUDA graph capture, warm-up
    builds = KernelBuilds().start()  # from here on, every kernel built is one a request waited for
    first = first_requests(llm, prompts, vocab=llm.engine.arch.vocab_size)
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in out_lens]
    # Warm-up prompts of the same lengths but other tokens: the measured prompts must not hit the prefix cache.
    warm = [p[::-1] for p in prompts[:2]]
    llm.generate(warm, [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)] * len(warm),
                 use_tqdm=False)  # warm-up
    warm_steps = llm.get_metrics()["num_steps"]
    host = time_host_phases(llm.engine)
    pieces = llm.engine.runner.piecewise
    replays_before = pieces.num_replays if pieces is not None else 0
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    elapsed = time.perf_counter() - t0
    kernel_builds = builds.stop()
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(out_lens), (produced, sum(out_lens))
    m = llm.get_metrics()
    e = llm.engine
    kernels = KernelConfig.from_args(e.args)  # what the engine's model was built with (args and env)
    steps = list(e.step_log)[len(e.step_log) - (m["num_steps"] - warm_steps):]
    return llm, dict(elapsed_s=elapsed, output_tokens=produced, output_tok_s=produced / elapsed,
                     total_tok_s=(produced + sum(map(len, prompts))) / elapsed, ready_s=ready_s,
                     warmup_s=e.warmup_s, first_requests=first, kernel_builds_after_ready=kernel_builds,
                     cuda_graph_capture_s=e.graph_capture_s, cuda_graphs=e.runner.graphs is not None,
                     piecewise_graph_tokens=pieces.max_tokens if pieces is not None else 0,
                     piecewise_replays=pieces.num_replays - replays_before if pieces is not None else 0,
                     engine_steps=m["num_steps"], preemptions=m["preemptions"], kv_blocks=e.num_blocks,
                     async_scheduling=e.async_scheduling, max_num_batched_tokens=e.args.max_num_batched_tokens,
                     fused_kernels=fused_kernels_on(e), max_num_seqs=e.args.max_num_seqs,
                     **{k: getattr(kernels, k) for k in ("gemv_max_rows", "pdl", "gemv_prefetch", "rope_kv")},
                     fi_decode_tensor_cores=getattr(e.attn_backend, "_use_tensor_cores", None),
                     phases=phase_times(steps),
                     host_ms_per_step={k: v * 1e3 / max(1, len(steps)) for k, v in host.items()},
                     gpu_memory=gpu_memory(e))


def gpu_memory(engine) -> "dict | None":
    """Where the GPU's memory went, after the run, against the engine's cap (gpu_memory_utilization x
    the card): the KV cache, the piecewise graphs' pool, and the whole device's use (the caching
    allocator keeps what the run's peak took, so this bounds the peak from below). None off CUDA."""
    if engine.device.type != "cuda":
        return None
    import torch

    free, total = torch.cuda.mem_get_info(engine.device)
    cap = engine.args.gpu_memory_utilization * total
    pieces = engine.runner.piecewise
    gib = 2 ** 30
    return dict(total_gib=total / gib, cap_gib=cap / gib, used_after_run_gib=(total - free) / gib,
                within_cap=total - free <= cap, kv_cache_gib=sum(c.nbytes for c in engine.kv_caches) / gib,
                piecewise_pool_gib=pieces.memory_bytes / gib if pieces is not None else 0.0,
                piecewise_inputs_unowned=getattr(pieces, "inputs_unowned", None),
                # the caching allocator's side of it: reserved beyond allocated is its cache (fragments of
                # earlier steps' sizes); the device's use beyond reserved is outside PyTorch (CUDA context,
                # cuBLAS/FlashInfer workspaces, NCCL)
                allocated_gib=torch.cuda.memory_allocated(engine.device) / gib,
                reserved_gib=torch.cuda.memory_reserved(engine.device) / gib,
                peak_allocated_gib=torch.cuda.max_memory_allocated(engine.device) / gib,
                peak_reserved_gib=torch.cuda.max_memory_reserved(engine.device) / gib)


def wrap_timed(obj, name: str, label: str, totals: dict[str, float]) -> None:
    """Replaces obj.name with a wrapper that adds each call's wall time to totals[label] (seconds)."""
    fn = getattr(obj, name)
    totals[label] = 0.0

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            totals[label] += time.perf_counter() - t

    setattr(obj, name, wrapper)


def time_host_phases(engine) -> dict[str, float]:
    """Wraps the engine's step phases with timers; returns the running totals (seconds). `collect`
    includes the wait for the device: near zero means the host is the bottleneck, the step's GPU
    time minus the host's work means the device is."""
    totals: dict[str, float] = {}
    wrap_timed(engine.scheduler, "schedule", "schedule", totals)
    # prepare, attention plan, sampling metadata, kernel launches
    wrap_timed(engine.runner, "launch", "launch", totals)
    wrap_timed(engine.runner, "collect", "collect_incl_device_wait", totals)
    wrap_timed(engine.scheduler, "update", "update", totals)
    wrap_timed(engine.outputs, "process", "outputs", totals)
    return totals


def phase_times(step_log) -> dict:
    """Median wall time of decode-only steps per batch size, and of prefill-only steps (no decodes)."""
    decode: dict[int, list[float]] = {}
    prefill_tokens, prefill_s = 0, 0.0
    for reqs, tokens, decodes, secs in step_log:
        if decodes == reqs:
            decode.setdefault(reqs, []).append(secs)
        elif decodes == 0:
            prefill_tokens += tokens
            prefill_s += secs
    top = sorted(decode, key=lambda b: -len(decode[b]))[:3]
    # Every step that computes prompt tokens, in order: (tokens, decode rows, ms).
    prompt_steps = [(tokens, decodes, round(secs * 1e3, 2)) for reqs, tokens, decodes, secs in step_log
                    if decodes != reqs]
    return dict(decode_step_s_by_batch={b: float(np.median(decode[b])) for b in sorted(top)},
                decode_steps_by_batch={b: len(decode[b]) for b in sorted(top)},
                decode_only_s=float(sum(sum(v) for v in decode.values())),
                prefill_only_tokens=prefill_tokens, prefill_only_s=prefill_s,
                prompt_steps=prompt_steps, prompt_steps_s=sum(ms for _, _, ms in prompt_steps) / 1e3)


def hf_model_sharing_our_weights(llm):
    """An HF `LlamaForCausalLM` whose parameters are views of our engine's (dummy or loaded) weights:
    same numbers, no second copy in device memory. q/k/v and gate/up are slices of our merged ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from raylight.models.config import PRESETS

    engine = llm.engine
    name = engine.model_name
    if name in PRESETS:
        cfg = LlamaConfig(**{k: v for k, v in PRESETS[name].items() if k not in ("architectures", "torch_dtype")})
    else:
        cfg = LlamaConfig.from_pretrained(engine.model_path)
    with torch.device(engine.device):
        hf = LlamaForCausalLM(cfg).to(engine.dtype).eval()
    ours = dict(engine.model.named_parameters())
    a = engine.arch
    q, kv, inter = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim, a.intermediate_size
    state = {}
    for n, p in ours.items():
        if ".qkv_proj." in n:
            for part, (lo, hi) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv))):
                state[n.replace(".qkv_proj.", f".{part}_proj.")] = p[lo:hi]
        elif ".gate_up_proj." in n:
            state[n.replace(".gate_up_proj.", ".gate_proj.")] = p[:inter]
            state[n.replace(".gate_up_proj.", ".up_proj.")] = p[inter:]
        else:
            state[n] = p
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    torch.cuda.empty_cache() if engine.device.type == "cuda" else None
    return hf


@torch.inference_mode()
def run_hf(args, llm, prompts, out_lens):
    dev = llm.engine.device
    model = hf_model_sharing_our_weights(llm)
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
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="default: the engine's (1024 on a GPU of 70 GiB or more)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="default: the engine's (16384 on a GPU of 70 GiB or more)")
    p.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--max-piecewise-graph-tokens", type=int, default=None,
                   help="largest step replayed from piecewise CUDA graphs (0: none; default: the engine's)")
    p.add_argument("--num-microbatches", type=int, default=None, help="steps in flight over disjoint requests")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="lower it to leave room for the HF peer on the same GPU")
    add_kernel_flags(p)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named workload (dummy weights of its model shape); explicit flags still override")
    p.add_argument("--workload-file", default=None, help="prompts and output lengths from a JSON file "
                   "({name, prompts, output_lens}), e.g. one written by --save-workload")
    p.add_argument("--save-workload", default=None, help="write the workload to this JSON file and go on")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)
    if args.preset:
        # A preset fills in what the command line left at its default.
        defaults = p.parse_args([])
        for k, v in PRESETS[args.preset].items():
            if getattr(args, k) == getattr(defaults, k):
                setattr(args, k, v)
        args.dummy = True
    if args.num_requests is None:
        args.num_requests = 32 if args.fixed else 64

    from raylight.models.loader import resolve_model

    vocab = resolve_model(args.model_config if args.dummy and args.model_config else args.model,
                          "dummy" if args.dummy else "auto").arch.vocab_size
    prompts, out_lens = make_workload(args, vocab)
    if args.workload_file:
        args.fixed, args.num_requests = False, len(prompts)
    if args.save_workload:
        with open(args.save_workload, "w") as f:
            json.dump(dict(name=args.preset or "workload", seed=args.seed, prompts=prompts,
                           output_lens=[int(o) for o in out_lens]), f)
    llm, ours = run_ours(args, prompts, out_lens)
    fr, kb = ours["first_requests"], ours["kernel_builds_after_ready"]
    print(f"ready in {ours['ready_s']:.1f}s (warm-up {ours['warmup_s']:.1f}s); first request "
          f"{fr['first_s'] * 1e3:.0f} ms, then {fr['steady_s'] * 1e3:.0f} ms ({fr['prompt_len']} in, "
          f"{fr['new_tokens']} out); kernels built after ready: triton {kb['triton']} {kb['triton_kernels']}, "
          f"flashinfer {kb['flashinfer']}")
    print(f"raylight: {ours['output_tok_s']:.1f} output tok/s ({ours['output_tokens']} tokens in "
          f"{ours['elapsed_s']:.1f}s, {ours['engine_steps']} steps, {ours['piecewise_replays']} from piecewise graphs "
          f"up to {ours['piecewise_graph_tokens']} tokens; graphs captured in {ours['cuda_graph_capture_s']:.1f}s)")
    if ours["gpu_memory"]:
        g = ours["gpu_memory"]
        print(f"GPU memory after the run: {g['used_after_run_gib']:.1f} GiB used of a {g['cap_gib']:.1f} GiB cap "
              f"({'within' if g['within_cap'] else 'PAST'} it); KV cache {g['kv_cache_gib']:.1f} GiB, piecewise "
              f"graphs' pool {g['piecewise_pool_gib']:.2f} GiB (inputs unowned: {g['piecewise_inputs_unowned']}); "
              f"allocator: {g['allocated_gib']:.1f} allocated, {g['reserved_gib']:.1f} reserved, peaks "
              f"{g['peak_allocated_gib']:.1f} / {g['peak_reserved_gib']:.1f} GiB")
    ph = ours["phases"]
    print(f"steps with prompt tokens: {len(ph['prompt_steps'])} in {ph['prompt_steps_s']:.3f}s "
          f"(tokens, decode rows, ms): {ph['prompt_steps'][:24]}; decode-only steps {ph['decode_only_s']:.3f}s")
    print("host per step (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in ours["host_ms_per_step"].items()))
    hf = None
    if not args.skip_hf:
        hf = run_hf(args, llm, prompts, out_lens)
        print(f"HF generate (static batches of {args.hf_batch_size}): {hf['output_tok_s']:.1f} useful output tok/s "
              f"({hf['elapsed_s']:.1f}s)")
        print(f"ratio raylight / HF: {ours['output_tok_s'] / hf['output_tok_s']:.2f}x")

    analysis = None
    if llm.engine.device.type == "cuda":
        # Floors and rates, measured and counted in the same run (after both engines, so neither is disturbed).
        ceil = measure_ceilings(llm.engine.device)
        counts = model_counts(llm.engine)
        analysis = dict(ceilings=ceil, counts=counts)
        if args.fixed:
            fl = floors(counts, ceil, args.num_requests, args.input_len, args.output_len)
            analysis["floors"] = fl
            analysis["fraction_of_floor"] = ours["output_tok_s"] / fl["floor_output_tok_s"]
            dec = ours["phases"]["decode_step_s_by_batch"]
            if args.num_requests in dec:
                analysis["decode_step_s_at_full_batch"] = dec[args.num_requests]
                analysis["decode_step_floor_fraction"] = fl["decode_step_floor_s_mid"] / dec[args.num_requests]
        # Replays run on whatever the KV holds now (contexts as the graph's metadata last saw them).
        analysis["graph_replay_s"] = graph_replay_times(llm.engine, sorted({1, args.num_requests}))
        pf = measure_prefill(llm, vocab, num=min(args.num_requests, 32), length=args.input_len)
        pf["mfu"] = prefill_flops(counts, pf["prompts"], pf["prompt_len"]) / pf["seconds"] / (ceil["bf16_matmul_TFLOPs"] * 1e12)
        pf["tokens_per_s"] = pf["prompts"] * pf["prompt_len"] / pf["seconds"]
        analysis["prefill"] = pf
        print(f"ceilings: copy {ceil['copy_bandwidth_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOPs']:.0f} "
              f"TFLOP/s; prefill MFU {pf['mfu']:.1%}; ready in {ours['ready_s']:.1f}s")
        if "floors" in analysis:
            print(f"floor {analysis['floors']['floor_output_tok_s']:.0f} output tok/s; we reach "
                  f"{analysis['fraction_of_floor']:.1%}")
        for b, t in analysis["graph_replay_s"].items():
            print(f"decode forward alone (graph replay) at batch {b}: {t * 1e3:.2f} ms")
        if "decode_step_s_at_full_batch" in analysis:
            print(f"decode step at batch {args.num_requests}: {analysis['decode_step_s_at_full_batch'] * 1e3:.2f} ms, "
                  f"floor {analysis['floors']['decode_step_floor_s_mid'] * 1e3:.2f} ms "
                  f"({analysis['decode_step_floor_fraction']:.1%})")

    workload = args.preset or ("fixed" if args.fixed else "mixed")
    record = dict(
        benchmark="bench_throughput", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        commit=git_commit(), device=device_name(str(llm.engine.device)), torch=torch.__version__,
        model=llm.engine.model_name, dtype=str(llm.engine.dtype).replace("torch.", ""),
        attention_backend=llm.engine.attn_backend.name,
        workload=dict(name=workload, num_requests=args.num_requests, seed=args.seed,
                      input_lens=[args.input_len] * 2 if args.fixed else [min(map(len, prompts)), max(map(len, prompts))],
                      output_lens=[args.output_len] * 2 if args.fixed else [min(out_lens), max(out_lens)],
                      workload_file=os.path.basename(args.workload_file) if args.workload_file else None,
                      total_prompt_tokens=sum(map(len, prompts)), total_output_tokens=sum(out_lens),
                      ignore_eos=True),
        raylight=ours, peer_hf_generate=hf, analysis=analysis,
        ratio_vs_hf=(ours["output_tok_s"] / hf["output_tok_s"]) if hf else None,
        command=" ".join(sys.argv),
    )
    dev = "gpu" if llm.engine.device.type == "cuda" else "cpu"
    write_record(args.out, f"throughput-{dev}-{workload}-{args.attention_backend}", record)


if __name__ == "__main__":
    main()
