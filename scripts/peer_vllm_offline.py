#!/usr/bin/env python
"""vLLM (the peer) on a saved workload: the same prompt ids and output lengths our bench ran.

`scripts/bench_throughput.py --preset sharegpt --save-workload W.json` (or `--preset long`) writes the
workload; this runs it through vLLM's offline `LLM` with dummy weights of the same model shape, greedy,
EOS ignored, after a short untimed warm-up, and prints one JSON line (`{"m": ...}`) per run. Seconds
are those of the timed `generate()` alone, as in our bench. Runs on the GPU machine with the peer's
site alone on the path: `PYTHONPATH=/root/peer/site python3 scripts/peer_vllm_offline.py W.json`
(../shared/peers/vllm/README.md installs it). Imports nothing of ours: vLLM's packages and ours are
never mixed in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import time

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1"),
               ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_k, _v)

# The shapes of our presets (raylight/models/registry.py), as HF configs vLLM can build.
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def model_dir(shape: str, max_len: int) -> str:
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, rope_theta=500000.0,
               rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, mlp_bias=False, torch_dtype="bfloat16",
               bos_token_id=128000, eos_token_id=128001, max_position_embeddings=max_len, **SHAPES[shape])
    path = f"/tmp/peer_{shape}_{max_len}"
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workload", help="JSON {name, prompts, output_lens}")
    p.add_argument("--model-config", default="llama-3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--max-model-len", type=int, default=None, help="default: the longest request, rounded up")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: vLLM's")
    p.add_argument("--runs", type=int, default=1)
    a = p.parse_args()

    import torch
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    with open(a.workload) as f:
        w = json.load(f)
    prompts, out_lens = w["prompts"], w["output_lens"]
    longest = max(len(x) + o for x, o in zip(prompts, out_lens))
    max_len = a.max_model_len or -(-longest // 256) * 256
    kw = dict(model=model_dir(a.model_config, max_len), skip_tokenizer_init=True, load_format="dummy",
              dtype="bfloat16", seed=0, max_model_len=max_len, gpu_memory_utilization=a.gpu_memory_utilization)
    if a.max_num_seqs:
        kw["max_num_seqs"] = a.max_num_seqs
    if a.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = a.max_num_batched_tokens
    t = time.perf_counter()
    llm = LLM(**kw)
    init_s = time.perf_counter() - t
    sched = llm.llm_engine.vllm_config.scheduler_config
    print(json.dumps(dict(m="vllm_engine", vllm=vllm.__version__, torch=torch.__version__,
                          gpu=torch.cuda.get_device_name(), init_s=round(init_s, 1), max_model_len=max_len,
                          max_num_seqs=sched.max_num_seqs, max_num_batched_tokens=sched.max_num_batched_tokens)),
          flush=True)
    # Warm-up on other ids (reversed prompts: no prefix-cache hits for the timed run), as our bench does.
    warm = [TokensPrompt(prompt_token_ids=x[::-1]) for x in prompts[:2]]
    llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False),
                 use_tqdm=False)
    reqs = [TokensPrompt(prompt_token_ids=x) for x in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True, detokenize=False) for o in out_lens]
    for run in range(a.runs):
        if run:
            llm.reset_prefix_cache()  # a repeat must not hit the previous run's prompts
        t = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        dt = time.perf_counter() - t
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps(dict(m=f"vllm_{w.get('name', 'workload')}_run{run}", requests=len(outs),
                              prompt_tokens=sum(map(len, prompts)), output_tokens=produced,
                              expected_output_tokens=sum(out_lens), seconds=round(dt, 3),
                              out_tok_s=round(produced / dt, 1))), flush=True)


if __name__ == "__main__":
    main()
