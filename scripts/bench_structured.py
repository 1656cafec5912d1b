#!/usr/bin/env python
"""The sampler's cost with grammars on (structured outputs) against the same steps without grammars.

Each step: logits [B, V] from a dummy LM head of the preset (random bf16/fp32 weights, the model's
vocabulary and hidden size), then the batched sampler. With grammars, every row follows its own
xgrammar matcher of a JSON schema (nested objects, arrays, enums, bounded numbers): the engine's own
code fills the step's bitmask on the host (raylight/structured/manager.py, several threads from 8
rows), copies it to the device, the sampler applies it per row (raylight/workers/token_mask.py), and
the matchers take the sampled tokens. A matcher whose JSON is complete starts over, so every step
has B constrained rows. Without grammars the same sampler runs on the same logits. Reports the
median time per step (the device synchronised after each) at each batch size, the overhead, and
its parts (host fill, copy + apply inside the sampler, matcher advance).

The preset has no tokenizer: the grammar compiles against a synthetic byte-level vocabulary of the
preset's size (256 single bytes, then deterministic 2-8 character pieces of letters, digits, spaces
and JSON punctuation), so mask sizes and matcher work are of the right order, not a given model's.
Needs xgrammar only (and torch). Writes one JSON under benchmarks/results/.

    python scripts/bench_structured.py --device cpu
    python scripts/bench_structured.py --device cuda --model llama-3.1-8b
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import REPO, device_name, git_commit, write_record  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "score": {"type": "number", "minimum": -10, "maximum": 10},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "black"]}, "maxItems": 6},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "active": {"type": "boolean"}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}


def synthetic_vocab(size: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,:;\"'{}[]"
    vocab = [chr(i) if 32 <= i < 127 else f"<0x{i:02X}>" for i in range(256)]
    seen = set(vocab)
    while len(vocab) < size:
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8)))
        if piece not in seen:
            seen.add(piece)
            vocab.append(piece)
    return vocab


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default=None, help="model preset (default: llama-3.2-1b; its 128K vocabulary)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--steps", type=int, default=None, help="measured steps per case (default 200 on cuda, 60 on cpu)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy rows")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)

    import xgrammar as xgr

    from raylight.models.config import PRESETS
    from raylight.sampling_params import SamplingParams
    from raylight.structured.compiler import GrammarCompileService
    from raylight.structured.manager import StructuredOutputManager
    from raylight.utils.structured_params import StructuredOutputsParams
    from raylight.utils.host_copy import to_device
    from raylight.workers import token_mask
    from raylight.workers.sampler import Sampler
    from raylight.workers.sampling_state import SamplingState

    model = args.model or "llama-3.2-1b"
    arch = PRESETS[model]
    V, H = arch["vocab_size"], arch["hidden_size"]
    eos = arch["eos_token_id"] if isinstance(arch["eos_token_id"], int) else arch["eos_token_id"][0]
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    steps = args.steps or (200 if dev.type == "cuda" else 60)
    torch.manual_seed(0)
    lm_head = torch.randn(V, H, dtype=dtype, device=dev) * H ** -0.5  # dummy weights of the preset's LM head

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(synthetic_vocab(V), vocab_type=xgr.VocabType.RAW, vocab_size=V, stop_token_ids=[eos])
    service = GrammarCompileService(None, V, [eos])
    service.use_tokenizer_info(info)
    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    grammar = service.compile(spec)
    compile_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=10**6, temperature=args.temperature, structured_outputs=spec)
    sampler = Sampler(dev, 0)
    state = SamplingState(V, dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    results = []
    for B in args.batch_sizes:
        seqs = [SimpleNamespace(request_id=f"s{i}", output_token_ids=[], is_finished=False) for i in range(B)]
        restarts = [0]

        def rows():
            return [SimpleNamespace(request_id=s.request_id, seq_id=s.request_id, params=params,
                                    num_output_tokens=len(s.output_token_ids), output_token_ids=s.output_token_ids,
                                    prompt_token_ids=[], eos_token_ids=frozenset([eos])) for s in seqs]

        manager = StructuredOutputManager(service, V)
        for s in seqs:
            manager.register([s.request_id], grammar)
        meta_rows = rows()
        base_meta = state.metadata(meta_rows)

        def step(constrained: bool, parts: dict):
            hidden = torch.randn(B, H, dtype=dtype, device=dev)
            logits = (hidden @ lm_head.T).float()
            sync()
            t = time.perf_counter()
            meta = state.metadata(meta_rows)
            if constrained:
                got = manager.bitmask(rows())
                t1 = time.perf_counter()
                idx, mask = got
                meta.token_mask = (to_device(torch.tensor(idx, dtype=torch.long), dev), to_device(mask, dev))
            out = sampler(logits, meta)
            ids = out.token_ids.tolist()  # the step's one host sync, as the engine's collect
            t2 = time.perf_counter()
            if constrained:
                changed = []
                for s, tok in zip(seqs, ids):
                    s.output_token_ids.append(tok)
                    changed.append((s, tok))
                done = {id(x) for x in manager.advance(changed)}
                for s in seqs:  # a complete JSON (or its EOS) starts over with a fresh matcher
                    if id(s) in done or s.output_token_ids[-1] == eos:
                        manager.release(s.request_id)
                        s.request_id = f"{s.request_id.split('.')[0]}.{len(s.output_token_ids)}"
                        s.output_token_ids = []
                        manager.register([s.request_id], grammar)
                        restarts[0] += 1
                t3 = time.perf_counter()
                parts["fill"].append(t1 - t)
                parts["sample"].append(t2 - t1)
                parts["advance"].append(t3 - t2)
                return t3 - t
            return t2 - t

        case = {"batch_size": B}
        for constrained in (False, True):
            parts = {"fill": [], "sample": [], "advance": []}
            for _ in range(args.warmup):
                step(constrained, parts)
            parts = {"fill": [], "sample": [], "advance": []}
            times = [step(constrained, parts) for _ in range(steps)]
            key = "grammar" if constrained else "plain"
            case[f"{key}_step_ms"] = round(statistics.median(times) * 1e3, 4)
            if constrained:
                case["grammar_parts_ms"] = {k: round(statistics.median(v) * 1e3, 4) for k, v in parts.items()}
        case["overhead_ms"] = round(case["grammar_step_ms"] - case["plain_step_ms"], 4)
        case["overhead_per_row_us"] = round(case["overhead_ms"] * 1e3 / B, 2)
        case["completed_jsons"] = restarts[0]
        results.append(case)
        print(f"batch {B:3d}: sampler {case['plain_step_ms']:.3f} ms/step plain, {case['grammar_step_ms']:.3f} ms/step "
              f"with grammars (+{case['overhead_ms']:.3f} ms; fill {case['grammar_parts_ms']['fill']:.3f}, "
              f"copy+sample {case['grammar_parts_ms']['sample']:.3f}, advance {case['grammar_parts_ms']['advance']:.3f}); "
              f"{restarts[0]} JSON objects completed", flush=True)
        del base_meta

    record = {
        "benchmark": "structured-outputs-sampler", "device": device_name(args.device), "date":
        datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
        "workload": {"model_preset": model, "vocab_size": V, "hidden_size": H, "logits_dtype_in": str(dtype),
                     "schema": SCHEMA, "disable_any_whitespace": True, "temperature": args.temperature,
                     "steps": steps, "warmup": args.warmup, "vocabulary": "synthetic byte-level (see script)"},
        "figures": {"compile_s": round(compile_s, 4), "bitmask_apply_backend": token_mask._backend,
                    "xgrammar": getattr(xgr, "__version__", None), "torch": torch.__version__, "cases": results},
    }
    write_record(args.out, f"structured-{args.device}", record)


if __name__ == "__main__":
    main()
