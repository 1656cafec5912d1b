"""workers/piecewise_graphs.py on a CUDA GPU: a step replayed from the piecewise graphs (padded token
count, attention eager between the pieces) computes what the eager forward computes, and the engine's
greedy output with them equals the engine's without them (float32, token for token)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylight import LLM, SamplingParams
from raylight.kernels.attention import CommonAttentionMetadata
from raylight.testing.helpers import random_prompts
from raylight.workers.piecewise_graphs import piecewise_sizes

pytestmark = pytest.mark.gpu


def _engine(gpu_llama_dir, backend, budget=256, **kw):
    return LLM(gpu_llama_dir, dtype="float32" if backend == "triton" else "bfloat16", device="cuda",
               max_num_batched_tokens=budget, attention_backend=backend, num_kv_blocks=1024,
               max_cuda_graph_batch_size=16, **kw)


@pytest.mark.parametrize("backend", ["triton", "auto"])
@torch.inference_mode()
def test_replayed_step_equals_the_eager_forward(gpu_llama_dir, backend, monkeypatch):
    # auto: FlashInfer takes prefill rows over 64+ tokens of context here (its `long` role), Triton the rest.
    monkeypatch.setenv("RAYLIGHT_LONG_PREFILL_MIN_CONTEXT", "64")
    llm = _engine(gpu_llama_dir, backend)
    eng = llm.engine
    pw = eng.runner.piecewise
    assert pw is not None and pw.sizes == piecewise_sizes(256) and pw.sizes[-1] == 256
    assert all(len(p.calls) == len(eng.kv_caches) for p in pw.pieces.values())
    dev = eng.device
    bs = eng.args.block_size
    # Two decodes (contexts 40 and 130) and two prefill chunks (one fresh, one on a 70-token prefix):
    # 2 + 57 + 33 = 92 tokens, replayed from the 96-token graph.
    rng = np.random.default_rng(0)
    q_lens = np.array([1, 1, 57, 33])
    seq_lens = np.array([40, 130, 57, 103])
    tables = np.arange(4 * 16, dtype=np.int64).reshape(4, 16)  # blocks no request holds
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    positions = np.concatenate([np.arange(s - q, s) for s, q in zip(seq_lens, q_lens)])
    req = np.repeat(np.arange(4), q_lens)
    slots = tables[req, positions // bs] * bs + positions % bs
    ids = torch.from_numpy(rng.integers(0, 512, qsl[-1])).to(dev)
    pos = torch.from_numpy(positions).to(dev)
    common = CommonAttentionMetadata(num_decodes=2, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
                                     slot_mapping=torch.from_numpy(slots).to(dev))
    for cache in eng.kv_caches:  # the contexts' earlier tokens: any finite values
        cache[:64].normal_()
    want = eng.model(ids, pos, eng.kv_caches, eng.attn_backend.build(common)).clone()
    before = pw.num_replays
    got = pw.run(ids, pos, eng.attn_backend.build(common))
    assert pw.num_replays == before + 1 and got.shape == want.shape
    tol = 1e-4 if backend == "triton" else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for cache in eng.kv_caches:
        cache[:64].zero_()
    del llm
    torch.cuda.empty_cache()


@torch.inference_mode()
def test_engine_greedy_output_equals_the_engine_without_piecewise_graphs(gpu_llama_dir):
    # Prompts over the 128-token budget run in chunks beside other requests' decodes: every kind of step
    # (the model's window is 512 tokens).
    prompts = random_prompts(24, 512, 5, 400, seed=3)
    params = [SamplingParams(temperature=0.0, max_tokens=24 + (i % 5) * 8, ignore_eos=True)
              for i in range(len(prompts))]
    outs = {}
    for tokens in (None, 0):
        llm = _engine(gpu_llama_dir, "triton", budget=128, max_piecewise_graph_tokens=tokens)
        pw = llm.engine.runner.piecewise
        assert (pw is None) == (tokens == 0)
        outs[tokens] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if pw is not None:
            assert pw.num_replays > 0 and llm.engine.runner.graphs.num_replays > 0
        del llm
        torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(outs[None], outs[0]))
    assert same == len(prompts), f"{same}/{len(prompts)} requests equal"


def _qkv_bytes_per_token(llm) -> int:
    """Bytes of one token's q, k and v over all layers (what the capture would keep per token count if it
    held every layer's attention inputs)."""
    cfg = llm.engine.model.config
    elem = torch.empty((), dtype=llm.engine.kv_caches[0].dtype).element_size()
    return (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim * elem * cfg.num_hidden_layers


@torch.inference_mode()
def test_the_graphs_pool_keeps_no_layers_attention_inputs_and_the_engine_stays_under_its_memory_cap():
    # Llama-3.2-1B's shape, random weights. A step of up to 2,048 tokens from the graphs: kept alive, every
    # layer's q, k, v of every captured count would take sum(sizes) x 16 layers x 6 KiB (~1.1 GiB).
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    cap = (total - free + 8 * 2**30) / total  # weights (~2.5 GiB), activations, the rest KV
    llm = LLM("llama-3.2-1b", load_format="dummy", device="cuda", max_num_batched_tokens=4096,
              max_piecewise_graph_tokens=2048, max_model_len=4096, gpu_memory_utilization=cap)
    pw = llm.engine.runner.piecewise
    held_if_kept = sum(pw.sizes) * _qkv_bytes_per_token(llm)
    one_layer_at_max = pw.max_tokens * _qkv_bytes_per_token(llm) // llm.engine.model.config.num_hidden_layers
    print(f"pool {pw.memory_bytes / 2**20:.0f} MiB; every layer's q/k/v of every count {held_if_kept / 2**20:.0f} MiB;"
          f" one layer's at {pw.max_tokens} tokens {one_layer_at_max / 2**20:.0f} MiB")
    # Besides one layer's q/k/v at a time the pool holds what passes between the pieces (each layer's
    # attention output and residual at every count): 464 MiB on an H100 against 1,224 if q/k/v were kept.
    assert pw.inputs_unowned and pw.memory_bytes < held_if_kept / 2
    # Steps of every kind (4,096-token prefills run eagerly, shorter ones and mixed steps from the pieces,
    # decodes from the decode graphs); the caching allocator keeps what the peak took, so the GPU's use
    # afterwards bounds it from below.
    prompts = random_prompts(48, 32000, 16, 3500, seed=5)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs) and pw.num_replays > 0
    free, total = torch.cuda.mem_get_info()
    slack = 512 * 2**20  # the CUDA context's own growth, allocator rounding
    assert total - free <= cap * total + slack, (
        f"{(total - free) / 2**30:.2f} GiB in use against a cap of {cap * total / 2**30:.2f} GiB")
    del llm, outs
    torch.cuda.empty_cache()
