"""kernels/attention/split_backend.py: eager steps go to one backend, CUDA-graph decode steps to the
other, whichever layer asks; the pair is named and warmed up as one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raylight.kernels.attention import AttentionSpec, CommonAttentionMetadata, get_attention_backend
from raylight.kernels.attention.split_backend import SplitAttentionBackend


class FakeBackend:
    supports_cuda_graphs = True

    def __init__(self, name):
        self.name, self.calls = name, []

    def warmup(self, kv_cache):
        self.calls.append("warmup")

    def build(self, common):
        self.calls.append("build")
        return ("eager-meta", self.name)

    def make_graph_metadata(self, batch_size, max_blocks):
        self.calls.append(("make", batch_size, max_blocks))
        return {"bs": batch_size, "filled": None}

    def fill_graph_metadata(self, meta, common):
        self.calls.append("fill")
        meta["filled"] = common

    def forward(self, q, k, v, kv_cache, meta, scale, out=None):
        self.calls.append(("forward", meta))
        value = {"eager": 1.0, "graph": 2.0, "long": 3.0}[self.name]
        return torch.full_like(q, value) if out is None else out.fill_(value)


def test_eager_and_graph_steps_go_to_their_backends():
    eager, graph = FakeBackend("eager"), FakeBackend("graph")
    split = SplitAttentionBackend(eager, graph)
    assert split.name == "eager+graph" and split.supports_cuda_graphs
    split.warmup(None)
    assert eager.calls == graph.calls == ["warmup"]
    q = torch.zeros(3, 2, 4)
    meta = split.build("common")
    assert (split.forward(q, q, q, None, meta, 1.0) == 1.0).all()
    gmeta = split.make_graph_metadata(8, 5)
    split.fill_graph_metadata(gmeta, "padded")
    assert (split.forward(q, q, q, None, gmeta, 1.0) == 2.0).all()
    assert eager.calls[1:] == ["build", ("forward", ("eager-meta", "eager"))]
    assert graph.calls[1:] == [("make", 8, 5), "fill", ("forward", {"bs": 8, "filled": "padded"})]


def test_graph_side_must_support_cuda_graphs():
    no_graphs = FakeBackend("plain")
    no_graphs.supports_cuda_graphs = False
    with pytest.raises(ValueError, match="CUDA graphs"):
        SplitAttentionBackend(FakeBackend("eager"), no_graphs)


def test_flashinfer_plus_triton_needs_a_gpu():
    spec = AttentionSpec(16, 4, 2, 64, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="flashinfer"):
        get_attention_backend("flashinfer+triton", spec)


def _step(num_decodes: int, seq_lens: list[int]) -> CommonAttentionMetadata:
    return CommonAttentionMetadata(num_decodes, np.zeros(len(seq_lens) + 1), np.array(seq_lens),
                                   np.zeros((len(seq_lens), 1)), torch.zeros(0))


def test_long_context_prefill_steps_go_to_the_long_backend():
    eager, long = FakeBackend("eager"), FakeBackend("long")
    split = SplitAttentionBackend(eager, eager, long=long, long_min_context=1000)
    assert split.name == "eager+long-long"
    split.warmup(None)
    assert eager.calls == ["warmup"] and long.calls == ["warmup"]  # one backend in two roles warms up once
    q = torch.zeros(3, 2, 4)
    # Decode rows never count, however long their context; a prefill row from the threshold does.
    for step, want in [(_step(2, [5000, 9000]), 1.0), (_step(1, [5000, 999]), 1.0), (_step(1, [10, 1000]), 3.0),
                       (_step(0, [10, 20, 4000]), 3.0), (_step(3, [4000, 4000, 4000]), 1.0)]:
        assert (split.forward(q, q, q, None, split.build(step), 1.0) == want).all(), step.seq_lens
    gmeta = split.make_graph_metadata(4, 2)  # CUDA-graph decode steps stay with the graph backend
    assert (split.forward(q, q, q, None, gmeta, 1.0) == 1.0).all()
