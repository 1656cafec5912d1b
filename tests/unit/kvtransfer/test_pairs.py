"""kvtransfer/pairs.py's device rules: every tensor of the wire format lives on the pair's device (NCCL
takes CUDA tensors only, the header too), and on CPU the stream and send-deadline helpers change
nothing (gloo's sends are done when they return)."""

from __future__ import annotations

import threading

import torch

from raylight.kvtransfer import pairs


def test_the_header_is_made_on_the_pairs_device():
    h = pairs.header(pairs.OP_END, 7, num_pairs=3, device=torch.device("meta"))
    assert h.device.type == "meta" and h.dtype == torch.int64 and h.shape == (pairs.HEADER_LEN,)
    assert pairs.header(pairs.OP_DATA, 7, 2, 0, 4, 5).tolist() == [pairs.OP_DATA, 7, 2, 0, 4, 5, 0, 0]


def test_on_cpu_the_pair_stream_and_the_send_deadline_are_no_ops():
    with pairs.pair_stream(torch.device("cpu")):
        pairs.wait_sent(torch.device("cpu"), timeout_s=0.0)


def test_a_gloo_pair_carries_header_ids_and_kv_in_order():
    server = pairs.host_store("127.0.0.1")
    got = {}

    def receiver():  # a store client of its own, as the endpoint's receiver threads have
        group = pairs.new_pair_group(pairs.connect_store("127.0.0.1", server.port), "t", 1, torch.device("cpu"))
        head = pairs.recv_header(group, torch.zeros(pairs.HEADER_LEN, dtype=torch.int64))
        ids = torch.empty(head[5], dtype=torch.int64)
        pairs.recv(group, ids)
        data = torch.empty(head[5], 2, 4, dtype=torch.bfloat16)
        pairs.recv(group, data)
        got.update(head=head, ids=ids.tolist(), data=data)

    t = threading.Thread(target=receiver)
    t.start()
    group = pairs.new_pair_group(pairs.connect_store("127.0.0.1", server.port), "t", 0, torch.device("cpu"))
    data = torch.randn(3, 2, 4).to(torch.bfloat16)
    pairs.send(group, pairs.header(pairs.OP_DATA, 11, 1, 0, 2, 3))
    pairs.send(group, torch.tensor([5, 9, 2]))
    pairs.send(group, data)
    pairs.wait_sent(torch.device("cpu"), 1.0)
    t.join(timeout=30)
    assert got["head"][:6] == [pairs.OP_DATA, 11, 1, 0, 2, 3] and got["ids"] == [5, 9, 2]
    assert torch.equal(got["data"], data)
