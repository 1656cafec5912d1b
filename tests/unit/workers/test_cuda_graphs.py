"""The host side of CUDA-graph decode: which batch sizes are captured and how a step is padded.
(Capture and replay themselves run in tests/gpu/test_engine_gpu.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from raylight.workers.cuda_graphs import CudaGraphRunner, _Graph, capture_sizes


def test_capture_sizes_cover_every_batch_with_little_padding():
    sizes = capture_sizes(256)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 256
    for n in range(1, 257):
        padded = next(s for s in sizes if s >= n)
        assert padded - n < 8
    assert capture_sizes(1) == [1]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]


def test_padding_rows_point_at_the_scratch_block():
    runner = CudaGraphRunner(model=None, backend=None, kv_caches=[], max_batch_size=8, max_blocks_per_seq=4,
                             scratch_block=99, block_size=16, device=torch.device("cpu"))
    seq_lens = np.array([17, 3])
    tables = np.array([[5, 6], [7, 0]])
    slots = np.array([6 * 16 + 0, 7 * 16 + 2])
    common = runner._padded(seq_lens, tables, 4, slots)
    assert common.num_decodes == common.num_reqs == 4
    assert common.seq_lens.tolist() == [17, 3, 1, 1]
    assert common.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert common.block_tables[:2].tolist() == [[5, 6], [7, 0]]
    assert common.block_tables[2:, 0].tolist() == [99, 99]
    assert common.slot_mapping.tolist() == [96, 114, 99 * 16, 99 * 16]
    assert not runner.can_run(1, 1)  # nothing captured
    reset = []
    runner.graphs = {bs: _Graph(SimpleNamespace(reset=lambda bs=bs: reset.append(bs)), None, None)
                     for bs in runner.sizes}
    assert runner.can_run(8, 4) and not runner.can_run(9, 4) and not runner.can_run(8, 5)
    runner.release()  # every graph freed; steps run eagerly from then on
    assert sorted(reset) == runner.sizes and not runner.can_run(1, 1)
