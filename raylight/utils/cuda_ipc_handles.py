"""CUDA IPC handles as plain JSON-safe fields, never pickled: what `UntypedStorage._share_cuda_()`
returns (bytes as hex) and how a tensor views its storage. Used where processes of one node map each
other's GPU memory: the disaggregated KV push (kvtransfer/cuda_ipc.py) and the custom all-reduce's
buffers (parallel/custom_allreduce.py)."""

from __future__ import annotations

from typing import Any, Optional

import torch

# `_share_cuda_()` returns (device, handle, size_bytes, offset_bytes, ref_counter_handle,
# ref_counter_offset, event_handle, event_sync_required); `_new_shared_cuda` takes the same.
_SHARE_FIELDS = ("device", "handle", "size_bytes", "offset_bytes", "ref_counter_handle", "ref_counter_offset",
                 "event_handle", "event_sync_required")
_BYTES_FIELDS = {"handle", "ref_counter_handle", "event_handle"}


def encode_share(share: tuple) -> dict[str, Any]:
    """`_share_cuda_()`'s tuple as JSON-safe fields: bytes as hex (None stays None)."""
    if len(share) != len(_SHARE_FIELDS):
        raise ValueError(f"_share_cuda_ returned {len(share)} fields, expected {len(_SHARE_FIELDS)}")
    out: dict[str, Any] = {}
    for name, value in zip(_SHARE_FIELDS, share):
        if name in _BYTES_FIELDS:
            out[name] = None if value is None else bytes(value).hex()
        elif name == "event_sync_required":
            out[name] = bool(value)
        else:
            out[name] = int(value)
    return out


def decode_share(d: dict[str, Any], device_index: Optional[int] = None) -> tuple:
    """The tuple `_new_shared_cuda` takes; `device_index`: the GPU's index in this process."""
    out = []
    for name in _SHARE_FIELDS:
        value = d[name]
        if name in _BYTES_FIELDS:
            value = None if value is None else bytes.fromhex(value)
        elif name == "event_sync_required":
            value = bool(value)
        elif name == "device" and device_index is not None:
            value = int(device_index)
        else:
            value = int(value)
        out.append(value)
    return tuple(out)


def describe(t: torch.Tensor) -> dict[str, Any]:
    """One KV cache tensor for a peer: its storage's IPC fields and how the tensor views it."""
    return {**encode_share(t.untyped_storage()._share_cuda_()), "dtype": str(t.dtype).replace("torch.", ""),
            "shape": list(t.shape), "stride": list(t.stride()), "storage_offset": int(t.storage_offset())}


def view(storage, d: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The tensor `describe` described, over `storage` (an UntypedStorage)."""
    t = torch.empty(0, dtype=getattr(torch, d["dtype"]), device=device)
    return t.set_(storage, d["storage_offset"], tuple(d["shape"]), tuple(d["stride"]))
