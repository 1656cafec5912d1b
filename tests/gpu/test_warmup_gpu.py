"""Start-up warm-up on a GPU (engine/warmup.py, the backends' `warmup`): once the engine is ready,
no request waits for a compiler. With the default kernel settings (PDL on, decided per launch from
the step's size) a batch-1 request, then many requests whose prefill chunks run beside many decodes
at several split-KV factors (the W1 pattern that once compiled four Triton variants inside its
first mixed steps on an H100) and finish at every batch size down to one (the LM head runs eagerly at
each step's rows: batch 32 once compiled its few-row variant live), build no Triton kernel and no
FlashInfer module. The small model's shapes all take the few-row kernel here (the committed table
lists the 8B shapes only)."""

from __future__ import annotations

import pytest
import torch

from raylight import LLM, SamplingParams
from raylight.kernels.pdl import PDL_MAX_TOKENS
from raylight.testing.helpers import random_prompts
from raylight.utils.kernel_builds import KernelBuilds

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["auto", "triton"])
@torch.inference_mode()
def test_no_kernel_is_built_after_the_engine_is_ready(gpu_llama_dir, backend, few_rows_everywhere):
    llm = LLM(gpu_llama_dir, dtype="bfloat16", device="cuda", attention_backend=backend, max_model_len=512,
              max_num_batched_tokens=1024, num_kv_blocks=8192)
    assert llm.engine.model.kernels.pdl  # the default
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, ignore_eos=True, seed=1)
    builds = KernelBuilds().start()
    try:
        llm.generate(random_prompts(1, 512, 300, 301, seed=1), greedy, use_tqdm=False)
        # 3 x PDL_MAX_TOKENS prompts of 100-450 tokens, 1,024-token budget: prefill chunks beside up to
        # 190 decodes, with contexts long enough to split; they start and so finish at different steps.
        many = random_prompts(3 * PDL_MAX_TOKENS - 2, 512, 100, 450, seed=2)
        outs = llm.generate(many, [greedy, sampled] * (len(many) // 2), use_tqdm=False)
        # Decode batches of every row tile, at row counts that are multiples of 16 and not.
        for n in (2, 15, 16, 17, 31, 32, 33, 48, 63, 64):
            llm.generate(random_prompts(n, 512, 40, 40, seed=n), greedy, use_tqdm=False)
    finally:
        got = builds.stop()
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    assert got["triton"] == 0, got["triton_kernels"]
    assert got["flashinfer"] == 0, got["flashinfer_modules"]
