"""A sharded Llama-family model (TP=2, PP=2, TP=2 x PP=2 over gloo processes) generates the same
greedy tokens as the single-process model in float32, and each rank reads only its share of
the checkpoint."""

from __future__ import annotations

import pytest

from raylight.parallel.state import ParallelConfig, ParallelGroups
from raylight.testing import parallel_ranks as workers

from raylight.testing.helpers import SMOLLM2_PROMPTS, make_random_hf_model, random_prompts

MAX_NEW, BLOCK = 8, 4
LAYOUTS = {  # id: (tp, pp, layer split)
    "tp2": (2, 1, None),
    "pp2": (1, 2, None),
    "pp2-split1+3": (1, 2, (1, 3)),
    "tp2xpp2": (2, 2, None),
}
# kind, overrides: GQA with 2 KV heads (Qwen3, qk-norm); 1 KV head replicated over TP ranks and a vocab
# that does not divide by 2 (Llama, llama3 rope); tied embeddings split across PP stages.
RANDOM_MODELS = [
    ("qwen3", dict(num_hidden_layers=4)),
    ("llama", dict(num_hidden_layers=4, num_key_value_heads=1, vocab_size=509)),
    ("llama-tied", dict(num_hidden_layers=4, vocab_size=509)),
]


def _single_process(path: str, prompts: list[list[int]]):
    model, backend, read = workers.build_rank_model(path, ParallelGroups.single(), BLOCK)
    tokens = workers.greedy_generate(model, backend, ParallelGroups.single(), prompts, MAX_NEW, BLOCK)
    return tokens, {k: p.numel() for k, p in model.named_parameters()}, read


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    out = []
    for kind, overrides in RANDOM_MODELS:
        path = str(tmp_path_factory.mktemp(kind))
        make_random_hf_model(kind, path, **overrides)
        prompts = random_prompts(4, overrides.get("vocab_size", 512), 3, 20, seed=2)
        out.append((path, prompts, *_single_process(path, prompts)))
    return out


def _check_shards(ranks: list[dict], full_numel: dict[str, int], tp: int, pp: int, split, tied: bool):
    """Every rank holds (and read) about 1/tp of its stage's weights, and the stages cover the model."""
    num_layers = 1 + max(int(k.split(".")[2]) for k in full_numel if k.startswith("model.layers."))
    config = ParallelConfig(tp, pp, split)
    ranges = config.layer_ranges(num_layers)
    stage_names = []
    for stage in range(pp):
        stage_ranks = [ranks[config.global_rank(t, stage)] for t in range(tp)]
        names = set(stage_ranks[0]["numel"])
        assert all(set(r["numel"]) == names for r in stage_ranks)
        assert all(r["layers"] == ranges[stage] for r in stage_ranks)
        stage_names.append(names)
        # A tied head on a last stage that lacks the embedding is its own (sharded) copy of it.
        full = sum(full_numel["model.embed_tokens.weight" if n == "lm_head.weight" and tied else n] for n in names)
        for r in stage_ranks:
            local = sum(r["numel"].values())
            assert r["read_elements"] <= local  # narrowed before reading, never the whole tensor
            if tp == 1:
                assert local == full and r["read_elements"] == full
            else:  # norms and replicated KV heads are whole on every rank
                assert local <= 0.6 * full, (local, full)
    covered = set().union(*stage_names) - {"lm_head.weight"} if tied else set().union(*stage_names)
    assert covered == set(full_numel)
    if pp > 1:
        assert not stage_names[0] & stage_names[-1]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_random_models_match_single_process(random_models, layout):
    tp, pp, split = LAYOUTS[layout]
    jobs = [(path, prompts) for path, prompts, *_ in random_models]
    ranks = workers.run_ranks(workers.sharded_greedy, tp * pp, tp, pp, split, jobs, MAX_NEW, BLOCK)
    for m, (kind, _) in enumerate(RANDOM_MODELS):
        _, _, ref_tokens, full_numel, _ = random_models[m]
        per_rank = [r[m] for r in ranks]
        for r in per_rank:
            assert r["tokens"] == ref_tokens, (kind, layout)
        _check_shards(per_rank, full_numel, tp, pp, split, tied=kind == "llama-tied")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2xpp2"])
def test_smollm2_matches_single_process(smollm2_dir, layout):
    """SmolLM2's 3 KV heads split 2 + 1 over two TP ranks; its 30 layers 15 + 15 over two stages."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tok(p).input_ids for p in SMOLLM2_PROMPTS]
    ref, full_numel, _ = _smollm2_reference(smollm2_dir, prompts)
    tp, pp, split = LAYOUTS[layout]
    ranks = workers.run_ranks(workers.sharded_greedy, tp * pp, tp, pp, split, [(smollm2_dir, prompts)],
                              MAX_NEW, BLOCK, timeout_s=240)
    for r in ranks:
        assert r[0]["tokens"] == ref, layout
    _check_shards([r[0] for r in ranks], full_numel, tp, pp, split, tied=True)


_SMOLLM2_REF: dict = {}


def _smollm2_reference(path, prompts):
    if path not in _SMOLLM2_REF:
        _SMOLLM2_REF[path] = _single_process(path, prompts)
    return _SMOLLM2_REF[path]


@pytest.mark.parametrize("layout", ["one", "pp2", "tp2xpp2"])
def test_decode_graphs_match_single_process(random_models, layout):
    """Decode steps through CudaGraphRunner (graphs that re-run their forward on CPU: the host side, with
    a PP stage's persistent (hidden, residual) inputs and its hand-offs around each replay) give the eager
    single-process model's tokens; three requests run padded to a captured batch of 4."""
    tp, pp, split = LAYOUTS.get(layout, (1, 1, None))
    path, prompts, *_ = random_models[0]
    prompts = prompts[:3]
    ref = _single_process(path, prompts)[0]
    if layout == "one":
        out = [workers.sharded_greedy(0, 1, 1, 1, None, [(path, prompts)], MAX_NEW, BLOCK, 4)]
    else:
        out = workers.run_ranks(workers.sharded_greedy, tp * pp, tp, pp, split, [(path, prompts)], MAX_NEW, BLOCK, 4)
    for r in out:
        assert r[0]["tokens"] == ref, layout
