"""The host side of piecewise CUDA graphs: the token counts captured, where a forward splits, which
steps the model runner hands them, and which engines get them. (Capture and replay against the eager
forward run in tests/gpu/test_piecewise_gpu.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylight import LLM, SamplingParams
from raylight.config import EngineArgs
from raylight.kernels.attention import CommonAttentionMetadata
from raylight.defaults import DEFAULT_PIECEWISE_GRAPH_TOKENS
from raylight.testing.helpers import make_random_hf_model, random_prompts
from raylight.workers.piecewise_graphs import PiecewiseGraphRunner, _attention_swapped, _Splitter, piecewise_sizes
from raylight.workers.worker import piecewise_graph_tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("piecewise") / "llama")
    make_random_hf_model("llama", path)
    return path


def test_sizes_pad_by_at_most_a_quarter_from_128_on():
    sizes = piecewise_sizes(4096)
    assert sizes[:12] == [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256] and sizes[-1] == 4096
    assert sizes == sorted(set(sizes))
    for n in range(1, 4097):
        padded = next(s for s in sizes if s >= n)
        assert padded - n <= max(15, n // 4), n
    assert piecewise_sizes(100) == [16, 32, 48, 64, 80, 96, 100]  # the budget itself is always a size
    assert piecewise_sizes(16) == [16] and piecewise_sizes(5) == [5]


class _Recorder:
    """Wraps a backend and keeps each layer's attention output, as the eager forward computed it."""

    def __init__(self, backend):
        self.backend, self.outputs = backend, []

    def forward(self, q, k, v, kv_cache, meta, scale, out=None):
        o = self.backend.forward(q, k, v, kv_cache, meta, scale, out=out)
        self.outputs.append(o.clone())
        return o


class _Replayer(_Splitter):
    """A splitter whose buffer holds, at each split, what attention produced there: what replay does."""

    def __init__(self, out, outputs):
        super().__init__(out, pool=None, stand_in_caches=[])
        self.outputs = list(outputs)

    def forward(self, q, k, v, kv_cache, meta, scale, out=None):
        o = self.outputs.pop(0)
        self.out[: len(o)] = o
        self.out[len(o):].normal_()  # padding rows: any values
        return super().forward(q, k, v, kv_cache, meta, scale)


@torch.inference_mode()
def test_a_forward_splits_at_every_attention_call_and_only_there(model_dir):
    """Everything the model computes after a layer's attention reaches it through the returned buffer:
    with each split's buffer holding the eager attention output, the forward's output is the eager one."""
    llm = LLM(model_dir, device="cpu", max_num_batched_tokens=64, kv_cache_memory=2**22, enforce_eager=True)
    eng = llm.engine
    ids = torch.randint(0, 100, (23,))
    pos = torch.arange(23)
    common = CommonAttentionMetadata(num_decodes=0, query_start_loc=np.array([0, 23]), seq_lens=np.array([23]),
                                     block_tables=np.array([[0, 1]]), slot_mapping=torch.arange(23))
    recorder = _Recorder(eng.attn_backend)
    with _attention_swapped(eng.model, eng.attn_backend, recorder) as n:
        want = eng.model(ids, pos, eng.kv_caches, eng.attn_backend.build(common))
    assert n == len(eng.kv_caches) == len(recorder.outputs)
    spec = recorder.outputs[0]
    buffer = torch.zeros(32, *spec.shape[1:], dtype=spec.dtype)
    replayer = _Replayer(buffer, recorder.outputs)
    with _attention_swapped(eng.model, eng.attn_backend, replayer):
        got = eng.model(ids, pos, eng.kv_caches, None)
    assert not replayer.outputs
    torch.testing.assert_close(got, want)
    # The swap is undone, also when the forward raises.
    assert all(m.attn is eng.attn_backend for m in eng.model.modules() if hasattr(m, "attn"))
    with pytest.raises(RuntimeError):
        with _attention_swapped(eng.model, eng.attn_backend, None):
            raise RuntimeError
    assert all(m.attn is eng.attn_backend for m in eng.model.modules() if hasattr(m, "attn"))


