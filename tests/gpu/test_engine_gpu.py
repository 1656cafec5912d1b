"""The engine on a CUDA GPU, every attention backend, with and without CUDA graphs: greedy bf16
output agrees with HF's (teacher-forced: HF's top-1 given our prefix), and the KV cache is sized
from gpu_memory_utilization after a profiling pass."""

from __future__ import annotations

import pytest
import torch

from raylight import LLM, SamplingParams

from ..conftest import make_random_hf_model, random_prompts

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama-gpu"))
    # head_dim 64 (256 / 4): a size every GPU backend supports
    make_random_hf_model("llama", path, hidden_size=256, intermediate_size=512)
    return path


NEAR_TIE = 1e-2  # the bound on HF's top-1 minus our token's logit, for any mismatch


@pytest.mark.parametrize("backend,eager", [("torch", True), ("triton", False), ("triton", True),
                                           ("flashinfer", False), ("flashinfer", True)])
@torch.inference_mode()
def test_bf16_greedy_agrees_with_hf(model_dir, backend, eager):
    from transformers import AutoModelForCausalLM

    if backend != "torch":
        pytest.importorskip(backend)
    # 13 prompts: decode batches 13, then fewer as they finish, pad to the captured sizes 16, 8, 4...
    prompts = random_prompts(13, 512, 5, 60, seed=2)
    max_tokens = [64 - 3 * (i % 4) for i in range(len(prompts))]
    # Memory-based sizing is tested once (torch); the rest fix the pool so earlier tests' leftovers don't matter.
    sizing = dict(gpu_memory_utilization=0.3) if backend == "torch" else dict(num_kv_blocks=2048)
    llm = LLM(model_dir, dtype="bfloat16", device="cuda", max_num_batched_tokens=64, attention_backend=backend,
              enforce_eager=eager, max_cuda_graph_batch_size=16, **sizing)
    assert llm.engine.attn_backend.name == backend
    assert llm.engine.device.type == "cuda" and llm.engine.num_blocks > 0
    graphs = llm.engine.runner.graphs
    assert (graphs is None) == (eager or backend == "torch")
    outs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens],
                        use_tqdm=False)
    if graphs is not None:
        assert graphs.num_replays > 0
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    matched = total = 0
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt + out.outputs[0].token_ids], device="cuda")
        # HF's bf16 final hidden states through its LM head in fp32: bf16 logits themselves are
        # rounded to 1/16 near 8, far coarser than the near-tie bound.
        hidden = hf(ids, output_hidden_states=True).hidden_states[-1][0, len(prompt) - 1 : -1].float()
        logits = hidden @ hf.lm_head.weight.float().t()
        hf_top2 = logits.topk(2, dim=-1)
        for step, token in enumerate(out.outputs[0].token_ids):
            total += 1
            if token == int(hf_top2.indices[step, 0]):
                matched += 1
            else:  # a mismatch must be a near-tie under HF's own logits
                gap = float(hf_top2.values[step, 0] - logits[step, token])
                assert gap < NEAR_TIE, (step, gap)
    assert matched / total >= 0.95, matched / total
    m = llm.get_metrics()
    assert m["kv_blocks_free"] == m["kv_blocks_total"]
    del llm, hf
    torch.cuda.empty_cache()
