"""The CUDA IPC transport's host logic, on CPU: handle fields survive JSON (hex, never pickle), a
described tensor is rebuilt over its storage, node/process checks decide when IPC may run, the
block copy (runs and gather/scatter, partial heads) writes what it should, and the whole push
(routing, per-layer copies, the completion thread's store bookkeeping) through two engines in one
process with the same-process path opened to CPU tensors (cuda_ipc.ALLOW_CPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from raylight.kvtransfer import cuda_ipc

# What `_share_cuda_()` returns: (device, handle, size, offset, ref counter handle, ref counter
# offset, event handle, event sync required).
FAKE_SHARE = (0, bytes(range(64)), 1 << 30, 4096, b"/torch_1234_5678_0", 7, b"\x00\xffevent" * 8, True)


def test_share_fields_round_trip_through_json():
    enc = cuda_ipc.encode_share(FAKE_SHARE)
    text = json.dumps(enc)  # plain JSON: strings, ints, bools
    assert "\\x" not in text and isinstance(enc["handle"], str)
    dec = cuda_ipc.decode_share(json.loads(text))
    assert dec == FAKE_SHARE
    assert [type(v) for v in dec] == [int, bytes, int, int, bytes, int, bytes, bool]


def test_no_event_handle_and_another_device_index():
    share = FAKE_SHARE[:6] + (None, False)
    dec = cuda_ipc.decode_share(json.loads(json.dumps(cuda_ipc.encode_share(share))), device_index=3)
    assert dec[0] == 3 and dec[6] is None and dec[7] is False and dec[1] == FAKE_SHARE[1]


def test_wrong_tuple_length_is_refused():
    with pytest.raises(ValueError):
        cuda_ipc.encode_share(FAKE_SHARE[:7])


def test_view_rebuilds_the_tensor_over_its_storage():
    base = torch.arange(2 * 3 * 4 * 2 * 5, dtype=torch.float32).reshape(2, 3, 4, 2, 5)
    t = base[1:]  # a nonzero storage offset
    d = {"dtype": "float32", "shape": list(t.shape), "stride": list(t.stride()), "storage_offset": t.storage_offset()}
    v = cuda_ipc.view(t.untyped_storage(), json.loads(json.dumps(d)), torch.device("cpu"))
    assert torch.equal(v, t) and v.data_ptr() == t.data_ptr()
    v[0, 0, 0, 0, 0] = -1.0  # the same memory
    assert base[1, 0, 0, 0, 0] == -1.0


def test_node_id_names_host_and_boot():
    host, boot = cuda_ipc.node_id().split("/", 1)
    assert host and boot


def _info(**kw):
    return {"node": cuda_ipc.node_id(), "pid": os.getpid(), "token": "x", "device_uuid": None, "layers": [], **kw}


def test_open_refuses_another_node_and_cpu_and_missing_handles(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(cuda_ipc.Unavailable, match="another node"):
        cuda_ipc.open_caches(_info(node="elsewhere/boot"), cpu)
    with pytest.raises(cuda_ipc.Unavailable, match="not CUDA"):
        cuda_ipc.open_caches(_info(pid=os.getpid() + 1), cpu)
    with pytest.raises(cuda_ipc.Unavailable, match="gone"):
        cuda_ipc.open_caches(_info(token="never-published"), cpu)


def test_publish_writes_json_and_same_process_open_returns_the_tensors(monkeypatch):
    store = dist.HashStore()
    caches = [torch.zeros(4, 2, 2, 2, 3) for _ in range(2)]
    token = cuda_ipc.publish(store, 1, caches, torch.device("cpu"))
    info = json.loads(store.get("ipc/1"))
    assert info["token"] == token and info["pid"] == os.getpid() and info["layers"] == []
    with pytest.raises(cuda_ipc.Unavailable, match="not CUDA"):
        cuda_ipc.open_caches(info, torch.device("cpu"))
    monkeypatch.setattr(cuda_ipc, "ALLOW_CPU", True)
    got, how = cuda_ipc.open_caches(info, torch.device("cpu"))
    assert how == "same process" and all(a is b for a, b in zip(got, caches))
    cuda_ipc.unpublish(token)
    with pytest.raises(cuda_ipc.Unavailable):
        cuda_ipc.open_caches(info, torch.device("cpu"))


def test_runs():
    assert cuda_ipc.runs([3, 4, 5, 9], [10, 11, 12, 13]) == [(3, 10, 3), (9, 13, 1)]
    assert cuda_ipc.runs([1, 2], [5, 4]) == [(1, 5, 1), (2, 4, 1)]
    assert cuda_ipc.runs([], []) == []


@pytest.mark.parametrize("contiguous", [False, True])
def test_copy_blocks_writes_only_the_named_blocks_and_heads(contiguous):
    torch.manual_seed(0)
    src = torch.randn(10, 2, 4, 4, 3)  # [blocks, K/V, block_size, heads, dim]
    dst = torch.randn(12, 2, 4, 2, 3)
    before = dst.clone()
    s_ids, d_ids = ([2, 3, 4], [7, 8, 9]) if contiguous else ([5, 1, 8], [0, 11, 3])
    runs = cuda_ipc.runs(s_ids, d_ids)
    cuda_ipc.copy_blocks(dst, torch.tensor(d_ids), slice(0, 2), src, torch.tensor(s_ids), slice(2, 4),
                         runs if contiguous else None)
    expect = before.clone()
    expect[d_ids] = src[s_ids][:, :, :, 2:4]
    assert torch.equal(dst, expect)


# ---------------------------------------------------------------- the whole push, two engines, CPU

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from raylight.testing.helpers import make_random_hf_model

    path = str(tmp_path_factory.mktemp("llama-ipc"))
    make_random_hf_model("llama", path)
    return path


def _run(engine, ids, params, rid):
    engine.add_request(ids, params, rid)
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out = o
    return out.outputs[0].token_ids


@pytest.mark.parametrize("kv_transport", ["auto", "pairs"])
def test_engines_push_over_the_same_process_path(model_dir, monkeypatch, kv_transport):
    """'auto' takes the IPC path (here the same-process one); kv_transport='pairs' sends over pair groups
    (gloo here, NCCL on CUDA) although IPC would work: the same outputs either way."""
    from raylight.config import EngineArgs
    from raylight.engine.llm_engine import LLMEngine
    from raylight.sampling_params import SamplingParams
    from raylight.testing.helpers import random_prompts

    monkeypatch.setattr(cuda_ipc, "ALLOW_CPU", True)
    base = dict(model=model_dir, device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
                max_num_batched_tokens=16)
    plain = LLMEngine(EngineArgs(**base))
    pre = LLMEngine(EngineArgs(**base, kv_role="prefill", kv_transport=kv_transport))
    dec = LLMEngine(EngineArgs(**base, kv_role="decode", kv_lease_s=20))
    sp = SamplingParams(max_tokens=6, temperature=0)
    prompts = random_prompts(3, 500, 20, 40, seed=3)
    prompts.append(prompts[0][:24] + [7, 8, 9, 10, 11, 12, 13])  # decode side holds 24 tokens of it
    refs = [_run(plain, ids, sp, f"p{i}") for i, ids in enumerate(prompts)]
    # The first three at once (several pushes per prefill step), then the cached-prefix one.
    for batch in (range(3), range(3, 4)):
        reservations = {}
        for i in batch:
            res = dec.reserve_remote(prompts[i], sp, f"d{i}", None, threshold=1)
            assert not res.local, res.reason
            reservations[i] = res
            pre.add_request({"prompt_token_ids": prompts[i][:-1]}, SamplingParams(max_tokens=1, temperature=0),
                            f"x{i}", kv_push=res.push_target())
        if 3 in batch:
            assert reservations[3].num_cached_tokens == 24
        while pre.has_unfinished_requests():
            pre.step()
        got = {}
        while dec.has_unfinished_requests():
            for o in dec.step():
                if o.finished:
                    got[o.request_id] = o.outputs[0].token_ids
        for i in batch:
            assert got[f"d{i}"] == refs[i], i
    key = (reservations[3].host, reservations[3].port)
    assert pre.kv_sender.transports == {key: cuda_ipc.TRANSPORT if kv_transport == "auto" else "pairs"}
    m, d = pre.get_metrics(), dec.get_metrics()
    # A partly filled block goes again with the next chunk: the sender counts it each time.
    assert m["kv_pushes_failed"] == 0 and m["kv_bytes_sent"] >= d["kv_bytes_received"] > 0
    assert d["kv_remote_prefills"] == 4 and d["kv_handoff_failures"] == {}
    assert d["kv_blocks_free"] == d["kv_blocks_total"]
    assert pre.kv_sender.ipc.bytes_copied == (m["kv_bytes_sent"] if kv_transport == "auto" else 0)
