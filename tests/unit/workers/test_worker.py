"""The worker's start-up helpers that run without a GPU: the KV budget profile's step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylight import LLM
from raylight.testing.helpers import make_random_hf_model
from raylight.workers.worker import profile_batch


@pytest.mark.parametrize("tokens,max_model_len,block_size", [
    (16384, 512, 16), (8192, 4096, 16), (2048, 8192, 16), (1000, 300, 16), (100, 7, 4), (5, 5, 16)])
def test_the_profile_step_fills_the_token_budget_with_prompts_no_longer_than_the_model_takes(
        tokens, max_model_len, block_size):
    common, positions, blocks = profile_batch(tokens, max_model_len, block_size, torch.device("cpu"))
    lens = common.seq_lens
    assert lens.sum() == tokens and lens.max() <= max_model_len and (lens > 0).all()
    assert len(lens) == -(-tokens // max_model_len)
    assert list(common.query_start_loc) == [0, *np.cumsum(lens)]
    # each prompt's positions count from 0; every token writes its own slot, inside the blocks it owns
    for i, (a, b) in enumerate(zip(common.query_start_loc[:-1], common.query_start_loc[1:])):
        assert positions[a:b].tolist() == list(range(b - a))
        owned = {int(blk) * block_size + j for blk in common.block_tables[i] for j in range(block_size)}
        assert set(common.slot_mapping[a:b].tolist()) <= owned
    slots = common.slot_mapping.tolist()
    assert len(set(slots)) == tokens and max(slots) < blocks * block_size
    assert common.block_tables.size == blocks and len(np.unique(common.block_tables)) == blocks


@torch.inference_mode()
def test_the_profile_step_runs_as_the_prompts_would_alone(tmp_path):
    # The profile's forward over several prompts in one step: each prompt's last hidden state is the one
    # it gets in a step of its own (the prompts attend only to themselves).
    path = str(tmp_path / "llama")
    make_random_hf_model("llama", path)
    llm = LLM(path, device="cpu", dtype="float32", max_num_batched_tokens=64, kv_cache_memory=2**22,
              enforce_eager=True)
    eng = llm.engine
    bs = eng.args.block_size
    common, positions, blocks = profile_batch(50, 20, bs, torch.device("cpu"))
    ids = torch.randint(0, 100, (50,), generator=torch.Generator().manual_seed(0))
    caches = [torch.zeros(eng.model.kv_cache_shape(blocks, bs)) for _ in eng.kv_caches]
    out = eng.model(ids, positions, caches, eng.attn_backend.build(common))
    for a, b in zip(common.query_start_loc[:-1], common.query_start_loc[1:]):
        one, pos, nb = profile_batch(int(b - a), 20, bs, torch.device("cpu"))
        alone = eng.model(ids[a:b], pos, [torch.zeros(eng.model.kv_cache_shape(nb, bs)) for _ in eng.kv_caches],
                          eng.attn_backend.build(one))
        torch.testing.assert_close(out[b - 1], alone[-1], rtol=1e-4, atol=1e-5)