class _EagerPieces:
    """Stands in for a captured PiecewiseGraphRunner: runs the model eagerly, counting its steps."""

    def __init__(self, eng, max_tokens):
        self.eng, self.max_tokens, self.tokens = eng, max_tokens, []

    def can_run(self, num_tokens):
        return num_tokens <= self.max_tokens

    def run(self, ids, positions, meta):
        self.tokens.append(len(ids))
        return self.eng.model(ids, positions, self.eng.kv_caches, meta)


def test_the_runner_hands_steps_up_to_the_size_to_the_pieces(model_dir):
    args = dict(device="cpu", max_num_batched_tokens=64, kv_cache_memory=2**22, seed=0)
    prompts = random_prompts(6, 100, 5, 150, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    plain = LLM(model_dir, **args)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    llm = LLM(model_dir, **args)
    assert llm.engine.runner.piecewise is None  # CPU: no graphs
    pieces = llm.engine.runner.piecewise = _EagerPieces(llm.engine, 40)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert pieces.tokens and max(pieces.tokens) <= 40
    assert llm.get_metrics()["num_steps"] > len(pieces.tokens)  # the larger steps ran as before


def test_which_engines_get_piecewise_graphs():
    dense = torch.nn.Linear(1, 1)
    moe = torch.nn.Linear(1, 1)
    moe.moe_blocks = [object()]
    args = EngineArgs(model="m", max_num_batched_tokens=8192)
    assert piecewise_graph_tokens(args, dense) == DEFAULT_PIECEWISE_GRAPH_TOKENS
    assert piecewise_graph_tokens(args.model_copy(update=dict(max_num_batched_tokens=512)), dense) == 512
    assert piecewise_graph_tokens(args.model_copy(update=dict(max_piecewise_graph_tokens=0)), dense) == 0
    assert piecewise_graph_tokens(args.model_copy(update=dict(max_piecewise_graph_tokens=1024)), dense) == 1024
    assert piecewise_graph_tokens(args, moe) == 0


def test_nothing_runs_before_capture_and_release_frees_every_graph():
    runner = PiecewiseGraphRunner(model=None, backend=None, num_layers=3, max_tokens=64, num_heads=2, head_dim=4,
                                  dtype=torch.float32, device=torch.device("cpu"))
    assert runner.sizes == [16, 32, 48, 64] and not runner.can_run(1)
    assert runner.attn_out.shape == (64, 2, 4)
    # One stand-in cache per layer for the capture (distinct objects: a call is matched to its layer by
    # identity); the real caches come later, exactly one per layer.
    assert len(runner.stand_in_caches) == 3 and len({id(c) for c in runner.stand_in_caches}) == 3
    with pytest.raises(ValueError, match="2 KV caches for 3 layers"):
        runner.bind_kv_caches([torch.zeros(1)] * 2)
    runner.bind_kv_caches([torch.zeros(1)] * 3)
    assert not runner.can_run(1)  # bound but not captured


def test_where_unowned_views_cannot_be_made_the_capture_keeps_the_inputs_alive(caplog):
    # On this CPU build torch cannot wrap a raw CUDA pointer: the splitter keeps the tensors themselves
    # (the old behaviour: same results, a larger pool), says so once, and stops trying.
    splitter = _Splitter(torch.zeros(4, 2), pool=None, stand_in_caches=[])
    q, k = torch.randn(4, 2), torch.randn(4, 1)
    with caplog.at_level("WARNING"):
        kept = splitter._keep(q, k)
        again = splitter._keep(k, q)
    assert kept[0] is q and kept[1] is k and again[0] is k and again[1] is q
    assert splitter.unowned is False
    assert sum("attention inputs alive" in r.message for r in caplog.records) == 1
